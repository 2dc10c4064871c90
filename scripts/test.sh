#!/usr/bin/env bash
# The whole test suite: notebooks are the source (export leaves turbotalk/ unchanged), nbdev_test, then pytest (last).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PATH="$PWD/.venv/bin:$PATH" MPLBACKEND=Agg
if git rev-parse --git-dir >/dev/null 2>&1; then
  nbdev_export
  [ -z "$(git status --porcelain -- turbotalk)" ] || { git status --short -- turbotalk;
    echo 'FAIL: nbdev_export changed turbotalk/: edit the notebooks, export, commit both'; exit 1; }
  nbdev_clean >/dev/null 2>&1
  [ -z "$(git status --porcelain -- nbs)" ] || { git status --short -- nbs; echo 'FAIL: notebooks are not clean: run nbdev_clean'; exit 1; }
fi
echo '== nbdev_test'; nbdev_test --n_workers 2 && echo 'nbdev_test: all notebooks passed'
echo '== pytest'; python -m pytest -q tests "$@"
