"""The training loop: one step (``step.take_step``) → PPO/GSPO update, repeated; run folders out.

One file, CleanRL style, for what only training does: the optimiser and its schedule, the policy
update, joining IOP's verified repairs into the batch (bilateral mode), the loop with
checkpoints and resume, held-out evaluation, ``train_many`` and the CLI. The config is
``config.TrainConfig``, the step ``step.take_step``, the run folder ``runs`` (schema, writers,
``load_run``)::

    ibpo-train ibpo --lr 1e-6 --correct.num_references 3 --report_to tensorboard   # HF-style --FIELD VALUE
    python -m ibpo_lab.train ibpo_lab/configs/ibpo.yaml --set seed=1 correct.num_references=3 --out runs/ibpo-k3
    python -m ibpo_lab.train ibpo --set estimator_kwargs.lam=0.3      # a committed config by name
    python -m ibpo_lab.train smoke --set estimator=grpo                # a preset instead of a file
    python -m ibpo_lab.train ibpo_lab/configs/ibpo.yaml --out runs/ibpo-lam0.3 --resume

Phases are timed (``time_sample`` ... ``time_update``) into the metrics table. RNGs are reseeded
from ``(seed, step)`` at the start of every step, so a killed and resumed run reproduces an
uninterrupted one exactly on the ``hf`` backend.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ibpo_lab.advantages import ibpo_repair_advantages, train_mask
from ibpo_lab.config import PROFILES, TrainConfig, build_checked_task, estimator_kwargs, load_config, loss_kwargs
from ibpo_lab.loggers import RunLogger, check_report_to
from ibpo_lab.losses import get_loss, truncated_is_weights
from ibpo_lab.models import load_policy, response_logprobs
from ibpo_lab.rollout import PaddedBatch, RolloutBatch, concat_batches
from ibpo_lab.runs import (
    CONFIG_FILE, EVAL_FILE, METRICS_FILE, RunLock, RunRecord, append_jsonl, check_records, has_records,
    load_checkpoint_model, load_checkpoint_state, load_run, mean_ci, model_card, prepare_run_dir, recover_checkpoint,
    rng_state, save_checkpoint, set_rng_state, truncate_records, write_trajectories,
)
from ibpo_lab.runs import _rng_split
from ibpo_lab.sampling import get_sampler
from ibpo_lab.step import (
    _timed, build_lab, build_policy, precision_context, resolve_device, seed_everything, step_seed,
    take_step,
)
from ibpo_lab.tasks import get_task

__all__ = [
    "NonFiniteLossError",
    "train",
    "train_many",
    "evaluate",
    "pick_examples",
    "policy_update",
    "make_scheduler",
    "make_optimizer",
    "offpolicy_repairs",
    "repaired_advantages",
    "RepairObjective",
    "repair_advantages",
    "repair_objective_batch",
    "main",
    "field_overrides",
]

#: consecutive skipped (non-finite) optimiser steps after which the run stops
MAX_CONSECUTIVE_SKIPS = 3


# ======================================================================================== optimiser
def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule over training steps: ``transformers.get_scheduler(cfg.lr_schedule,
    num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)`` — the schedules and warm-up of
    HF ``Trainer``/TRL, so a run here and a TRL run with the same settings step through the same
    learning rates. ``constant`` with ``warmup_steps > 0`` is the library's ``constant_with_warmup``
    (``constant`` alone ignores warm-up there). The scheduler steps once per training step (also when
    every optimiser step of it was skipped); the warm-up starts from 0, so with warm-up the first
    step's learning rate is 0, as in HF Trainer."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.lr_schedule == "constant" and cfg.warmup_steps > 0 else cfg.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)


#: bfloat16 keeps 8 significant bits: its spacing is 2^-8..2^-7 of a weight, so a step below |w|·2^-9 rounds back to w
BF16_EPS = 2.0**-8


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; its state (m, v) takes the parameters' dtype.

    Precision: with ``dtype="float32"`` or ``"bfloat16"`` (mixed) the parameters are float32 master
    weights (``step.build_policy``), checked here: a float32 run handed a low-precision model would
    otherwise silently train pure bf16. ``"bfloat16-pure"`` (bf16 weights and state) is allowed
    only explicitly and warns: AdamW's step is about lr per weight, and bf16 keeps 8 significant
    bits, so a step below |w|·2^-9 rounds back to w (lr 1e-6 leaves every weight above 5e-4 as it was)."""
    params = [p for p in model.parameters() if p.requires_grad]
    low = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
    if cfg.dtype == "bfloat16-pure":
        warnings.warn(f"dtype='bfloat16-pure': bfloat16 weights and AdamW state; an update smaller than "
                      f"{BF16_EPS / 2:.1e} of a weight's magnitude is rounded away (lr={cfg.lr:g}), so training may "
                      f"silently not learn. dtype='bfloat16' (float32 master weights, bf16 autocast) does not lose "
                      f"them.", UserWarning, stacklevel=2)
    elif low:
        raise ValueError(f"dtype: {cfg.dtype!r} trains float32 master weights, but the model has {', '.join(low)} "
                         f"parameters; load it in float32 (step.build_policy does) or set dtype='bfloat16-pure'")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


