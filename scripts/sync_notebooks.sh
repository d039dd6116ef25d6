#!/usr/bin/env bash
# Keep every notebook pair in step: notebooks/NN_name.py (jupytext py:percent, the file to edit
# and review) and notebooks/NN_name.ipynb (committed without outputs).
#   bash scripts/sync_notebooks.sh          # sync: the newer file of each pair wins
#   bash scripts/sync_notebooks.sh --check  # exit 1 if a pair differs (what tests/test_notebooks.py checks)
set -euo pipefail
cd "$(dirname "$0")/.."
JUPYTEXT="${JUPYTEXT:-.venv/bin/jupytext}"
[ -x "$JUPYTEXT" ] || JUPYTEXT=jupytext
if [ "${1:-}" = "--check" ]; then
  exec .venv/bin/python -m pytest -q tests/test_notebooks.py -m "not notebooks"
fi
for py in notebooks/[0-9][0-9]_*.py; do
  nb="${py%.py}.ipynb"
  if [ ! -f "$nb" ]; then
    "$JUPYTEXT" --set-formats ipynb,py:percent "$py" >/dev/null
  fi
  "$JUPYTEXT" --sync "$py" >/dev/null
done
# outputs never go into git: strip them from every paired notebook
.venv/bin/python - <<'PY'
import glob, nbformat
for path in sorted(glob.glob("notebooks/[0-9][0-9]_*.ipynb")):
    nb = nbformat.read(path, as_version=4)
    dirty = False
    for c in nb.cells:
        if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None):
            c.outputs, c.execution_count, dirty = [], None, True
    if dirty:
        nbformat.write(nb, path)
PY
echo "notebooks in sync: $(ls notebooks/[0-9][0-9]_*.ipynb | wc -l) pairs"
