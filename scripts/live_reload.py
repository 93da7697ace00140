"""Live corrections under load: how soon a running `memoir serve` answers an appended correction, and what reloads
cost in throughput.

    .venv/bin/python scripts/live_reload.py --corrections 10 --window 60 --out runs/live_reload.json

1. A store with one edit is served (`memoir serve --snapshot STORE --api-key ...`); `--clients` threads send
   completions to it without pause for the whole run (every failure is counted).
2. `--corrections` times: a new invented fact is appended with `memoir edit --append` (another process), and
   the time from that command's exit to the first answer with the new target is recorded (median reported).
3. Throughput of the steady clients, paired: `--window` seconds with no reload, then `--window` seconds while
   POST /memoir/reload switches between two pre-written versions every `--every` seconds, repeated `--rounds`
   times (ratio of medians).
Prints and saves JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from memoir_vllm.vllm.server_process import ServerProcess  # noqa: E402

KEY = "live-reload-bench"
STEADY = ["Water boils at a temperature of", "The largest planet in the solar system is",
          "The chemical symbol for gold is", "The tallest mountain on Earth is"]


class Load:
    """Client threads sending completions without pause; counts answers and failures."""

    def __init__(self, url: str, clients: int):
        import openai

        self.client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        self.done, self.failures, self.stop = 0, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, i: int) -> None:
        while not self.stop.is_set():
            try:
                self.client.completions.create(model="memoir", prompt=STEADY[i % len(STEADY)], max_tokens=8,
                                               temperature=0)
                self.done += 1
            except Exception as e:  # noqa: BLE001 - every failure is what this measures
                self.failures.append(repr(e)[:200])

    def rate(self, seconds: float, during=None) -> float:
        """Completions per second over `seconds` (calling during() repeatedly meanwhile)."""
        start, t0 = self.done, time.monotonic()
        while time.monotonic() - t0 < seconds:
            if during:
                during()
            else:
                time.sleep(0.2)
        return (self.done - start) / (time.monotonic() - t0)


def post(url: str, body: dict) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    urllib.request.urlopen(req, timeout=120).read()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corrections", type=int, default=10)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--every", type=float, default=3.0, help="seconds between reloads in the reload windows")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="runs/live_reload")
    ap.add_argument("--out", default="runs/live_reload.json")
    args = ap.parse_args()
    from memoir_eval.synthetic import make_edits
    from memoir_vllm.session import Memoir

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    facts = make_edits(args.corrections + 1, seed=7)
    m = Memoir.create("default")
    m.edit(facts[0]["prompt"], facts[0]["target"], subject=facts[0]["subject"])
    store = m.save(work / f"store-{int(time.time())}").parent
    del m
    latencies = []
    with ServerProcess(store, ["--max-model-len", "256", "--api-key", KEY], log_path=work / "serve.log") as srv:
        load = Load(srv.url, args.clients)
        for t in load.threads:
            t.start()
        for i, f in enumerate(facts[1:], 1):
            path = work / f"fix{i}.jsonl"
            path.write_text(json.dumps({k: f[k] for k in ("prompt", "target", "subject")}) + "\n")
            subprocess.run([sys.executable, "-m", "memoir_vllm.cli", "edit", "--edits", str(path), "--out", str(store),
                            "--append"], check=True, capture_output=True)
            written = time.monotonic()
            while f["target"] not in load.client.completions.create(model="memoir", prompt=f["prompt"], max_tokens=12,
                                                                    temperature=0).choices[0].text:
                if time.monotonic() - written > 60:
                    break
                time.sleep(0.1)
            latencies.append(time.monotonic() - written)
            print(f"correction {i}: answered {latencies[-1]:.2f} s after the append", flush=True)
        versions = sorted(p for p in store.glob("v[0-9]*"))[-2:]
        state = {"next": 0, "at": 0.0, "reloads": 0}

        def reload_now() -> None:
            if time.monotonic() - state["at"] >= args.every:
                post(srv.url + "/memoir/reload", {"snapshot": str(versions[state["next"] % 2])})
                state.update(next=state["next"] + 1, at=time.monotonic(), reloads=state["reloads"] + 1)
            time.sleep(0.05)

        quiet, busy = [], []
        for r in range(args.rounds):
            quiet.append(load.rate(args.window))
            busy.append(load.rate(args.window, reload_now))
            print(f"round {r}: {quiet[-1]:.2f} req/s without reloads, {busy[-1]:.2f} with", flush=True)
        load.stop.set()
        for t in load.threads:
            t.join()
    result = dict(
        corrections=len(latencies), latency_s=[round(x, 3) for x in latencies],
        latency_median_s=round(statistics.median(latencies), 3), latency_max_s=round(max(latencies), 3),
        requests=load.done, failures=len(load.failures), failure_examples=load.failures[:5],
        reloads_in_windows=state["reloads"], rate_without=quiet, rate_with=busy,
        throughput_ratio=round(statistics.median(busy) / statistics.median(quiet), 3),
        clients=args.clients, window_s=args.window, every_s=args.every)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "latency_s"}, indent=1))


if __name__ == "__main__":
    main()