def pick_examples(examples: Sequence, cfg: TrainConfig, step: int) -> list:
    """The prompts of one step: drawn without replacement (with, if the split is smaller) from (seed, step)."""
    rng = np.random.default_rng(step_seed(cfg.seed, step, 3))
    n = len(examples)
    idx = rng.choice(n, size=cfg.prompts_per_step, replace=cfg.prompts_per_step > n)
    return [examples[int(i)] for i in idx]



def repaired_advantages(repaired: RolloutBatch, batch: RolloutBatch, cfg: TrainConfig) -> torch.Tensor:
    """[R, T_r] IOP bilateral credit of the verified repairs, on their inserted tokens
    (``advantages.ibpo_repair_advantages``: repair reward against the source group's shaped rewards,
    with the estimator's own λ, ρ, eps, scale, std and success threshold)."""
    import inspect

    kw = estimator_kwargs(cfg.estimator, cfg.estimator_kwargs)
    accepted = inspect.signature(ibpo_repair_advantages).parameters
    rkw = {k: v for k, v in kw.items() if k in accepted and k not in ("repaired", "original", "source")}
    if kw.get("shaping") is False:
        rkw["lam"] = 0.0
    return ibpo_repair_advantages(repaired, batch, repaired.meta["source_traj"], **rkw)


