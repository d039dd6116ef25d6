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
# # 01 · Quickstart: one IBPO step taken apart
#
# One group of trajectories is **sampled** for one prompt, **rewarded** (0/1 terminal reward),
# its failed members are **repaired** by the policy itself with a sibling as reference
# (compare-and-correct), and the token **advantages of every estimator** are put side by side.
#
# IBPO shapes the reward before group centring, R' = R + λ·φ with the published φ = ρ·1[a repair
# verified] on failed trajectories (0 on correct ones). A failed trajectory's advantage is sign-safe:
# the group-centred R', but never less penalty than (1 − λφ) times its GRPO penalty, so it is never
# positive — a verified repair softens the penalty of a near miss, it cannot turn it into a reward.
# Token credit: a failed trajectory with a verified repair gets its (negative) advantage only on the
# tokens the repair edited, 0 on the others; correct trajectories and unrepaired failures get their
# sequence advantage on every token.
#
# Wall time per profile: measured, in docs/notebooks.md (written from the last recorded runs).

# %% tags=["parameters"]
profile = "smoke"  # smoke: CI, minutes on a CPU; cpu: the main job, the claims in 15 min on 2 cores; full: one 80 GB GPU
out_dir = None  # folder for figures and tables (reproduce sets it); None: only show them
seed = 0  # sampling seed
model = None  # policy name or path; None: the profile's preset (tiny / Qwen2.5-1.5B-Instruct)
task = None  # task name; None: the profile's preset (synthetic / gsm8k)
group_size = 8  # trajectories sampled for the prompt (G)
max_new_tokens = None  # response length limit; None: the preset's
corrector = "policy"  # compare-and-correct operator: policy, splice, oracle (synthetic only)
repair_k = 2  # sibling references (repairs) per failed trajectory, K
lam = 0.6  # IBPO shaping weight λ
rho = 0.5  # IBPO shaping scale ρ
estimators = ["grpo", "dr_grpo", "rloo", "prefix_tree", "vineppo", "ibpo"]  # shown side by side
mc_rollouts = 2  # VinePPO continuations per step boundary

# %%
from IPython.display import display

from ibpo_lab import config, diagnostics
from ibpo_lab.step import sample as sample_step
from ibpo_lab import viz

config.require_gpu_for_full(profile)
knobs = {k: v for k, v in dict(model=model, task=task, max_new_tokens=max_new_tokens).items() if v is not None}
cfg = config.presets(profile, group_size=group_size, correct={"operator": corrector, "num_references": repair_k},
                     estimator_kwargs={"lam": lam, "rho": rho}, mc_rollouts=mc_rollouts,
                     prompts_per_step=1, minibatch_size=0, **knobs)
sample = sample_step(cfg, n_prompts=1, seed=seed)
print(sample.examples[0].prompt)
sample.batch

# %% [markdown]
# ## The group: rewards and repairs
# `repair_success` is the share of a failed trajectory's revisions that verify; φ = ρ·1[repair_success > 0]
# (the estimator's `phi="share"` ablation uses ρ·repair_success instead). `n_edited` is how many of its
# tokens the best repair changed — for a repaired failure, the only tokens IBPO credits.

# %%
group = sample.batch.to_dataframe()[["traj", "reward", "repair_success", "n_edited", "response_len", "response"]]
viz.save_table(group, out_dir, "group")
group

# %%
repairs = sample.repairs
if len(repairs):
    display(repairs[["traj", "reference_traj", "reward", "verified", "edit_distance", "n_edited", "selected"]])
else:
    print("no failed trajectory had a correct sibling to compare with: nothing was repaired this time")

# %% [markdown]
# ## Advantages of every estimator, side by side
# One row per trajectory, one column per response token; red = negative credit, blue = positive,
# black ticks = step boundaries. GRPO/RLOO/Dr. GRPO give every token of a trajectory the same value;
# prefix-tree and VinePPO vary by step; IBPO puts a repaired failure's blame on its edited tokens only
# (never positive credit on a failed trajectory), and gives correct and unrepaired trajectories their
# sequence advantage on every token, as GRPO does.

# %%
advantages = sample.advantages_for(estimators)
b = sample.batch
fig = viz.advantage_panel(advantages, b.response_mask, rewards=b.rewards, group_ids=b.group_ids,
                          step_spans=b.step_spans, title="token advantages by estimator")
viz.save_fig(fig, out_dir, "advantages_by_estimator")

# %%
means = diagnostics.sequence_advantages(sample, advantages)
viz.save_table(means, out_dir, "mean_advantage_per_trajectory")
means

# %% [markdown]
# ## One failed trajectory: its tokens by advantage, and its repair

# %%
i = sample.pick_trajectory("repaired")
for name in ("grpo", "ibpo"):
    if name in advantages:
        view = viz.batch_token_html(b, advantages[name], sample.tokenizer, i)
        viz.save_html(view, out_dir, f"tokens_{name}")
        display(view)
pair = sample.repair_of(i)
if pair is not None:
    view = viz.repair_diff_html(pair[0], pair[1], sample.tokenizer, title=f"repair of trajectory {i}")
    viz.save_html(view, out_dir, "repair_diff")
    display(view)
else:
    print(f"trajectory {i} has no verified repair")
