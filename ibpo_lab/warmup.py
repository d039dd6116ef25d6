"""Warm start: supervised fine-tuning of the tiny policy on the synthetic task's solve and repair
data, so RL starts from a policy that sometimes solves (room and signal for RL) and can already
compare-and-correct (IBPO's repairs need a policy that can use a reference).

    OMP_WAIT_POLICY=PASSIVE python -m ibpo_lab.warmup --out data/tiny-policy --steps 800 --seed 0

(``OMP_WAIT_POLICY=PASSIVE``: on a small shared CPU, busy-waiting OpenMP threads slow torch a lot.)

Each step trains on one batch mixing solve pairs (solve prompt -> a correct solution in a random
order, or, with probability ``error_rate``, a solution carrying one injected error) and repair pairs
(question + failed attempt + reference -> the oracle local repair), all from
``SyntheticTask.sft_pairs``. The loss is the token cross-entropy on the target tokens only (EOS
included, so generation learns to stop). The learning rate is constant after a linear warm-up, and
each step's batch depends only on (seed, step), so the checkpoint after k steps of a longer run is
the checkpoint of a k-step run.

``error_rate`` sets how often the warm policy fails: it learns to make the task's realistic errors
at about that rate, which pins solve pass@1 in the range RL needs more robustly than stopping a
steep learning curve early. The folder written holds the model (safetensors), the tokenizer, a
``warmup.json`` record (config, curve, final accuracies) and a model card ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from ibpo_lab.models import Policy, build_tiny_policy
from ibpo_lab.sampling import sample

__all__ = ["WarmupConfig", "warmup", "evaluate_policy", "sft_batch", "sft_loss", "repair_eval_set", "model_card", "main"]


@dataclass
class WarmupConfig:
    """Everything that determines the warm-started checkpoint."""

    out: str = field(default="data/tiny-policy", metadata={"help": "output folder (model, tokenizer, warmup.json, README.md)"})
    steps: int = field(default=800, metadata={"help": "optimiser steps"})
    save_every: int = field(default=0, metadata={"help": "also save a complete checkpoint (as a k-step run would) to OUT/step-k every k steps (0 = no)"})
    batch_size: int = field(default=64, metadata={"help": "sequences per step (solve + repair)"})
    repair_fraction: float = field(default=0.5, metadata={"help": "share of each batch that is repair pairs"})
    error_rate: float = field(default=0.25, metadata={"help": "share of solve targets carrying one injected error (caps solve accuracy)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (constant after warm-up)"})
    lr_warmup_steps: int = field(default=30, metadata={"help": "linear learning-rate warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and data order"})
    hidden_size: int = field(default=256, metadata={"help": "model width"})
    num_layers: int = field(default=4, metadata={"help": "transformer blocks"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    intermediate_size: int = field(default=688, metadata={"help": "MLP width"})
    context_length: int = field(default=1024, metadata={"help": "max positions (RoPE; repair prompts are ~130 chars)"})
    eval_every: int = field(default=50, metadata={"help": "evaluate every k steps (0 = only at the end)"})
    eval_prompts: int = field(default=200, metadata={"help": "test problems for solve pass@1 (T=1.0)"})
    eval_repairs: int = field(default=200, metadata={"help": "test (failed, reference) pairs for repair success (T=1.0)"})
    curve_prompts: int = field(default=100, metadata={"help": "test problems per intermediate evaluation"})
    max_new_tokens: int = field(default=96, metadata={"help": "generation budget during evaluation"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "context_length", "eval_prompts", "eval_repairs", "curve_prompts", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("lr_warmup_steps", "eval_every", "save_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("repair_fraction", "error_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


# ---------------------------------------------------------------------------- data
def sft_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """(prompt, target) pairs -> right-padded input_ids/attention_mask [B, L] and labels [B, L]
    (-100 on prompt and padding, so the loss is on target tokens + EOS only).

    Prompts are encoded exactly as the sampler encodes them (with BOS), targets without special
    tokens, then EOS."""
    rows, labels = [], []
    for prompt, target in pairs:
        p = tokenizer(prompt)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + t)
        labels.append([-100] * len(p) + t)
    L = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    lab = torch.full((len(rows), L), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), L), dtype=torch.long)
    for i, (r, y) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(y)] = torch.tensor(y)
        attn[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": lab}


def _step_pairs(task, cfg: WarmupConfig, step: int) -> list[list[tuple[str, str]]]:
    """The batch of ``step`` as [solve pairs, repair pairs]: a function of (seed, step) only.
    Kept apart so short solve sequences are not padded to the length of repair prompts."""
    n_rep = round(cfg.batch_size * cfg.repair_fraction)
    s = cfg.seed * 1_000_003 + step
    parts = [task.sft_pairs("solve", cfg.batch_size - n_rep, seed=s, error_rate=cfg.error_rate),
             task.sft_pairs("repair", n_rep, seed=s)]
    return [p for p in parts if p]


def sft_loss(model, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean token cross-entropy over the labelled (target) tokens of all ``batches`` together."""
    total, count = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        total = total + torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
        count += int((labels != -100).sum())
    return total / max(count, 1)


