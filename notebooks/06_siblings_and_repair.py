# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Counterfactual siblings K, and local repair vs full rewrite
#
# **K** is the number of sibling references each failed trajectory is repaired against (one repair
# each); φ = ρ·(share of the K repairs that verify). The paper reports that K = 1 loses most of
# IBPO's gain: with one reference φ is all-or-nothing and one unlucky repair silences the signal.
#
# **Local repair vs full rewrite**: IBPO credits only the tokens a *minimal* repair edits. A full
# rewrite — replacing the failed attempt by a whole correct solution (here: its reference sibling) —
# changes far more tokens, so its blame is diffuse; sequence-level credit (no mask) is the limit.
#
# First on fixed batches (the corrector re-run with each setting, so sampling noise cancels; one batch per
# seed, so the differences get an interval over seeds), then in training (`smoke`, `full`; `cpu` spends its
# minutes on the batch study, whose claims go to `claims.json`). Wall time per profile: measured, in
# docs/notebooks.md.

# %% tags=["parameters"]
profile = "smoke"  # smoke: CI, minutes on a CPU; cpu: the main job, the claims in 15 min on 2 cores; full: one 80 GB GPU
out_dir = None  # folder for figures and tables (reproduce sets it); None: only show them
runs_dir = None  # where run records go (reproduce sets it); None: runs/notebooks under the working folder
batch_seeds = None  # seeds of the fixed batches (one each); None: [0] (smoke) / [0, 1, 2, 3] (cpu, full)
model = None  # policy; None: the committed tiny policy
n_prompts = None  # groups per fixed batch; None: 6 (smoke) / 8 (cpu) / 64 (full)
group_size = None  # trajectories per group; None: 4 (smoke) / 8 (cpu, full)
ks = None  # K values, each at most group_size - 1; None: [1, 2, 3] (smoke, cpu) / [1, 2, 3, 4] (full)
train_ks = None  # K values trained; None: [1, 2] (smoke) / none (cpu) / ks (full)
seeds = None  # training seeds; None: [0] (smoke) / [0, 1, 2, 3, 4] (full)
steps = None  # training steps; None: the profile's size (3 / 100)

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from ibpo_lab import claims, config, diagnostics
from ibpo_lab.step import sample as sample_step
from ibpo_lab import viz
from ibpo_lab.train import train_many

NB = "06_siblings_and_repair"
config.require_gpu_for_full(profile)
batch_seeds = batch_seeds or config.profile_value(profile, [0], [0, 1, 2, 3], cpu=[0, 1, 2, 3])
n_prompts = n_prompts or config.profile_value(profile, 6, 64, cpu=8)
group_size = group_size or config.profile_value(profile, 4, 8, cpu=8)
ks = ks or config.profile_value(profile, [1, 2, 3], [1, 2, 3, 4])
train_ks = train_ks if train_ks is not None else config.profile_value(profile, [1, 2], ks, cpu=[])
seeds = seeds or config.profile_value(profile, [0], [0, 1, 2, 3, 4])
knobs = {k: v for k, v in dict(model=model, steps=steps).items() if v is not None}
cfg = config.synthetic_preset(profile, prompts_per_step=n_prompts, group_size=group_size, minibatch_size=0,
                              estimator="ibpo", **knobs)
n_batch = claims.size(len(batch_seeds), n_prompts, group_size)
print(f"fixed batches: {n_batch}")
lab, ksweep, rewrite = None, [], []
for s in batch_seeds:
    sample = sample_step(cfg, seed=s, correct=False, lab=lab)
    lab = sample.lab
    k = diagnostics.k_sweep(sample, ks, seed=s + 1)
    k.insert(0, "seed", s)
    ksweep.append(k)
    corrected = sample.recorrect(correct={"num_references": max(k for k in ks if k < group_size)}, seed=s + 1)
    r = diagnostics.rewrite_comparison(corrected)
    r.insert(0, "seed", s)
    rewrite.append(r)
