#!/usr/bin/env bash
# Mutation testing of one core module against its own tests (mutmut 3).
#   bash scripts/mutation.sh MODULE [JOBS] [PATTERN ...]   e.g. bash scripts/mutation.sh diff
#   make mutation MODULE=diff
# MODULE: advantages, diff, losses, correct, steps, sampling (ibpo_lab/MODULE.py), or
# `sampler-token`: the sampler's token step only (sampling.py's _draw, keyed_uniform, _mix32,
# _mul32 and HFSampler._decode_chunk; the rest of sampling.py is engine plumbing: vLLM wake/sleep,
# cache compaction). PATTERNs (fnmatch on mutmut's names, e.g. 'ibpo_lab.correct.x_splice*')
# restrict the run and the score to the mutants they match. The run
# works in a scratch copy (.mutation/MODULE/: the package, that module's test files and a
# pyproject.toml whose [tool.mutmut] mutates only ibpo_lab/MODULE.py and selects only its
# tests), prints the score, and writes the surviving mutants with their diffs to
# .mutation/MODULE/survivors.txt. JOBS: parallel test processes (default 2; the box is shared).
set -euo pipefail
cd "$(dirname "$0")/.."
module="${1:?usage: scripts/mutation.sh MODULE [JOBS] [PATTERN ...]  (advantages, diff, losses, correct, steps, sampling, sampler-token)}"
jobs="${2:-${MUTATION_JOBS:-2}}"
shift $(( $# < 2 ? $# : 2 ))
patterns=("$@")
if [ "$module" = sampler-token ]; then
  module=sampling
  [ ${#patterns[@]} -gt 0 ] || patterns=(
    'ibpo_lab.sampling.x__draw__mutmut_*' 'ibpo_lab.sampling.x_keyed_uniform__mutmut_*'
    'ibpo_lab.sampling.x__mix32__mutmut_*' 'ibpo_lab.sampling.x__mul32__mutmut_*'
    'ibpo_lab.sampling.xǁHFSamplerǁ_decode_chunk__mutmut_*')
fi
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}"

# each module's own tests: the files that state its behaviour (fakes they import come along)
case "$module" in
  advantages) tests="tests/test_advantages.py" ;;
  diff)       tests="tests/test_diff.py" ;;
  losses)     tests="tests/test_losses.py" ;;
  correct)    tests="tests/test_correct.py tests/test_bpe.py" ;;
  steps)      tests="tests/test_steps.py tests/test_bpe.py" ;;
  sampling)   tests="tests/test_sampling.py" ;;
  *) echo "unknown module '$module' (use: advantages, diff, losses, correct, steps, sampling)" >&2; exit 2 ;;
esac
tests="$(for f in $tests; do if [ -f "$f" ]; then echo "$f"; fi; done | xargs)"  # test files not written yet
[ -n "$tests" ] || { echo "no test file for $module" >&2; exit 2; }
[ -f "ibpo_lab/$module.py" ] || { echo "ibpo_lab/$module.py does not exist" >&2; exit 2; }
"$PY" -c "import mutmut" 2>/dev/null || { echo "mutmut is not installed: pip install -e '.[dev]'" >&2; exit 2; }

work=".mutation/$module"
rm -rf "$work"
mkdir -p "$work/tests"
cp -r ibpo_lab "$work/"
find "$work/ibpo_lab" -name __pycache__ -prune -exec rm -rf {} +
for f in $tests tests/_*.py tests/conftest.py; do if [ -f "$f" ]; then cp "$f" "$work/tests/"; fi; done
# the repo's pyproject (pytest markers, filterwarnings) with [tool.mutmut] narrowed to this module
"$PY" - "$module" "$work" $tests <<'PYEOF'
import json, re, sys, tomllib
from pathlib import Path
module, work, tests = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
text = Path("pyproject.toml").read_text()
base = tomllib.loads(text).get("tool", {}).get("mutmut", {})
text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
conf = dict(base, only_mutate=[f"ibpo_lab/{module}.py"], pytest_add_cli_args_test_selection=tests)
if module == "sampling":  # its one slow test loads SmolLM2-135M (40 s a run); the tiny-policy tests cover the same code
    args = list(conf["pytest_add_cli_args"])
    args[args.index("not notebooks")] = "not notebooks and not slow"
    conf["pytest_add_cli_args"] = args
lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in conf.items()]
(work / "pyproject.toml").write_text(text.rstrip() + "\n" + "\n".join(lines) + "\n")
PYEOF

# tests that load the committed tiny policy read it from the checkout (it is not copied)
[ -d data/tiny-policy ] && export IBPO_TINY_POLICY="${IBPO_TINY_POLICY:-$PWD/data/tiny-policy}"
cd "$work"
# the scratch copy must be what the tests import: no PYTHONPATH pointing back at the checkout
unset PYTHONPATH
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
start=$(date +%s)
"$PY" -m mutmut run --max-children "$jobs" "${patterns[@]}" > run.log 2>&1 || { tail -40 run.log >&2; exit 1; }
"$PY" -m mutmut results --all true > results.txt 2>&1 || true
"$PY" - "$module" "$(( $(date +%s) - start ))" "${patterns[@]}" <<'PYEOF'
import fnmatch, re, subprocess, sys
from collections import Counter
module, secs, patterns = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = [l.strip().rsplit(": ", 1) for l in open("results.txt") if ": " in l]
if patterns:  # score only the mutants the patterns selected (the others were never run)
    rows = [(n, s) for n, s in rows if any(fnmatch.fnmatch(n, p) for p in patterns)]
status = Counter(s for _, s in rows)
total = sum(status.values())
killed = status.get("killed", 0) + status.get("caught by type check", 0)
survivors = [n for n, s in rows if s == "survived"]
try:  # one process for all diffs (`mutmut show NAME` per survivor takes seconds each)
    from mutmut.mutation.diff_apply import get_diff_for_mutant
except ImportError:
    get_diff_for_mutant = None
with open("survivors.txt", "w") as f:
    for name in survivors:
        if get_diff_for_mutant is not None:
            f.write(f"# {name}: survived\n{get_diff_for_mutant(name)}\n\n")
        else:
            f.write(subprocess.run([sys.executable, "-m", "mutmut", "show", name], capture_output=True, text=True).stdout + "\n")
score = 100.0 * killed / total if total else float("nan")
scope = f" ({len(patterns)} name patterns)" if patterns else ""
print(f"[mutation] ibpo_lab/{module}.py{scope}: {killed}/{total} mutants killed ({score:.1f}%) in {secs} s; "
      + ", ".join(f"{k}: {v}" for k, v in sorted(status.items())))
print(f"[mutation] survivors with diffs: .mutation/{module}/survivors.txt")
PYEOF