def policy_update(model, ref_model, optimizer, batch: RolloutBatch, advantages: torch.Tensor, cfg: TrainConfig,
                  device: torch.device, is_weights: torch.Tensor | None = None, n_onpolicy: int | None = None,
                  repair: "RepairObjective | None" = None) -> dict[str, float]:
    """PPO/GSPO epochs over minibatches, one clipped optimiser step per minibatch (gradients accumulated
    over micro-batches). A non-finite loss or gradient norm skips that optimiser step (counted in
    ``skipped``). Rows of ``batch`` past ``n_onpolicy`` are off-policy repairs (IOP bilateral), spread
    evenly over the minibatches. The loss gets ``cfg.loss_kwargs`` (e.g. GSPO's ``gate``); with
    ``estimator_kwargs.anchors_only`` the on-policy correct trajectories leave the loss mask
    (``advantages.train_mask``).
    ``repair`` (:func:`repair_objective_batch`): IOP's joint repair
    objective, its rows spread evenly over the minibatches and added as λ_rep·J_rep to each one's loss.

    batch: B trajectories; advantages [B, T'] (T' <= T); is_weights [B, T'] or None.

    Precision (``cfg.dtype``): every forward runs under ``step.precision_context`` (bf16 autocast for
    ``"bfloat16"``: the weights, their gradients and AdamW's state stay float32, so an update of
    lr 1e-6 is not rounded away); the loss and the log-softmax are float32 in every mode.
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
    if cfg.estimator_kwargs.get("anchors_only"):
        # IOP anchors: correct on-policy trajectories leave the loss mask (normaliser and KL too); repairs stay
        mask[:n_on] = train_mask(batch.rewards[:n_on], mask[:n_on], anchors_only=True,
                                 success_threshold=cfg.estimator_kwargs.get("success_threshold", 0.5))
    loss_kw = loss_kwargs(cfg.loss, cfg.loss_kwargs)
    old, ref = _fixed_logprobs(model, ref_model, padded, cfg, device)

    mb = cfg.minibatch_size or n_on
    n_mb = n_on // mb
    sums: dict[str, list[float]] = {}
    skipped = trailing = 0
    params = [p for p in model.parameters() if p.requires_grad]
    for epoch in range(cfg.ppo_epochs):
        perm_on, perm_off = torch.randperm(n_on), torch.randperm(B - n_on) + n_on
        off_split = torch.tensor_split(perm_off, n_mb)
        rep_split = None if repair is None else torch.tensor_split(torch.randperm(len(repair.adv)), n_mb)
        for j in range(n_mb):
            idx = torch.cat([perm_on[j * mb : (j + 1) * mb], off_split[j]])
            optimizer.zero_grad(set_to_none=True)
            finite = True
            for mic, share in _micro_batches(idx, mask, cfg):
                sub = _select_padded(padded, mic).to(device)
                with precision_context(cfg.dtype, device):  # bf16 autocast forward; lp, ent float32
                    lp, ent = response_logprobs(model, sub, temperature=cfg.temperature)
                m = mask[mic].to(device)
                loss, lm = loss_fn(lp, old[mic].to(device), adv[mic].to(device), m, clip_low=cfg.clip_low,
                                   clip_high=cfg.clip_high, agg=cfg.agg, kl_coef=cfg.kl_coef,
                                   ref_logprobs=None if ref is None else ref[mic].to(device),
                                   is_weights=None if isw is None else isw[mic].to(device), **norm, **loss_kw)
                _acc(sums, "entropy", float((ent.detach() * m).sum() / m.sum().clamp(min=1)))
                for k, v in (lm or {}).items():
                    _acc(sums, k if k in ("approx_kl", "clip_frac", "kl_ref") else f"loss_{k}", float(v))
                if not torch.isfinite(loss):
                    finite = False
                    break
                (loss * share).backward()
                _acc(sums, "loss", loss.item())
            if repair is not None and finite:  # IOP's J_rep, one local block (repair_objective_batch)
                finite = _repair_backward(model, loss_fn, repair, rep_split[j], cfg, device, sums, norm)
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
    forward may not fit), under the run's precision context (``step.precision_context``: bf16 autocast
    for ``dtype="bfloat16"``), so a recomputed old log-prob is exactly what the update's forward gives
    before its first step. -> (old [B, T], ref [B, T] or None), float32, on the CPU."""
    recompute = cfg.recompute_logprobs if recompute is None else recompute
    old = padded.old_logprobs.float()
    if not recompute and ref_model is None:
        return old, None
    B = padded.response_ids.shape[0]
    step = cfg.micro_batch_size or cfg.minibatch_size or B
    olds, refs = [], []
    with torch.no_grad(), precision_context(cfg.dtype, device):  # the same autocast as the update's forward
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



# ======================================================================================== J_rep
@dataclass
class RepairObjective:
    """IOP's joint repair objective J_rep for one update: revisions as responses to their REPAIR prompt.

    padded: the revisions kept (non-zero advantage), R rows; old [R, T] = π_old(y | repair prompt);
    adv [R, T] per-token advantage (the row's advantage on every response token); is_weights [R, T]
    = min(π_old/μ, is_cap) on response tokens (1 when log-probs are not recomputed); weight = λ_rep."""

    padded: PaddedBatch
    old: torch.Tensor
    adv: torch.Tensor
    is_weights: torch.Tensor
    weight: float


