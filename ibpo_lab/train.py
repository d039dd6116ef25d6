"""The training loop: sample groups → rewards → (IBPO) compare-and-correct → advantages → PPO/GSPO update.

One file, CleanRL style. ``TrainConfig`` says everything a run does (help text on every field,
YAML in and out, validated before any work starts); ``train(cfg, out_dir)`` runs it and writes a
run folder that notebooks read back with ``load_run``:

    run_dir/
      config.yaml                  the exact config (load with TrainConfig.from_yaml)
      metrics.jsonl                one row per step (rewards, accuracy, entropy, KL, clip fraction,
                                   grad norm, zero-variance groups, active tokens, repair success, timings)
      eval.jsonl                   one row per held-out evaluation (pass@1, avg@k, pass@k with CIs)
      trajectories/step_000001.parquet   every trajectory of a step (text, reward, group, example_id,
                                   step_labels, per-token advantages and masks, repair text);
                                   ``RunRecord.trajectories(step)``
      checkpoint/state.pt          model, optimiser, scheduler, RNG states, step counter (resume);
                                   absent with ``save_checkpoints=False`` (such a run cannot be resumed)

From a shell (prints the run folder at the end)::

    python -m ibpo_lab.train ibpo_lab/configs/ibpo.yaml --set seed=1 lam=0.3 --out runs/ibpo-lam0.3
    python -m ibpo_lab.train smoke --set estimator=grpo          # a preset instead of a file
    python -m ibpo_lab.train ibpo_lab/configs/ibpo.yaml --out runs/ibpo-lam0.3 --resume

A step is a short sequence of named phases (``sample_groups``, ``score_groups``, ``correct_groups``,
``step_values``, ``compute_advantages``, ``policy_update``); each is timed and the timings go in the
metrics table. RNGs are reseeded from ``(seed, step)`` at the start of every step, so a killed and
resumed run reproduces an uninterrupted one exactly on the ``hf`` backend.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import io
import json
import math
import os
import random
import shutil
import sys
import time
import typing
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import yaml

from ibpo_lab.advantages import get_estimator, ibpo_repair_advantages, list_estimators
from ibpo_lab.correct import CorrectConfig, compare_and_correct
from ibpo_lab.losses import AGG_MODES, get_loss, list_losses, truncated_is_weights
from ibpo_lab.mc_values import mc_step_values
from ibpo_lab.models import build_tiny_policy, load_policy, response_logprobs
from ibpo_lab.rollout import PaddedBatch, RolloutBatch, concat_batches
from ibpo_lab.sampling import get_sampler
from ibpo_lab.steps import split_steps
from ibpo_lab.tasks import get_task, list_tasks

__all__ = [
    "TrainConfig",
    "RunRecord",
    "NonFiniteLossError",
    "presets",
    "train",
    "train_many",
    "load_run",
    "evaluate",
    "summarise_runs",
    "build_task",
    "build_policy",
    "sample_groups",
    "score_groups",
    "correct_groups",
    "correct_config",
    "step_values",
    "compute_advantages",
    "offpolicy_repairs",
    "repaired_advantages",
    "policy_update",
    "batch_metrics",
    "trajectory_frame",
    "safe_step_labels",
    "save_checkpoint",
    "step_seed",
    "mean_ci",
    "resolve_device",
    "CONFIG_DIR",
    "METRIC_HELP",
    "main",
]

#: the committed configs (one per estimator on the synthetic task, plus the IBPO ablations)
CONFIG_DIR = Path(__file__).parent / "configs"

#: estimators that need compare-and-correct before the advantage (they read repair_success/edit_masks)
CORRECTING_ESTIMATORS = ("ibpo",)
CORRECTORS = ("policy", "splice", "oracle")
BACKENDS = ("hf", "vllm")
DTYPES = ("float32", "bfloat16", "float16")
LR_SCHEDULES = ("constant", "linear", "cosine")
#: the model name that builds a randomly initialised tiny policy over the task's vocabulary
RANDOM_TINY = "tiny-random"
#: consecutive skipped (non-finite) optimiser steps after which the run stops
MAX_CONSECUTIVE_SKIPS = 3

#: the columns of metrics.jsonl (one row per step); loss_* columns carry the loss's own metrics and
#: correct_* columns the corrector's stats (counts, success rates, φ mean, edited tokens)
METRIC_HELP: dict[str, str] = {
    "step": "training step, from 1",
    "reward_mean": "mean terminal reward of the sampled trajectories",
    "accuracy": "share of sampled trajectories with reward >= 1",
    "zero_var_groups": "share of groups whose rewards are all equal (no group-relative signal)",
    "active_tokens": "share of response tokens with a non-zero advantage (credited tokens)",
    "response_len": "mean response length in tokens",
    "repair_success": "mean share of verified repairs over failed trajectories (NaN without a corrector)",
    "entropy": "mean token entropy of the policy on the sampled responses",
    "approx_kl": "k3 estimate of KL(behaviour || current) during the update",
    "clip_frac": "share of tokens whose ratio was clipped",
    "kl_ref": "k3 KL to the frozen reference policy (only with kl_coef > 0)",
    "loss": "mean policy loss over micro-batches",
    "grad_norm": "mean gradient norm before clipping over the step's optimiser steps",
    "updates": "optimiser steps taken this step",
    "skipped": "optimiser steps skipped this step (non-finite loss or gradient)",
    "skipped_total": "optimiser steps skipped so far in the run",
    "lr": "learning rate used this step",
    "n_repaired": "verified repairs this step (trained off-policy only in bilateral mode)",
    "time_sample": "seconds sampling the groups",
    "time_reward": "seconds scoring rewards and splitting steps",
    "time_correct": "seconds in compare-and-correct (IBPO) or Monte-Carlo step values (VinePPO)",
    "time_advantage": "seconds computing advantages (and importance weights of repairs)",
    "time_update": "seconds in the PPO/GSPO update and the sampler weight sync",
    "time_step": "seconds for the whole step (evaluation and checkpoint excluded)",
}


# ======================================================================================== config
def _f(default, help: str, **kw):
    """A dataclass field with help text (mutable defaults go through a factory)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    """Everything one training run does. Build it in code, from YAML (``from_yaml``) or from a
    preset (``presets("smoke")``); ``validate()`` runs on construction and names the bad field."""

    # -- run ------------------------------------------------------------------------------
    label: str = _f("", "name of this configuration, used to group seeds and ablations in summaries "
                        "(empty: the estimator name)")
    seed: int = _f(0, "run seed; every step reseeds python/numpy/torch from (seed, step)")
    device: str = _f("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'")

    # -- task -----------------------------------------------------------------------------
    task: str = _f("synthetic", "task name for ibpo_lab.tasks.get_task (synthetic, gsm8k, math, humaneval, rg:<name>)")
    task_kwargs: dict = _f({}, "keyword arguments for the task constructor")
    train_split: str = _f("train", "split the training prompts are drawn from")
    step_delimiter: str = _f("", "how responses split into steps (ibpo_lab.steps.split_steps); empty: the task's own")

    # -- model and sampler ----------------------------------------------------------------
    model: str = _f("tiny", "policy for ibpo_lab.models.load_policy (alias, hub id or local path); "
                            f"'{RANDOM_TINY}' builds a randomly initialised tiny policy (tests)")
    dtype: str = _f("float32", "parameter dtype: " + ", ".join(DTYPES))
    backend: str = _f("hf", "sampler backend: " + ", ".join(BACKENDS))
    max_new_tokens: int = _f(48, "response length limit when sampling")
    temperature: float = _f(1.0, "sampling temperature; the trainer's log-probs use the same temperature")
    top_p: float = _f(1.0, "nucleus sampling threshold in (0, 1]")
    stop: list = _f([], "stop strings for the sampler (empty: only EOS)")
    sampler_kwargs: dict = _f({}, "extra keyword arguments for ibpo_lab.sampling.get_sampler (e.g. vllm "
                                  "gpu_memory_utilization)")
    recompute_logprobs: bool = _f(False, "recompute behaviour log-probs with the trainer's forward pass instead "
                                         "of trusting the sampler's (use with vllm)")

    # -- schedule -------------------------------------------------------------------------
    steps: int = _f(20, "number of training steps (one step = one batch of groups)")
    prompts_per_step: int = _f(4, "prompts sampled per step")
    group_size: int = _f(8, "trajectories sampled per prompt (G)")

    # -- estimator ------------------------------------------------------------------------
    estimator: str = _f("ibpo", "advantage estimator: grpo, dr_grpo, rloo, prefix_tree, vineppo, ibpo")
    estimator_kwargs: dict = _f({}, "extra keyword arguments for the estimator (e.g. eps, scale)")
    lam: float = _f(0.6, "IBPO shaping weight λ in R' = R + λ·φ (>= 0; 0 disables shaping)")
    rho: float = _f(0.5, "IBPO shaping scale ρ in φ = ρ·(share of successful repairs)")
    edit_mask: bool = _f(True, "IBPO: credit only tokens the repair edited; false credits every token of "
                               "repaired failures (the no-mask ablation)")
    mc_rollouts: int = _f(4, "VinePPO: fresh continuations per step prefix for Monte-Carlo step values (K)")

    # -- corrector (IBPO compare-and-correct) ---------------------------------------------
    corrector: str = _f("policy", "repair operator: policy (the policy rewrites), splice (copy from the "
                                  "reference), oracle (the task's minimal repair)")
    repair_k: int = _f(2, "repairs attempted per failed trajectory, each against a different sibling "
                          "reference (K <= group_size - 1)")
    k_star: int = _f(0, "truncate credit to the first K* edited tokens (0: no truncation)")
    repair_max_new_tokens: int = _f(0, "length limit of a repair (0: max_new_tokens)")
    repair_temperature: float = _f(0.0, "sampling temperature of repairs (0: temperature)")
    correct_kwargs: dict = _f({}, "extra fields for ibpo_lab.correct.CorrectConfig")
    bilateral: bool = _f(False, "IOP bilateral mode: also train the verified repairs as off-policy samples "
                                "on their inserted tokens, with a truncated importance weight")
    is_cap: float = _f(2.0, "truncation of the bilateral importance weight: w = min(π/μ, is_cap)")

    # -- loss -----------------------------------------------------------------------------
    loss: str = _f("ppo", "policy loss: ppo (token-level clipped ratio) or gspo (sequence-level ratio)")
    clip_low: float = _f(0.2, "lower clip range ε_low of the ratio")
    clip_high: float = _f(0.2, "upper clip range ε_high of the ratio (DAPO clip-higher uses 0.28)")
    agg: str = _f("token-mean", "loss aggregation over tokens (ibpo_lab.losses.aggregate mode)")
    kl_coef: float = _f(0.0, "weight of the k3 KL penalty to a frozen copy of the initial policy (0: no reference)")

    # -- optimiser ------------------------------------------------------------------------
    lr: float = _f(1e-5, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_betas: list = _f([0.9, 0.999], "AdamW betas")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    lr_schedule: str = _f("constant", "learning-rate schedule over steps: " + ", ".join(LR_SCHEDULES))
    warmup_steps: int = _f(0, "linear warm-up steps")
    ppo_epochs: int = _f(1, "passes over each batch")
    micro_batch_size: int = _f(0, "trajectories per forward/backward pass; gradients accumulate over the micro-batches "
                                  "of a minibatch (0: the whole minibatch at once)")
    minibatch_size: int = _f(0, "trajectories per optimiser step; must divide prompts_per_step * group_size "
                                "(0: the whole batch, one optimiser step per epoch)")

    # -- evaluation and records -----------------------------------------------------------
    eval_every: int = _f(0, "held-out evaluation every N steps (0: only after the last step)")
    eval_split: str = _f("test", "held-out split")
    eval_n: int = _f(32, "held-out prompts per evaluation (0: no evaluation)")
    eval_k: int = _f(4, "samples per held-out prompt (avg@k, pass@k)")
    eval_temperature: float = _f(1.0, "sampling temperature of evaluation")
    checkpoint_every: int = _f(0, "checkpoint every N steps (0: only at the end); always at the end")
    save_checkpoints: bool = _f(True, "write checkpoint/ (needed for resume and RunRecord.load_policy); False writes "
                                      "every other record but no weights (a 135M policy + AdamW is 1.6 GB); "
                                      "checkpoint_every must then be 0")
    save_trajectories: bool = _f(True, "write trajectories/step_*.parquet")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _HINTS()[f.name]))
        self.validate()

    # -------------------------------------------------------------------- derived values
    @property
    def name(self) -> str:
        """The label, or the estimator name when no label is set."""
        return self.label or self.estimator

    @property
    def batch_size(self) -> int:
        """Trajectories per step, B = prompts_per_step · group_size."""
        return self.prompts_per_step * self.group_size

    @property
    def uses_correction(self) -> bool:
        return self.estimator in CORRECTING_ESTIMATORS

    # -------------------------------------------------------------------- validation
    def problems(self) -> list[str]:
        """Every problem with this config, one ``field: message`` string each."""
        p: list[str] = []

        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                p.append(f"{name}: {msg}, got {getattr(self, name)!r}")

        need(isinstance(self.task, str) and bool(self.task.strip()), "task", "a task name is required")
        if self.task and self.task.strip():
            known = list_tasks()
            prefixes = [k[: -len("<name>")] for k in known if k.endswith(":<name>")]
            need(self.task in known or any(self.task.startswith(q) for q in prefixes), "task",
                 f"unknown task (known: {', '.join(known)})")
        need(isinstance(self.model, str) and bool(self.model), "model", "a model name or path is required")
        ests = list_estimators()
        need(self.estimator in ests, "estimator", f"unknown estimator (allowed: {', '.join(ests)})")
        losses = list_losses()
        need(self.loss in losses, "loss", f"unknown loss (allowed: {', '.join(losses)})")
        need(self.agg in AGG_MODES, "agg", f"must be one of {', '.join(AGG_MODES)}")
        need(self.device == "auto" or self.device == "cpu" or self.device.split(":")[0] == "cuda", "device",
             "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        need(self.backend in BACKENDS, "backend", f"must be one of {', '.join(BACKENDS)}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "ppo_epochs", "eval_k", "mc_rollouts"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.group_size >= 2, "group_size", "must be >= 2 (advantages compare trajectories within a group)")
        for name in ("seed", "warmup_steps", "eval_every", "eval_n", "checkpoint_every", "minibatch_size", "micro_batch_size",
                     "k_star", "repair_max_new_tokens"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("lam", "rho", "kl_coef", "clip_low", "clip_high", "weight_decay", "repair_temperature"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "must be a finite number >= 0")
        need(self.clip_low < 1, "clip_low", "must be < 1 (the ratio is clipped to [1 - clip_low, 1 + clip_high])")
        need(self.temperature > 0 and math.isfinite(self.temperature), "temperature", "must be > 0")
        need(self.eval_temperature >= 0, "eval_temperature", "must be >= 0")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be > 0")
        need(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        need(self.adam_eps > 0, "adam_eps", "must be > 0")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
             "must be two numbers in [0, 1)")
        need(self.is_cap > 0, "is_cap", "must be > 0")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
        need(self.corrector in CORRECTORS, "corrector", f"must be one of {', '.join(CORRECTORS)}")
        if self.uses_correction:
            need(1 <= self.repair_k <= self.group_size - 1, "repair_k",
                 f"K repairs per failure each use a different sibling, so 1 <= K <= group_size - 1 = "
                 f"{self.group_size - 1}")
        need(not self.bilateral or self.uses_correction, "bilateral",
             f"needs an estimator that runs compare-and-correct ({', '.join(CORRECTING_ESTIMATORS)})")
        need(self.save_checkpoints or self.checkpoint_every == 0, "checkpoint_every",
             "must be 0 when save_checkpoints is False (no checkpoint is ever written)")
        if self.minibatch_size > 0 and self.prompts_per_step >= 1 and self.group_size >= 1:
            need(self.batch_size % self.minibatch_size == 0, "minibatch_size",
                 f"must divide the batch of prompts_per_step * group_size = {self.batch_size} trajectories")
        for name in ("task_kwargs", "estimator_kwargs", "correct_kwargs", "sampler_kwargs"):
            need(all(isinstance(k, str) for k in getattr(self, name)), name, "keys must be strings")
        return p

    def validate(self) -> "TrainConfig":
        """Raise one ValueError listing every bad field; return self when the config is fine."""
        p = self.problems()
        if p:
            raise ValueError("invalid TrainConfig: " + "; ".join(p))
        return self

    # -------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a TrainConfig needs a mapping of fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"invalid TrainConfig: unknown field(s) {unknown}; known fields: {', '.join(sorted(names))}")
        return cls(**d)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """The config as YAML text (fields in declaration order); also written to ``path`` if given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if path is not None:
            _atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike) -> "TrainConfig":
        """Load from a YAML file path, or from YAML text (a string with a newline in it)."""
        s = str(path_or_text)
        if isinstance(path_or_text, os.PathLike) or "\n" not in s:
            p = Path(s)
            if not p.is_file():
                raise ValueError(f"config file {s!r} does not exist")
            s = p.read_text()
        d = yaml.safe_load(s)
        return cls.from_dict(d or {})

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        return self.from_dict({**self.to_dict(), **changes})

    def with_overrides(self, assignments: Sequence[str]) -> "TrainConfig":
        """Apply ``key=value`` strings (values parsed as YAML; ``task_kwargs.n_steps=3`` sets a dict key)."""
        d = self.to_dict()
        names = {f.name for f in dataclasses.fields(self)}
        for a in assignments:
            if "=" not in a:
                raise ValueError(f"--set expects key=value, got {a!r}")
            key, raw = a.split("=", 1)
            key = key.strip()
            value = yaml.safe_load(raw) if raw.strip() else ""
            head, _, sub = key.partition(".")
            if head not in names:
                raise ValueError(f"--set {key}: unknown field {head!r}; known fields: {', '.join(sorted(names))}")
            if sub:
                if not isinstance(d[head], dict):
                    raise ValueError(f"--set {key}: field {head!r} is not a mapping")
                d[head] = {**d[head], sub: value}
            else:
                d[head] = value
        return self.from_dict(d)

    @classmethod
    def help(cls) -> str:
        """One line per field: name, default, help text."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append(f"{f.name} = {default!r}\n    {f.metadata['help']}")
        return "\n".join(rows)


_HINTS_CACHE: dict[str, Any] = {}


def _HINTS() -> dict[str, Any]:
    if not _HINTS_CACHE:
        _HINTS_CACHE.update(typing.get_type_hints(TrainConfig))
    return _HINTS_CACHE


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Bring YAML/CLI values to the field's type (YAML reads ``1e-5`` as a string, for one)."""
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, (bool, int)) and not isinstance(value, float):
                return bool(value)
            raise TypeError
        if tp is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            if value is None:
                return ""
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if tp is dict:
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if tp is list:
            if value is None:
                return []
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise TypeError
            return list(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"invalid TrainConfig: {name}: expected {getattr(tp, '__name__', tp)}, got {value!r}"
        ) from None
    return value


