#!/usr/bin/env bash
# Run the test suite: sets up .venv if needed (scripts/setup.sh), then pytest on 2 threads.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not vllm" -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} MEMOIR_TEST_THREADS=${MEMOIR_TEST_THREADS:-2}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
[ "$rc" -eq 5 ] && { echo "pytest collected no tests"; exit 1; }
exit "$rc"