ksweep, rewrite = pd.concat(ksweep, ignore_index=True), pd.concat(rewrite, ignore_index=True)
sample.batch

# %% [markdown]
# ## K on fixed batches (mean and 95% interval over the batches)

# %%
viz.save_table(ksweep, out_dir, "k_sweep")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
viz.summary_bars(ksweep, "K", "repaired_share", ax=axes[0], title=f"failed trajectories with a verified repair ({n_batch})")
viz.summary_bars(ksweep.fillna(0), "K", "live_group_share", ax=axes[1], title=f"groups with a non-zero IBPO signal ({n_batch})")
fig.tight_layout()
viz.save_fig(fig, out_dir, "k_sweep")
ksweep

# %% [markdown]
# ## Local repair vs full rewrite on the same batches

# %%
viz.save_table(rewrite, out_dir, "local_vs_rewrite")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
viz.summary_bars(rewrite.fillna(0), "credit", "edited_fraction", ax=axes[0], title=f"share of tokens credited ({n_batch})")
viz.summary_bars(rewrite.fillna(0), "credit", "first_error_localisation", ax=axes[1],
                 title=f"first-error localisation ({n_batch})")
fig.tight_layout()
viz.save_fig(fig, out_dir, "local_vs_rewrite")
rewrite

# %% [markdown]
# ## The claims (paired by batch)

# %%
rows = []
kk = ksweep.set_index(["K", "seed"])
k_hi = 2 if 2 in ks else max(ks)
if 1 in ks and k_hi != 1:
    for col, what in (("repaired_share", "share of failed trajectories with a verified repair"),
                      ("auc", "IBPO credit AUC")):
        a, b = kk.loc[1][col].reindex(batch_seeds), kk.loc[k_hi][col].reindex(batch_seeds)
        d, lo, hi = claims.paired_difference(a.tolist(), b.tolist())
        rows.append(claims.claim(NB, f"K = 1 sibling reference loses much of what K = {k_hi} gives", what, "K=1",
                                 f"K={k_hi}", a.mean(), b.mean(), d, lo, hi, expect="higher", n=n_batch,
                                 interval=f"t over {len(batch_seeds)} batches (paired)"))
rw = rewrite.set_index(["credit", "seed"])
for col, what, expect in (("first_error_localisation", "first-error localisation", "higher"),
                          ("edited_fraction", "share of tokens credited", "lower")):
    a, b = rw.loc["full rewrite"][col].reindex(batch_seeds), rw.loc["local repair"][col].reindex(batch_seeds)
    d, lo, hi = claims.paired_difference(a.tolist(), b.tolist())
    rows.append(claims.claim(NB, "a minimal local repair credits the error more precisely than a full rewrite", what,
                             "full rewrite", "local repair", a.mean(), b.mean(), d, lo, hi, expect=expect, n=n_batch,
                             interval=f"t over {len(batch_seeds)} batches (paired)"))
claims.write_claims(rows, out_dir)
claims.claims_frame(rows)

# %% [markdown]
# ## In training: K, and full-rewrite credit (IBPO without the edit mask)

# %%
if train_ks:
    variants = {f"ibpo_K{k}": {"estimator": "ibpo", "correct": {"num_references": k}} for k in train_ks}
    variants["ibpo_full_rewrite"] = {**config.method_variants(["ibpo_no_mask"])["ibpo_no_mask"]}
    cfgs = config.grid_configs(profile, variants, seeds, group_size=group_size, **knobs)
    records = train_many(cfgs, runs_dir, progress=False, experiment=NB, keep_checkpoints=False)
    fig = viz.metric_grid(records, ["reward_mean", "repair_success"],
                          title=f"IBPO by K, and with full-rewrite credit ({len(seeds)} seeds each)")
    viz.save_fig(fig, out_dir, "training_k_and_rewrite")
    final = claims.accuracy_table(records)
    viz.save_table(final, out_dir, "training_final")
    display(final)
else:
    print("not trained in this profile: K and rewrite runs of a few minutes cannot separate in training; "
          "the fixed-batch claims above are this profile's measurement")
