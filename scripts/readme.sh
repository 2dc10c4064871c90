#!/usr/bin/env bash
# README.md is generated from nbs/index.ipynb (quarto is not installable here, so no nbdev_readme).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/jupyter nbconvert --to markdown --log-level WARN nbs/index.ipynb --output-dir . --output README
