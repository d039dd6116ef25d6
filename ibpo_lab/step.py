"""One RL step of IBPO and its baselines: sample → score → compare-and-correct → step values →
advantages, returned as one :class:`Step` object.

This is the only implementation of a step: ``train`` (the loop), the notebooks, the benchmarks
and ``diagnostics.gradient_variance`` all call :func:`take_step` (or :func:`sample`, which picks
the prompts first), and every advantage anywhere is :func:`compute_advantages` of a config — so
an ablation shown in a notebook is exactly the one trained::

    lab = build_lab(cfg)                        # task, policy, sampler (built once)
    step = sample(cfg, n_prompts=4, seed=0, lab=lab)
    step.batch                                  # RolloutBatch: rewards, step spans, repairs, edit masks
    step.advantage                              # [B, T] of cfg's own estimator
    step.advantages_for(["grpo", "ibpo_no_mask"])   # same batch, other methods (committed configs)
    step.token_frame("ibpo")                    # tidy per-token DataFrame
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ibpo_lab.advantages import active_token_ratio, failed_positive_share, get_estimator, list_estimators
from ibpo_lab.config import CONFIG_DIR, RANDOM_TINY, TrainConfig, estimator_kwargs, method_variants
from ibpo_lab.correct import CorrectConfig, CorrectionResult, compare_and_correct
from ibpo_lab.mc_values import mc_step_values
from ibpo_lab.models import build_tiny_policy, load_policy
from ibpo_lab.rollout import RolloutBatch
from ibpo_lab.sampling import get_sampler
from ibpo_lab.steps import split_steps
from ibpo_lab.tasks import get_task

__all__ = [
    "Lab",
    "Step",
    "build_lab",
    "build_task",
    "build_policy",
    "resolve_device",
    "precision_context",
    "autocast_dtype",
    "param_dtype",
    "enable_tf32",
    "AutocastSampler",
    "step_seed",
    "seed_everything",
    "sample",
    "take_step",
    "sample_groups",
    "score_groups",
    "correct_config",
    "correct_groups",
    "step_values",
    "compute_advantages",
    "variant_config",
    "batch_metrics",
]


# ======================================================================================== building blocks
def resolve_device(device: str) -> torch.device:
    """'auto' → cuda if available else cpu; 'cuda' without a GPU → ValueError (before any model loads)
    that says why torch sees none (``gpu_check.cuda_diagnosis``: CPU-only torch, no driver, a driver
    too old for torch's CUDA, ``CUDA_VISIBLE_DEVICES``)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from ibpo_lab.gpu_check import cuda_diagnosis

        raise ValueError(f"device: {device!r} was requested but torch sees no CUDA GPU; use 'cpu' or 'auto'. "
                         f"Why: {cuda_diagnosis()}")
    return torch.device(device)


# ---------------------------------------------------------------------------- precision
def param_dtype(dtype: str) -> str:
    """The dtype the policy's parameters (and so AdamW's state) are kept in for ``TrainConfig.dtype``:
    float32 for ``"float32"`` and for ``"bfloat16"`` (mixed precision: fp32 master weights),
    bfloat16 only for the explicit ``"bfloat16-pure"``."""
    return "bfloat16" if dtype == "bfloat16-pure" else "float32"


def autocast_dtype(dtype: str) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of a ``TrainConfig.dtype``: bfloat16 for ``"bfloat16"`` (mixed
    precision), None (no autocast) for ``"float32"`` and ``"bfloat16-pure"``."""
    return torch.bfloat16 if dtype == "bfloat16" else None


def precision_context(dtype: str, device: torch.device | str):
    """The context every forward pass of a run enters: ``torch.autocast(device.type, bfloat16)`` for
    ``dtype="bfloat16"`` (the update, the fixed old/reference log-prob passes, the hf sampler's
    decode), else a no-op. Matmuls then run in bfloat16 while the weights, their gradients and
    AdamW's state stay float32; ``models.response_logprobs`` upcasts the logits to float32 before
    the log-softmax, so log-probs and entropies are float32 either way. Works on CPU too (tests)."""
    ac = autocast_dtype(dtype)
    if ac is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=ac)


def enable_tf32() -> None:
    """TF32 tensor cores for float32 CUDA matmuls and cuDNN convolutions (10-bit mantissa inputs,
    float32 accumulation): the float32 parts of a run (the ``float32`` dtype; the optimiser and
    the float32 log-softmax of mixed precision) run on tensor cores instead of ~8x slower float32
    CUDA cores. Set by :func:`build_policy` whenever the policy goes to a CUDA device."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


class AutocastSampler:
    """A sampler whose ``sample`` runs under :func:`precision_context` (``build_lab`` wraps the hf
    sampler in it for ``dtype="bfloat16"``); every other attribute is the wrapped sampler's.

    Why the decode runs under the same autocast: the behaviour log-probs the hf sampler records
    are then those of the same bf16-autocast model the trainer differentiates (they still differ
    from the trainer's full-sequence pass by bf16 rounding of the incremental KV-cache decode;
    ``recompute_logprobs=True`` makes the old log-probs the trainer's own, so the first PPO ratio
    is exactly 1), and the decode's matmuls run at bf16 speed. The vllm sampler is not wrapped:
    its engine runs in its own dtype (bf16 for Qwen2.5), and an autocast context around its
    (torch.compile'd) forward would only change its graphs; the ``full`` preset recomputes the old
    log-probs in the trainer instead (``recompute_logprobs=True``)."""

    def __init__(self, sampler, dtype: str, device: torch.device | str):
        self.sampler, self.dtype, self.device = sampler, dtype, torch.device(device)

    def sample(self, *args, **kwargs):
        with precision_context(self.dtype, self.device):
            return self.sampler.sample(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            inner = self.__dict__["sampler"]
        except KeyError:  # not initialised yet (copy, pickle)
            raise AttributeError(name) from None
        return getattr(inner, name)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The seed of one step: a hash of (seed, step, stream), so runs with neighbouring seeds never share
    steps; ``stream`` separates uses within a step (0 training, 1 repairs, 2 evaluation, 3 prompts,
    4 Monte-Carlo values)."""
    return int(np.random.SeedSequence([int(seed), int(step), int(stream)]).generate_state(1)[0])


def seed_everything(s: int) -> None:
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def build_task(cfg: TrainConfig):
    """The task of a config."""
    return get_task(cfg.task, **cfg.task_kwargs)


def build_policy(cfg: TrainConfig, task, device: torch.device):
    """The initial policy of a config, on ``device`` (``task`` is accepted for tasks that shape the model),
    its parameters in :func:`param_dtype` (float32 master weights unless ``dtype="bfloat16-pure"``);
    TF32 on for a CUDA device (:func:`enable_tf32`)."""
    if device.type == "cuda":
        enable_tf32()
    dtype = param_dtype(cfg.dtype)
    if cfg.model == RANDOM_TINY:
        from ibpo_lab.tasks.synthetic import VOCAB

        policy = build_tiny_policy(VOCAB, seed=cfg.seed)
        policy.model.to(getattr(torch, dtype))
    else:
        policy = load_policy(cfg.model, dtype=dtype, device=str(device))
    policy.model.to(device)
    return policy


@dataclass
class Lab:
    """What a step needs besides its prompts: the config, task, policy and sampler (built once, reused)."""

    cfg: TrainConfig
    task: Any
    policy: Any
    sampler: Any


def build_lab(cfg: TrainConfig, policy=None, task=None) -> Lab:
    """Task, policy and sampler of a config (the objects ``train`` builds); pass ``policy``/``task``
    to reuse ones you have."""
    device = resolve_device(cfg.device)
    task = task if task is not None else build_task(cfg)
    if policy is None:
        policy = build_policy(cfg, task, device)
        policy.model.eval()  # no dropout: the trainer's log-probs must match the sampler's
    kw = dict(cfg.sampler_kwargs)
    if cfg.backend == "vllm":
        kw.setdefault("trainer_dtype", cfg.dtype)  # its recomputed old log-probs run under the run's precision
    sampler = get_sampler(cfg.backend, policy, **kw)
    if cfg.backend == "hf" and autocast_dtype(cfg.dtype) is not None:
        sampler = AutocastSampler(sampler, cfg.dtype, device)  # decode under the trainer's autocast
    return Lab(cfg=cfg, task=task, policy=policy, sampler=sampler)


# ======================================================================================== the phases
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


def correct_config(cfg: TrainConfig) -> CorrectConfig:
    """The CorrectConfig of a run: ``cfg.correct``, with ``max_new_tokens``/``stop`` left None taken
    from the run's sampling settings (a repair is as long as an attempt, and stops where it stops)."""
    c = cfg.correct
    return dataclasses.replace(c, max_new_tokens=c.max_new_tokens or cfg.max_new_tokens,
                               stop=c.stop if c.stop is not None else (cfg.stop or None))


def correct_groups(batch: RolloutBatch, examples: Sequence, task, sampler, tokenizer, cfg: TrainConfig,
                   seed: int) -> CorrectionResult:
    """IBPO compare-and-correct: the result's batch has repair_success and edit_masks filled in."""
    return compare_and_correct(batch, dict(enumerate(examples)), task, sampler, correct_config(cfg),
                               tokenizer=tokenizer, seed=seed)


def step_values(batch, examples, task, sampler, tokenizer, cfg: TrainConfig, seed: int) -> RolloutBatch:
    """VinePPO: Monte-Carlo value at every step boundary from K fresh continuations (expensive)."""
    values = mc_step_values(batch, dict(enumerate(examples)), task, sampler, cfg.mc_rollouts,
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop=cfg.stop or None, seed=seed, tokenizer=tokenizer, progress=False)
    return batch.replace(step_values=values)


def compute_advantages(batch: RolloutBatch, cfg: TrainConfig) -> Tensor:
    """[B, T] token advantages of ``cfg.estimator`` with ``cfg.estimator_kwargs`` (0 off the response mask).
    Every advantage the lab computes from a config goes through here."""
    adv = get_estimator(cfg.estimator)(batch, **estimator_kwargs(cfg.estimator, cfg.estimator_kwargs))
    if not torch.isfinite(adv).all():
        raise RuntimeError(f"estimator {cfg.estimator!r} returned non-finite advantages")
    return adv


@contextlib.contextmanager
def _timed(times: dict[str, float], name: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[f"time_{name}"] = times.get(f"time_{name}", 0.0) + time.perf_counter() - t0


# ======================================================================================== the step
@dataclass
class Step:
    """One step's data, taken apart (TransformerLens' ActivationCache idea: analysis lives here).

    batch        scored batch (rewards, step spans) with repair_success / edit_masks once corrected
                 and step_values once valued
    examples     the Example of each group (group id g -> examples[g])
    correction   the ``correct.CorrectionResult`` (None when not corrected)
    advantages   label -> [B, T]; ``cfg.name`` holds the config's own estimator (``advantage``)
    timings      seconds per phase: time_sample, time_reward, time_correct, time_advantage
    """

    lab: Lab
    batch: RolloutBatch
    examples: list
    correction: CorrectionResult | None = None
    advantages: dict[str, Tensor] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    @property
    def cfg(self) -> TrainConfig:
        return self.lab.cfg

    @property
    def tokenizer(self):
        return self.lab.policy.tokenizer

    @property
    def advantage(self) -> Tensor:
        """[B, T] advantages of the step's own config (what ``train`` trains on)."""
        if self.cfg.name not in self.advantages:
            self.advantages[self.cfg.name] = compute_advantages(self._ready(self.cfg), self.cfg)
        return self.advantages[self.cfg.name]

    @property
    def repairs(self) -> pd.DataFrame:
        """One row per revision (``correct.TABLE_COLUMNS``); empty without a correction."""
        return pd.DataFrame() if self.correction is None else self.correction.table

    @property
    def repaired(self) -> RolloutBatch | None:
        """The selected verified repairs (under the solve prompt), or None."""
        return None if self.correction is None else self.correction.repaired

    @property
    def stats(self) -> dict[str, Any]:
        return {} if self.correction is None else dict(self.correction.stats or {})

    @cached_property
    def step_labels(self) -> list:
        """Per trajectory, the task's ground-truth step labels (None where unknown)."""
        b = self.batch
        return [self.lab.task.step_labels(self.examples[int(g)], r) for g, r in zip(b.group_ids.tolist(), b.responses)]

    def metrics(self) -> dict[str, float]:
        """:func:`batch_metrics` of the batch and the config's advantages, plus the corrector's
        numeric stats as ``correct_<name>`` (``correct_phi_mean``, ``correct_audit_rejection_share``,
        ...; none without a correction) — the per-step columns of ``runs.METRIC_HELP``. The loss's
        own metrics (``loss_gate_frac``...) come from the update, not the step."""
        thr = self.cfg.estimator_kwargs.get("success_threshold", self.cfg.correct.success_threshold)
        out = batch_metrics(self.batch, self.advantage, success_threshold=thr)
        out.update({f"correct_{k}": float(v) for k, v in self.stats.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return out

    # -------------------------------------------------------------------- other methods on this batch
    def variant(self, name: str, spec: Mapping[str, Any] | None = None) -> TrainConfig:
        """The config of method ``name`` on this step: see :func:`variant_config`."""
        return variant_config(self.cfg, name, spec)

    def advantages_for(self, estimators: Sequence[str] | Mapping[str, Any], *, seed: int | None = None
                       ) -> dict[str, Tensor]:
        """[B, T] advantages of several methods on this same batch, each by :func:`compute_advantages`
        of its :func:`variant_config` — the code ``train`` runs. ``estimators``: names (estimators or
        committed configs such as ``"ibpo_no_mask"``) or label -> TrainConfig overrides. A method that
        needs Monte-Carlo step values gets them once, with the step's ``mc_rollouts`` (``seed``, default
        the step's seed + 4), kept on the batch for the next."""
        specs = {n: None for n in estimators} if not isinstance(estimators, Mapping) else dict(estimators)
        if not specs:
            raise ValueError("estimators is empty")
        out: dict[str, Tensor] = {}
        for label, spec in specs.items():
            cfg = self.variant(label, spec)
            if cfg.uses_correction and self.batch.repair_success is None:
                raise ValueError(f"estimators[{label!r}]: {cfg.estimator} needs a corrected step (take_step(correct=True))")
            out[label] = compute_advantages(self._ready(cfg, seed), cfg)
        return out

    def _ready(self, cfg: TrainConfig, seed: int | None = None) -> RolloutBatch:
        if cfg.uses_step_values and self.batch.step_values is None:
            # a property of the batch: valued with the step's own settings (cfg.mc_rollouts), whichever method asks
            self.batch = step_values(self.batch, self.examples, self.lab.task, self.lab.sampler, self.tokenizer,
                                     self.cfg, seed=self.seed + 4 if seed is None else seed)
        return self.batch

    def token_frame(self, estimator: str | None = None) -> pd.DataFrame:
        """One row per response token (``RolloutBatch.token_frame``) with the advantage of
        ``estimator`` (a name as in :meth:`advantages_for`; default the config's own) and token text."""
        adv = self.advantage if estimator is None else self.advantages_for([estimator])[estimator]
        return self.batch.token_frame(adv, tokenizer=self.tokenizer)

    def recorrect(self, *, seed: int = 1, **cfg_overrides) -> "Step":
        """The same sampled batch, compare-and-correct run again with changed TrainConfig fields
        (``correct={"num_references": 1}``...): isolates the corrector from sampling noise."""
        cfg = self.cfg.replace(**cfg_overrides) if cfg_overrides else self.cfg
        lab = dataclasses.replace(self.lab, cfg=cfg)
        base = self.batch.replace(repair_success=None, edit_masks=None)
        res = correct_groups(base, self.examples, lab.task, lab.sampler, self.tokenizer, cfg, seed=seed)
        out = Step(lab=lab, batch=res.batch, examples=self.examples, correction=res, seed=self.seed)
        if "step_labels" in self.__dict__:
            out.__dict__["step_labels"] = self.step_labels
        return out

    def pick_trajectory(self, prefer: str = "repaired") -> int:
        """A trajectory worth showing: ``"repaired"`` = the first failed one with a verified repair
        (else the first failed, else 0); ``"failed"`` = the first failed; ``"correct"`` = the first correct."""
        b = self.batch
        r = b.rewards.numpy()
        rs = b.repair_success.numpy() if b.repair_success is not None else np.zeros(len(b))
        if prefer not in ("repaired", "failed", "correct"):
            raise ValueError(f"prefer must be 'repaired', 'failed' or 'correct', got {prefer!r}")
        cands = {"repaired": np.flatnonzero((r < 0.5) & (rs > 0)), "failed": np.flatnonzero(r < 0.5),
                 "correct": np.flatnonzero(r >= 0.5)}
        for key in ([prefer, "failed"] if prefer == "repaired" else [prefer]):
            if len(cands[key]):
                return int(cands[key][0])
        return 0

    def repair_of(self, traj: int) -> tuple[list[int], list[int]] | None:
        """(failed response ids, its selected repair's ids) of trajectory ``traj``; None if not repaired."""
        rep = self.repaired
        if rep is None or len(rep) == 0:
            return None
        src = [int(x) for x in rep.meta.get("source_traj", [])]
        if traj not in src:
            return None
        return self.batch.response_ids[traj], rep.response_ids[src.index(traj)]


def variant_config(cfg: TrainConfig, name: str, spec: Mapping[str, Any] | None = None) -> TrainConfig:
    """The config of method ``name`` on ``cfg``'s run: ``spec`` (TrainConfig overrides) if given; else
    ``cfg`` itself when ``name`` is its name (label, or estimator when unlabelled); else the committed config
    ``configs/<name>.yaml``'s method fields (``config.method_variants``) — every estimator has one."""
    if spec is not None:
        if not isinstance(spec, Mapping):
            raise ValueError(f"estimators[{name!r}] must be None or a dict of TrainConfig overrides, "
                             f"got {type(spec).__name__}")
        return cfg.replace(**dict(spec))
    if name == cfg.name:  # the label, or the estimator of an unlabelled run
        return cfg
    if (CONFIG_DIR / f"{name}.yaml").is_file():
        # a committed method is its own estimator/loss settings: they replace the base's, so that e.g.
        # ``ibpo`` on an ``ibpo_legacy`` run is not left with the legacy sign rule
        rest = dict(method_variants([name])[name])
        own = {k: dict(rest.pop(k, None) or {}) for k in ("estimator_kwargs", "loss_kwargs")}
        return TrainConfig.from_dict({**cfg.replace(**rest).to_dict(), **own})
    if name in list_estimators():
        return cfg.replace(estimator=name)
    raise ValueError(f"unknown method {name!r}: not an estimator ({', '.join(list_estimators())}) nor a config in "
                     f"{CONFIG_DIR}")


def take_step(lab: Lab, examples: Sequence, *, seed: int, correct: bool | None = None, values: bool | None = None,
              correct_seed: int | None = None, values_seed: int | None = None, advantages: bool = True) -> Step:
    """THE RL step on ``examples`` (one group of ``cfg.group_size`` each): sample (``seed``), score and
    split steps, compare-and-correct (``correct``, default: the estimator needs it; ``correct_seed``,
    default seed + 1), Monte-Carlo step values (``values``, default: the estimator needs them;
    ``values_seed``, default seed + 4), and the config's advantages. Each phase is timed."""
    cfg = lab.cfg
    examples = list(examples)
    correct = cfg.uses_correction if correct is None else correct
    values = cfg.uses_step_values if values is None else values
    times: dict[str, float] = {}
    tok = lab.policy.tokenizer
    with _timed(times, "sample"):
        batch = sample_groups(lab.sampler, lab.task, examples, cfg, seed=seed)
    with _timed(times, "reward"):
        batch = score_groups(batch, examples, lab.task, tok, cfg)
    correction = None
    with _timed(times, "correct"):
        if correct:
            correction = correct_groups(batch, examples, lab.task, lab.sampler, tok, cfg,
                                        seed=seed + 1 if correct_seed is None else correct_seed)
            batch = correction.batch
        if values:
            batch = step_values(batch, examples, lab.task, lab.sampler, tok, cfg,
                                seed=seed + 4 if values_seed is None else values_seed)
    step = Step(lab=lab, batch=batch, examples=examples, correction=correction, timings=times, seed=seed)
    if advantages:
        with _timed(times, "advantage"):
            step.advantage  # noqa: B018 — computed now so the phase is timed
    return step


def sample(cfg: TrainConfig, n_prompts: int | None = None, *, seed: int = 0, split: str = "train", lab: Lab | None = None,
           correct: bool = True, values: bool | None = None) -> Step:
    """One step on the first ``n_prompts`` examples of ``split`` (default ``cfg.prompts_per_step``),
    corrected by default whatever the estimator (the notebooks compare methods on it)."""
    lab = lab or build_lab(cfg)
    n = cfg.prompts_per_step if n_prompts is None else int(n_prompts)
    if n < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    examples = lab.task.examples(split, n)
    if len(examples) < n:
        raise ValueError(f"n_prompts: split {split!r} has only {len(examples)} examples, asked for {n}")
    torch.manual_seed(seed)
    return take_step(lab, examples, seed=seed, correct=correct, values=values,
                     advantages=correct or not cfg.uses_correction)


# ======================================================================================== metrics
def batch_metrics(batch: RolloutBatch, advantages: Tensor, success_threshold: float = 0.5) -> dict[str, float]:
    """Reward mean, accuracy, zero-variance groups, active (credited) tokens
    (``advantages.active_token_ratio``, IOP's active-token ratio), the share of failed trajectories'
    credited tokens with positive advantage (``advantages.failed_positive_share``; failed = reward
    below ``success_threshold``), response length, repair success (columns of ``runs.METRIC_HELP``).
    advantages [B, T'] with T' <= the batch's longest response (padded with 0)."""
    import math

    r = batch.rewards
    groups = batch.groups()
    zero_var = [float(r[idx].max() - r[idx].min()) == 0.0 for idx in groups.values()]
    mask = batch.response_mask
    adv = torch.zeros(mask.shape, dtype=torch.float32)
    adv[:, : advantages.shape[1]] = advantages.detach().float().cpu()
    out = {
        "reward_mean": float(r.mean()),
        "accuracy": float((r >= 1.0).float().mean()),
        "zero_var_groups": float(np.mean(zero_var)),
        "active_tokens": active_token_ratio(adv, mask),
        "failed_positive_share": failed_positive_share(adv, r, mask, success_threshold=success_threshold),
        "response_len": float(batch.response_lengths.float().mean()),
    }
    if batch.repair_success is not None:
        failed = r < 1.0
        out["repair_success"] = float(batch.repair_success[failed].mean()) if failed.any() else math.nan
    else:
        out["repair_success"] = math.nan
    return out
