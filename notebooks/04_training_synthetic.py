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
# # 04 · Training: estimators, IBPO ablations, stability (synthetic task on CPU, GSM8K/MATH in `full`)
#
# The policy (the tiny one on modular-arithmetic chains in CPU profiles) is trained with every estimator — GRPO, Dr. GRPO, RLOO,
# prefix-tree, IBPO — and with the IBPO ablations (no shaping λ=0, no edit mask, K=1 reference, IOP
# bilateral training of the repairs, splice instead of policy corrector), over several seeds. The
# published backbone is compared too: GSPO (sequence-level ratio, clip 3e-4/4e-4) against IBPO on GSPO
# (`ibpo_gspo`: IBPO's credit, and IOP's gated ratio, taken over the credited tokens only).
# Learning curves show the mean over seeds with a 95% band; the stability table reports run-to-run
# jitter, entropy, gradient norms and skipped steps.
#
# Each method's definition is the committed config `ibpo_lab/configs/<name>.yaml`; run sizes come from
# the profile. Wall time: `smoke` (3 steps; 5 methods x 2 seeds, 5 ablations x 1 seed; CPU) ≈ 1-1.5 min — curves that short
# show the machinery, not the result.
#
# `full` runs the same comparison on the real model, as the paper's ablations are: Qwen2.5-1.5B-Instruct on
# GSM8K (`task="math"`: MATH-format problems from `$IBPO_DATA_DIR/math`) with vLLM sampling and bf16 mixed
# precision, 100 steps of 16 prompts x 8 samples (`config.experiment_preset`). GPU budget: ≤ 35 GPU-hours
# on one H100-class GPU (`config.gpu_hours` of the 65 runs, GSPO and IBPO-on-GSPO included: cost model `config.GPU_COST`, e.g. an IBPO step
# = 128·512 sampled + 0.5·128·2·640 repair tokens at 20k tokens/s, 128·712 trained tokens at 30k/s, the
# old log-probs at 90k/s, 2 s overhead ≈ 13.4 s, so ≈ 0.4 h per IBPO run and 0.3 h per GRPO run;
# VinePPO's Monte-Carlo values, 4 continuations from each of ~8 step boundaries, make its runs ≈ 1.75 h). The
# rates are estimates until `python -m ibpo_lab.gpu_check` measures them on the GPU. The synthetic task stays
# the CPU testbed (`smoke`).

# %% tags=["parameters"]
profile = "smoke"  # smoke: 2-core CPU in minutes; full: one 80 GB GPU
out_dir = None  # folder for figures and tables (reproduce sets it); None: only show them
runs_dir = None  # where run records go (reproduce sets it); None: runs/notebooks under the working folder
model = None  # policy; None: the committed tiny policy ("tiny") / Qwen/Qwen2.5-1.5B-Instruct (full)
task = None  # benchmark; None: synthetic (CPU profiles) / gsm8k (full; or "math")
seeds = None  # seeds per baseline and IBPO; None: [0, 1] (smoke) / [0, 1, 2, 3, 4] (full)
ablation_seeds = None  # seeds per ablation; None: [0] (smoke) / the same as seeds (full)
steps = None  # training steps per run; None: the profile's size (3 / 100)
estimators = None  # baselines + IBPO; None: grpo, dr_grpo, rloo, prefix_tree, ibpo (+ vineppo in full)
ablations = ["ibpo_no_shaping", "ibpo_no_mask", "ibpo_k1", "ibpo_bilateral", "ibpo_splice"]  # IBPO ablations
backbone = ["gspo", "ibpo_gspo"]  # the published backbone: GSPO vs IBPO on GSPO (gated ratio), `seeds` each
metrics = ["reward_mean", "entropy", "grad_norm", "repair_success"]  # curves drawn

# %%
from ibpo_lab import config, runs
from ibpo_lab import viz
from ibpo_lab.train import train_many