def repair_advantages(revisions: RolloutBatch, mode: str = "selected") -> torch.Tensor:
    """[R] J_rep advantage of each revision (``TrainConfig.repair_advantage``).

    revisions: ``correct.CorrectionResult.revisions`` (group ids = the failed trajectory revised,
    meta ``accepted`` / ``selected``). ``"group"``: a = 1[accepted] - mean of 1[accepted] over the
    revisions of the same failed attempt: REINFORCE on repair success with the group mean as
    baseline, like GRPO without the std division (so λ_rep alone sets the scale); a failure whose
    revisions all verify or all fail gives no signal. ``"selected"``: a = 1 on the selected repair
    (the one kept for credit), 0 elsewhere: rejection-sampling fine-tuning on the policy's best
    verified repair, which also trains when every revision verified, but never pushes a failed
    revision down."""
    acc = torch.tensor([float(a) for a in revisions.meta["accepted"]])
    if mode == "selected":
        return torch.tensor([float(a) for a in revisions.meta["selected"]])
    if mode != "group":
        raise ValueError(f"repair_advantage must be 'group' or 'selected', got {mode!r}")
    g = revisions.group_ids.long()
    _, inv = torch.unique(g, return_inverse=True)
    mean = torch.zeros(int(inv.max()) + 1).index_add_(0, inv, acc) / torch.bincount(inv).float()
    return acc - mean[inv]


def repair_objective_batch(model, revisions: RolloutBatch | None, cfg: TrainConfig, device: torch.device
                           ) -> RepairObjective | None:
    """J_rep's training rows from the corrector's revisions (``CorrectionResult.revisions``), or None
    (λ_rep = 0, no revisions, or every advantage 0).

    The revisions were sampled by the policy itself under the repair prompt, so they are on-policy
    there up to the sampler's numerics; the correction is the bilateral path's: with
    ``recompute_logprobs`` the ratio's denominator is π_old recomputed by the trainer and each
    token gets the truncated IS weight min(π_old/μ, is_cap), μ = the sampler's log-probs; without
    it μ is π_old and the weight is 1 (as for the on-policy batch). No KL term on these rows (the
    reference policy's repair-prompt log-probs would cost another forward)."""
    if revisions is None or len(revisions) == 0 or cfg.repair_loss_weight == 0:
        return None
    a = repair_advantages(revisions, cfg.repair_advantage)
    keep = torch.nonzero(a != 0).flatten().tolist()
    if not keep:
        return None
    sub = revisions.select(keep)
    padded = sub.padded()
    mask = padded.response_mask.float()
    mu = padded.old_logprobs.float()
    if cfg.recompute_logprobs:
        old, _ = _fixed_logprobs(model, None, padded, cfg, device, recompute=True)
        w = truncated_is_weights(mu, old, cap=cfg.is_cap) * mask
    else:
        old, w = mu, mask.clone()
    adv = a[keep][:, None] * mask
    return RepairObjective(padded=padded, old=old, adv=adv, is_weights=w, weight=float(cfg.repair_loss_weight))


def _repair_backward(model, loss_fn, rep: RepairObjective, idx: torch.Tensor, cfg: TrainConfig, device, sums,
                     norm) -> bool:
    """Backward of λ_rep·J_rep over the revisions ``idx`` of one minibatch (one forward); False if non-finite."""
    if len(idx) == 0:
        return True
    sub = _select_padded(rep.padded, idx).to(device)
    with precision_context(cfg.dtype, device):  # the same autocast as the policy loss's forward
        lp, _ = response_logprobs(model, sub, temperature=cfg.temperature)
    m = rep.padded.response_mask[idx].float().to(device)
    loss, _ = loss_fn(lp, rep.old[idx].to(device), rep.adv[idx].to(device), m, clip_low=cfg.clip_low,
                      clip_high=cfg.clip_high, agg=cfg.agg, kl_coef=0.0, ref_logprobs=None,
                      is_weights=rep.is_weights[idx].to(device), **norm, **loss_kwargs(cfg.loss, cfg.loss_kwargs))
    if not torch.isfinite(loss):
        return False
    (rep.weight * loss).backward()
    _acc(sums, "loss_repair", loss.item())
    return True


