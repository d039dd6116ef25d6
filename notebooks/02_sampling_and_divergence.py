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
# # 02 · Sampling and trajectory divergence
#
# Where do the trajectories of one group part ways? Token-level and step-level divergence
# heatmaps (cell *i, j* = length of the prefix trajectories *i* and *j* share), the group's
# step prefix trie (the structure the prefix-tree estimator reads), and the repairs of the failed
# trajectories as diffs (red: changed in the failed attempt, green: written by the repair).
#
# Wall time per profile: measured, in docs/notebooks.md (written from the last recorded runs).

# %% tags=["parameters"]
profile = "smoke"  # smoke: CI, minutes on a CPU; cpu: the main job, the claims in 15 min on 2 cores; full: one 80 GB GPU
out_dir = None  # folder for figures and tables (reproduce sets it); None: only show them
seed = 0  # sampling seed
model = None  # policy name or path; None: the profile's preset
task = None  # task name; None: the profile's preset
n_prompts = 2  # groups sampled
group_size = 8  # trajectories per group (G)
max_new_tokens = None  # response length limit; None: the preset's
corrector = "policy"  # compare-and-correct operator: policy, splice, oracle (synthetic only)
repair_k = 2  # references per failed trajectory (K)
temperature = 1.0  # sampling temperature (higher: earlier divergence)
max_diffs = 4  # repair diffs shown

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from ibpo_lab import config, diagnostics
from ibpo_lab.step import sample as sample_step
from ibpo_lab import viz

config.require_gpu_for_full(profile)
knobs = {k: v for k, v in dict(model=model, task=task, max_new_tokens=max_new_tokens).items() if v is not None}
cfg = config.presets(profile, group_size=group_size, prompts_per_step=n_prompts, minibatch_size=0,
                     correct={"operator": corrector, "num_references": repair_k}, temperature=temperature, **knobs)
sample = sample_step(cfg, seed=seed)
sample.batch

# %% [markdown]
# ## Divergence heatmaps of each group (tokens and steps)

# %%
summary = []
for g in sorted(sample.batch.groups()):
    v = diagnostics.group_views(sample, g)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    viz.divergence_heatmap(v["token_divergence"], axes[0], rewards=v["rewards"], title=f"group {g}: shared prefix")
    viz.divergence_heatmap(v["step_divergence"], axes[1], rewards=v["rewards"], unit="steps",
                           title=f"group {g}: shared steps")
    viz.save_fig(fig, out_dir, f"divergence_group{g}")
    summary.append(diagnostics.divergence_summary(v, g))
summary = pd.DataFrame(summary)
viz.save_table(summary, out_dir, "divergence_summary")
summary

# %% [markdown]
# ## The step prefix trie of the first group
# Each node is a step prefix shared by some trajectories (the number in it); its colour is their
# mean reward — the Monte-Carlo value the prefix-tree estimator differences step by step.

# %%
v = diagnostics.group_views(sample, sorted(sample.batch.groups())[0])
fig = viz.prefix_trie_plot(v["trie"])
viz.save_fig(fig, out_dir, "prefix_trie")
v["trie"].to_dataframe().head(20)

# %% [markdown]
# ## Repair diffs

# %%
repaired = [i for i in range(len(sample.batch)) if sample.repair_of(i) is not None]
print(f"{len(repaired)} of {int((sample.batch.rewards < 0.5).sum())} failed trajectories have a verified repair")
for i in repaired[:max_diffs]:
    failed, fixed = sample.repair_of(i)
    view = viz.repair_diff_html(failed, fixed, sample.tokenizer, title=f"trajectory {i}")
    viz.save_html(view, out_dir, f"repair_diff_{i}")
    display(view)