# ---------------------------------------------------------------------------- evaluation
def repair_eval_set(task, n: int, seed: int = 0) -> list[tuple[Any, str]]:
    """n (example, repair prompt) pairs from the test split: a correct solution with one injected
    error as the failed attempt, a different correct order as the reference."""
    rng = random.Random(f"warmup-repair-eval|{seed}")
    exs = task.examples("test")
    out = []
    for i in range(n):
        ex = exs[i % len(exs)]
        sol, ref = task.solutions(ex, 2, rng)
        failed = task.inject_error(ex, sol, rng).text
        out.append((ex, task.repair_prompt(ex, failed, ref)))
    return out


def evaluate_policy(policy: Policy, task, n_prompts: int = 200, n_repairs: int = 200, *, seed: int = 0,
                    temperature: float = 1.0, max_new_tokens: int = 96) -> dict[str, float]:
    """Solve pass@1 (one sample per test problem) and repair success (one repair per test
    (failed, reference) pair, success = the repair earns reward 1), both at ``temperature``."""
    exs = task.examples("test", n_prompts)
    b = sample(policy, [task.solve_prompt(e) for e in exs], n=1, max_new_tokens=max_new_tokens,
               temperature=temperature, seed=seed)
    solve = task.rewards(exs, b.responses)
    rep = repair_eval_set(task, n_repairs, seed)
    rb = sample(policy, [p for _, p in rep], n=1, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + 1)
    repair = task.rewards([e for e, _ in rep], rb.responses)
    return {
        "solve_pass@1": sum(solve) / len(solve),
        "repair_success": sum(repair) / len(repair),
        "n_solve": len(solve),
        "n_repair": len(repair),
        "truncated": sum(r == "length" for r in b.meta["finish_reason"] + rb.meta["finish_reason"]),
    }