# ======================================================================================== presets
def presets(profile: str = "smoke", **overrides) -> TrainConfig:
    """A ready config. ``smoke``: the tiny policy on the synthetic task, a minute or so per run on a
    2-core CPU. ``full``: one GPU, a 1.5B instruct model on GSM8K with the vllm sampler.
    ``overrides`` are TrainConfig fields (``presets("smoke", estimator="grpo", seed=1)``). Unless
    ``minibatch_size`` is given, the batch is split into the profile's number of minibatches (2 for
    smoke, 4 for full) when it divides evenly, else trained as one minibatch."""
    n_minibatches = {"smoke": 2, "full": 4}
    profiles: dict[str, dict[str, Any]] = {
        "smoke": dict(
            task="synthetic", model="tiny", device="cpu", backend="hf",
            steps=5, prompts_per_step=4, group_size=8, max_new_tokens=48,
            lr=1e-4, max_grad_norm=1.0, ppo_epochs=1,
            repair_k=2, repair_max_new_tokens=48, eval_every=0, eval_n=16, eval_k=2, checkpoint_every=0,
        ),
        "full": dict(
            task="gsm8k", model="Qwen/Qwen2.5-1.5B-Instruct", device="auto", backend="vllm", dtype="float32",
            sampler_kwargs={"gpu_memory_utilization": 0.35}, steps=200, prompts_per_step=32, group_size=8,
            max_new_tokens=512, repair_max_new_tokens=640, lr=1e-6, lr_schedule="constant", warmup_steps=10,
            max_grad_norm=1.0, ppo_epochs=1, micro_batch_size=4, clip_high=0.28, kl_coef=0.0,
            repair_k=2,
            eval_every=25, eval_n=256, eval_k=4, eval_temperature=0.6, checkpoint_every=25,
        ),
    }
    if profile not in profiles:
        raise ValueError(f"profile: unknown profile {profile!r} (allowed: {', '.join(profiles)})")
    d = {**profiles[profile], **overrides}
    if "minibatch_size" not in overrides:
        batch, n = int(d["prompts_per_step"]) * int(d["group_size"]), n_minibatches[profile]
        d["minibatch_size"] = batch // n if batch % n == 0 else 0
    return TrainConfig.from_dict(d)


