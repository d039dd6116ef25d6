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
# First on fixed batches (the corrector re-run with each setting, so sampling noise cancels; one batch per
# seed, so the differences get an interval over seeds), then in training (`smoke`, `full`; `cpu` spends its
# minutes on the batch study, whose claims go to `claims.json`). Wall time per profile: measured, in
# docs/notebooks.md.
#
# `full` runs it on the real model: Qwen2.5-1.5B-Instruct on GSM8K (`task="math"`: MATH-format problems)
# with vLLM and bf16 mixed precision (`config.experiment_preset`); the fixed batch is 64 prompts x 8, the
# training runs 100 steps of 16 prompts x 8 per (K, seed). GPU budget: ≤ 15 GPU-hours on one H100-class
# GPU (`config.gpu_hours` of the 30 training runs, J_rep included, an IBPO run estimated at 0.4 h: 13.4 s per step as in notebook 04,
# plus evaluation; the fixed-batch study is a few minutes).

# %% tags=["parameters"]
profile = "smoke"  # smoke: CI, minutes on a CPU; cpu: the main job, the claims in 15 min on 2 cores; full: one 80 GB GPU
out_dir = None  # folder for figures and tables (reproduce sets it); None: only show them
runs_dir = None  # where run records go (reproduce sets it); None: runs/notebooks under the working folder
batch_seeds = None  # seeds of the fixed batches (one each); None: [0] (smoke) / [0, 1, 2, 3] (cpu, full)
model = None  # policy; None: the committed tiny policy / Qwen/Qwen2.5-1.5B-Instruct (full)
task = None  # benchmark; None: synthetic (CPU profiles) / gsm8k (full; or "math")
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
cfg = config.experiment_preset(profile, task, prompts_per_step=n_prompts, group_size=group_size, minibatch_size=0,
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
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
viz.summary_bars(ksweep, "K", "repaired_share", ax=axes[0], title=f"failed trajectories with a verified repair ({n_batch})")
viz.summary_bars(ksweep, "K", "live_group_share", ax=axes[1], title=f"groups with a non-zero IBPO signal ({n_batch})")
viz.save_fig(fig, out_dir, "k_sweep")
ksweep

# %% [markdown]
# ## Reference mode × K at equal budget, on the first fixed batch
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
        st = sample.recorrect(correct={"num_references": k, "reference_mode": mode}, seed=batch_seeds[0] + 1).stats
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
# ## Local repair vs full rewrite on the same batches

# %%
viz.save_table(rewrite, out_dir, "local_vs_rewrite")
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
viz.summary_bars(rewrite, "credit", "edited_fraction", ax=axes[0],
                 title=f"share of tokens credited (repaired failures; {n_batch})")
viz.summary_bars(rewrite, "credit", "first_error_localisation", ax=axes[1],
                 title=f"first-error localisation ({n_batch})")
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
# ## In training: K, full-rewrite credit (IBPO without the edit mask), and the joint repair objective
#
# `ibpo_jrep` adds IOP's joint repair objective (J_rep, `repair_loss_weight` = 1): the policy also trains on its own
# verified repairs under the repair prompt, so the `repair_success` panel shows what J_rep does to in-loop repairs.

# %%
if train_ks:
    variants = {f"ibpo_K{k}": {"estimator": "ibpo", "correct": {"num_references": k}} for k in train_ks}
    variants["ibpo_full_rewrite"] = {**config.method_variants(["ibpo_no_mask"])["ibpo_no_mask"]}
    variants["ibpo_jrep"] = {**config.method_variants(["ibpo_jrep"])["ibpo_jrep"]}
    cfgs = config.experiment_grid(profile, variants, seeds, task=task, group_size=group_size, **knobs)
    if config.uses_real_model(profile):
        print(f"{len(cfgs)} runs of {cfgs[0].model} on {cfgs[0].task}: estimated {config.gpu_hours(cfgs):.1f} GPU-hours")
    records = train_many(cfgs, runs_dir, progress=False, experiment=NB, keep_checkpoints=False)
    fig = viz.metric_grid(records, ["reward_mean", "repair_success"],
                          title=f"IBPO by K, with full-rewrite credit, and with J_rep ({len(seeds)} seeds each)")
    viz.save_fig(fig, out_dir, "training_k_and_rewrite")
    final = claims.accuracy_table(records)
    viz.save_table(final, out_dir, "training_final")
    display(final)
else:
    print("not trained in this profile: K and rewrite runs of a few minutes cannot separate in training; "
          "the fixed-batch claims above are this profile's measurement")
