"""Runs one real vLLM engine in a fresh process for tests/test_vllm_serving.py.

    python tests/vllm_driver.py SPEC.json OUT.json

SPEC: {"engine": {LLM kwargs}, "env": {...}, "steps": [{"op": "generate", "prompts": [...],
"max_tokens": [...], "memoir": [true|false, ...]} | {"op": "rpc", "method": ..., "args": [...]} |
{"op": "reset_prefix_cache"}]}. OUT: one result per step (token ids per request, or the rpc result).
"""
from __future__ import annotations

import json
import os
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    os.environ.update(spec.get("env", {}))
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**spec["engine"])
    results: list = [{"init_s": time.perf_counter() - t0}]
    for step in spec["steps"]:
        if step["op"] == "generate":
            n = len(step["prompts"])
            params = [
                SamplingParams(temperature=0.0, max_tokens=step["max_tokens"][i],
                               extra_args=None if step.get("memoir", [True] * n)[i] else {"memoir": False})
                for i in range(n)
            ]
            outs = llm.generate(step["prompts"], params, use_tqdm=False)
            results.append([list(o.outputs[0].token_ids) for o in outs])
        elif step["op"] == "rpc":
            results.append(llm.collective_rpc(step["method"], args=tuple(step.get("args", ()))))
        elif step["op"] == "reset_prefix_cache":
            results.append(llm.reset_prefix_cache())
        else:
            raise ValueError(f"unknown step {step['op']!r}")
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