# ======================================================================================== run records
@dataclass
class RunRecord:
    """A run folder, read back: ``config``, ``metrics`` (one row per step), ``eval`` (one row per
    evaluation) and ``trajectories(step)`` (one row per trajectory)."""

    path: Path
    config: TrainConfig
    metrics: pd.DataFrame
    eval: pd.DataFrame

    @property
    def label(self) -> str:
        return self.config.name

    def steps_with_trajectories(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in (self.path / "trajectories").glob("step_*.parquet"))

    def trajectories(self, step: int | None = None) -> pd.DataFrame:
        """Trajectories of one step, or of every step (``step=None``), as a DataFrame."""
        tdir = self.path / "trajectories"
        if step is None:
            files = [tdir / f"step_{s:06d}.parquet" for s in self.steps_with_trajectories()]
            if not files:
                raise ValueError(f"run {self.path} has no trajectory files")
            return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        f = tdir / f"step_{int(step):06d}.parquet"
        if not f.is_file():
            raise ValueError(f"step: run {self.path} has no trajectories for step {step} "
                             f"(available: {self.steps_with_trajectories()})")
        return pd.read_parquet(f)

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    def load_policy(self, device: str = "cpu"):
        """The trained policy from the run's checkpoint."""
        state = _load_checkpoint_state(self.path, map_location="cpu")
        if state is None:
            raise ValueError(f"run {self.path} has no checkpoint"
                             + (" (trained with save_checkpoints=False)" if not self.config.save_checkpoints else ""))
        task = build_task(self.config)
        policy = build_policy(self.config, task, torch.device(device))
        policy.model.load_state_dict(state["model"])
        return policy

    def __repr__(self) -> str:
        return f"RunRecord({self.label!r}, seed={self.config.seed}, steps={len(self.metrics)}, path='{self.path}')"