# ======================================================================================== the loop
class NonFiniteLossError(RuntimeError):
    """Raised after MAX_CONSECUTIVE_SKIPS optimiser steps in a row had a non-finite loss or gradient."""


def train(cfg: TrainConfig, out_dir: str | os.PathLike | None = None, progress: bool = True,
          resume: bool = False) -> RunRecord:
    """Run ``cfg`` and write its run folder (``out_dir``; default ``runs/<stamp>-<label>-seed<seed>``).

    One process writes a folder at a time (``runs.RunLock``; a second is refused naming the holder).
    A folder that already holds records needs ``resume=True``; without it that is an error (pass
    ``--resume`` or choose another ``--out``). ``resume=True`` always continues a killed run: from its
    newest complete checkpoint (bit-exact: same metrics as an uninterrupted run), or, when it has none
    (killed before its first checkpoint, or ``save_checkpoints=False``), from step 1 with its old records
    dropped. Every config value (``eval_split`` and the task/sampler/estimator/correct keys included)
    is checked before any model loads."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    check_report_to(cfg.report_to)  # a requested tracker that is not installed fails here, before any model loads
    device = resolve_device(cfg.device)  # before anything heavy: 'cuda' without a GPU fails here
    task = build_checked_task(cfg)  # task_kwargs, train_split, eval_split: before any folder or model
    run_dir = prepare_run_dir(out_dir, cfg)
    with RunLock(run_dir):
        return _train(cfg, run_dir, device, task, progress, resume)


def _open_run(cfg: TrainConfig, run_dir: Path, resume: bool) -> dict | None:
    """Holding the run's lock: recover the newest complete checkpoint (stale temporaries removed),
    refuse a folder with records unless ``resume``, check the records against the checkpoint and drop
    what was written after it. -> the checkpoint's state, or None to start at step 1."""
    ckpt = recover_checkpoint(run_dir)
    if not has_records(run_dir):
        return None
    if not resume:
        raise ValueError(f"out_dir: {run_dir} already holds a run; pass resume=True (--resume) to continue it "
                         f"or choose another --out")
    saved = run_dir / CONFIG_FILE
    if saved.is_file():
        _check_resumable(cfg, TrainConfig.from_yaml(saved))
    state = load_checkpoint_state(run_dir) if ckpt is not None else None
    if state is None:
        warnings.warn(f"{run_dir} has no checkpoint"
                      + (" (save_checkpoints=False)" if saved.is_file() and not TrainConfig.from_yaml(saved).save_checkpoints
                         else " (killed before its first one)") + ": starting again from step 1; its records are dropped")
        truncate_records(run_dir, 0)
        return None
    _check_resumable(cfg, TrainConfig.from_dict(state["config"]))
    check_records(run_dir, state["step"], trajectories=cfg.save_trajectories)
    truncate_records(run_dir, state["step"])
    return state


