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
# First on one fixed batch (the corrector re-run with each setting, so sampling noise cancels), then
# in training. Wall time: `smoke` ≈ 1 min on a 2-core CPU; `full` (tiny policy, 100 steps, 5 seeds,
# K up to 4, one GPU) ≈ 1.5 h.

# %% tags=["parameters"]
profile = "smoke"  # smoke: 2-core CPU in minutes; full: one 80 GB GPU
out_dir = None  # folder for figures and tables (reproduce sets it); None: only show them
runs_dir = None  # where run records go (reproduce sets it); None: runs/notebooks under the working folder
seed = 0  # sampling seed of the fixed batch
model = None  # policy; None: the committed tiny policy
n_prompts = None  # groups in the fixed batch; None: 6 (smoke) / 64 (full)
group_size = None  # trajectories per group; None: 4 (smoke) / 8 (full)
ks = None  # K values, each at most group_size - 1; None: [1, 2, 3] (smoke) / [1, 2, 3, 4] (full)
train_ks = None  # K values trained; None: [1, 2] (smoke) / ks (full)
seeds = None  # training seeds; None: [0] (smoke) / [0, 1, 2, 3, 4] (full)
steps = None  # training steps; None: the profile's size (3 / 100)

# %%
import matplotlib.pyplot as plt

from ibpo_lab import config, diagnostics, runs
from ibpo_lab.step import sample as sample_step
from ibpo_lab import viz
from ibpo_lab.train import train_many

config.require_gpu_for_full(profile)
n_prompts = n_prompts or config.profile_value(profile, 6, 64)
group_size = group_size or config.profile_value(profile, 4, 8)
ks = ks or config.profile_value(profile, [1, 2, 3], [1, 2, 3, 4])
train_ks = train_ks or config.profile_value(profile, [1, 2], ks)
seeds = seeds or config.profile_value(profile, [0], [0, 1, 2, 3, 4])
knobs = {k: v for k, v in dict(model=model, steps=steps).items() if v is not None}
cfg = config.synthetic_preset(profile, prompts_per_step=n_prompts, group_size=group_size, minibatch_size=0,
                              estimator="ibpo", **knobs)
sample = sample_step(cfg, seed=seed, correct=False)
sample.batch

# %% [markdown]
# ## K on one fixed batch

# %%
ksweep = diagnostics.k_sweep(sample, ks, seed=seed + 1)
viz.save_table(ksweep, out_dir, "k_sweep")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
viz.summary_bars(ksweep, "K", "repaired_share", ax=axes[0], title="failed trajectories with a verified repair")
viz.summary_bars(ksweep.fillna(0), "K", "live_group_share", ax=axes[1], title="groups with a non-zero IBPO signal")
fig.tight_layout()
viz.save_fig(fig, out_dir, "k_sweep")
ksweep

# %% [markdown]
# ## Local repair vs full rewrite on the same batch

# %%
corrected = sample.recorrect(correct={"num_references": max(k for k in ks if k < group_size)}, seed=seed + 1)
rewrite = diagnostics.rewrite_comparison(corrected)
viz.save_table(rewrite, out_dir, "local_vs_rewrite")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
viz.summary_bars(rewrite.fillna(0), "credit", "edited_fraction", ax=axes[0], title="share of tokens credited")
viz.summary_bars(rewrite.fillna(0), "credit", "first_error_localisation", ax=axes[1],
                 title="first-error localisation")
fig.tight_layout()
viz.save_fig(fig, out_dir, "local_vs_rewrite")
rewrite

# %% [markdown]
# ## In training: K, full-rewrite credit (IBPO without the edit mask), and the joint repair objective
#
# Every IBPO run trains its own revisions under the repair prompt (IOP's J_rep, `repair_loss_weight` = 1 by
# default); `ibpo_no_jrep` turns it off, so the `repair_success` panel shows what J_rep does to in-loop repairs.

# %%
variants = {f"ibpo_K{k}": {"estimator": "ibpo", "correct": {"num_references": k}} for k in train_ks}
variants["ibpo_full_rewrite"] = {**config.method_variants(["ibpo_no_mask"])["ibpo_no_mask"]}
variants["ibpo_no_jrep"] = {"estimator": "ibpo", "repair_loss_weight": 0.0}
cfgs = config.grid_configs(profile, variants, seeds, group_size=group_size, **knobs)
records = train_many(cfgs, runs_dir, progress=False, experiment="06_siblings_and_repair", keep_checkpoints=False)
fig = viz.metric_grid(records, ["reward_mean", "repair_success"], title="IBPO by K, with full-rewrite credit, and without J_rep")
viz.save_fig(fig, out_dir, "training_k_and_rewrite")
final = runs.final_table(records)
viz.save_table(final, out_dir, "training_final")
final
