"""Benchmark 3c — one GRPO training step of ibpo_lab against TRL's ``GRPOTrainer``, on the CPU.

Same tiny model (two copies of the same weights), same prompts, group size, completion length,
temperature, learning rate, clip range, token-mean loss and no KL reference. TRL runs its own
``trainer.train()`` loop; a callback times each of its steps (``on_step_begin`` → ``on_step_end``:
generation, rewards, advantages, forward/backward, clipping, optimiser) and, right after each
one, runs and times one ibpo_lab step — so the two alternate in one process under the same load.
The ibpo_lab step is the one step training takes (``ibpo_lab.step.take_step``: ``sample_groups`` →
``score_groups`` → ``compute_advantages`` (grpo) → ``policy_update`` (ppo) → ``sync_weights``).
The first step of each is a warm-up and is not counted; the ratio is of medians.

Two TRL settings are measured, each alternated with ibpo_lab: gradient checkpointing off (the
target compares against this) and TRL's default (gradient checkpointing on). Both use float32,
as ibpo_lab does (TRL's ``bf16=True`` default is a separate precision choice).

    python -m benchmarks.trl_step             # writes benchmarks/results/trl_step.{md,png}
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from benchmarks.common import Report, Target, cli_main, tiny_policy_or_random

NAME = "trl_step"


@dataclass
class StepSetup:
    """The shared sizes of one comparison."""

    prompts: int = 8
    group_size: int = 8
    max_new_tokens: int = 64
    lr: float = 1e-4
    measured_steps: int = 10  # after one warm-up step each
    temperature: float = 1.0


def lab_stepper(policy, task, examples, s: StepSetup, seed: int = 0):
    """A function that runs one ibpo_lab GRPO step on ``policy`` (its own AdamW) and returns
    (seconds, mean completion length, seconds spent sampling)."""
    import torch

    from ibpo_lab.config import TrainConfig
    from ibpo_lab.step import build_lab, step_seed, take_step
    from ibpo_lab.train import policy_update

    cfg = TrainConfig(task="synthetic", model="tiny", device="cpu", estimator="grpo", loss="ppo", agg="token-mean",
                        prompts_per_step=s.prompts, group_size=s.group_size, max_new_tokens=s.max_new_tokens,
                        temperature=s.temperature, lr=s.lr, kl_coef=0.0, minibatch_size=0, ppo_epochs=1,
                        max_grad_norm=1.0, clip_low=0.2, clip_high=0.2)
    model = policy.model
    model.eval()  # the lab's trainer keeps the model in eval mode (no dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    lab = build_lab(cfg, policy=policy, task=task)
    sampler = lab.sampler
    sampler.sync_weights(model)
    device = torch.device("cpu")
    counter = [0]

    def step() -> tuple[float, float, float]:
        counter[0] += 1
        t0 = time.perf_counter()
        st = take_step(lab, examples, seed=step_seed(seed, counter[0]))
        policy_update(model, None, opt, st.batch, st.advantage, cfg, device)
        sampler.sync_weights(model)
        return time.perf_counter() - t0, float(st.batch.response_lengths.float().mean()), st.timings["time_sample"]

    return step


def trl_trainer(policy, task, examples, s: StepSetup, gradient_checkpointing: bool, out_dir: str, callback):
    """A ``trl.GRPOTrainer`` over ``policy`` with the shared sizes and ``callback`` attached."""
    from trl import GRPOConfig, GRPOTrainer

    from ibpo_lab.integrations.trl import task_dataset, task_reward_func

    args = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, report_to="none", seed=0, save_strategy="no",
        disable_tqdm=True, logging_steps=10_000, max_steps=s.measured_steps + 1,
        per_device_train_batch_size=s.prompts * s.group_size, num_generations=s.group_size,
        max_completion_length=s.max_new_tokens, temperature=s.temperature, learning_rate=s.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group", num_iterations=1,
        gradient_checkpointing=gradient_checkpointing, dataloader_num_workers=0,
    )
    return GRPOTrainer(
        model=policy.model, args=args, reward_funcs=task_reward_func(task, examples),
        train_dataset=task_dataset(task, examples=examples), processing_class=policy.tokenizer,
        callbacks=[callback],
    )


def compare(policy, task, examples, s: StepSetup, gradient_checkpointing: bool) -> pd.DataFrame:
    """Alternate TRL and ibpo_lab steps (fresh copies of ``policy`` each). -> one row per step pair:
    pair, trl_s, lab_s, trl_tokens, lab_tokens, warmup."""
    from transformers import TrainerCallback

    from ibpo_lab.models import Policy

    trl_policy = Policy(model=copy.deepcopy(policy.model), tokenizer=policy.tokenizer, name="trl copy")
    lab_policy = Policy(model=copy.deepcopy(policy.model), tokenizer=policy.tokenizer, name="lab copy")
    lab = lab_stepper(lab_policy, task, examples, s)
    rows: list[dict[str, Any]] = []
    # TRL generates with the model's own generate() (one process, CPU: the unwrapped model is this
    # object), so timing that method gives TRL's generation time per step
    gen_time = [0.0]
    generate = trl_policy.model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        try:
            return generate(*a, **kw)
        finally:
            gen_time[0] += time.perf_counter() - t0

    trl_policy.model.generate = timed_generate

    class Alternate(TrainerCallback):
        t0 = 0.0
        trainer = None  # set once the trainer exists: its metrics hold the completion lengths

        def on_step_begin(self, args, state, control, **kw):
            gen_time[0] = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            trl_s = time.perf_counter() - self.t0
            # TRL appends the mean completion length of each generation batch (one per step here);
            # read before its logger clears the buffer
            lens = self.trainer._metrics.get("train", {}).get("completions/mean_length", []) if self.trainer else []
            trl_gen = gen_time[0]
            lab_s, lab_tok, lab_sample = lab()
            rows.append({"pair": len(rows), "trl_s": trl_s, "lab_s": lab_s, "trl_generate_s": trl_gen,
                         "lab_sample_s": lab_sample, "trl_tokens": float(lens[-1]) if lens else np.nan,
                         "lab_tokens": lab_tok})

    cb = Alternate()
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp, warnings.catch_warnings():
        # transformers 5 renames gradient_checkpointing to activation_checkpointing; TRL still uses the old name
        warnings.simplefilter("ignore", FutureWarning)
        trainer = trl_trainer(trl_policy, task, examples, s, gradient_checkpointing, tmp, cb)
        cb.trainer = trainer
        trainer.train()
    df = pd.DataFrame(rows)
    df["warmup"] = df["pair"] == 0
    return df


def summary(results: dict[str, pd.DataFrame]) -> pd.DataFrame:
    rows = []
    for setting, df in results.items():
        m = df[~df["warmup"]]
        trl, lab = float(m["trl_s"].median()), float(m["lab_s"].median())
        rows.append({
            "TRL setting": setting, "steps (median of)": len(m), "TRL s/step": trl, "ibpo_lab s/step": lab,
            "ratio lab/TRL": lab / trl, "ratio per pair (min–max)":
                f"{(m['lab_s'] / m['trl_s']).min():.2f}–{(m['lab_s'] / m['trl_s']).max():.2f}",
            "TRL generate s": float(m["trl_generate_s"].median()),
            "lab sample s": float(m["lab_sample_s"].median()),
            "TRL rest s": float((m["trl_s"] - m["trl_generate_s"]).median()),
            "lab rest s": float((m["lab_s"] - m["lab_sample_s"]).median()),
            "TRL tokens/completion": float(m["trl_tokens"].mean()) if m["trl_tokens"].notna().any() else float("nan"),
            "lab tokens/completion": float(m["lab_tokens"].mean()),
        })
    return pd.DataFrame(rows)


def figure(results: dict[str, pd.DataFrame]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.4), squeeze=False)
    for ax, (setting, df) in zip(axes[0], results.items()):
        ax.plot(df["pair"], df["trl_s"], "o-", label="TRL GRPOTrainer")
        ax.plot(df["pair"], df["lab_s"], "s-", label="ibpo_lab GRPO")
        ax.axvspan(-0.5, 0.5, color="0.9", label="warm-up (not counted)")
        ax.set(xlabel="step (alternating)", ylabel="seconds", title=f"TRL {setting}", ylim=(0, None))
        ax.legend(fontsize=8)
    fig.suptitle("One GRPO training step: ibpo_lab vs TRL (CPU)")
    fig.tight_layout()
    return fig


def run(quick: bool = False, setup: StepSetup | None = None) -> Report:
    import torch

    from ibpo_lab.models import build_tiny_policy, load_policy
    from ibpo_lab.tasks import get_task
    from ibpo_lab.tasks.synthetic import VOCAB

    t0 = time.perf_counter()
    s = setup or (StepSetup(prompts=2, group_size=2, max_new_tokens=8, measured_steps=1) if quick else StepSetup())
    model_name, model_desc = tiny_policy_or_random(quick)
    policy = load_policy("tiny") if model_name == "tiny" else build_tiny_policy(VOCAB, seed=0)
    task = get_task("synthetic")
    examples = task.examples("train", s.prompts)
    torch.manual_seed(0)
    results = {
        "gradient checkpointing off": compare(policy, task, examples, s, gradient_checkpointing=False),
        "defaults (gradient checkpointing on)": compare(policy, task, examples, s, gradient_checkpointing=True),
    }
    table = summary(results)
    import trl

    rep = Report(name=NAME, title="One GRPO step: ibpo_lab vs TRL GRPOTrainer (CPU)",
                 setup={"policy": model_desc, "params": f"{sum(p.numel() for p in policy.model.parameters()) / 1e6:.2f}M",
                        "prompts": s.prompts, "group size": s.group_size, "max new tokens": s.max_new_tokens,
                        "lr": s.lr, "trl": trl.__version__, "precision": "float32 both"})
    rep.tables.append(("Seconds per step (median over alternating steps, warm-up excluded)", table))
    per_step = pd.concat([df.assign(setting=k) for k, df in results.items()], ignore_index=True)
    rep.tables.append(("Every step", per_step[["setting", "pair", "warmup", "trl_s", "lab_s", "trl_generate_s",
                                                "lab_sample_s", "trl_tokens", "lab_tokens"]]))
    off = table.iloc[0]
    rep.targets.append(Target(
        "ibpo_lab GRPO step / TRL GRPOTrainer step (checkpointing off)", "≤ 0.8", float(off["ratio lab/TRL"]),
        float(off["ratio lab/TRL"]) <= 0.8,
        f"generation: ibpo_lab {off['lab sample s']:.2f} s vs TRL {off['TRL generate s']:.2f} s; everything else: "
        f"ibpo_lab {off['lab rest s']:.2f} s vs TRL {off['TRL rest s']:.2f} s. Both run the same model's forward "
        "passes token by token with a KV cache, and one forward/backward over the same tokens; at 3M parameters on "
        "2 cores that compute, not framework overhead, is most of the step"))
    rep.notes.append("generate/sample = generation of the completions (TRL: time inside model.generate; ibpo_lab: "
                     "its sampler); rest = rewards, advantages, forward/backward, optimiser and framework overhead")
    rep.notes.append("TRL tokens/completion is TRL's own completions/mean_length metric; ibpo_lab's is the mean "
                     "response length of its batch. Equal lengths mean equal generation work.")
    rep.figure = figure(results)
    rep.seconds = time.perf_counter() - t0
    return rep


def main(argv: Sequence[str] | None = None) -> Report:
    return cli_main(run, "trl_step", __doc__, argv)


if __name__ == "__main__":
    main()