def _train(cfg: TrainConfig, run_dir: Path, device: torch.device, task, progress: bool, resume: bool) -> RunRecord:
    state = _open_run(cfg, run_dir, resume)
    cfg.to_yaml(run_dir / CONFIG_FILE)

    seed_everything(cfg.seed)
    train_examples = task.examples(cfg.train_split)
    policy = build_policy(cfg, task, device)
    model = policy.model
    model.eval()  # no dropout: the trainer's log-probs must match the sampler's behaviour log-probs
    ref_model = policy.reference().model.to(device) if cfg.kl_coef > 0 else None
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    start, skipped_total, consecutive = 1, 0, 0
    if state is not None:
        load_checkpoint_model(state["path"], model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, skipped_total, consecutive = state["step"] + 1, state["skipped_total"], state["consecutive_skips"]
    lab = build_lab(cfg, policy=policy, task=task)
    sampler = lab.sampler
    sampler.sync_weights(model)

    def checkpoint(step: int) -> None:
        if not cfg.save_checkpoints:
            return
        rng_json, rng_tensors = _rng_split(rng_state())
        save_checkpoint(run_dir, step, model=model, tokenizer=policy.tokenizer, card=model_card(cfg, step),
                        tensors={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                 "rng": rng_tensors},
                        meta={"skipped_total": skipped_total, "consecutive_skips": consecutive, "rng": rng_json,
                              "config": cfg.to_dict()})

    tracker = RunLogger(cfg.report_to, run_dir, cfg.to_dict())  # report_to: tensorboard/wandb/trackio besides the JSONL
    bar = _progress(range(start, cfg.steps + 1), cfg, progress)
    for step in bar:
        times: dict[str, float] = {}
        t_step = time.perf_counter()
        s = step_seed(cfg.seed, step)
        seed_everything(s)
        examples = pick_examples(train_examples, cfg, step)

        st = take_step(lab, examples, seed=s, correct_seed=step_seed(cfg.seed, step, 1),
                       values_seed=step_seed(cfg.seed, step, 4))
        times.update(st.timings)
        batch, adv, repaired = st.batch, st.advantage, st.repaired
        with _timed(times, "advantage"):
            train_batch, train_adv, isw, rep_w, rep_adv = batch, adv, None, None, None
            if cfg.bilateral and repaired is not None and len(repaired) > 0:
                repaired, rep_w = offpolicy_repairs(model, repaired, cfg, device)
                rep_adv = repaired_advantages(repaired, batch, cfg)
                train_batch, train_adv, isw = _join_offpolicy(batch, adv, repaired, rep_adv, rep_w)
            rep_obj = repair_objective_batch(model, None if st.correction is None else st.correction.revisions,
                                             cfg, device)
        with _timed(times, "update"):
            upd = policy_update(model, ref_model, optimizer, train_batch, train_adv, cfg, device,
                                is_weights=isw, n_onpolicy=len(batch), repair=rep_obj)
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
        row = {"step": step, **st.metrics(), **upd, "skipped_total": skipped_total, "lr": lr,
               "n_repaired": 0 if repaired is None else len(repaired),
               "repair_loss_weight": cfg.repair_loss_weight if rep_obj is not None else 0.0,
               "n_repair_trained": 0 if rep_obj is None else len(rep_obj.adv), **times}  # correct_*: st.metrics()
        append_jsonl(run_dir / METRICS_FILE, row)
        tracker.log(row, step)
        if cfg.save_trajectories:
            write_trajectories(run_dir, step, batch, adv, st.repairs if st.correction is not None else None,
                               repaired, rep_adv, rep_w, examples, task)
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
            append_jsonl(run_dir / EVAL_FILE, {"step": step, **ev})
            tracker.log(ev, step, prefix="eval")
            row["eval_avg@k"] = ev["avg@k"]
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
            checkpoint(step)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("reward_mean", "approx_kl", "repair_success", "eval_avg@k")
                             if k in row and not (isinstance(row[k], float) and math.isnan(row[k]))})
    tracker.close()
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


def train_many(cfgs: TrainConfig | Sequence[TrainConfig], out_root: str | os.PathLike | None = "runs",
               progress: bool = True, resume: bool = False, *, experiment: str = "",
               keep_checkpoints: bool = True) -> list[RunRecord]:
    """Train each config in turn under ``out_root/[experiment/]<label>-seed<seed>`` (``-2``, ``-3``... if
    taken) and return the run records (``record.experiment`` = ``experiment``, as ``runs.load_runs``
    names it). ``out_root=None``: ``runs/notebooks``. ``keep_checkpoints=False`` trains with
    ``save_checkpoints=False, checkpoint_every=0`` (the notebooks read metrics and trajectories only,
    and a 135M-parameter policy's checkpoint with AdamW state is 1.6 GB)."""
    if isinstance(cfgs, TrainConfig):
        cfgs = [cfgs]
    root = Path(out_root if out_root is not None else Path("runs") / "notebooks") / experiment
    out, used = [], set()
    for cfg in cfgs:
        base = f"{cfg.name}-seed{cfg.seed}"
        name, i = base, 1
        while name in used or (not resume and (root / name).exists()):
            i += 1
            name = f"{base}-{i}"
        used.add(name)
        if not keep_checkpoints:
            cfg = cfg.replace(save_checkpoints=False, checkpoint_every=0)
        rec = train(cfg, root / name, progress=progress, resume=resume)
        rec.experiment = experiment
        out.append(rec)
    return out