def _read_jsonl(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame()
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # a run killed mid-write leaves a partial last line; anything else is real corruption
            if i == len(lines) - 1:
                warnings.warn(f"{path}: ignoring a truncated last line (run interrupted while writing)")
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return pd.DataFrame(rows)


def load_run(path: str | os.PathLike) -> RunRecord:
    """Read a run folder written by :func:`train`."""
    p = Path(path)
    if not (p / "config.yaml").is_file():
        raise ValueError(f"path: {p} is not a run folder (no config.yaml)")
    return RunRecord(
        path=p,
        config=TrainConfig.from_yaml(p / "config.yaml"),
        metrics=_read_jsonl(p / "metrics.jsonl"),
        eval=_read_jsonl(p / "eval.jsonl"),
    )


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write then rename, so a crash or a full disk never leaves a half-written file in place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(e.errno, f"could not write {path} ({e.strerror or e}); nothing partial was left there") from e


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def _append_jsonl(path: Path, row: dict) -> None:
    line = json.dumps(row, default=_json_default) + "\n"
    try:
        with open(path, "a") as fh:
            fh.write(line)
    except OSError as e:  # a partial last line is tolerated by _read_jsonl and dropped on resume
        raise OSError(e.errno, f"could not append a row to {path} ({e.strerror or e})") from e


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)


def _prepare_run_dir(out_dir: str | os.PathLike | None, cfg: TrainConfig) -> Path:
    if out_dir is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path("runs") / f"{stamp}-{cfg.name}-seed{cfg.seed}"
    p = Path(out_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        (p / "trajectories").mkdir(exist_ok=True)
        probe = p / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"out_dir: cannot write the run folder {str(p)!r}: {e.strerror or e}") from e
    return p


# ======================================================================================== checkpoints
def _rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``run_dir/checkpoint/state.pt`` via a temporary folder and renames, so the previous
    checkpoint survives a crash or a full disk. Raises OSError with a clear message on failure."""
    final = run_dir / "checkpoint"
    tmp = run_dir / f".checkpoint.tmp-{os.getpid()}"
    old = run_dir / ".checkpoint.old"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / "state.pt", "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _atomic_write_text(tmp / "step.txt", str(state["step"]))
        # a directory cannot be renamed onto a non-empty one: move the old one aside first
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists() and old.exists():
            os.replace(old, final)
        raise OSError(e.errno, f"could not write the checkpoint in {run_dir} ({e.strerror or e}); "
                               f"the previous checkpoint, if any, is kept") from e
    return final


def _load_checkpoint_state(run_dir: Path, map_location="cpu") -> dict[str, Any] | None:
    for d in (run_dir / "checkpoint", run_dir / ".checkpoint.old"):
        f = d / "state.pt"
        if f.is_file():
            return torch.load(f, map_location=map_location, weights_only=False)
    return None


# ======================================================================================== building blocks
def resolve_device(device: str) -> torch.device:
    """'auto' → cuda if available else cpu; 'cuda' without a GPU → ValueError (before any model loads)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was requested but torch sees no CUDA GPU; use 'cpu' or 'auto'")
    return torch.device(device)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The seed of one step: a hash of (seed, step, stream), so runs with neighbouring seeds never share
    steps; ``stream`` separates uses within a step (0 training, 1 repairs, 2 evaluation)."""
    return int(np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(1)[0])


def seed_everything(s: int) -> None:
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def build_task(cfg: TrainConfig):
    """The task of a config."""
    return get_task(cfg.task, **cfg.task_kwargs)


def build_policy(cfg: TrainConfig, task, device: torch.device):
    """The initial policy of a config, on ``device`` (``task`` is accepted for tasks that shape the model)."""
    if cfg.model == RANDOM_TINY:
        from ibpo_lab.tasks.synthetic import VOCAB

        policy = build_tiny_policy(VOCAB, seed=cfg.seed)
    else:
        policy = load_policy(cfg.model, dtype=cfg.dtype, device=str(device))
    policy.model.to(device)
    return policy


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(i: int) -> float:  # i = training steps done so far
        warm = min(1.0, (i + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        frac = min(1.0, i / max(1, cfg.steps))
        if cfg.lr_schedule == "linear":
            return warm * (1.0 - frac)
        if cfg.lr_schedule == "cosine":
            return warm * 0.5 * (1.0 + math.cos(math.pi * frac))
        return warm

    return f


@contextlib.contextmanager
def _timed(times: dict[str, float], name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[f"time_{name}"] = times.get(f"time_{name}", 0.0) + time.perf_counter() - t0


def pick_examples(examples: Sequence, cfg: TrainConfig, step: int) -> list:
    """The prompts of one step: drawn without replacement (with, if the split is smaller) from (seed, step)."""
    rng = np.random.default_rng(step_seed(cfg.seed, step, 3))
    n = len(examples)
    idx = rng.choice(n, size=cfg.prompts_per_step, replace=cfg.prompts_per_step > n)
    return [examples[int(i)] for i in idx]


# ======================================================================================== the step's phases
def sample_groups(sampler, task, examples: Sequence, cfg: TrainConfig, seed: int) -> RolloutBatch:
    """G trajectories per prompt; group id i for prompt i."""
    prompts = [task.solve_prompt(ex) for ex in examples]
    return sampler.sample(prompts, n=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature, top_p=cfg.top_p, stop=cfg.stop or None, seed=seed)


def score_groups(batch: RolloutBatch, examples: Sequence, task, tokenizer, cfg: TrainConfig) -> RolloutBatch:
    """Terminal 0/1 rewards from the task's verifier and step spans of every response."""
    per_traj = [examples[int(g)] for g in batch.group_ids.tolist()]
    rewards = task.rewards(per_traj, batch.responses)
    delim = cfg.step_delimiter or task.step_delimiter
    spans = [split_steps(r, tokenizer, delimiter=delim) for r in batch.response_ids]
    return batch.replace(rewards=rewards, step_spans=spans)


def correct_groups(batch, examples, task, sampler, tokenizer, cfg: TrainConfig, seed: int):
    """IBPO compare-and-correct: fills repair_success and edit_masks; returns (batch, repaired, table, stats)."""
    res = compare_and_correct(batch, dict(enumerate(examples)), task, sampler, correct_config(cfg),
                              tokenizer=tokenizer, seed=seed)
    return res.batch, res.repaired, res.table, dict(res.stats or {})


