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
# Learning curves show the mean over seeds, with a band (95% CI of the mean) where a line has ≥ 2 seeds; the stability table reports run-to-run
# jitter, entropy, gradient norms and skipped steps.
#
# Each method's definition is the committed config `ibpo_lab/configs/<name>.yaml`; run sizes come from
# the profile. `cpu` (the main job) trains the paper's two comparisons — GRPO vs IBPO and GSPO vs IBPO on
# GSPO — for 25 steps x 4 seeds and writes each as a claim (held-out accuracy, area under the learning
# curve) to `claims.json`; the IBPO ablations run in `smoke` (machinery) and `full`. `smoke`'s 3-step
# curves show the machinery, not the result. Wall time per profile: measured, in docs/notebooks.md.
#
# `full` runs the same comparison on the real model, as the paper's ablations are: Qwen2.5-1.5B-Instruct on
# GSM8K (`task="math"`: MATH-format problems from `$IBPO_DATA_DIR/math`) with vLLM sampling and bf16 mixed
# precision, 100 steps of 16 prompts x 8 samples (`config.experiment_preset`). GPU budget: ≤ 35 GPU-hours
# on one H100-class GPU (`config.gpu_hours` of the 65 runs, GSPO and IBPO-on-GSPO included: cost model `config.GPU_COST`, e.g. an IBPO step
# = 128·512 sampled + 0.5·128·2·640 repair tokens at 20k tokens/s, 128·712 trained tokens at 30k/s, the
# old log-probs at 90k/s and 2 s overhead: an estimated 13.4 s, so 0.4 h per IBPO run and 0.3 h per GRPO run;
# VinePPO's Monte-Carlo values, 4 continuations from each of ~8 step boundaries, make its runs 1.75 h). The
# rates are estimates until `python -m ibpo_lab.gpu_check` measures them on the GPU. The synthetic task stays
# the CPU testbed (`smoke`).

# %% tags=["parameters"]
profile = "smoke"  # smoke: CI, minutes on a CPU; cpu: the main job, the claims in 15 min on 2 cores; full: one 80 GB GPU
out_dir = None  # folder for figures and tables (reproduce sets it); None: only show them
runs_dir = None  # where run records go (reproduce sets it); None: runs/notebooks under the working folder
model = None  # policy; None: the committed tiny policy ("tiny") / Qwen/Qwen2.5-1.5B-Instruct (full)
task = None  # benchmark; None: synthetic (CPU profiles) / gsm8k (full; or "math")
seeds = None  # seeds per baseline and IBPO; None: [0, 1] (smoke) / [0, 1, 2, 3] (cpu) / [0, 1, 2, 3, 4] (full)
ablation_seeds = None  # seeds per ablation; None: [0] (smoke) / the same as seeds (full)
steps = None  # training steps per run; None: the profile's size (3 / 25 / 100)
estimators = None  # baselines + IBPO; None: grpo, dr_grpo, rloo, prefix_tree, ibpo (smoke; + vineppo in full) / grpo, ibpo, gspo, ibpo_gspo (cpu)
ablations = None  # IBPO ablations; None: no_shaping, no_mask, k1, bilateral, splice (smoke, full) / none (cpu: 06-08 measure them)
backbone = None  # the published backbone, `seeds` each; None: gspo, ibpo_gspo (smoke, full) / none extra (cpu: in estimators)
metrics = ["reward_mean", "entropy", "grad_norm", "repair_success"]  # curves drawn

# %%
from ibpo_lab import claims, config, runs
from ibpo_lab import viz
from ibpo_lab.train import train_many

NB = "04_training_synthetic"
config.require_gpu_for_full(profile)
seeds = seeds or config.profile_value(profile, [0, 1], [0, 1, 2, 3, 4], cpu=[0, 1, 2, 3])
estimators = estimators or config.profile_value(profile, ["grpo", "dr_grpo", "rloo", "prefix_tree", "ibpo"],
                                                ["grpo", "dr_grpo", "rloo", "prefix_tree", "vineppo", "ibpo"],
                                                cpu=["grpo", "ibpo", "gspo", "ibpo_gspo"])
