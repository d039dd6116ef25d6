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
# Each claim is measured on several seeds (a fresh batch of the same prompts each) and written with its
# interval and verdict to `claims.json` (the report's "what this run shows"). Wall time per profile:
# measured, in docs/notebooks.md (`smoke` and `cpu` from the last recorded runs; `full`: not measured here).

# %% tags=["parameters"]
profile = "smoke"  # smoke: CI, minutes on a CPU; cpu: the main job, the claims in 15 min on 2 cores; full: one 80 GB GPU
out_dir = None  # folder for figures and tables (reproduce sets it); None: only show them
seeds = None  # seeds, one fresh batch of the same prompts each; None: [0] (smoke) / [0, 1, 2, 3] (cpu, full)
model = None  # policy name or path; None: the tiny synthetic-task policy (step labels need the synthetic task)
n_prompts = None  # groups per seed scored for credit quality; None: 6 (smoke) / 8 (cpu) / 64 (full)
group_size = 8  # trajectories per group (G)
corrector = "policy"  # compare-and-correct operator: policy, splice, oracle
repair_k = 2  # references per failed trajectory (K)
lam = 0.6  # IBPO λ
rho = 0.5  # IBPO ρ
estimators = ["grpo", "dr_grpo", "rloo", "prefix_tree", "vineppo", "ibpo"]  # compared
mc_rollouts = 2  # VinePPO continuations per step boundary
variance_estimators = ["grpo", "rloo", "prefix_tree", "ibpo"]  # gradient variance compared (vineppo is costly)
variance_prompts = None  # fixed prompts of the gradient-variance study; None: 2 (smoke) / 4 (cpu) / 16 (full)
variance_resamples = None  # independent resamples per seed; None: 3 (smoke) / 8 (cpu) / 32 (full)

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from ibpo_lab import claims, config, diagnostics
from ibpo_lab.step import sample as sample_step
from ibpo_lab import viz

NB = "03_advantages_and_credit"
config.require_gpu_for_full(profile)
seeds = seeds or config.profile_value(profile, [0], [0, 1, 2, 3], cpu=[0, 1, 2, 3])
n_prompts = n_prompts or config.profile_value(profile, 6, 64, cpu=8)
variance_prompts = variance_prompts or config.profile_value(profile, 2, 16, cpu=4)
variance_resamples = variance_resamples or config.profile_value(profile, 3, 32, cpu=8)
# credit quality needs step labels: the synthetic task in every profile (the tiny policy knows it)
cfg = config.presets("smoke", task="synthetic", model=model or "tiny", device="auto", group_size=group_size,
                     prompts_per_step=n_prompts, minibatch_size=0,
                     correct={"operator": corrector, "num_references": repair_k},
                     estimator_kwargs={"lam": lam, "rho": rho}, mc_rollouts=mc_rollouts)
n_credit = claims.size(len(seeds), n_prompts, group_size)
print(f"credit quality: {n_credit}; gradient variance: "
      f"{claims.size(len(seeds), variance_prompts, group_size, resample=variance_resamples)}")
sample = sample_step(cfg, seed=seeds[0])
sample.batch

# %% [markdown]
# ## Credit quality per estimator (the first seed's batch)

# %%
advantages = sample.advantages_for(estimators)
quality = diagnostics.credit_summary(sample, advantages)
viz.save_table(quality, out_dir, "credit_quality_seed0")
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

# %% [markdown]
# ## Credit quality over seeds
# Every seed is a fresh batch of the same prompts; per estimator, the mean over seeds and a 95% t-interval
# (shown only with 3 seeds or more).

# %%
per_seed = []
for s in seeds:
    st = sample if s == seeds[0] else sample_step(cfg, seed=s, lab=sample.lab)
    q = diagnostics.credit_summary(st, st.advantages_for(estimators))
    q.insert(0, "seed", s)
    per_seed.append(q)
per_seed = pd.concat(per_seed, ignore_index=True)
viz.save_table(per_seed, out_dir, "credit_quality_per_seed")
rows = []
for est, g in per_seed.groupby("estimator", sort=False):
    row = {"estimator": est, "n": n_credit}
    for col in ("auc", "auc_within_failed", "first_error_localisation"):
        m, lo, hi = claims.paired_difference([0.0] * len(g), g[col].tolist())  # mean and t-interval over seeds
        row.update({col: m, f"{col}_lo": lo, f"{col}_hi": hi})
    rows.append(row)
quality = pd.DataFrame(rows)
viz.save_table(quality, out_dir, "credit_quality")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
# several rows per estimator (one per seed): bars are the mean, error bars the 95% interval over seeds
viz.summary_bars(per_seed, "estimator", "auc", ax=axes[0], title=f"credit AUC (0.5 = no information; {n_credit})",
                 ylabel="AUC")
viz.summary_bars(per_seed, "estimator", "first_error_localisation", ax=axes[1],
                 title=f"first-error localisation ({n_credit})", ylabel="share of failures")
viz.save_fig(fig, out_dir, "credit_quality_bars")
quality

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
# `rel_var` = total variance of the R gradient estimates / squared norm of their mean, per seed (R resamples
# of the same prompts each); the claim is the ratio IBPO / GRPO (geometric mean over seeds, t-interval of the
# log ratios).

# %%
lab = sample.lab
examples = lab.task.examples("train", variance_prompts)
var = []
for s in seeds:
    v = diagnostics.gradient_variance(lab, examples, estimators=variance_estimators, resamples=variance_resamples,
                                      seed=1000 * s + 100, progress=False)
    v.insert(0, "seed", s)
    var.append(v)
var = pd.concat(var, ignore_index=True)
viz.save_table(var, out_dir, "gradient_variance")
n_var = claims.size(len(seeds), variance_prompts, group_size, resample=variance_resamples)
fig = viz.summary_bars(var, "estimator", "rel_var",
                       title=f"relative gradient variance, mean over seeds (lower is better; {n_var})")
viz.save_fig(fig, out_dir, "gradient_variance")
var

# %% [markdown]
# ## The claims, with their intervals and verdicts

# %%
rows = []
by = per_seed.set_index(["estimator", "seed"])
for col, what in (("auc", "credit AUC (steps, all trajectories)"),
                  ("first_error_localisation", "first-error localisation (failed trajectories)")):
    if {"grpo", "ibpo"} <= set(per_seed.estimator):
        a, b = by.loc["grpo"][col].reindex(seeds), by.loc["ibpo"][col].reindex(seeds)
        d, lo, hi = claims.paired_difference(a.tolist(), b.tolist())
        rows.append(claims.claim(NB, "IBPO's token credit points at the wrong steps better than GRPO's", what,
                                 "grpo", "ibpo", a.mean(), b.mean(), d, lo, hi, expect="higher", n=n_credit,
                                 interval=f"t over {len(seeds)} seeds (paired)"))
if {"grpo", "ibpo"} <= set(var.estimator):
    g = var.pivot(index="seed", columns="estimator", values="rel_var")
    r, lo, hi = claims.ratio_interval(g["grpo"].tolist(), g["ibpo"].tolist())
    rows.append(claims.claim(NB, "IBPO's policy gradient has lower variance than GRPO's", "relative gradient variance",
                             "grpo", "ibpo", g["grpo"].mean(), g["ibpo"].mean(), r, lo, hi, null=1.0, expect="lower",
                             n=n_var, interval=f"t over {len(seeds)} seeds of the log ratio",
                             note="per-seed ratios " + ", ".join(f"{x:.2f}" for x in g["ibpo"] / g["grpo"])))
claims.write_claims(rows, out_dir)
claims.claims_frame(rows)
