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
# # 09 · Results: every run record, summarised
#
# Loads the run records the training notebooks wrote (`runs_dir`; `reproduce` passes the run's
# `records/` folder) and draws the summary: final held-out accuracy per experiment and method (mean
# pooled over seeds, with a Wilson 95% interval that stays inside [0, 1]; n = seeds × prompts × samples),
# training stability, and reward curves. Wall time per profile: measured, in docs/notebooks.md.

# %% tags=["parameters"]
profile = "smoke"  # smoke: CI, minutes on a CPU; cpu: the main job, the claims in 15 min on 2 cores; full: one 80 GB GPU (this notebook only reads records)
out_dir = None  # folder for figures and tables (reproduce sets it); None: only show them
runs_dir = None  # folder of run records to summarise; None: runs/notebooks under the working folder
metric = "reward_mean"  # training metric whose curves are drawn

# %%
from ibpo_lab import claims, runs
from ibpo_lab import viz

records = runs.load_runs(runs_dir or "runs/notebooks")
print(f"{len(records)} runs in {len(set(r.experiment for r in records))} experiments")

# %%
final = claims.accuracy_table(records)
viz.save_table(final, out_dir, "summary_final_accuracy")
final

# %%
stability = runs.stability_table(records)
viz.save_table(stability[["experiment", "label", "n_seeds", "steps", "final_reward", "run_to_run_std", "step_jitter",
                          "entropy_start", "entropy_end", "grad_norm_mean", "grad_norm_max", "skipped"]],
               out_dir, "summary_stability")
stability

# %%
for exp in sorted(set(r.experiment for r in records)):
    recs = [r for r in records if r.experiment == exp]
    fig = viz.learning_curves(recs, metric, title=f"{exp}: {viz.axis_label(metric)}")
    viz.save_fig(fig, out_dir, f"curves_{exp}")

# %% [markdown]
# ## Explore any run (needs a live kernel; the static views are in notebooks 04 and 05)

# %%
viz.explorer(runs_dir or "runs/notebooks")
