"""The repair pass's forward calls split by size: prefill (input length > 16) vs decode/draft-verify calls."""
import time, dataclasses, statistics
import torch
from benchmarks.common import setup_env
setup_env()
from ibpo_lab import train as T
from ibpo_lab.config import load_config
from ibpo_lab.correct import compare_and_correct
from ibpo_lab.step import build_lab, correct_config, take_step

cfg = load_config("ibpo").replace(device="cpu", eval_n=0)
lab = build_lab(cfg)
exs = T.pick_examples(lab.task.examples(cfg.train_split), cfg, 1)
st = take_step(lab, exs, seed=11, correct=False, advantages=False)
batch = st.batch
by_group = {g: exs[g] for g in range(len(exs))}
model = lab.policy.model
calls = []
orig = model.forward
def timed(*a, **kw):
    ids = kw.get("input_ids", a[0] if a else None)
    t0 = time.perf_counter(); out = orig(*a, **kw)
    calls.append((tuple(ids.shape), time.perf_counter() - t0)); return out
model.forward = timed
c = correct_config(cfg)
for rep in range(3):
    calls.clear(); t0 = time.perf_counter()
    res = compare_and_correct(batch, by_group, lab.task, lab.sampler, c, tokenizer=lab.policy.tokenizer, seed=5)
    tot = time.perf_counter() - t0
    pre = [(s, t) for s, t in calls if s[-1] > 16]; dec = [(s, t) for s, t in calls if s[-1] <= 16]
    print(f"rep {rep}: pass wall {tot:.3f}s | forward calls {len(calls)} total {sum(t for _, t in calls):.3f}s | "
          f"prefill calls {len(pre)} {sum(t for _, t in pre):.3f}s shapes {[s for s, _ in pre]} | "
          f"decode calls {len(dec)} {sum(t for _, t in dec):.3f}s | outside forward {tot - sum(t for _, t in calls):.3f}s | revisions {len(res.table)}")
# the sampling pass of the same step, for comparison
calls.clear(); t0 = time.perf_counter()
take_step(lab, exs, seed=11, correct=False, advantages=False)
tot = time.perf_counter() - t0
pre = [(s, t) for s, t in calls if s[-1] > 16]
print(f"sampling step (8x8): wall {tot:.3f}s | forward calls {len(calls)} | prefill {[s for s, _ in pre]} {sum(t for _, t in pre):.3f}s")
