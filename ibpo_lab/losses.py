"""Policy losses: the clipped surrogate that turns IBPO's (or a baseline's) token credit into a gradient.

A name -> loss registry (``ppo``, ``gspo``). Every loss is

    fn(logprobs [B, T], old_logprobs [B, T], advantages [B, T], mask [B, T], *,
       clip_low=0.2, clip_high=0.2, agg="token-mean", ref_logprobs=None, kl_coef=0.0,
       is_weights=None, ...) -> (loss: Tensor[], metrics: dict[str, float])

``logprobs`` carries the gradient; everything else is treated as data. Pieces:

* token-level PPO clip with separate low/high ranges (DAPO's clip-higher: ``clip_high > clip_low``);
* GSPO's length-normalised sequence ratio (GSPO-token form, so per-token advantages work);
* aggregation modes (:data:`AGG_MODES`): ``token-mean``, ``seq-mean-token-mean``,
  ``seq-mean-token-sum``, ``seq-mean-token-sum-norm`` (Dr. GRPO: divide by a constant length);
* optional k3 KL penalty to a reference policy, and truncated importance weights for tokens
  sampled by another policy (IOP's repaired trajectories, or a stale sampler).

Metrics are python floats: ``clip_frac`` (``clip_frac_low``/``clip_frac_high``), ``approx_kl``
(k3 estimate of KL(old || new)), ``ratio_mean``/``ratio_min``/``ratio_max`` over the mask,
``pg_loss``, and ``kl_ref`` when reference log-probs are given.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ibpo_lab.registry import Registry

__all__ = [
    "LOSSES",
    "AGG_MODES",
    "GATES",
    "register_loss",
    "get_loss",
    "list_losses",
    "aggregate",
    "kl_k3",
    "truncated_is_weights",
    "ppo_loss",
    "gspo_loss",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
#: which tokens GSPO's sequence ratio is taken over: every trained token, or only the credited ones (IOP)
GATES = ("mask", "credited")
#: log-ratios are clamped here before exp so one wild token cannot turn the loss into inf/NaN
LOG_RATIO_CLAMP = 20.0

LOSSES: Registry = Registry("loss", "losses")


# --------------------------------------------------------------------------- registry
def register_loss(name: str):
    """Decorator: register a policy loss under ``name``."""
    return LOSSES.register(name)


def get_loss(name: str) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """The loss registered under ``name`` (ValueError listing the known ones otherwise)."""
    return LOSSES.get_registered(name)


def list_losses() -> list[str]:
    return LOSSES.names()


# --------------------------------------------------------------------------- validation
def _check_2d(x: Tensor, name: str, shape: tuple[int, ...] | None = None) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but logprobs has {shape}")


def _as_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    _check_2d(mask, name, tuple(like.shape))
    m = mask.to(like.dtype)
    if not ((m == 0) | (m == 1)).all():
        raise ValueError(f"{name} must hold only 0/1 (or bool) values")
    return m


def _check_agg(agg: str) -> None:
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {', '.join(AGG_MODES)}, got {agg!r}")


# --------------------------------------------------------------------------- pieces
def aggregate(values: Tensor, mask: Tensor, mode: str = "token-mean", norm_len: float | None = None) -> Tensor:
    """Reduce per-token values [B, T] over the 0/1 mask [B, T] to a scalar.

    ``token-mean``              Σ m·v / Σ m (every token weighs the same; DAPO)
    ``seq-mean-token-mean``     mean over sequences (with ≥ 1 token) of each one's token mean (GRPO)
    ``seq-mean-token-sum``      mean over the B sequences of each one's token sum
    ``seq-mean-token-sum-norm`` Σ m·v / (B · norm_len), norm_len a constant (default T): Dr. GRPO's
                                length-unbiased form (TRL's ``dr_grpo``; verl omits the 1/B)
    An all-zero mask gives 0 (no token to train), never NaN.
    """
    _check_agg(mode)
    _check_2d(values, "values")
    m = _as_mask(mask, values)
    vm = values * m
    if mode == "token-mean":
        return vm.sum() / m.sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        n = m.sum(-1)
        per_seq = vm.sum(-1) / n.clamp(min=1)
        has = (n > 0).to(values.dtype)
        return (per_seq * has).sum() / has.sum().clamp(min=1)
    if mode == "seq-mean-token-sum":
        return vm.sum(-1).mean() if values.shape[0] else vm.sum()
    L = values.shape[-1] if norm_len is None else norm_len
    if not (isinstance(L, (int, float)) and math.isfinite(L) and L > 0):
        raise ValueError(f"norm_len must be a positive number, got {norm_len!r}")
    return vm.sum() / (max(values.shape[0], 1) * L)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(π || π_ref) per token, from tokens sampled by π.

    logprobs, ref_logprobs [B, T] -> [B, T]:  exp(ref - lp) - (ref - lp) - 1  (≥ 0, 0 at equality).
    The log-ratio is clamped to ±20 so the estimate stays finite.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"ref_logprobs has shape {tuple(ref_logprobs.shape)} but logprobs has {tuple(logprobs.shape)}")
    d = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1


def truncated_is_weights(behaviour_logprobs: Tensor, target_logprobs: Tensor, cap: float = 2.0) -> Tensor:
    """Truncated importance weights min(π_target / π_behaviour, cap), detached.

    behaviour_logprobs, target_logprobs [B, T] -> [B, T]. For tokens sampled by a behaviour
    policy (e.g. an IOP repaired trajectory, or a sampler lagging the learner): the weight
    corrects the off-policy gradient, the cap bounds its variance (truncated IS).
    """
    if behaviour_logprobs.shape != target_logprobs.shape:
        raise ValueError(
            f"target_logprobs has shape {tuple(target_logprobs.shape)} but behaviour_logprobs has "
            f"{tuple(behaviour_logprobs.shape)}"
        )
    if not (isinstance(cap, (int, float)) and cap > 0 and math.isfinite(cap)):
        raise ValueError(f"cap must be a positive finite number, got {cap!r}")
    d = (target_logprobs - behaviour_logprobs).detach().clamp(max=math.log(cap))
    return torch.exp(d)


def _masked_stats(x: Tensor, m: Tensor) -> tuple[float, float, float]:
    sel = x.detach()[m > 0]
    if sel.numel() == 0:
        return math.nan, math.nan, math.nan
    return float(sel.mean()), float(sel.min()), float(sel.max())


def _masked_mean(x: Tensor, m: Tensor) -> float:
    n = float(m.sum())
    return float((x.detach() * m).sum() / n) if n > 0 else 0.0


def _check_args(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, agg, ref_logprobs, kl_coef, is_weights):
    _check_2d(logprobs, "logprobs")
    shape = tuple(logprobs.shape)
    _check_2d(old_logprobs, "old_logprobs", shape)
    _check_2d(advantages, "advantages", shape)
    m = _as_mask(mask, logprobs)
    if not (0 <= clip_low < 1):
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
    if not (clip_high >= 0 and math.isfinite(clip_high)):
        raise ValueError(f"clip_high must be a finite number >= 0, got {clip_high!r}")
    _check_agg(agg)
    if not (kl_coef >= 0 and math.isfinite(kl_coef)):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
    if ref_logprobs is not None:
        _check_2d(ref_logprobs, "ref_logprobs", shape)
    elif kl_coef > 0:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the reference policy's log-probs)")
    if is_weights is not None:
        _check_2d(is_weights, "is_weights", shape)
    if not torch.isfinite(advantages[m > 0]).all():
        raise ValueError("advantages must be finite on masked tokens")
    return m


def _clipped_surrogate(ratio, advantages, m, clip_low, clip_high, is_weights):
    """Per-token PPO loss max(-A·r, -A·clip(r, 1-lo, 1+hi)) and its clip metrics."""
    # off-mask advantages are not validated (padding may hold anything): zero them, or a NaN there
    # would make the masked sum NaN (NaN·0) and its gradient NaN
    advantages = torch.where(m > 0, advantages, torch.zeros_like(advantages))
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    if is_weights is not None:
        pg = pg * is_weights.detach()
    clipped = (pg2 > pg1).to(ratio.dtype)
    r = ratio.detach()
    metrics = {
        "clip_frac": _masked_mean(clipped, m),
        "clip_frac_low": _masked_mean(clipped * (r < 1 - clip_low), m),
        "clip_frac_high": _masked_mean(clipped * (r > 1 + clip_high), m),
    }
    return pg, metrics


def _finish(pg, logprobs, old_logprobs, m, agg, norm_len, ref_logprobs, kl_coef, metrics, ratio):
    loss = aggregate(pg, m, agg, norm_len)
    metrics["pg_loss"] = float(loss.detach())
    rmean, rmin, rmax = _masked_stats(ratio, m)
    metrics.update(ratio_mean=rmean, ratio_min=rmin, ratio_max=rmax)
    # k3 of KL(old || new) from tokens sampled by old: how far this update has moved
    metrics["approx_kl"] = _masked_mean(kl_k3(old_logprobs.detach(), logprobs.detach()), m)
    if ref_logprobs is not None:
        kl = kl_k3(logprobs, ref_logprobs.detach())
        metrics["kl_ref"] = _masked_mean(kl, m)
        if kl_coef > 0:
            loss = loss + kl_coef * aggregate(kl, m, agg, norm_len)
    return loss, metrics


# --------------------------------------------------------------------------- losses
@register_loss("ppo")
def ppo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    is_weights: Tensor | None = None,
    norm_len: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Token-level clipped surrogate (PPO/GRPO; DAPO clip-higher with ``clip_high > clip_low``).

    logprobs [B, T] (with grad), old_logprobs [B, T], advantages [B, T], mask [B, T] 0/1 ->
    (scalar loss, metrics). Per token, r = exp(lp - old):
        ℓ = w · max(-A·r, -A·clip(r, 1 - clip_low, 1 + clip_high))
    w = ``is_weights`` (detached, e.g. :func:`truncated_is_weights`) or 1; reduced with
    :func:`aggregate` (``agg``, ``norm_len``), plus ``kl_coef`` · aggregate(k3(lp, ref_logprobs)).
    """
    m = _check_args(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, agg, ref_logprobs, kl_coef, is_weights)
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    pg, metrics = _clipped_surrogate(ratio, advantages.detach(), m, clip_low, clip_high, is_weights)
    return _finish(pg, logprobs, old_logprobs, m, agg, norm_len, ref_logprobs, kl_coef, metrics, ratio)


@register_loss("gspo")
def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    is_weights: Tensor | None = None,
    norm_len: float | None = None,
    gate_mask: Tensor | None = None,
    gate: str = "mask",
) -> tuple[Tensor, dict[str, float]]:
    """GSPO: clip a length-normalised *sequence* ratio instead of token ratios (GSPO-token form).

    Shapes as :func:`ppo_loss`. With the gate g [B, T] (the tokens the ratio is taken over),

        w_i = exp(Σ_t g·m·(lp - old) / Σ_t g·m)      (geometric mean of the gated token ratios)

    and per token s_it = sg[w_i] · π(y_t) / sg[π(y_t)], whose value is w_i and whose gradient is
    w_i·∇lp_t, so per-token advantages (IBPO's edit credit) still work and with a
    sequence-constant advantage and the full gate the gradient is exactly GSPO's. Then
        ℓ_it = max(-A_it·s_it, -A_it·clip(s_it, 1 - clip_low, 1 + clip_high)),
    aggregated over ``mask`` with :func:`aggregate` (the loss tokens are always ``mask``; to drop
    tokens from the loss, leave them out of ``mask``, e.g. ``advantages.train_mask``).

    The gate: ``gate_mask`` [B, T] 0/1 if given (intersected with ``mask``); otherwise ``gate``:
    ``"mask"`` (default, plain GSPO: every trained token) or ``"credited"`` (IOP's gated ratio:
    the trained tokens with a non-zero advantage, so w_i measures how far the policy moved on the
    tokens that carry credit — for IBPO a repaired failure's edited tokens — and is not diluted by
    the unedited tokens, whose advantage is 0). A sequence with no gated token has w_i = 1 (its
    advantages are all 0 under ``"credited"``, so it adds no loss). The paper's clip ranges are
    tiny (3e-4 / 4e-4) and its aggregation is ``seq-mean-token-mean``; the defaults here are the
    shared ones, so pass them explicitly. Extra metrics: ``seq_ratio_mean`` (mean w_i over
    sequences with a gated token) and ``gate_frac`` (share of ``mask`` tokens in the gate).
    """
    m = _check_args(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, agg, ref_logprobs, kl_coef, is_weights)
    if gate not in GATES:
        raise ValueError(f"gate must be one of {', '.join(map(repr, GATES))}, got {gate!r}")
    if gate_mask is not None:
        g = _as_mask(gate_mask, logprobs, "gate_mask") * m
    elif gate == "credited":
        g = m * (advantages.detach() != 0).to(m.dtype)
    else:
        g = m
    token_lr = logprobs - old_logprobs.detach()
    n_gate = g.sum(-1)
    seq_lr = (token_lr * g).sum(-1) / n_gate.clamp(min=1)
    log_s = (logprobs - logprobs.detach() + seq_lr.detach()[:, None]).clamp(max=LOG_RATIO_CLAMP)
    ratio = torch.exp(log_s)
    pg, metrics = _clipped_surrogate(ratio, advantages.detach(), m, clip_low, clip_high, is_weights)
    loss, metrics = _finish(pg, logprobs, old_logprobs, m, agg, norm_len, ref_logprobs, kl_coef, metrics, ratio)
    seq_ratio = torch.exp(seq_lr.detach())
    has = n_gate > 0
    if has.any():
        metrics["seq_ratio_mean"] = float(seq_ratio[has].mean())
    n_mask = float(m.sum())
    metrics["gate_frac"] = float(g.sum()) / n_mask if n_mask > 0 else math.nan
    return loss, metrics
