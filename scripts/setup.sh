#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtual environment in .venv with the pinned packages.
# Never installs a CUDA torch on a machine without an NVIDIA GPU, never leaves a broken torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.turbotalk-setup
want=$(cat constraints.txt settings.ini setup.py scripts/setup.sh | sha256sum | cut -c1-16)
[ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && exit 0
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
exec 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)  # this machine's pip index config is noisy
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" -c constraints.txt torch==2.13.0                      # GPU machine: the CUDA build is wanted
else  # CPU machine: a local CPU wheel if there is one, else the CPU-wheel index named by TORCH_CPU_INDEX_URL; never PyPI's CUDA build
  if ! "${pip[@]}" --no-index --no-deps torch==2.13.0 2>/dev/null; then   # its dependencies come with the next step
    [ -n "${TORCH_CPU_INDEX_URL:-}" ] || { echo "no local torch 2.13.0 CPU wheel: set TORCH_CPU_INDEX_URL to an index of" \
      "PyTorch CPU wheels (PyPI's torch is the CUDA build, several GB)" >&2; exit 1; }
    "${pip[@]}" torch==2.13.0 --index-url "$TORCH_CPU_INDEX_URL" ${PIP_EXTRA_INDEX_URL:+--extra-index-url "$PIP_EXTRA_INDEX_URL"}
  fi
fi
"${pip[@]}" -c constraints.txt -e ".[dev]"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" -c constraints.txt torchvision==0.28.0 lpips==0.1.4   # LPIPS needs torchvision: GPU machines only
fi
.venv/bin/python - <<'PY'
import importlib.util, subprocess, sys, torch
gpu = subprocess.run(['sh', '-c', 'nvidia-smi -L'], capture_output=True).returncode == 0
assert gpu or torch.version.cuda is None, f'CUDA torch {torch.__version__} on a CPU machine: remove .venv and re-run'
if importlib.util.find_spec('torchvision'):
    try: import torchvision
    except Exception as e: sys.exit(f'torchvision is installed but cannot import ({e}); pip uninstall torchvision')
print(f'turbotalk set-up ok: torch {torch.__version__}, python {sys.version.split()[0]}')
PY
echo "$want" > "$stamp"
