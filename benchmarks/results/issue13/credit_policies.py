"""Credit AUC of IBPO with policy repairs, per policy: the benchmark's own credit_rows at its default sizes."""
import sys, time
import pandas as pd
from benchmarks import credit
from benchmarks.common import setup_env
from ibpo_lab.tasks import get_task

setup_env()
seeds = [int(s) for s in sys.argv[1].split(",")]
specs = sys.argv[2:]
task = get_task("synthetic")
P, G, T = 8, 8, 48  # the benchmark's defaults: credit prompts 2*4, group 8, 48 tokens
examples = task.examples("test", P)
out = []
for spec in specs:
    t0 = time.perf_counter()
    name, policy, desc = credit.resolve_policy(None if spec == "tiny" else spec)
    base = dict(model=name, device="cpu", prompts_per_step=P, group_size=G, max_new_tokens=T, minibatch_size=0,
                correct={"num_references": 2}, mc_rollouts=4)
    df = credit.credit_rows(policy, task, examples, base, seeds, estimators=("grpo", "ibpo"))
    df.insert(0, "policy", spec)
    out.append(df)
    print(desc, f"{time.perf_counter() - t0:.0f}s", flush=True)
df = pd.concat(out, ignore_index=True)
df.to_csv(sys.argv[0].replace(".py", ".csv"), index=False)  # the CSVs committed here were written to /tmp/r13/
cols = [c for c in ["auc", "auc_within_failed", "first_error_loc", "first_error_localisation", "accuracy", "repair_success", "n_localisable"] if c in df.columns]
print(df.columns.tolist())
print(df[["policy", "seed", "estimator", *cols]].to_string())
print(df.groupby(["policy", "estimator"])[cols].agg(["mean", "std"]).to_string())
