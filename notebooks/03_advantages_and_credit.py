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
# # 03 · Advantage estimators and credit quality
#
# Does an estimator blame the right steps? On the synthetic task every step has a ground-truth
# label, so per-step advantages (mean token advantage of the step) can be scored:
#
# * **AUC**: how well step advantages separate correct from wrong steps (0.5 = no information);
# * **AUC within failures**: the same inside each failed trajectory — sequence-level credit
#   (GRPO, RLOO, Dr. GRPO) gives all steps of a trajectory one value and scores exactly 0.5;
# * **first-error localisation**: share of failed trajectories whose most-blamed step is the first wrong one.
#
# IBPO's credit, as implemented (`advantages.ibpo_estimator` defaults): R' = R + λ·φ with
# φ = ρ·1[a repair verified] on failed trajectories; a failed trajectory's advantage is sign-safe,
# min(A', (1 − λφ)·min(0, A_GRPO)) with A' the group-centred R', so it is never positive; a repaired
# failure carries it only on the tokens its repair edited (0 elsewhere), while correct trajectories and
# unrepaired failures carry their sequence advantage on every token.
#
# Then the **gradient variance** of each estimator: the policy gradient is recomputed on independent
# resamples of the same prompts; lower relative variance = fewer samples for the same signal.
#
# Wall time: `smoke` ≈ 60 s on a 2-core CPU; `full` (tiny policy on the synthetic task with many more
# groups and resamples, one GPU) ≈ 10 min.

# %% tags=["parameters"]
profile = "smoke"  # smoke: 2-core CPU in minutes; full: one 80 GB GPU
out_dir = None  # folder for figures and tables (reproduce sets it); None: only show them
seed = 0  # sampling seed
model = None  # policy name or path; None: the tiny synthetic-task policy (step labels need the synthetic task)
n_prompts = None  # groups scored for credit quality; None: 6 (smoke) / 64 (full)
group_size = 8  # trajectories per group (G)
corrector = "policy"  # compare-and-correct operator: policy, splice, oracle
repair_k = 2  # references per failed trajectory (K)
lam = 0.6  # IBPO λ
rho = 0.5  # IBPO ρ
estimators = ["grpo", "dr_grpo", "rloo", "prefix_tree", "vineppo", "ibpo"]  # compared
mc_rollouts = 2  # VinePPO continuations per step boundary
variance_estimators = ["grpo", "rloo", "prefix_tree", "ibpo"]  # gradient variance compared (vineppo is costly)
variance_prompts = None  # fixed prompts of the gradient-variance study; None: 2 (smoke) / 16 (full)
variance_resamples = None  # independent resamples; None: 3 (smoke) / 32 (full)

# %%
from IPython.display import display

from ibpo_lab import config, diagnostics
from ibpo_lab.step import sample as sample_step
from ibpo_lab import viz

config.require_gpu_for_full(profile)
n_prompts = n_prompts or config.profile_value(profile, 6, 64)
variance_prompts = variance_prompts or config.profile_value(profile, 2, 16)
variance_resamples = variance_resamples or config.profile_value(profile, 3, 32)
# credit quality needs step labels: the synthetic task in both profiles (the tiny policy knows it)
cfg = config.presets("smoke", task="synthetic", model=model or "tiny", device="auto", group_size=group_size,
                     prompts_per_step=n_prompts, minibatch_size=0,
                     correct={"operator": corrector, "num_references": repair_k},
                     estimator_kwargs={"lam": lam, "rho": rho}, mc_rollouts=mc_rollouts)
sample = sample_step(cfg, seed=seed)
sample.batch

# %% [markdown]
# ## Credit quality per estimator

# %%
advantages = sample.advantages_for(estimators)
quality = diagnostics.credit_summary(sample, advantages)
viz.save_table(quality, out_dir, "credit_quality")
quality[["estimator", "auc", "auc_within_failed", "first_error_localisation", "wrong_step_credit_share",
         "n_localisable", "live_group_share"]]

# %%
steps = diagnostics.step_credit_frame(sample, advantages)
fig = viz.step_credit_plot(steps)
viz.save_fig(fig, out_dir, "step_advantage_by_label")
if steps["correct"].nunique() == 2:
    fig = viz.roc_plot(steps)
    viz.save_fig(fig, out_dir, "step_credit_roc")
else:
    print("every labelled step has the same label in this sample: no ROC curve")

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
viz.summary_bars(quality, "estimator", "auc_within_failed", ax=axes[0],  # n/a: no failure with both kinds of step
                 title="AUC within failed trajectories (0.5 = no information)", ylabel="AUC")
viz.summary_bars(quality, "estimator", "first_error_localisation", ax=axes[1],
                 title="first-error localisation", ylabel="share of failures")
viz.save_fig(fig, out_dir, "credit_quality_bars")

# %% [markdown]
# ## IBPO's sign rule and φ on this batch
# The same batch under IBPO's default (`sign_rule="safe"`, indicator φ) and its two ablations:
# `ibpo_shaped_sign` (GRPO on R' for failures too) and `ibpo_legacy` (that, plus φ = ρ·share).
# `failed_positive_share` is the share of failed trajectories' credited tokens with positive
# advantage: with the shaped rule, a repaired failure in a group where most trajectories failed lies
# above the group mean of R', and its positive credit lands exactly on the tokens its repair replaced.

# %%
from ibpo_lab.advantages import failed_positive_share

rules = sample.advantages_for(["ibpo", "ibpo_shaped_sign", "ibpo_legacy"])
sign_table = diagnostics.credit_summary(sample, rules)[["estimator", "auc", "auc_within_failed",
                                                        "first_error_localisation"]]
b = sample.batch
sign_table["failed_positive_share"] = [failed_positive_share(rules[n], b.rewards, b.response_mask)
                                       for n in sign_table["estimator"]]
viz.save_table(sign_table, out_dir, "ibpo_sign_rule")
sign_table

# %% [markdown]
# ## One failed trajectory, coloured by each estimator's credit

# %%
i = sample.pick_trajectory("repaired")
print("step labels:", sample.step_labels[i])
for name, adv in advantages.items():
    display(viz.batch_token_html(sample.batch, adv, sample.tokenizer, i))

# %% [markdown]
# ## Gradient variance
# `rel_var` = total variance of the R gradient estimates / squared norm of their mean.

# %%
lab = sample.lab
examples = lab.task.examples("train", variance_prompts)
var = diagnostics.gradient_variance(lab, examples, estimators=variance_estimators, resamples=variance_resamples,
                                    seed=seed + 100, progress=False)
viz.save_table(var, out_dir, "gradient_variance")
fig = viz.summary_bars(var, "estimator", "rel_var", err=("rel_var_lo", "rel_var_hi"),
                       err_label=f"error bars: 95% bootstrap interval over the {variance_resamples} resamples",
                       title=f"relative gradient variance (lower is better), {len(examples)} fixed prompts")
viz.save_fig(fig, out_dir, "gradient_variance")
var