def correct_config(cfg: TrainConfig):
    """The CorrectConfig of a run: our named fields, then the free-form ``correct_kwargs``."""
    kw = dict(
        operator=cfg.corrector,
        num_references=cfg.repair_k,
        truncate_k=cfg.k_star or None,
        max_new_tokens=cfg.repair_max_new_tokens or None,
        temperature=cfg.repair_temperature or cfg.temperature,
        top_p=cfg.top_p,
        stop=cfg.stop or None,
        rho=cfg.rho,
    )
    names = {f.name for f in dataclasses.fields(CorrectConfig)}
    unknown = sorted(set(cfg.correct_kwargs) - names)
    if unknown:
        raise ValueError(f"correct_kwargs: unknown CorrectConfig fields {unknown}; known: {', '.join(sorted(names))}")
    kw.update(cfg.correct_kwargs)
    try:
        return CorrectConfig(**kw)
    except ValueError as e:
        raise ValueError(f"correct_kwargs: {e}") from e


def step_values(batch, examples, task, sampler, tokenizer, cfg: TrainConfig, seed: int) -> RolloutBatch:
    """VinePPO: Monte-Carlo value at every step boundary from K fresh continuations (expensive)."""
    values = mc_step_values(batch, dict(enumerate(examples)), task, sampler, cfg.mc_rollouts,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop=cfg.stop or None, seed=seed, tokenizer=tokenizer, progress=False)
    return batch.replace(step_values=values)


def compute_advantages(batch: RolloutBatch, cfg: TrainConfig) -> torch.Tensor:
    """[B, T] token advantages from the configured estimator (0 off the response mask)."""
    kw = dict(cfg.estimator_kwargs)
    if cfg.estimator == "ibpo":
        kw = {"lam": cfg.lam, "rho": cfg.rho, "token_mask": cfg.edit_mask, **kw}
    adv = get_estimator(cfg.estimator)(batch, **kw)
    if not torch.isfinite(adv).all():
        raise RuntimeError(f"estimator {cfg.estimator!r} returned non-finite advantages")
    return adv


def repaired_advantages(repaired: RolloutBatch, batch: RolloutBatch, cfg: TrainConfig) -> torch.Tensor:
    """[R, T_r] IOP bilateral credit of the verified repairs, on their inserted tokens
    (``advantages.ibpo_repair_advantages``: repair reward against the source group's shaped rewards)."""
    kw = {k: v for k, v in cfg.estimator_kwargs.items() if k in ("eps", "scale", "std", "success_threshold")}
    return ibpo_repair_advantages(repaired, batch, repaired.meta["source_traj"], lam=cfg.lam, rho=cfg.rho, **kw)


def policy_update(model, ref_model, optimizer, batch: RolloutBatch, advantages: torch.Tensor, cfg: TrainConfig,
                  device: torch.device, is_weights: torch.Tensor | None = None, n_onpolicy: int | None = None,
                  ) -> dict[str, float]:
    """PPO/GSPO epochs over minibatches, one clipped optimiser step per minibatch (gradients accumulated
    over micro-batches). A non-finite loss or gradient norm skips that optimiser step (counted in
    ``skipped``). Rows of ``batch`` past ``n_onpolicy`` are off-policy repairs (IOP bilateral), spread
    evenly over the minibatches.

    batch: B trajectories; advantages [B, T'] (T' <= T); is_weights [B, T'] or None.
    """
    loss_fn = get_loss(cfg.loss)
    # Dr. GRPO's length-unbiased sum needs one constant length for every minibatch: the generation budget
    norm = {"norm_len": float(cfg.max_new_tokens)} if cfg.agg == "seq-mean-token-sum-norm" else {}
    B = len(batch)
    n_on = B if n_onpolicy is None else n_onpolicy
    padded = batch.padded()
    T = padded.response_ids.shape[1]
    adv = _pad_cols(advantages, T, 0.0)
    isw = None if is_weights is None else _pad_cols(is_weights, T, 1.0)
    mask = padded.response_mask.float()
    old, ref = _fixed_logprobs(model, ref_model, padded, cfg, device)

    mb = cfg.minibatch_size or n_on
    n_mb = n_on // mb
    sums: dict[str, list[float]] = {}
    skipped = trailing = 0
    params = [p for p in model.parameters() if p.requires_grad]
    for epoch in range(cfg.ppo_epochs):
        perm_on, perm_off = torch.randperm(n_on), torch.randperm(B - n_on) + n_on
        off_split = torch.tensor_split(perm_off, n_mb)
        for j in range(n_mb):
            idx = torch.cat([perm_on[j * mb : (j + 1) * mb], off_split[j]])
            optimizer.zero_grad(set_to_none=True)
            finite = True
            for mic, share in _micro_batches(idx, mask, cfg):
                sub = _select_padded(padded, mic).to(device)
                lp, ent = response_logprobs(model, sub, temperature=cfg.temperature)
                m = mask[mic].to(device)
                loss, lm = loss_fn(lp, old[mic].to(device), adv[mic].to(device), m, clip_low=cfg.clip_low,
                                   clip_high=cfg.clip_high, agg=cfg.agg, kl_coef=cfg.kl_coef,
                                   ref_logprobs=None if ref is None else ref[mic].to(device),
                                   is_weights=None if isw is None else isw[mic].to(device), **norm)
                _acc(sums, "entropy", float((ent.detach() * m).sum() / m.sum().clamp(min=1)))
                for k, v in (lm or {}).items():
                    _acc(sums, k if k in ("approx_kl", "clip_frac", "kl_ref") else f"loss_{k}", float(v))
                if not torch.isfinite(loss):
                    finite = False
                    break
                (loss * share).backward()
                _acc(sums, "loss", loss.item())
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if finite else None
            if not finite or not torch.isfinite(gn):
                optimizer.zero_grad(set_to_none=True)
                skipped, trailing = skipped + 1, trailing + 1
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trailing = 0
            _acc(sums, "grad_norm", float(gn))
    out = {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for k, v in sums.items()}
    out.setdefault("loss", math.nan)
    out.setdefault("grad_norm", math.nan)
    out.update(updates=cfg.ppo_epochs * n_mb - skipped, skipped=skipped, trailing_skips=trailing)
    return out


def _pad_cols(x: torch.Tensor, T: int, value: float) -> torch.Tensor:
    out = torch.full((x.shape[0], T), value, dtype=torch.float32)
    out[:, : x.shape[1]] = x.detach().float().cpu()
    return out


def _fixed_logprobs(model, ref_model, padded: PaddedBatch, cfg: TrainConfig, device, recompute: bool | None = None):
    """Log-probs that stay fixed during the update: behaviour (the sampler's, or recomputed with
    ``model``) and the KL reference's, in no-grad chunks of the micro-batch size (a whole-batch
    forward may not fit). -> (old [B, T], ref [B, T] or None), on the CPU."""
    recompute = cfg.recompute_logprobs if recompute is None else recompute
    old = padded.old_logprobs.float()
    if not recompute and ref_model is None:
        return old, None
    B = padded.response_ids.shape[0]
    step = cfg.micro_batch_size or cfg.minibatch_size or B
    olds, refs = [], []
    with torch.no_grad():
        for i in range(0, B, step):
            sub = _select_padded(padded, torch.arange(i, min(i + step, B))).to(device)
            if recompute:
                olds.append(response_logprobs(model, sub, temperature=cfg.temperature)[0].float().cpu())
            if ref_model is not None:
                refs.append(response_logprobs(ref_model, sub, temperature=cfg.temperature)[0].float().cpu())
    return (torch.cat(olds) if olds else old), (torch.cat(refs) if refs else None)


