#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): run it first whenever a GPU is lent, and put the
# summary it writes (gpu_check.md) into the issue's note. At most 8 minutes of device time.
#
#   here, once:     bash scripts/device_wheels.sh        (what the device's image lacks, into .whl/)
#   on the device:  bash benchmarks/gpu_check.sh          (device tool: carry [".whl"], timeout_s 540)
#   here and in CI: bash benchmarks/gpu_check.sh --dry-run (every stage on the CPU, small)
#
# Wheels in .whl/ are installed into a folder of their own and put on PYTHONPATH; a dry run uses
# the project's venv as it is. The summary goes to $OUT where that is set (the device tool's
# folder that comes back), else runs/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
if [ "$dry" = 0 ] && ! "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "evomerge: error: gpu_check: no CUDA device here (use --dry-run for the CPU)" >&2
    exit 2
fi
if [ "$dry" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    site=${TMPDIR:-/tmp}/evomerge-site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "gpu_check: the carried wheels in .whl/ did not install" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec timeout 480 "$py" benchmarks/gpu_check.py "$@"
