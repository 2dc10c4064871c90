#!/usr/bin/env bash
# README.md is generated from nbs/index.ipynb (quarto is not installable here, so no nbdev_readme).
# The notebook links runs as ../papermill_runs/... (relative to nbs/, so they resolve in JupyterLab);
# README.md sits at the root, so its links drop the ../
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/jupyter nbconvert --to markdown --log-level WARN nbs/index.ipynb --output-dir . --output README
sed -i 's#](\.\./papermill_runs/#](papermill_runs/#g; s#`\.\./papermill_runs/#`papermill_runs/#g; s#src="\.\./papermill_runs/#src="papermill_runs/#g' README.md