# ---------------------------------------------------------------------------- training
def warmup(cfg: WarmupConfig, progress: bool = True) -> dict[str, Any]:
    """Train the tiny policy from scratch, save it to ``cfg.out`` with its record and model card."""
    from tqdm.auto import tqdm

    from ibpo_lab.tasks import get_task
    from ibpo_lab.tasks.synthetic import VOCAB

    task = get_task("synthetic")
    policy = build_tiny_policy(
        VOCAB, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, context_length=cfg.context_length, seed=cfg.seed,
    )
    model, tok = policy.model, policy.tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.lr_warmup_steps)))
    curve: list[dict[str, float]] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc="warmup", disable=not progress, mininterval=5)
    for step in bar:
        model.train()
        loss = sft_loss(model, [sft_batch(tok, part) for part in _step_pairs(task, cfg, step)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            m = evaluate_policy(policy, task, cfg.curve_prompts, cfg.curve_prompts, max_new_tokens=cfg.max_new_tokens)
            curve.append({"step": step, "loss": sum(losses[-20:]) / len(losses[-20:]), **m})
            bar.write(json.dumps(curve[-1]))
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            sub = replace(cfg, steps=step, save_every=0, out=str(Path(cfg.out) / f"step-{step}"))
            rec = _finish(policy, task, sub, curve, losses, time.perf_counter() - t0)
            bar.write(json.dumps({"saved": sub.out, **rec["final"]}))
    return _finish(policy, task, cfg, curve, losses, time.perf_counter() - t0)


def _finish(policy: Policy, task, cfg: WarmupConfig, curve: list[dict], losses: list[float], train_s: float) -> dict[str, Any]:
    """Final evaluation, then model + tokenizer + warmup.json + README.md into ``cfg.out``."""
    model = policy.model
    model.eval()
    final = evaluate_policy(policy, task, cfg.eval_prompts, cfg.eval_repairs, max_new_tokens=cfg.max_new_tokens)
    last = sum(losses[-20:]) / len(losses[-20:])
    curve = [c for c in curve if c["step"] <= cfg.steps]
    if not curve or curve[-1]["step"] != cfg.steps:
        curve.append({"step": cfg.steps, "loss": last,
                      **evaluate_policy(policy, task, cfg.curve_prompts, cfg.curve_prompts, max_new_tokens=cfg.max_new_tokens)})
    record = {
        "config": asdict(cfg),
        "params": policy.num_parameters(),
        "train_seconds": round(train_s, 1),
        "torch_threads": torch.get_num_threads(),
        "final": final,
        "curve": curve,
        "loss_first": losses[0],
        "loss_last20": last,
        "losses": [round(x, 4) for x in losses],
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    policy.tokenizer.save_pretrained(out)
    (out / "warmup.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "README.md").write_text(model_card(record))
    return record


#: the model card's YAML metadata (Hub format). No base_model: the policy is trained from a random
#: initialisation, not fine-tuned from another model.
CARD_METADATA = """---
library_name: transformers
license: mit
pipeline_tag: text-generation
tags:
- ibpo_lab
- llama
- synthetic-arithmetic
- character-level
---

"""


def model_card(record: dict[str, Any]) -> str:
    cfg, fin = record["config"], record["final"]
    rows = "\n".join(
        f"| {c['step']} | {c['loss']:.3f} | {c['solve_pass@1']:.2f} | {c['repair_success']:.2f} |" for c in record["curve"]
    )
    args = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in cfg.items() if k != "out")
    return CARD_METADATA + f"""# tiny-policy: warm-started character-level policy for the synthetic task

A {record['params'] / 1e6:.2f}M-parameter Llama-style causal LM (RoPE, {cfg['num_layers']} layers, width
{cfg['hidden_size']}, {cfg['num_heads']} heads, MLP {cfg['intermediate_size']}, context {cfg['context_length']},
tied embeddings) over a character tokenizer built from `ibpo_lab.tasks.synthetic.VOCAB`
(`<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3; BOS prepended). Load it with
`ibpo_lab.models.load_policy("tiny")`.

## Accuracies (test split, temperature 1.0, one sample each)

| metric | value | n |
|---|---|---|
| solve pass@1 | {fin['solve_pass@1']:.3f} | {fin['n_solve']} problems |
| repair success (failed attempt + correct reference -> rewarded repair) | {fin['repair_success']:.3f} | {fin['n_repair']} pairs |

Repair pairs: a correct solution with one error from `SyntheticTask.inject_error` as the failed
attempt, another correct order from `solutions` as the reference (`ibpo_lab.warmup.repair_eval_set`).

## Training

- data: `get_task("synthetic")` (default config, seed 0), train split; each step {cfg['batch_size']} pairs,
  {cfg['repair_fraction']:.0%} repair (`sft_pairs("repair")`: oracle local repair as target), the rest solve
  (`sft_pairs("solve", error_rate={cfg['error_rate']})`: that share of solve targets carries one injected
  error, which keeps solve pass@1 in the range RL needs); loss on target tokens + EOS only.
- optimiser: AdamW lr {cfg['lr']} (linear warm-up {cfg['lr_warmup_steps']} steps, then constant),
  weight decay {cfg['weight_decay']}, grad clip {cfg['grad_clip']}; {cfg['steps']} steps; seed {cfg['seed']}.
- wall time: {record['train_seconds']:.0f} s of training on {record['torch_threads']} CPU threads (shared machine).
- loss: {record['loss_first']:.3f} at step 1, {record['loss_last20']:.3f} over the last 20 steps.

Curve ({record['curve'][-1]['n_solve']} problems / pairs per point, one standard error up to ±{0.5 / math.sqrt(record['curve'][-1]['n_solve']):.2f}):

| step | loss | solve pass@1 | repair success |
|---|---|---|---|
{rows}

## Reproduce

```
OMP_WAIT_POLICY=PASSIVE python -m ibpo_lab.warmup --out data/tiny-policy {args}
```
Full record (config, curve): `warmup.json`.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ibpo_lab.warmup", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(WarmupConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default, help=f.metadata["help"])
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = vars(_parser().parse_args(argv))
    progress = not args.pop("no_progress")
    cfg = WarmupConfig(**args)
    rec = warmup(cfg, progress=progress)
    print(json.dumps({"out": cfg.out, "train_seconds": rec["train_seconds"], **rec["final"]}))
    return rec


if __name__ == "__main__":
    main()
