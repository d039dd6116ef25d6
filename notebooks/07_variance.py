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
# # 07 · The variance argument, measured
#
# IBPO shapes the reward before group centring: R' = R + λφ, with the published φ = ρ·1[a repair
# verified] on failed trajectories and 0 on correct ones (`advantages.repair_phi`). Within a group,
#
# Var(R') = Var(R) + λ²·Var(φ) + 2λ·Cov(R, φ).
#
# φ is non-zero only where R = 0, so Cov(R, φ) ≤ 0: the comparison signal pulls repairable failures
# towards the successes and the shaped reward can have *lower* variance than the terminal one. Here
# every term is measured on sampled groups, and Var(R + λφ) is traced over λ.
#
# What the estimator then does with R' (default `sign_rule="safe"`): a failed trajectory's advantage is
# min(A', (1 − λφ)·min(0, A_GRPO)), A' the group-centred R' — the shaped value, but never less penalty
# than (1 − λφ) of GRPO's, so never positive. Shaping therefore shrinks the penalty of repairable
# failures (a near miss ranks above a plain failure) without ever rewarding a failed attempt. In an
# all-failed group GRPO has no signal; there repaired failures get 0 and unrepaired ones keep their
# negative shaped value — which needs a repair without a correct sibling (`correct.no_correct="any"`
# or the oracle corrector; the default `"skip"` repairs nothing there).
#
# The claims — Cov(R, φ) < 0, the variance shaping adds, the groups it revives — are written with a
# bootstrap interval over groups to `claims.json`. Wall time per profile: measured, in docs/notebooks.md.

# %% tags=["parameters"]
profile = "smoke"  # smoke: CI, minutes on a CPU; cpu: the main job, the claims in 15 min on 2 cores; full: one 80 GB GPU
out_dir = None  # folder for figures and tables (reproduce sets it); None: only show them
seed = 0  # sampling seed
model = None  # policy; None: the committed tiny policy
n_prompts = None  # groups sampled; None: 8 (smoke) / 48 (cpu) / 256 (full)
group_size = 8  # trajectories per group (G)
repair_k = 2  # references per failed trajectory (K)
lam = 0.6  # IBPO λ
rho = 0.5  # IBPO ρ
lams = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0]  # λ values traced

# %%
import matplotlib.pyplot as plt
import pandas as pd

from ibpo_lab import claims, config, diagnostics
from ibpo_lab.step import sample as sample_step
from ibpo_lab import viz

config.require_gpu_for_full(profile)
n_prompts = n_prompts or config.profile_value(profile, 8, 256, cpu=48)
knobs = {"model": model} if model else {}
cfg = config.synthetic_preset(profile, prompts_per_step=n_prompts, group_size=group_size, minibatch_size=0,
                              estimator="ibpo", correct={"num_references": repair_k},
                              estimator_kwargs={"lam": lam, "rho": rho}, **knobs)
sample = sample_step(cfg, seed=seed)
sample.batch

# %%
moments = diagnostics.shaping_moments(sample, lam, rho)
viz.save_table(moments, out_dir, "moments_by_group")
moments

# %%
pooled = moments.iloc[-1]
terms = pd.DataFrame({"term": ["Var(R)", "λ²·Var(φ)", "2λ·Cov(R,φ)", "Var(R + λφ)"],
                          "value": [pooled.var_R, lam**2 * pooled.var_phi, 2 * lam * pooled.cov_R_phi,
                                    pooled.var_shaped]})
curve = diagnostics.shaping_variance_curve(sample, lams, rho)
viz.save_table(curve, out_dir, "variance_vs_lambda")
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
n_groups = claims.size(None, n_prompts, group_size)
viz.summary_bars(terms, "term", "value", ax=axes[0], title=f"pooled within-group terms (λ={lam}, ρ={rho}; {n_groups})",
                 ylabel="pooled within-group variance")
axes[1].plot(curve.lam, curve.var_shaped, "o-", label="measured Var(R + λφ)")
axes[1].plot(curve.lam, curve.var_decomposed, "--", label="Var(R) + λ²Var(φ) + 2λCov(R,φ)")
axes[1].axhline(pooled.var_R, color="grey", lw=0.8, label="Var(R) (no shaping)")
axes[1].set_xlabel(viz.axis_label("lam"))
axes[1].set_ylabel("pooled within-group variance")
axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
viz.save_fig(fig, out_dir, "variance_decomposition")

# %% [markdown]
# Groups GRPO cannot learn from (all failed or all correct) and how many of them IBPO gives a signal
# (all-failed groups only, and only where some member was repaired; see above):

# %%
per_group = moments[moments.group >= 0]
revived = sample.advantages_for(["grpo", "ibpo"])
live = diagnostics.credit_summary(sample, revived)[["estimator", "live_group_share", "live_trajectory_share", "live_token_share"]]
viz.save_table(live, out_dir, "effective_updates")
print(f"{int(per_group.all_failed.sum())} all-failed and {int(per_group.all_correct.sum())} all-correct groups "
      f"of {len(per_group)}")
live

# %% [markdown]
# ## The claims (bootstrap over the groups of the batch)

# %%
import numpy as np

NB = "07_variance"
g = per_group.copy()
w = (g.n - 1).clip(lower=0)
adv = revived
gid = sample.batch.group_ids.numpy()
for name in ("grpo", "ibpo"):
    live_traj = (adv[name].abs().amax(dim=1) > 0).numpy()
    g[f"live_{name}"] = [float(live_traj[gid == k].any()) for k in g.group]
g["w"] = w
pooled_cov = lambda d: float(np.average(d.cov_R_phi, weights=d.w)) if d.w.sum() > 0 else float("nan")  # noqa: E731
added = lambda d: float(np.average(d.var_shaped - d.var_R, weights=d.w)) if d.w.sum() > 0 else float("nan")  # noqa: E731
revive = lambda d: float(d.live_ibpo.mean() - d.live_grpo.mean())  # noqa: E731
n_b = claims.size(1, n_prompts, group_size)
how = f"percentile bootstrap over the {len(g)} groups"
rows = []
est, lo, hi = claims.bootstrap_difference(g, pooled_cov)
rows.append(claims.claim(NB, "the comparison signal φ is anti-correlated with the reward within a group",
                         "pooled within-group Cov(R, φ)", "zero", "measured", 0.0, est, est, lo, hi, expect="lower",
                         n=n_b, interval=how))
est, lo, hi = claims.bootstrap_difference(g, added)
rows.append(claims.claim(NB, "shaping R + λφ need not add reward variance (Cov(R, φ) offsets λ²Var(φ))",
                         f"pooled Var(R + λφ) − Var(R) at λ={lam}, ρ={rho}", "Var(R)", "Var(R + λφ)",
                         float(pooled.var_R), float(pooled.var_shaped), est, lo, hi, expect="lower", n=n_b,
                         interval=how))
est, lo, hi = claims.bootstrap_difference(g, revive)
rows.append(claims.claim(NB, "shaping gives a signal to groups GRPO cannot learn from (all failed)",
                         "share of groups with a non-zero advantage", "grpo", "ibpo", float(g.live_grpo.mean()),
                         float(g.live_ibpo.mean()), est, lo, hi, expect="higher", n=n_b, interval=how))
claims.write_claims(rows, out_dir)
claims.claims_frame(rows)