def _micro_batches(idx: torch.Tensor, mask: torch.Tensor, cfg: TrainConfig):
    """Split a minibatch into micro-batches, each with the share of the minibatch's loss it carries:
    its token share for token-mean aggregation, its sequence share otherwise, so the accumulated
    gradient equals the whole minibatch's."""
    if not cfg.micro_batch_size or cfg.micro_batch_size >= len(idx):
        yield idx, 1.0
        return
    tok = mask[idx].sum(-1)
    for mic in torch.split(idx, cfg.micro_batch_size):
        t = mask[mic].sum(-1)
        if cfg.agg == "token-mean":
            share = float(t.sum() / tok.sum().clamp(min=1))
        elif cfg.agg == "seq-mean-token-mean":  # sequences without a trained token do not count
            share = float((t > 0).sum() / (tok > 0).sum().clamp(min=1))
        else:
            share = len(mic) / len(idx)
        yield mic, share


def _acc(d: dict[str, list[float]], k: str, v: float) -> None:
    d.setdefault(k, []).append(v)


def _select_padded(p, idx: torch.Tensor):
    return PaddedBatch(
        input_ids=p.input_ids[idx], attention_mask=p.attention_mask[idx], response_ids=p.response_ids[idx],
        response_mask=p.response_mask[idx], old_logprobs=p.old_logprobs[idx], rewards=p.rewards[idx],
        group_ids=p.group_ids[idx], prompt_len=p.prompt_len,
    )


def offpolicy_repairs(model, repaired: RolloutBatch, cfg: TrainConfig, device: torch.device):
    """Prepare verified repairs for IOP bilateral training as responses to the SOLVE prompt.

    Returns (repaired with logprobs = π_old(y | solve prompt) and response_masks = inserted tokens,
    is_weights [R, T_r] = min(π_old(y | solve) / μ(y | repair prompt), is_cap)). μ, the implicit
    behaviour policy that wrote the repair, is the corrector's sampling log-probs; the oracle
    operator has none, so its repairs get weight 1 (they are not samples of any policy)."""
    lp, _ = _fixed_logprobs(model, None, repaired.padded(), cfg, device, recompute=True)
    if repaired.logprobs is not None:
        w = truncated_is_weights(repaired.old_logprobs, lp, cap=cfg.is_cap)
    else:
        w = torch.ones_like(lp)
    lens = [len(r) for r in repaired.response_ids]
    out = repaired.replace(logprobs=[lp[i, :n].tolist() for i, n in enumerate(lens)],
                           response_masks=[np.asarray(m, dtype=bool) for m in repaired.edit_masks])
    return out, w * out.response_mask


# ======================================================================================== metrics
def batch_metrics(batch: RolloutBatch, advantages: torch.Tensor) -> dict[str, float]:
    """Reward mean, accuracy, zero-variance groups, active (credited) tokens, response length."""
    r = batch.rewards
    groups = batch.groups()
    zero_var = [float(r[idx].max() - r[idx].min()) == 0.0 for idx in groups.values()]
    mask = batch.response_mask.bool()
    active = (advantages.abs() > 0) & mask
    out = {
        "reward_mean": float(r.mean()),
        "accuracy": float((r >= 1.0).float().mean()),
        "zero_var_groups": float(np.mean(zero_var)),
        "active_tokens": float(active.sum() / mask.sum().clamp(min=1)),
        "response_len": float(batch.response_lengths.float().mean()),
    }
    if batch.repair_success is not None:
        failed = r < 1.0
        out["repair_success"] = float(batch.repair_success[failed].mean()) if failed.any() else math.nan
    else:
        out["repair_success"] = math.nan
    return out


def safe_step_labels(task, example, response: str | None) -> list[bool] | None:
    """``task.step_labels(example, response)`` for the record, or None when it is unknown: no response
    text, a task that cannot tell, or a labeller that raised (a record must never stop a run)."""
    if response is None:
        return None
    try:
        labels = task.step_labels(example, response)
    except Exception:  # noqa: BLE001 — any labeller bug costs the labels, never the run
        return None
    return None if labels is None else [bool(x) for x in labels]


def trajectory_frame(batch: RolloutBatch, advantages: torch.Tensor, step: int, kind: str = "policy",
                     repairs: dict[int, str] | None = None, is_weights: torch.Tensor | None = None,
                     examples: Sequence | None = None, task=None) -> pd.DataFrame:
    """One row per trajectory with its per-token advantages and masks (lists), for the parquet record.

    ``examples``: the step's examples, indexed by group id (group i was sampled from ``examples[i]``);
    given, the frame gets ``example_id`` and, with ``task``, ``step_labels`` (list of bools per
    non-empty text step of the response, or None where the task cannot tell)."""
    df = batch.to_dataframe()
    df.insert(0, "step", step)
    df.insert(1, "kind", kind)
    if examples is not None:
        exs = [examples[g] for g in batch.group_ids.tolist()]
        df.insert(2, "example_id", [str(e.id) for e in exs])
        if task is not None:
            texts = batch.responses if batch.responses is not None else [None] * len(batch)
            df["step_labels"] = [safe_step_labels(task, e, t) for e, t in zip(exs, texts)]
    lens = [len(x) for x in batch.response_ids]
    mask = batch.response_mask
    df["advantages"] = [advantages[i, :n].tolist() for i, n in enumerate(lens)]
    df["response_mask"] = [mask[i, :n].bool().tolist() for i, n in enumerate(lens)]
    if batch.edit_masks is not None:
        df["edit_mask"] = [m.tolist() for m in batch.edit_masks]
    if batch.step_values is not None:
        df["step_values"] = [list(map(float, v)) for v in batch.step_values]
    if is_weights is not None:
        df["is_weights"] = [is_weights[i, :n].tolist() for i, n in enumerate(lens)]
    if repairs is not None:
        df["repair"] = [repairs.get(i) for i in range(len(batch))]
    return df


def _repair_texts(table: pd.DataFrame | None) -> dict[int, str]:
    """trajectory index → text of its selected (best verified) repair, from the corrector's table."""
    if table is None or len(table) == 0:
        return {}
    sel = table[table["selected"].astype(bool)]
    return {int(t): str(x) for t, x in zip(sel["traj"], sel["revision"])}


# ======================================================================================== the loop
class NonFiniteLossError(RuntimeError):
    """Raised after MAX_CONSECUTIVE_SKIPS optimiser steps in a row had a non-finite loss or gradient."""