all_ablations = ["ibpo_no_shaping", "ibpo_no_mask", "ibpo_k1", "ibpo_bilateral", "ibpo_splice"]
ablations = ablations if ablations is not None else config.profile_value(profile, all_ablations, all_ablations, cpu=[])
knobs = {k: v for k, v in dict(model=model, steps=steps).items() if v is not None}
ablation_seeds = ablation_seeds or config.profile_value(profile, [0], seeds)
backbone = backbone if backbone is not None else config.profile_value(profile, ["gspo", "ibpo_gspo"],
                                                                      ["gspo", "ibpo_gspo"], cpu=[])
cfgs = config.experiment_grid(profile, config.method_variants(estimators), seeds, task=task, **knobs)
if ablations:
    cfgs += config.experiment_grid(profile, config.method_variants(ablations), ablation_seeds, task=task, **knobs)
if backbone:
    cfgs += config.experiment_grid(profile, config.method_variants(backbone), seeds, task=task, **knobs)
n_train = claims.size(len(seeds), cfgs[0].prompts_per_step, cfgs[0].group_size, step=cfgs[0].steps)
print(f"{len(cfgs)} runs of {cfgs[0].steps} steps ({cfgs[0].model} on {cfgs[0].task}): {len(estimators)} methods x "
      f"{len(seeds)} seeds, {len(ablations)} ablations x {len(ablation_seeds)} seeds, {len(backbone)} backbone runs x "
      f"{len(seeds)} seeds; per method {n_train}; held-out {cfgs[0].eval_n} prompts x {cfgs[0].eval_k} samples at the end"
      + (f"; estimated {config.gpu_hours(cfgs):.1f} GPU-hours" if config.uses_real_model(profile) else ""))
records = train_many(cfgs, runs_dir, progress=False, experiment=NB, keep_checkpoints=False)

# %% [markdown]
# ## Learning curves: baselines vs IBPO

# %%
main = [r for r in records if r.label in estimators]
fig = viz.metric_grid(main, metrics, title=f"baselines vs IBPO ({n_train} per method)")
viz.save_fig(fig, out_dir, "curves_estimators")

# %% [markdown]
# ## Learning curves: IBPO ablations

# %%
if ablations:
    abl = [r for r in records if r.label in list(ablations) + ["ibpo"]]
    fig = viz.metric_grid(abl, metrics, title=f"IBPO and its ablations ({len(ablation_seeds)} seeds each)")
    viz.save_fig(fig, out_dir, "curves_ablations")
else:
    print("no ablation trained in this profile: notebooks 06 (K, local repair vs rewrite), 07 (shaping) and "
          "08 (λ, ρ) measure them on fixed batches")

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
# pooled over seeds (avg@k weighted by prompts x k) with a Wilson 95% interval, which stays inside [0, 1]
final = claims.accuracy_table(records)
viz.save_table(final, out_dir, "final_accuracy")
fig = viz.summary_bars(final, "label", "heldout_accuracy", err=("wilson_lo", "wilson_hi"),
                       err_label="error bars: Wilson 95% interval", bounds=(0, 1), ylabel=viz.axis_label("avg@k"),
                       title="held-out accuracy at the end (n: " + "; ".join(dict.fromkeys(final["n"])) + ")")
viz.save_fig(fig, out_dir, "final_accuracy")
final

# %%
stability = runs.stability_table(records)
viz.save_table(stability, out_dir, "stability")
stability

# %% [markdown]
# ## The claims: IBPO vs GRPO, IBPO on GSPO vs GSPO (paired by seed)

# %%
rows = []
for a, b, text in (("grpo", "ibpo", "IBPO learns faster / further than GRPO at equal samples"),
                   ("gspo", "ibpo_gspo", "IBPO's credit helps on top of GSPO's sequence-level loss too")):
    if {a, b} <= set(estimators) | set(backbone):
        rows += claims.compare_runs(records, a, b, NB, text)
claims.write_claims(rows, out_dir)
claims.claims_frame(rows)

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