# ======================================================================================== evaluation
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
    st = rng_state()
    try:
        yield
    finally:
        set_rng_state(st)



# ======================================================================================== CLI
def field_overrides(args: Sequence[str]) -> list[str]:
    """HF-style ``--field value`` arguments as ``field=value`` assignments for
    :meth:`TrainConfig.with_overrides` (values parsed as YAML there, as ``--set``'s).

    ``--lr 1e-6``, ``--lr=1e-6``, ``--max-new-tokens 64`` (hyphens read as underscores),
    ``--correct.num_references 3`` / ``--estimator_kwargs.lam 0.3`` (one key of a mapping field),
    ``--report_to tensorboard wandb`` and ``--stop A B`` (several values: a list; one value of a list
    field: a one-item list), ``--bilateral`` (a bool field without a value: true) and
    ``--no_save_trajectories`` (false, as HfArgumentParser)."""
    import json
    import typing

    import yaml

    from ibpo_lab.config import _HINTS

    hints = _HINTS()
    out: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if not tok.startswith("--") or tok == "--":
            raise ValueError(f"expected --FIELD VALUE, got {tok!r}")
        key, eq, inline = tok[2:].partition("=")
        key = key.replace("-", "_")
        vals = [inline] if eq else []
        i += 1
        while not eq and i < len(args) and not args[i].startswith("--"):
            vals.append(args[i])
            i += 1
        head = key.split(".", 1)[0]
        tp = hints.get(head)
        if tp is None and head.startswith("no_") and hints.get(head[3:]) is bool and not vals and "." not in key:
            out.append(f"{head[3:]}=false")
            continue
        is_list = typing.get_origin(tp) is list or tp is list
        if not vals:
            if tp is bool:
                out.append(f"{key}=true")
                continue
            raise ValueError(f"--{key} needs a value")
        if len(vals) == 1 and not (is_list and "." not in key):
            out.append(f"{key}={vals[0]}")
            continue
        if len(vals) > 1 and not is_list:
            raise ValueError(f"--{key} takes one value, got {vals}")
        parsed = [yaml.safe_load(v) for v in vals]
        if len(parsed) == 1 and isinstance(parsed[0], list):
            parsed = parsed[0]  # --stop '[a, b]' as well as --stop a b
        out.append(f"{key}={json.dumps(parsed)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="ibpo-train", description="Train one IBPO-lab config (also: python -m ibpo_lab.train).", allow_abbrev=False,
        epilog="Any TrainConfig field is also an option, HF style: --lr 1e-6 --estimator grpo "
               "--correct.num_references 3 --report_to tensorboard (see --help-config for every field). "
               "Order of application: the config, then --set, then --FIELD options.")
    ap.add_argument("config", nargs="?", help="YAML config, a committed config name (ibpo, grpo... in ibpo_lab/configs/), "
                                              "or a preset: " + ", ".join(PROFILES) + "; comes before the --FIELD options")
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="override config fields (values parsed as YAML; correct.num_references=3 or "
                         "estimator_kwargs.lam=0.3 sets one key of a mapping field)")
    ap.add_argument("--out", default=None, help="run folder (default runs/<stamp>-<label>-seed<seed>)")
    ap.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--help-config", action="store_true", help="list every config field with its default and help")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """``ibpo-train CONFIG [--set k=v ...] [--FIELD VALUE ...] [--out DIR] [--resume]``."""
    ap = build_parser()
    a, rest = ap.parse_known_args(argv)
    if a.help_config:
        print(TrainConfig.help())
        return 0
    if a.config is None:
        ap.error("a config is required (a YAML path, a committed config name or a preset)")
    try:
        cfg = load_config(a.config)
        cfg = cfg.with_overrides(list(a.overrides) + field_overrides(rest))
        resolve_device(cfg.device)
        check_report_to(cfg.report_to)
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
