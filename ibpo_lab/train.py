"""The training loop: one step (``step.take_step``) → PPO/GSPO update, repeated; run folders out.

One file, CleanRL style, for what only training does: the optimiser and its schedule, the policy
update, joining IOP's verified repairs into the batch (bilateral mode), the loop with
checkpoints and resume, held-out evaluation, ``train_many`` and the CLI. The config is
``config.TrainConfig``, the step ``step.take_step``, the run folder ``runs`` (schema, writers,
``load_run``)::

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
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ibpo_lab.advantages import ibpo_repair_advantages
from ibpo_lab.config import PROFILES, TrainConfig, estimator_kwargs, load_config
from ibpo_lab.losses import get_loss, truncated_is_weights
from ibpo_lab.models import load_policy, response_logprobs
from ibpo_lab.rollout import PaddedBatch, RolloutBatch, concat_batches
from ibpo_lab.runs import (
    CONFIG_FILE, EVAL_FILE, METRICS_FILE, RunRecord, append_jsonl, has_records, load_checkpoint_state, load_run, mean_ci, prepare_run_dir, rng_state,
    save_checkpoint, set_rng_state, truncate_records, write_trajectories,
)
from ibpo_lab.sampling import get_sampler
from ibpo_lab.step import (
    _timed, build_lab, build_policy, build_task, resolve_device, seed_everything, step_seed, take_step,
)
from ibpo_lab.tasks import get_task

__all__ = [
    "NonFiniteLossError",
    "train",
    "train_many",
    "evaluate",
    "pick_examples",
    "policy_update",
    "offpolicy_repairs",
    "repaired_advantages",
    "RepairObjective",
    "repair_advantages",
    "repair_objective_batch",
    "main",
]

#: consecutive skipped (non-finite) optimiser steps after which the run stops
MAX_CONSECUTIVE_SKIPS = 3


# ======================================================================================== optimiser
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
    evenly over the minibatches. ``repair`` (:func:`repair_objective_batch`): IOP's joint repair
    objective, its rows spread evenly over the minibatches and added as λ_rep·J_rep to each one's loss.

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
        rep_split = None if repair is None else torch.tensor_split(torch.randperm(len(repair.adv)), n_mb)
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
    lp, _ = response_logprobs(model, sub, temperature=cfg.temperature)
    m = rep.padded.response_mask[idx].float().to(device)
    loss, _ = loss_fn(lp, rep.old[idx].to(device), rep.adv[idx].to(device), m, clip_low=cfg.clip_low,
                      clip_high=cfg.clip_high, agg=cfg.agg, kl_coef=0.0, ref_logprobs=None,
                      is_weights=rep.is_weights[idx].to(device), **norm)
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
    ``resume=True`` continues from the folder's checkpoint (same metrics as an uninterrupted run)."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    cfg.validate()
    device = resolve_device(cfg.device)  # before anything heavy: 'cuda' without a GPU fails here
    run_dir = prepare_run_dir(out_dir, cfg)
    state = load_checkpoint_state(run_dir) if resume else None
    if state is not None:
        _check_resumable(cfg, TrainConfig.from_dict(state["config"]))
    elif has_records(run_dir):
        if resume:
            saved = run_dir / CONFIG_FILE
            if saved.is_file() and not TrainConfig.from_yaml(saved).save_checkpoints:
                raise ValueError(f"out_dir: cannot resume {run_dir}: it was trained with save_checkpoints=False, "
                                 f"so it has no checkpoint; train it again in a new folder")
            raise ValueError(f"out_dir: {run_dir} has records but no checkpoint to resume from")
        raise ValueError(f"out_dir: {run_dir} already holds a run; pass resume=True (--resume) or pick a new folder")
    cfg.to_yaml(run_dir / CONFIG_FILE)

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
        set_rng_state(state["rng"])
        start, skipped_total, consecutive = state["step"] + 1, state["skipped_total"], state["consecutive_skips"]
        truncate_records(run_dir, state["step"])
    lab = build_lab(cfg, policy=policy, task=task)
    sampler = lab.sampler
    sampler.sync_weights(model)

    def checkpoint(step: int) -> None:
        if not cfg.save_checkpoints:
            return
        save_checkpoint(run_dir, {
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "skipped_total": skipped_total,
            "consecutive_skips": consecutive, "config": cfg.to_dict(),
        })

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
               "n_repair_trained": 0 if rep_obj is None else len(rep_obj.adv),
               **{f"correct_{k}": v for k, v in st.stats.items() if isinstance(v, (int, float))}, **times}
        append_jsonl(run_dir / METRICS_FILE, row)
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
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ibpo_lab.train", description="Train one IBPO-lab config.")
    ap.add_argument("config", help="YAML config, a committed config name (ibpo, grpo... in ibpo_lab/configs/), "
                                   "or a preset: " + ", ".join(PROFILES))
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="override config fields (values parsed as YAML; correct.num_references=3 or "
                         "estimator_kwargs.lam=0.3 sets one key of a mapping field)")
    ap.add_argument("--out", default=None, help="run folder (default runs/<stamp>-<label>-seed<seed>)")
    ap.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.config)
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