def train(cfg: TrainConfig, out_dir: str | os.PathLike | None = None, progress: bool = True,
          resume: bool = False) -> RunRecord:
    """Run ``cfg`` and write its run folder (``out_dir``; default ``runs/<stamp>-<label>-seed<seed>``).
    ``resume=True`` continues from the folder's checkpoint (same metrics as an uninterrupted run)."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    device = resolve_device(cfg.device)  # before anything heavy: 'cuda' without a GPU fails here
    run_dir = _prepare_run_dir(out_dir, cfg)
    state = _load_checkpoint_state(run_dir) if resume else None
    if state is not None:
        _check_resumable(cfg, TrainConfig.from_dict(state["config"]))
    elif any((run_dir / n).exists() for n in ("metrics.jsonl", "checkpoint")):
        if resume:
            saved = run_dir / "config.yaml"
            if saved.is_file() and not yaml.safe_load(saved.read_text()).get("save_checkpoints", True):
                raise ValueError(f"out_dir: cannot resume {run_dir}: it was trained with save_checkpoints=False, "
                                 f"so it has no checkpoint; train it again in a new folder")
            raise ValueError(f"out_dir: {run_dir} has records but no checkpoint to resume from")
        raise ValueError(f"out_dir: {run_dir} already holds a run; pass resume=True (--resume) or pick a new folder")
    cfg.to_yaml(run_dir / "config.yaml")

    seed_everything(cfg.seed)
    task = build_task(cfg)
    train_examples = task.examples(cfg.train_split)
    if not train_examples:
        raise ValueError(f"train_split: task {cfg.task!r} has no examples in split {cfg.train_split!r}")
    policy = build_policy(cfg, task, device)
    model = policy.model
    model.eval()  # no dropout: the trainer's log-probs must match the sampler's behaviour log-probs
    ref_model = policy.reference().model.to(device) if cfg.kl_coef > 0 else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    start, skipped_total, consecutive = 1, 0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start, skipped_total, consecutive = state["step"] + 1, state["skipped_total"], state["consecutive_skips"]
        _truncate_records(run_dir, state["step"])
    sampler = get_sampler(cfg.backend, policy, **cfg.sampler_kwargs)
    sampler.sync_weights(model)

    def checkpoint(step: int) -> None:
        if not cfg.save_checkpoints:
            return
        save_checkpoint(run_dir, {
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": _rng_state(), "skipped_total": skipped_total,
            "consecutive_skips": consecutive, "config": cfg.to_dict(),
        })

    bar = _progress(range(start, cfg.steps + 1), cfg, progress)
    for step in bar:
        times: dict[str, float] = {}
        t_step = time.perf_counter()
        s = step_seed(cfg.seed, step)
        seed_everything(s)
        examples = pick_examples(train_examples, cfg, step)

        with _timed(times, "sample"):
            batch = sample_groups(sampler, task, examples, cfg, seed=s)
        with _timed(times, "reward"):
            batch = score_groups(batch, examples, task, policy.tokenizer, cfg)
        repaired, table, cstats = None, None, {}
        with _timed(times, "correct"):
            if cfg.uses_correction:
                batch, repaired, table, cstats = correct_groups(batch, examples, task, sampler, policy.tokenizer, cfg,
                                                                seed=step_seed(cfg.seed, step, 1))
            if cfg.estimator == "vineppo":
                batch = step_values(batch, examples, task, sampler, policy.tokenizer, cfg,
                                    seed=step_seed(cfg.seed, step, 4))
        with _timed(times, "advantage"):
            adv = compute_advantages(batch, cfg)
            train_batch, train_adv, isw, rep_w, rep_adv = batch, adv, None, None, None
            if cfg.bilateral and repaired is not None and len(repaired) > 0:
                repaired, rep_w = offpolicy_repairs(model, repaired, cfg, device)
                rep_adv = repaired_advantages(repaired, batch, cfg)
                train_batch, train_adv, isw = _join_offpolicy(batch, adv, repaired, rep_adv, rep_w)
        with _timed(times, "update"):
            upd = policy_update(model, ref_model, optimizer, train_batch, train_adv, cfg, device,
                                is_weights=isw, n_onpolicy=len(batch))
            lr = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():
                # the schedule follows training steps, also when every optimiser step of one was skipped
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                scheduler.step()
            sampler.sync_weights(model)
        times["time_step"] = time.perf_counter() - t_step

        skipped_total += upd["skipped"]
        trailing = upd.pop("trailing_skips")
        # skipped optimiser steps in a row, across step boundaries (a good update restarts the count)
        consecutive = consecutive + trailing if upd["updates"] == 0 else trailing
        row = {"step": step, **batch_metrics(batch, adv), **upd, "skipped_total": skipped_total, "lr": lr,
               "n_repaired": 0 if repaired is None else len(repaired),
               **{f"correct_{k}": v for k, v in cstats.items() if isinstance(v, (int, float))}, **times}
        _append_jsonl(run_dir / "metrics.jsonl", row)
        if cfg.save_trajectories:
            _write_trajectories(run_dir, step, batch, adv, table, repaired, rep_adv, rep_w, examples, task)
        if consecutive >= MAX_CONSECUTIVE_SKIPS:
            checkpoint(step)
            where = (f"the last good weights are checkpointed in {run_dir / 'checkpoint'}" if cfg.save_checkpoints
                     else "no checkpoint is written (save_checkpoints=False)")
            raise NonFiniteLossError(
                f"stopping at step {step}: {consecutive} optimiser steps in a row had a non-finite loss or "
                f"gradient and were skipped; {where}")
        if cfg.eval_n > 0 and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
            ev = evaluate(policy, task, split=cfg.eval_split, n=cfg.eval_n, k=cfg.eval_k,
                          temperature=cfg.eval_temperature, seed=step_seed(cfg.seed, step, 2),
                          max_new_tokens=cfg.max_new_tokens, sampler=sampler)
            _append_jsonl(run_dir / "eval.jsonl", {"step": step, **ev})
            row["eval_avg@k"] = ev["avg@k"]
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
            checkpoint(step)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("reward_mean", "approx_kl", "repair_success", "eval_avg@k")
                             if k in row and not (isinstance(row[k], float) and math.isnan(row[k]))})
    return load_run(run_dir)


def _join_offpolicy(batch, adv, repaired, rep_adv, rep_w):
    """On-policy batch + off-policy repairs as one training batch, with importance weights (1 on-policy)."""
    def strip(b: RolloutBatch) -> RolloutBatch:  # only what training reads, so optional fields need not agree
        masks = b.response_masks or [np.ones(len(r), dtype=bool) for r in b.response_ids]
        return RolloutBatch(prompt_ids=b.prompt_ids, response_ids=b.response_ids, rewards=b.rewards, group_ids=b.group_ids,
                  logprobs=b.logprobs, response_masks=masks, pad_id=b.pad_id)

    joined = concat_batches([strip(batch), strip(repaired)])
    T = joined.max_response_len
    a = torch.zeros(len(joined), T)
    a[: len(batch), : adv.shape[1]] = adv
    a[len(batch):, : rep_adv.shape[1]] = rep_adv
    w = torch.ones(len(joined), T)
    w[len(batch):, : rep_w.shape[1]] = rep_w
    return joined, a, w


def _write_trajectories(run_dir, step, batch, adv, table, repaired, rep_adv, rep_w, examples, task) -> None:
    df = trajectory_frame(batch, adv, step, "policy", repairs=_repair_texts(table) if table is not None else None,
                          examples=examples, task=task)
    df["trained"] = True
    if repaired is not None and len(repaired) > 0:
        # repairs are recorded for inspection; they are trained only in IOP bilateral mode
        ra = rep_adv if rep_adv is not None else torch.zeros(len(repaired), repaired.max_response_len)
        rdf = trajectory_frame(repaired, ra, step, "repaired", is_weights=rep_w, examples=examples, task=task)
        rdf["trained"] = rep_adv is not None
        df = pd.concat([df, rdf], ignore_index=True)
    buf = _parquet_bytes(df)
    _atomic_write_bytes(run_dir / "trajectories" / f"step_{step:06d}.parquet", buf)


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    b = io.BytesIO()
    df.to_parquet(b, index=False)
    return b.getvalue()


def _truncate_records(run_dir: Path, step: int) -> None:
    """Drop metric/eval rows written after the checkpoint (a killed run got further than it saved)."""
    for name in ("metrics.jsonl", "eval.jsonl"):
        p = run_dir / name
        if p.is_file():
            keep = []
            for line in p.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a half-written last line goes too
                    if json.loads(line)["step"] <= step:
                        keep.append(line + "\n")
            _atomic_write_text(p, "".join(keep))
    for f in (run_dir / "trajectories").glob("step_*.parquet"):
        if int(f.stem.split("_")[1]) > step:
            f.unlink()


def _check_resumable(cfg: TrainConfig, saved: TrainConfig) -> None:
    a, b = cfg.to_dict(), saved.to_dict()
    diff = sorted(k for k in a if a[k] != b[k] and k not in ("steps", "eval_every", "checkpoint_every", "save_checkpoints", "device"))
    if diff:
        raise ValueError(f"cfg: cannot resume, the config differs from the checkpoint's in {diff}")


def _progress(it: Iterable, cfg: TrainConfig, on: bool):
    if not on:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=f"{cfg.name} seed {cfg.seed}", total=len(it) if hasattr(it, "__len__") else None)


def train_many(cfgs: TrainConfig | Sequence[TrainConfig], out_root: str | os.PathLike = "runs",
               progress: bool = True, resume: bool = False) -> list[RunRecord]:
    """Train each config in turn under ``out_root/<label>-seed<seed>`` (``-2``, ``-3``... if taken)."""
    if isinstance(cfgs, TrainConfig):
        cfgs = [cfgs]
    root = Path(out_root)
    out, used = [], set()
    for cfg in cfgs:
        base = f"{cfg.name}-seed{cfg.seed}"
        name, i = base, 1
        while name in used or (not resume and (root / name).exists()):
            i += 1
            name = f"{base}-{i}"
        used.add(name)
        out.append(train(cfg, root / name, progress=progress, resume=resume))
    return out


# ======================================================================================== evaluation
# two-sided 95% Student-t quantiles for df = 1..30 (written out so the package needs no scipy)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def mean_ci(x: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): a 95% Student-t interval for the mean (NaN bounds with fewer than 2 values)."""
    a = np.asarray([v for v in x if not (isinstance(v, float) and math.isnan(v))], dtype=float)
    if len(a) == 0:
        return math.nan, math.nan, math.nan
    m = float(a.mean())
    if len(a) < 2:
        return m, math.nan, math.nan
    t = _T975[len(a) - 2] if len(a) - 1 <= len(_T975) else 1.96
    h = t * float(a.std(ddof=1)) / math.sqrt(len(a))
    return m, m - h, m + h


