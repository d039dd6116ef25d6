#!/usr/bin/env bash
# The GPU check on a borrowed GPU machine, in one command (issue 15).
#
# The machine: Python 3.12, torch (CUDA), transformers, accelerate, numpy, pandas, pyarrow, pyyaml,
# tqdm; no internet, no pip index, no vLLM/scipy/papermill. The repository arrives as a source tree
# (no pip install); wheels it lacks travel in the git-ignored .whl/ folder (rapidfuzz, which
# ibpo_lab.diff imports; make it here with
#   python3 -m pip download rapidfuzz --only-binary=:all: --no-deps --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 -d .whl
# ). From a session with a device, the `run` tool call is:
#   command:   bash scripts/gpu_check.sh
#   carry:     [".whl"]
#   timeout_s: 560
# It writes $OUT/gpu_check.json (comes back with the call) and prints a summary; commit the JSON as
# benchmarks/results/gpu/gpu_check_<commit>.json (the commit it ran at is inside, "commit").
#
# Usage: bash scripts/gpu_check.sh [extra gpu_check args, e.g. --small]
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg PYTHONUNBUFFERED=1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"

shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]})); then
    if PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/site "${wheels[@]}"; then
        :
    else  # no pip: a wheel is a zip of its installed files
        echo "pip install failed; unpacking the wheels into /tmp/site" >&2
        for w in "${wheels[@]}"; do python3 -m zipfile -e "$w" /tmp/site; done
    fi
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
else
    echo "no .whl/*.whl carried (pass carry [\".whl\"]): rapidfuzz must already be installed" >&2
fi

python3 - <<'PY'
import importlib.util, sys
print("python", sys.version.split()[0])
for m in ("torch", "transformers", "accelerate", "numpy", "pandas", "pyarrow", "yaml", "tqdm", "rapidfuzz", "scipy", "vllm"):
    print(f"  {m}: {'yes' if importlib.util.find_spec(m) else 'NO'}")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

timeout 540 python3 -m ibpo_lab.gpu_check --out "$OUT" "$@"
rc=$?
[ "$rc" = 124 ] && echo "gpu_check: timed out after 540 s; the JSON holds the sections that finished" >&2

python3 - "$OUT/gpu_check.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"no gpu_check.json: {e}")
short = {"ok": r.get("ok"), "failed": r.get("failed"), "commit": r.get("commit"), "device": r.get("device"),
         "torch": r.get("torch"), "torch_cuda": r.get("torch_cuda"), "seconds": r.get("seconds"),
         "env": {k: v for k, v in (r.get("env") or {}).items() if k != "traceback"}, "rates": r.get("rates")}
mem = r.get("mem_1p5b") or {}
short["mem_1p5b"] = {k: v for k, v in mem.items() if k != "traceback"}
s = r.get("sampler_vs_trainer_logprobs") or {}
short["sampler_vs_trainer"] = {k: (v if not isinstance(v, dict) else {x: v.get(x) for x in ("max_abs", "mean_abs", "ok")}) for k, v in s.items()}
short["hf_sampler_1p5b"] = r.get("hf_sampler_1p5b")
short["errors"] = {k: v.get("error") for k, v in r.items() if isinstance(v, dict) and v.get("error")}
print(json.dumps(short, indent=1, default=str))
PY
exit "$rc"
