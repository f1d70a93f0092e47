#!/usr/bin/env bash
# The wheels evomerge needs on the lent GPU machine beyond what its image holds (Python 3.12,
# torch, transformers, tokenizers, safetensors, matplotlib and pytest are there; nothing can be
# fetched there), at the versions this project's venv runs, into .whl/ (git-ignored), for
# benchmarks/gpu_check.sh. Carry .whl with the device tool's run (carry: [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PY:-.venv/bin/python}
pkgs=$("$py" -c 'from importlib.metadata import version
names = ["optuna", "cma", "cmaes", "sqlalchemy", "alembic", "mako", "colorlog", "pydantic", "pydantic-core",
         "annotated-types", "typing-inspection", "typing-extensions", "pyyaml"]
print(" ".join(f"{n}=={version(n)}" for n in names))')
rm -rf .whl
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pkgs
du -sh .whl