def evaluate(policy, task, split: str = "test", n: int | None = 32, k: int = 4, temperature: float = 1.0,
             seed: int = 0, max_new_tokens: int = 48, backend: str = "hf", sampler=None) -> dict[str, float]:
    """Held-out accuracy of ``policy`` on the first ``n`` examples of ``split`` with ``k`` samples each.

    avg@k = mean over prompts of c_i/k, the per-prompt share correct (this is also the unbiased pass@1
    estimate from k samples, so ``pass@1`` reports the same number); pass@k = share of prompts with
    at least one correct sample. ``*_lo``/``*_hi``: 95% t-interval over prompts.
    """
    if isinstance(task, str):
            task = get_task(task)
    if isinstance(policy, str):
        policy = load_policy(policy)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    exs = task.examples(split, n)
    if not exs:
        raise ValueError(f"split: task has no examples in split {split!r}")
    if sampler is None:
            sampler = get_sampler(backend, policy)
    # sampling at temperature 0 means greedy; k greedy samples would be identical
    kk = 1 if temperature == 0 else k
    with _preserve_rng():
        b = sampler.sample([task.solve_prompt(e) for e in exs], n=kk, max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed)
    correct = np.asarray(task.rewards([exs[int(g)] for g in b.group_ids.tolist()], b.responses), dtype=float) >= 1.0
    per = correct.reshape(len(exs), kk)
    avg, lo, hi = mean_ci(per.mean(1))
    pk, pk_lo, pk_hi = mean_ci(per.any(1).astype(float))
    return {"n": len(exs), "k": kk, "temperature": temperature, "avg@k": avg, "avg@k_lo": lo, "avg@k_hi": hi,
            "pass@1": avg, "pass@1_lo": lo, "pass@1_hi": hi, "pass@k": pk, "pass@k_lo": pk_lo, "pass@k_hi": pk_hi}


@contextlib.contextmanager
def _preserve_rng():
    # evaluation must not shift the training RNG streams (resume reproducibility)
    st = _rng_state()
    try:
        yield
    finally:
        _set_rng_state(st)


def summarise_runs(records: Sequence[RunRecord | str | os.PathLike], metric: str = "avg@k") -> pd.DataFrame:
    """One row per config label: final held-out ``metric`` (last eval row; training accuracy of the last
    step if a run has no eval) as mean and 95% t-interval over seeds. Records or run folders."""
    rows = []
    for r in records:
        r = r if isinstance(r, RunRecord) else load_run(r)
        if len(r.eval) and metric in r.eval.columns:
            v, src = float(r.eval[metric].iloc[-1]), f"eval {metric}"
        elif len(r.metrics):
            v, src = float(r.metrics["accuracy"].iloc[-1]), "train accuracy"
        else:
            v, src = math.nan, "none"
        rows.append({"label": r.label, "seed": r.config.seed, "value": v, "source": src,
                     "final_reward": float(r.metrics["reward_mean"].iloc[-1]) if len(r.metrics) else math.nan})
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["label", "n_seeds", "mean", "ci_lo", "ci_hi", "final_reward", "source"])
    out = []
    for label, g in df.groupby("label", sort=False):
        m, lo, hi = mean_ci(g["value"].tolist())
        out.append({"label": label, "n_seeds": len(g), "seeds": sorted(g["seed"].tolist()), "mean": m,
                    "ci_lo": lo, "ci_hi": hi, "final_reward": float(g["final_reward"].mean()),
                    "source": ", ".join(sorted(set(g["source"])))})
    return pd.DataFrame(out)


# ======================================================================================== CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ibpo_lab.train", description="Train one IBPO-lab config.")
    ap.add_argument("config", help="YAML config (see ibpo_lab/configs/), or a preset: smoke, full")
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="override config fields (values parsed as YAML; task_kwargs.x=1 sets a dict key)")
    ap.add_argument("--out", default=None, help="run folder (default runs/<stamp>-<label>-seed<seed>)")
    ap.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    a = ap.parse_args(argv)
    try:
        cfg = presets(a.config) if a.config in ("smoke", "full") else TrainConfig.from_yaml(Path(a.config))
        cfg = cfg.with_overrides(a.overrides)
        resolve_device(cfg.device)
    except ValueError as e:
        ap.error(str(e))
    if a.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    rec = train(cfg, a.out, progress=not a.no_progress, resume=a.resume)
    print(rec.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
