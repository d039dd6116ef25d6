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
# **K** is the number of sibling references each failed trajectory is repaired against; φ = ρ·1[at
# least one revision verifies] (the published rule; `phi="share"`, ρ·share of verified revisions, is
# the lab's earlier rule, kept as an ablation). The paper reports that K = 1 loses most of IBPO's gain.
# K has two readings (`correct.reference_mode`), compared here at equal budget (the same number of
# revisions per failed trajectory):
#
# * `separate` (default): K repair prompts, one per reference. K buys independent attempts — more
#   chances that *some* revision verifies, which more revisions per reference would buy too;
# * `joint`: one repair prompt showing all K references, sampled K times. K buys contrast — several
#   correct solutions at once. Our reading (not reproduced) is that the paper's "K ≥ 2 is needed"
#   ablation is this one. At K = 1 both send the same prompt.
#
# Caveat for the `smoke` profile: the committed tiny policy was warmed up only on the single-reference
# repair format, so the joint prompt is out of its training distribution. Measured on 50 failures with
# K = 2, its joint repairs verified 0.318 of revisions against 0.620 for separate prompts — the table
# below measures a format the tiny policy never saw, not the value of seeing two references at once.
#
# **Local repair vs full rewrite**: IBPO credits only the tokens a *minimal* repair edits. A full
# rewrite — replacing the failed attempt by a whole correct solution (here: its reference sibling) —
# changes far more tokens, so its blame is diffuse; sequence-level credit (no mask) is the limit.
#
# First on one fixed batch (the corrector re-run with each setting, so sampling noise cancels), then
# in training. Wall time: `smoke` ≈ 1 min on a 2-core CPU (the tiny policy on the synthetic task, the
# CPU testbed).
#
# `full` runs it on the real model: Qwen2.5-1.5B-Instruct on GSM8K (`task="math"`: MATH-format problems)
# with vLLM and bf16 mixed precision (`config.experiment_preset`); the fixed batch is 64 prompts x 8, the
# training runs 100 steps of 16 prompts x 8 per (K, seed). GPU budget: ≤ 12 GPU-hours on one H100-class
# GPU (`config.gpu_hours` of the 25 training runs, ≈ 0.4 h per IBPO run: 13.4 s per step as in notebook 04,
# plus evaluation; the fixed-batch study is a few minutes).

# %% tags=["parameters"]
profile = "smoke"  # smoke: 2-core CPU in minutes; full: one 80 GB GPU
out_dir = None  # folder for figures and tables (reproduce sets it); None: only show them
runs_dir = None  # where run records go (reproduce sets it); None: runs/notebooks under the working folder
seed = 0  # sampling seed of the fixed batch
model = None  # policy; None: the committed tiny policy / Qwen/Qwen2.5-1.5B-Instruct (full)
task = None  # benchmark; None: synthetic (CPU profiles) / gsm8k (full; or "math")
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
cfg = config.experiment_preset(profile, task, prompts_per_step=n_prompts, group_size=group_size, minibatch_size=0,
                               estimator="ibpo", **knobs)
sample = sample_step(cfg, seed=seed, correct=False)
sample.batch

# %% [markdown]
# ## K on one fixed batch

# %%
ksweep = diagnostics.k_sweep(sample, ks, seed=seed + 1)
viz.save_table(ksweep, out_dir, "k_sweep")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
viz.summary_bars(ksweep, "K", "repaired_share", ax=axes[0], title="failed trajectories with a verified repair")
viz.summary_bars(ksweep, "K", "live_group_share", ax=axes[1], title="groups with a non-zero IBPO signal")
viz.save_fig(fig, out_dir, "k_sweep")
ksweep

# %% [markdown]
# ## Reference mode × K at equal budget, on the same batch
# For each K, the corrector is re-run on the fixed batch with `reference_mode` `separate` and `joint`
# (same seed, same number of revisions). `revision_success_rate`: share of revisions that verify;
# `repair_rate`: share of failed trajectories with a verified repair (φ > 0); `phi_mean`: mean φ over
# failed trajectories; `edited_fraction_mean`: share of a repaired failure's tokens its repair edited.

# %%
import pandas as pd

mode_rows = []
for k in ks:
    if not 1 <= k <= group_size - 1:
        continue
    for mode in ("separate", "joint"):
        st = sample.recorrect(correct={"num_references": k, "reference_mode": mode}, seed=seed + 1).stats
        mode_rows.append({"K": k, "reference_mode": mode, **{c: st.get(c) for c in (
            "n_failed", "n_revisions", "revision_success_rate", "repair_rate", "phi_mean", "edited_fraction_mean")}})
modes = pd.DataFrame(mode_rows)
viz.save_table(modes, out_dir, "reference_mode_by_k")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for ax, col, title in ((axes[0], "revision_success_rate", "revisions that verify"),
                       (axes[1], "repair_rate", "failed trajectories repaired")):
    for mode, g in modes.groupby("reference_mode"):
        ax.plot(g["K"], g[col], "o-", label=mode)
    ax.set(xlabel="K (references)", title=title)
    ax.legend()
fig.tight_layout()
viz.save_fig(fig, out_dir, "reference_mode_by_k")
modes

# %% [markdown]
# ## Local repair vs full rewrite on the same batch

# %%
corrected = sample.recorrect(correct={"num_references": max(k for k in ks if k < group_size)}, seed=seed + 1)
rewrite = diagnostics.rewrite_comparison(corrected)
viz.save_table(rewrite, out_dir, "local_vs_rewrite")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
viz.summary_bars(rewrite, "credit", "edited_fraction", ax=axes[0], title="share of tokens credited (repaired failures)")
viz.summary_bars(rewrite, "credit", "first_error_localisation", ax=axes[1],
                 title="first-error localisation")
viz.save_fig(fig, out_dir, "local_vs_rewrite")
rewrite

# %% [markdown]
# ## In training: K, and full-rewrite credit (IBPO without the edit mask)

# %%
variants = {f"ibpo_K{k}": {"estimator": "ibpo", "correct": {"num_references": k}} for k in train_ks}
variants["ibpo_full_rewrite"] = {**config.method_variants(["ibpo_no_mask"])["ibpo_no_mask"]}
cfgs = config.experiment_grid(profile, variants, seeds, task=task, group_size=group_size, **knobs)
if config.uses_real_model(profile):
    print(f"{len(cfgs)} runs of {cfgs[0].model} on {cfgs[0].task}: estimated {config.gpu_hours(cfgs):.1f} GPU-hours")
records = train_many(cfgs, runs_dir, progress=False, experiment="06_siblings_and_repair", keep_checkpoints=False)
fig = viz.metric_grid(records, ["reward_mean", "repair_success"], title="IBPO by K, and with full-rewrite credit")
viz.save_fig(fig, out_dir, "training_k_and_rewrite")
final = runs.final_table(records)
viz.save_table(final, out_dir, "training_final")
final
