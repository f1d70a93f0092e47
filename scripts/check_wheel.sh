#!/usr/bin/env bash
# Builds the wheel, installs it (no extras, not editable) into a fresh virtual environment and,
# from a directory outside the checkout, runs what a new user runs first: `evomerge space` with a
# preset by name, a short search with a shipped suite by name, and `evomerge eval --backend lm-eval`.
# torch: an importable one (a GPU node's CUDA build) is shared into the venv; else the CPU build.
set -euo pipefail
PYTHON=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/evomerge-wheel.XXXXXX)
trap 'rm -rf "$work"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# from a copy of the tracked and unignored files: a stale build/ folder never reaches the wheel
mkdir "$work/src"
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 tar --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$work/src"
"$PYTHON" -m pip wheel -q --no-deps -w "$work/dist" "$work/src" 2>&1 | grep -v '^WARNING: Location' || true
wheel=$(ls "$work"/dist/evomerge-*.whl)
echo "wheel-check: built $(basename "$wheel")"
if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "$PYTHON" -m venv --system-site-packages "$work/venv"
else
  "$PYTHON" -m venv "$work/venv"
fi
pip=("$work/venv/bin/python" -m pip --disable-pip-version-check -q)
"$work/venv/bin/python" -c "import torch" >/dev/null 2>&1 || "${pip[@]}" install torch==2.13.0
"${pip[@]}" install "$wheel" 2>&1 | grep -v '^WARNING: Location' || true
em="$work/venv/bin/evomerge"
py="$work/venv/bin/python"

cd "$work"  # nothing of the checkout is reachable from here
"$py" -c "import evomerge, sys; assert '$repo' not in evomerge.__file__, evomerge.__file__; print('wheel-check: evomerge from', evomerge.__file__)"
"$py" - <<'PY'
from pathlib import Path
from evomerge.tiny import TinySpec, build_family
build_family(Path("family"), spec=TinySpec(hidden_size=64, num_attention_heads=2, num_key_value_heads=1))
PY
cat > run.yaml <<'YAML'
name: wheel-check
models:
  base: family/base
  experts: [family/expert_0, family/expert_1]
merge_method: ties
space: per_layer_per_module
fitness: {suite: zoo}
driver: {name: cma, popsize: 4}
budget: {max_candidates: 6}
seed: 0
YAML
"$em" space run.yaml | tail -n 3
"$em" search run.yaml --run-dir run | tail -n 3
"$em" status run --no-plots | sed -n 1,5p
"$em" export run exported --no-heldout | tail -n 1
"$em" eval exported/model --suite zoo --backend lm-eval --batch-size 8 | tail -n 3
# the data-flow preset by name: a short layer-path search over the same models, and its export
sed -e 's/^merge_method: ties$/merge_method: passthrough/' -e 's/^space: per_layer_per_module$/space: layer_path/' \
  -e 's/^name: wheel-check$/name: wheel-check-path/' run.yaml > path.yaml
"$em" search path.yaml --run-dir path-run | tail -n 1
"$em" export path-run path-exported --no-heldout | tail -n 1
grep -q "merge_method: passthrough" path-exported/recipe.yaml
echo "wheel-check: passed"