config.require_gpu_for_full(profile)
seeds = seeds or config.profile_value(profile, [0, 1], [0, 1, 2, 3, 4])
estimators = estimators or config.profile_value(profile, ["grpo", "dr_grpo", "rloo", "prefix_tree", "ibpo"],
                                            ["grpo", "dr_grpo", "rloo", "prefix_tree", "vineppo", "ibpo"])
knobs = {k: v for k, v in dict(model=model, steps=steps).items() if v is not None}
ablation_seeds = ablation_seeds or config.profile_value(profile, [0], seeds)
cfgs = config.experiment_grid(profile, config.method_variants(estimators), seeds, task=task, **knobs)
cfgs += config.experiment_grid(profile, config.method_variants(ablations), ablation_seeds, task=task, **knobs)
if backbone:
    cfgs += config.experiment_grid(profile, config.method_variants(backbone), seeds, task=task, **knobs)
print(f"{len(cfgs)} runs of {cfgs[0].steps} steps ({cfgs[0].model} on {cfgs[0].task}): {len(estimators)} methods x "
      f"{len(seeds)} seeds, {len(ablations)} ablations x {len(ablation_seeds)} seeds, {len(backbone)} backbone runs x "
      f"{len(seeds)} seeds" + (f"; estimated {config.gpu_hours(cfgs):.1f} GPU-hours" if config.uses_real_model(profile) else ""))
records = train_many(cfgs, runs_dir, progress=False, experiment="04_training_synthetic", keep_checkpoints=False)

# %% [markdown]
# ## Learning curves: baselines vs IBPO

# %%
main = [r for r in records if r.label in estimators]
fig = viz.metric_grid(main, metrics, title="baselines vs IBPO")
viz.save_fig(fig, out_dir, "curves_estimators")

# %% [markdown]
# ## Learning curves: IBPO ablations

# %%
abl = [r for r in records if r.label in list(ablations) + ["ibpo"]]
fig = viz.metric_grid(abl, metrics, title="IBPO and its ablations")
viz.save_fig(fig, out_dir, "curves_ablations")

# %% [markdown]
# ## Learning curves: the GSPO backbone, with and without IBPO

# %%
if backbone:
    bb = [r for r in records if r.label in backbone]
    fig = viz.metric_grid(bb, metrics, title="GSPO vs IBPO on GSPO (mean over seeds, 95% band)")
    viz.save_fig(fig, out_dir, "curves_backbone")

# %% [markdown]
# ## Final accuracy and stability

# %%
final = runs.final_table(records)
viz.save_table(final, out_dir, "final_accuracy")
fig = viz.summary_bars(final, "label", "mean", err=("ci_lo", "ci_hi"), err_label="error bars: 95% CI over seeds",
                       bounds=(0, 1), n="n_seeds", ylabel=viz.axis_label("avg@k"), title="held-out accuracy at the end")
viz.save_fig(fig, out_dir, "final_accuracy")
final

# %%
stability = runs.stability_table(records)
viz.save_table(stability, out_dir, "stability")
stability

# %% [markdown]
# ## Explore the trajectories of the IBPO run
# The widget (run → step → prompt → trajectory) needs a live kernel; the static view below it is the
# same panels for the last step of the first IBPO run.

# %%
ibpo_run = next(r for r in records if r.label == "ibpo")
viz.explorer(ibpo_run.path.parent)

# %%
frame = viz.load_trajectories(ibpo_run.path)
policy_rows = frame[frame["kind"] == "policy"] if "kind" in frame else frame
failed = policy_rows[policy_rows["reward"] < 0.5]
view = viz.trajectory_view(frame, int((failed if len(failed) else policy_rows)["traj"].iloc[0]),
                           viz.run_tokenizer(ibpo_run.path), viz.run_step_labeler(ibpo_run.path))
viz.save_fig(view["heatmap"], out_dir, "explorer_group_heatmap")
static = viz.HTML(view["tokens"] + view["diff"] + view["steps"])
viz.save_html(static, out_dir, "explorer_static_view")
static
