"""Advantage estimation: IBPO's shaped, edit-masked credit and the baselines it is compared to.

Two layers:

* sequence-level functions on plain tensors — ``grpo_advantages``, ``rloo_advantages``,
  ``shaped_rewards``, ``ibpo_advantages`` (rewards ``[B]``, group ids ``[B]`` -> ``[B]``), each
  with a plain-loop ``*_reference`` twin that the tests hold the vectorised one to;
* a name -> estimator registry (``grpo``, ``dr_grpo``, ``rloo``, ``prefix_tree``, ``vineppo``,
  ``ibpo``); every estimator is ``fn(batch: RolloutBatch, **params) -> Tensor[B, T]``, zero off
  ``batch.response_mask`` and finite everywhere.

IBPO's rules as implemented (defaults): φ = ρ·1[a revision verified] (:func:`repair_phi`, the one
home of φ), R' = R + λφ on failed trajectories, group-centred and scaled; a failed trajectory's
advantage is sign-safe — the published shaped value, but never less penalty than (1 - λφ) times
its GRPO penalty, so never positive (:func:`ibpo_advantages`, ``sign_rule``) — and sits on the tokens its best repair
edited (0 on the others); correct trajectories and unrepaired failures get their sequence
advantage on every trained token (:func:`ibpo_token_advantages`). Per-step health metrics:
:func:`failed_positive_share` (0 under the defaults) and :func:`active_token_ratio`.

Conventions shared by every function here:

* Groups are the trajectories that share a group id (one prompt). A group of one member has no
  baseline, so it gets zero advantage.
* A group whose rewards are equal up to ``const_tol`` (relative to ``max(1, |r|)``, so float
  noise such as 1e-7 in float32 counts as equal) carries no learning signal and gets exactly
  zero advantage — never ``noise / eps``.
* The group std is the unbiased one (ddof=1), as in TRL and verl, so numbers match theirs
  (rewards [0, 1] -> ±0.7071); ``std="population"`` gives ddof=0.
* Arithmetic is done in float64; the result has the rewards' float dtype (float32 by default).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ibpo_lab.registry import Registry
from ibpo_lab.rollout import RolloutBatch

__all__ = [
    "ESTIMATORS",
    "register_estimator",
    "get_estimator",
    "list_estimators",
    "grpo_advantages",
    "grpo_advantages_reference",
    "rloo_advantages",
    "rloo_advantages_reference",
    "repair_phi",
    "shaped_rewards",
    "ibpo_advantages",
    "ibpo_advantages_reference",
    "ibpo_token_advantages",
    "ibpo_repair_advantages",
    "prefix_tree_step_advantages",
    "broadcast",
    "failed_positive_share",
    "active_token_ratio",
    "train_mask",
]

SCALES = ("group", "batch", "none")
STDS = ("unbiased", "population")
NO_REPAIR_MODES = ("sequence", "zero")
EMPTY_EDIT_MODES = ("error", "sequence", "zero")
#: how φ is read from repair_success: "indicator" ρ·1[some revision verified] (published), "share" ρ·share
PHI_MODES = ("indicator", "share")
#: how a failed trajectory's sign is decided: "safe" (never positive; default) or "shaped" (GRPO on R', the old rule)
SIGN_RULES = ("safe", "shaped")
#: default tolerance under which a group's rewards count as equal (relative to max(1, |r|))
CONST_TOL = 1e-5

ESTIMATORS: Registry = Registry("estimator")


# --------------------------------------------------------------------------- registry
def register_estimator(name: str):
    """Decorator: register ``fn(batch, **params) -> Tensor[B, T]`` under ``name``."""
    return ESTIMATORS.register(name)


def get_estimator(name: str) -> Callable[..., Tensor]:
    """The estimator registered under ``name`` (ValueError listing the known ones otherwise)."""
    return ESTIMATORS.get_registered(name)


def list_estimators() -> list[str]:
    return ESTIMATORS.names()


# --------------------------------------------------------------------------- validation helpers
def _as_rewards(rewards: Any, name: str = "rewards") -> Tensor:
    r = torch.as_tensor(rewards)
    if r.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B], got shape {tuple(r.shape)}")
    if r.numel() == 0:
        raise ValueError(f"{name} is empty: need at least one trajectory")
    if not (r.is_floating_point() or r.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)):
        raise ValueError(f"{name} must be numeric, got dtype {r.dtype}")
    if r.is_floating_point() and torch.isnan(r).any():
        bad = torch.nonzero(torch.isnan(r)).flatten().tolist()
        raise ValueError(f"{name} contains NaN at trajectories {bad}")
    if r.is_floating_point() and not torch.isfinite(r).all():
        raise ValueError(f"{name} must be finite (found ±inf)")
    return r


def _out_dtype(r: Tensor) -> torch.dtype:
    return r.dtype if r.is_floating_point() else torch.float32


def _as_group_ids(group_ids: Any, B: int) -> Tensor:
    g = torch.as_tensor(group_ids)
    if g.dim() != 1 or g.numel() != B:
        raise ValueError(f"group_ids must be 1-D with {B} entries (one per reward), got shape {tuple(g.shape)}")
    if g.is_floating_point():
        if not torch.equal(g, g.round()):
            raise ValueError("group_ids must be integers")
    return g.long()


def _check_choice(value: Any, name: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_nonneg(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_common(eps: float, scale: str, std: str, const_tol: float) -> None:
    _check_nonneg(eps, "eps")
    _check_nonneg(const_tol, "const_tol")
    _check_choice(scale, "scale", SCALES)
    _check_choice(std, "std", STDS)


def _as_repair_success(repair_success: Any, B: int) -> Tensor:
    if repair_success is None:
        return torch.zeros(B, dtype=torch.float64)
    p = torch.as_tensor(repair_success, dtype=torch.float64)
    if p.dim() != 1 or p.numel() != B:
        raise ValueError(f"repair_success must be 1-D with {B} entries (one per reward), got shape {tuple(p.shape)}")
    if torch.isnan(p).any():
        raise ValueError("repair_success contains NaN")
    if ((p < 0) | (p > 1)).any():
        bad = torch.nonzero((p < 0) | (p > 1)).flatten().tolist()
        raise ValueError(f"repair_success must lie in [0, 1]; out of range at trajectories {bad}")
    return p


# --------------------------------------------------------------------------- group statistics
def _group_stats(r: Tensor, g: Tensor, std: str, const_tol: float):
    """Vectorised per-group statistics of float64 rewards r [B] with group ids g [B].

    -> (inverse [B] group index, mean [n], std [n], dead [n] bool: singleton or constant group)
    """
    _, inv = torch.unique(g, return_inverse=True)
    n = int(inv.max()) + 1
    cnt = torch.zeros(n, dtype=r.dtype).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(n, dtype=r.dtype).index_add_(0, inv, r) / cnt
    ss = torch.zeros(n, dtype=r.dtype).index_add_(0, inv, (r - mean[inv]) ** 2)
    gmax = torch.full((n,), -torch.inf, dtype=r.dtype).scatter_reduce(0, inv, r, "amax")
    gmin = torch.full((n,), torch.inf, dtype=r.dtype).scatter_reduce(0, inv, r, "amin")
    ddof = 1 if std == "unbiased" else 0
    sd = torch.sqrt(ss / (cnt - ddof).clamp(min=1))
    scale_ref = torch.maximum(gmax.abs(), gmin.abs()).clamp(min=1.0)
    dead = (cnt < 2) | ((gmax - gmin) <= const_tol * scale_ref)
    return inv, mean, sd, dead


def _batch_std(r: Tensor, std: str) -> Tensor:
    if r.numel() < 2:
        return torch.ones((), dtype=r.dtype)  # every group is then a singleton: the value is unused
    return r.std(correction=1 if std == "unbiased" else 0)


def _group_divisor(scale: str, sd: Tensor, r64: Tensor, std: str, eps: float) -> Tensor:
    """What each group's centred rewards are divided by -> [n]: ``scale="group"`` its std + eps,
    ``"batch"`` the std of all rewards r64 [B] + eps, ``"none"`` 1 (sd [n]: per-group stds)."""
    if scale == "group":
        return sd + eps
    if scale == "batch":
        return (_batch_std(r64, std) + eps).expand_as(sd)
    return torch.ones_like(sd)


def _centre_scale(r64: Tensor, g: Tensor, eps: float, scale: str, std: str, const_tol: float) -> Tensor:
    inv, mean, sd, dead = _group_stats(r64, g, std, const_tol)
    adv = (r64 - mean[inv]) / _group_divisor(scale, sd, r64, std, eps)[inv]
    # singleton and constant groups have no signal: exactly zero, never noise / eps
    return torch.where(dead[inv], torch.zeros_like(adv), adv)


# --------------------------------------------------------------------------- sequence level
def grpo_advantages(
    rewards: Any,
    group_ids: Any,
    eps: float = 1e-6,
    scale: str = "group",
    std: str = "unbiased",
    const_tol: float = CONST_TOL,
) -> Tensor:
    """Group-relative outcome advantage (GRPO; Dr. GRPO with ``scale="none"``).

    rewards [B], group_ids [B] -> [B]:  A_i = (r_i - mean_g) / (s + eps) where s is
    ``scale="group"``: the std of i's group; ``"batch"``: the std of all B rewards (group mean,
    batch std, as in TRL's ``scale_rewards="batch"``); ``"none"``: no division (Dr. GRPO).
    ``std``: ``"unbiased"`` (ddof=1, TRL/verl) or ``"population"`` (ddof=0). Singleton groups and
    groups equal within ``const_tol`` get exactly 0.
    """
    r = _as_rewards(rewards)
    g = _as_group_ids(group_ids, r.numel())
    _check_common(eps, scale, std, const_tol)
    return _centre_scale(r.double(), g, eps, scale, std, const_tol).to(_out_dtype(r))


def _is_constant(vals: list[float], const_tol: float) -> bool:
    return max(vals) - min(vals) <= const_tol * max(1.0, max(abs(v) for v in vals))


def grpo_advantages_reference(
    rewards: Any,
    group_ids: Any,
    eps: float = 1e-6,
    scale: str = "group",
    std: str = "unbiased",
    const_tol: float = CONST_TOL,
) -> Tensor:
    """Plain-loop twin of :func:`grpo_advantages` (same arguments, same result); for tests."""
    r = _as_rewards(rewards)
    g = _as_group_ids(group_ids, r.numel())
    _check_common(eps, scale, std, const_tol)
    vals = [float(x) for x in r.double().tolist()]
    ids = g.tolist()
    ddof = 1 if std == "unbiased" else 0
    bsd = float(np.std(vals, ddof=ddof)) if len(vals) > 1 else 1.0
    out = [0.0] * len(vals)
    for gid in dict.fromkeys(ids):
        members = [i for i, x in enumerate(ids) if x == gid]
        gv = [vals[i] for i in members]
        if len(gv) < 2 or _is_constant(gv, const_tol):
            continue
        m = sum(gv) / len(gv)
        sd = (sum((v - m) ** 2 for v in gv) / (len(gv) - ddof)) ** 0.5
        for i in members:
            a = vals[i] - m
            if scale == "group":
                a /= sd + eps
            elif scale == "batch":
                a /= bsd + eps
            out[i] = a
    return torch.tensor(out, dtype=torch.float64).to(_out_dtype(r))


def rloo_advantages(rewards: Any, group_ids: Any, const_tol: float = CONST_TOL) -> Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean of the *other* members of i's group.

    rewards [B], group_ids [B] -> [B]. Equals G/(G-1) · (r_i - group mean). Singleton groups and
    groups equal within ``const_tol`` get exactly 0.
    """
    r = _as_rewards(rewards)
    g = _as_group_ids(group_ids, r.numel())
    _check_nonneg(const_tol, "const_tol")
    r64 = r.double()
    inv, mean, _, dead = _group_stats(r64, g, "unbiased", const_tol)
    cnt = torch.bincount(inv).to(r64.dtype)
    total = mean * cnt
    others = (total[inv] - r64) / (cnt[inv] - 1).clamp(min=1)
    adv = torch.where(dead[inv], torch.zeros_like(r64), r64 - others)
    return adv.to(_out_dtype(r))


def rloo_advantages_reference(rewards: Any, group_ids: Any, const_tol: float = CONST_TOL) -> Tensor:
    """Plain-loop twin of :func:`rloo_advantages`; for tests."""
    r = _as_rewards(rewards)
    g = _as_group_ids(group_ids, r.numel())
    vals = r.double().tolist()
    ids = g.tolist()
    out = [0.0] * len(vals)
    for i, gid in enumerate(ids):
        gv = [vals[j] for j, x in enumerate(ids) if x == gid]
        if len(gv) < 2 or _is_constant(gv, const_tol):
            continue
        others = [vals[j] for j, x in enumerate(ids) if x == gid and j != i]
        out[i] = vals[i] - sum(others) / len(others)
    return torch.tensor(out, dtype=torch.float64).to(_out_dtype(r))


def _check_threshold(success_threshold: float) -> None:
    if not (isinstance(success_threshold, (int, float)) and np.isfinite(success_threshold)):
        raise ValueError(f"success_threshold must be finite, got {success_threshold!r}")


def repair_phi(
    rewards: Any,
    repair_success: Any,
    rho: float = 0.5,
    phi: str = "indicator",
    success_threshold: float = 0.5,
) -> Tensor:
    """IBPO's repair signal φ per trajectory — the one home of φ (shaping, diagnostics, stats call this).

    rewards [B], repair_success [B] in [0, 1] (share of a trajectory's revisions that verified;
    None = all 0) -> φ [B] float64, 0 on correct trajectories (R >= ``success_threshold``):

    * ``phi="indicator"`` (default, as published): φ = ρ·1[repair_success > 0] — the repair
      succeeds when at least one revision verifies;
    * ``phi="share"``: φ = ρ·repair_success (the share of the K·n revisions that verify; the
      lab's earlier rule, kept for ablation). It is diluted when a group has fewer good
      references than K, which is why it is not the default.
    """
    _check_choice(phi, "phi", PHI_MODES)
    r = _as_rewards(rewards)
    p = _as_repair_success(repair_success, r.numel())
    _check_nonneg(rho, "rho")
    _check_threshold(success_threshold)
    failed = (r.double() < success_threshold).to(torch.float64)
    signal = (p > 0).to(torch.float64) if phi == "indicator" else p
    return rho * signal * failed


def shaped_rewards(
    rewards: Any,
    repair_success: Any,
    lam: float = 0.6,
    rho: float = 0.5,
    success_threshold: float = 0.5,
    *,
    phi: str = "indicator",
) -> Tensor:
    """IBPO reward shaping: R' = R + λ·φ with φ from :func:`repair_phi` (0 on correct trajectories).

    rewards [B], repair_success [B] in [0, 1] (None = all 0) -> R' [B] float64. ``phi``:
    ``"indicator"`` (default, φ = ρ·1[a revision verified]) or ``"share"`` (φ = ρ·share). A
    correct trajectory (R >= ``success_threshold``) has φ = 0 by definition, so any
    repair_success given for it is not used.
    """
    r = _as_rewards(rewards)
    _check_nonneg(lam, "lam")
    return r.double() + lam * repair_phi(r, repair_success, rho=rho, phi=phi, success_threshold=success_threshold)


def ibpo_advantages(
    rewards: Any,
    group_ids: Any,
    repair_success: Any,
    lam: float = 0.6,
    rho: float = 0.5,
    eps: float = 1e-6,
    scale: str = "group",
    std: str = "unbiased",
    success_threshold: float = 0.5,
    const_tol: float = CONST_TOL,
    *,
    phi: str = "indicator",
    sign_rule: str = "safe",
) -> Tensor:
    """IBPO sequence-level advantage: GRPO centring and scaling of the shaped rewards, sign-safe.

    rewards [B], group_ids [B], repair_success [B] in [0, 1] -> [B]. With R' = R + λ·φ
    (:func:`shaped_rewards`, ``phi`` as there), m_g / s_g the mean / divisor of R' in the group
    (``scale``, ``std`` as in :func:`grpo_advantages`; singleton and constant groups give 0):

    * correct trajectories (R >= ``success_threshold``): A_i = (R'_i - m_g) / s_g (both rules);
    * ``sign_rule="shaped"`` (the old rule, for ablation): failures too get (R'_i - m_g) / s_g.
      Defect: when most of a group failed, a repaired failure's R' = λφ lies above m_g, so it gets
      POSITIVE credit, and the token rule puts it exactly on the tokens its repair replaced —
      reinforcing the error (rewards [1,0,0,0,0,0,0,0] with three repaired failures: +0.183);
    * ``sign_rule="safe"`` (default): a failure gets the published value, but never less penalty
      than (1 - λφ_i) times its GRPO penalty:

          A_i = min( (R'_i - m_g) / s_g ,  (1 - λ·φ_i) · min(0, A^R_i) ),   A^R = GRPO on the unshaped R

      Why: the sign of a failure's credit must come from its outcome (it failed: under the token
      rule its edited tokens are the error, and they must be pushed down), while shaping may say
      how bad the failure was — a near miss whose repair verified may shed at most the share λφ
      of the outcome penalty GRPO gives it, never turn it into a reward. Where the published value
      already penalises at least that much it is kept unchanged (every unrepaired failure, and
      repaired ones in groups where most trajectories succeed). Properties: never positive for a
      failure; for 0/1 rewards, in a group with a correct sibling A^R_i < 0, so a repaired
      failure's advantage is strictly negative (for λρ < 1) and at least as large as an unrepaired
      sibling's (the min is monotone in A', and A'_repaired >= A'_unrepaired) — shaping still
      ranks the near miss above the plain failure; non-decreasing in φ; no larger in magnitude than
      the published value or GRPO's; ``lam=0`` is GRPO. In an all-failed group
      (``no_correct="any"``) A^R = 0, so repaired failures get 0 (not the published +0.866) and
      unrepaired ones keep their published (negative) value; with no or uniform repairs R' is
      constant and every advantage is 0. A graded failure above its group's mean (rewards below
      ``success_threshold`` that differ) gets 0, not GRPO's positive credit. λ·ρ >= 1 (a repair
      worth a success) zeroes the factor, so such a repaired failure gets min(A', 0).

    ``lam=0`` gives GRPO exactly for 0/1 rewards (``sign_rule="shaped"``: for any rewards).
    """
    _check_choice(sign_rule, "sign_rule", SIGN_RULES)
    r = _as_rewards(rewards)
    g = _as_group_ids(group_ids, r.numel())
    _check_common(eps, scale, std, const_tol)
    rs = shaped_rewards(r, repair_success, lam=lam, rho=rho, success_threshold=success_threshold, phi=phi)
    if sign_rule == "shaped":
        return _centre_scale(rs, g, eps, scale, std, const_tol).to(_out_dtype(r))
    r64 = r.double()
    shaped = _centre_scale(rs, g, eps, scale, std, const_tol)  # A'  (published)
    outcome = _centre_scale(r64, g, eps, scale, std, const_tol)  # A^R (GRPO on the unshaped rewards)
    keep = (1.0 - (rs - r64)).clamp(min=0.0)  # 1 - λφ_i (1 on correct trajectories)
    floor = outcome.clamp(max=0.0) * keep
    adv = torch.where(r64 < success_threshold, torch.minimum(shaped, floor), shaped)
    # + 0.0: no -0.0 from the clamp / product (cleaner tables, exact equality in tests)
    return (adv + 0.0).to(_out_dtype(r))


def ibpo_advantages_reference(
    rewards: Any,
    group_ids: Any,
    repair_success: Any,
    lam: float = 0.6,
    rho: float = 0.5,
    eps: float = 1e-6,
    scale: str = "group",
    std: str = "unbiased",
    success_threshold: float = 0.5,
    const_tol: float = CONST_TOL,
    *,
    phi: str = "indicator",
    sign_rule: str = "safe",
) -> Tensor:
    """Plain-loop twin of :func:`ibpo_advantages`; for tests."""
    _check_choice(sign_rule, "sign_rule", SIGN_RULES)
    _check_choice(phi, "phi", PHI_MODES)
    r = _as_rewards(rewards)
    p = _as_repair_success(repair_success, r.numel())
    _check_nonneg(lam, "lam")
    _check_nonneg(rho, "rho")
    vals = [float(x) for x in r.double().tolist()]
    bonus = []
    for ri, pi in zip(vals, p.tolist()):
        signal = (1.0 if pi > 0 else 0.0) if phi == "indicator" else float(pi)
        bonus.append(lam * rho * signal if ri < success_threshold else 0.0)
    shaped = [ri + bi for ri, bi in zip(vals, bonus)]
    out = grpo_advantages_reference(
        torch.tensor(shaped, dtype=torch.float64), group_ids, eps=eps, scale=scale, std=std, const_tol=const_tol
    ).double().tolist()
    if sign_rule == "safe":
        # failures: min(A'_i, (1 - λφ_i) · min(0, A^R_i)), A^R = GRPO on the unshaped rewards
        grpo = grpo_advantages_reference(
            torch.tensor(vals, dtype=torch.float64), group_ids, eps=eps, scale=scale, std=std, const_tol=const_tol
        ).double().tolist()
        for i in range(len(vals)):
            if vals[i] < success_threshold:
                out[i] = min(out[i], min(0.0, grpo[i]) * max(0.0, 1.0 - bonus[i])) + 0.0
    return torch.tensor(out, dtype=torch.float64).to(_out_dtype(r))


# --------------------------------------------------------------------------- token level
def broadcast(seq_adv: Tensor, response_mask: Tensor) -> Tensor:
    """Sequence-level credit on every trained token: seq_adv [B], response_mask [B, T] -> [B, T]
    in the mask's float dtype (float32 for a bool/int mask)."""
    if seq_adv.dim() != 1 or response_mask.dim() != 2 or response_mask.shape[0] != seq_adv.shape[0]:
        raise ValueError(
            f"response_mask must be [B, T] with B = {seq_adv.shape[0]}, got shape {tuple(response_mask.shape)}"
        )
    # a bool/int mask must not cast the advantages to bool/int (that lost their sign and size)
    dtype = response_mask.dtype if response_mask.is_floating_point() else torch.float32
    # + 0.0 turns the -0.0 of negative advantages on masked tokens into 0.0 (cleaner tables)
    return seq_adv.to(dtype)[:, None] * response_mask.to(dtype) + 0.0


def _failed_rows(advantages: Tensor, rewards: Any, success_threshold: float) -> Tensor:
    if advantages.dim() != 2:
        raise ValueError(f"advantages must be [B, T], got shape {tuple(advantages.shape)}")
    r = _as_rewards(rewards)
    if r.numel() != advantages.shape[0]:
        raise ValueError(f"rewards has {r.numel()} entries but advantages has {advantages.shape[0]} rows")
    _check_threshold(success_threshold)
    return r.double() < success_threshold


def _mask_like(response_mask: Tensor | None, advantages: Tensor) -> Tensor:
    if response_mask is None:
        return torch.ones(advantages.shape, dtype=torch.bool)
    if tuple(response_mask.shape) != tuple(advantages.shape):
        raise ValueError(f"response_mask has shape {tuple(response_mask.shape)} but advantages has {tuple(advantages.shape)}")
    return response_mask.bool()


def failed_positive_share(
    advantages: Tensor, rewards: Any, response_mask: Tensor | None = None, success_threshold: float = 0.5
) -> float:
    """Share of failed trajectories' credited tokens whose advantage is positive (a per-step health metric).

    advantages [B, T], rewards [B], response_mask [B, T] (None = every position) -> float in [0, 1]:
    #{failed i, trained t : A_it > 0} / #{failed i, trained t : A_it != 0}. A positive token on a
    failed trajectory reinforces what failed; the default ibpo estimator (``sign_rule="safe"``)
    gives exactly 0. NaN when no failed trajectory has a credited token (nothing to measure).
    """
    failed = _failed_rows(advantages, rewards, success_threshold)
    m = _mask_like(response_mask, advantages) & failed[:, None]
    credited = m & (advantages != 0)
    n = int(credited.sum())
    if n == 0:
        return math.nan
    return int((credited & (advantages > 0)).sum()) / n


def active_token_ratio(advantages: Tensor, response_mask: Tensor | None = None) -> float:
    """Share of trained tokens with a non-zero advantage (IOP's active-token ratio).

    advantages [B, T], response_mask [B, T] (None = every position) -> float in [0, 1]; NaN when
    there is no trained token. Edit-masked credit (IBPO) and zeroed anchors lower it; GRPO gives
    1 minus the share of tokens in groups without signal.
    """
    if advantages.dim() != 2:
        raise ValueError(f"advantages must be [B, T], got shape {tuple(advantages.shape)}")
    m = _mask_like(response_mask, advantages)
    n = int(m.sum())
    if n == 0:
        return math.nan
    return int((m & (advantages != 0)).sum()) / n


def train_mask(
    rewards: Any, response_mask: Tensor, *, anchors_only: bool = False, success_threshold: float = 0.5
) -> Tensor:
    """The loss mask for a batch: ``response_mask`` [B, T], with correct trajectories' rows zeroed
    when ``anchors_only`` (IOP: correct trajectories are references and baseline only, not trained)
    -> [B, T] in response_mask's dtype.

    The ibpo estimator's ``anchors_only`` already zeroes their advantage (so no policy gradient);
    passing this mask to the loss also takes them out of the token-mean normaliser and the KL term.
    IOP reports that keeping correct trajectories out of the gradient counters entropy collapse once
    edit masks have removed most of the negative gradient; it is off by default (GRPO/IBPO train on them).
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T], got shape {tuple(response_mask.shape)}")
    if not isinstance(anchors_only, bool):
        raise ValueError(f"anchors_only must be a bool, got {anchors_only!r}")
    failed = _failed_rows(response_mask.to(torch.float32), rewards, success_threshold)
    if not anchors_only:
        return response_mask.clone()
    keep = failed.to(response_mask.dtype)[:, None]
    return response_mask * keep


def ibpo_token_advantages(
    seq_adv: Tensor,
    rewards: Any,
    repair_success: Any,
    response_mask: Tensor,
    edit_mask: Tensor | None,
    *,
    success_threshold: float = 0.5,
    renormalize: bool = False,
    no_repair: str = "sequence",
    empty_edit: str = "error",
) -> Tensor:
    """IBPO token credit: a failed trajectory's advantage only on the tokens its repair edited.

    The sign comes from ``seq_adv``: with :func:`ibpo_advantages`' default ``sign_rule="safe"`` a
    failed trajectory's seq_adv is <= 0, so every token of it is <= 0 (edited: < 0 in a group with
    a correct sibling, unedited: 0). With ``renormalize=False`` (default) a repaired failure's
    per-token penalty is at most an unrepaired one's of the same group; ``renormalize=True`` keeps
    the per-trajectory sum instead (n_i/|E_i| times larger per edited token).

    seq_adv [B] (e.g. from :func:`ibpo_advantages`), rewards [B], repair_success [B] (None = 0),
    response_mask [B, T], edit_mask [B, T] 0/1 or None  ->  [B, T] (0 off response_mask).

    Per trajectory i (E_i = edited ∧ trained tokens, n_i = trained tokens):

    * correct (R_i >= success_threshold): seq_adv_i on every trained token (edit masks ignored);
    * failed with repair_success_i > 0 and |E_i| > 0: seq_adv_i on E_i, 0 elsewhere; with
      ``renormalize=True`` scaled by n_i/|E_i| so the per-trajectory sum equals n_i·seq_adv_i;
    * failed with no successful repair (repair_success_i == 0, or ``edit_mask`` None): an edit
      mask of a failed repair is not a correction, so ``no_repair="sequence"`` (default) falls
      back to seq_adv_i on every trained token, ``"zero"`` gives it no credit;
    * failed with repair_success_i > 0 but no edited trained token: contradictory input (a
      successful repair that changed nothing trained); ``empty_edit="error"`` (default) raises,
      ``"sequence"`` / ``"zero"`` treat it like ``no_repair``.
    """
    _check_choice(no_repair, "no_repair", NO_REPAIR_MODES)
    _check_choice(empty_edit, "empty_edit", EMPTY_EDIT_MODES)
    if response_mask.dim() != 2 or response_mask.shape[0] != seq_adv.numel():
        raise ValueError(
            f"response_mask must be [B, T] with B = {seq_adv.numel()}, got shape {tuple(response_mask.shape)}"
        )
    B = seq_adv.numel()
    r = _as_rewards(rewards)
    if r.numel() != B:
        raise ValueError(f"rewards has {r.numel()} entries but seq_adv has {B}")
    p = _as_repair_success(repair_success, B)
    mask = response_mask.to(torch.float64)
    seq64 = seq_adv.to(torch.float64)
    failed = r.double() < success_threshold
    if edit_mask is None:
        edited = torch.zeros_like(mask)
        repaired = torch.zeros(B, dtype=torch.bool)
    else:
        if tuple(edit_mask.shape) != tuple(response_mask.shape):
            raise ValueError(
                f"edit_mask has shape {tuple(edit_mask.shape)} but response_mask has {tuple(response_mask.shape)}"
            )
        edited = edit_mask.to(torch.float64) * mask
        repaired = failed & (p > 0)
    n_i = mask.sum(1)
    n_e = edited.sum(1)
    empty = repaired & (n_e == 0)
    if empty.any() and empty_edit == "error":
        bad = torch.nonzero(empty).flatten().tolist()
        raise ValueError(
            f"edit_mask: failed trajectories {bad} have repair_success > 0 but no edited trained token; "
            "pass empty_edit='sequence' or 'zero' to accept this"
        )
    use_edit = repaired & (n_e > 0)
    no_rep = failed & ~repaired
    factor = n_i / n_e.clamp(min=1) if renormalize else torch.ones_like(n_i)
    out = seq64[:, None] * mask  # correct trajectories and the "sequence" fallbacks
    out = torch.where(use_edit[:, None], seq64[:, None] * edited * factor[:, None], out)
    zero = (no_rep & (no_repair == "zero")) | (empty & (empty_edit == "zero"))
    out = torch.where(zero[:, None], torch.zeros_like(out), out)
    return out.to(response_mask.dtype if response_mask.is_floating_point() else torch.float32)


# --------------------------------------------------------------------------- estimators on batches
def _rewards_of(batch: RolloutBatch) -> Tensor:
    if len(batch) == 0:
        raise ValueError("batch is empty: need at least one trajectory")
    return batch.rewards


@register_estimator("grpo")
def grpo_estimator(
    batch: RolloutBatch,
    *,
    eps: float = 1e-6,
    scale: str = "group",
    std: str = "unbiased",
    const_tol: float = CONST_TOL,
) -> Tensor:
    """GRPO: :func:`grpo_advantages` broadcast over response tokens.

    batch.rewards [B], batch.group_ids [B], batch.response_mask [B, T] -> [B, T] (0 off-mask).
    """
    adv = grpo_advantages(_rewards_of(batch), batch.group_ids, eps=eps, scale=scale, std=std, const_tol=const_tol)
    return broadcast(adv, batch.response_mask)


@register_estimator("dr_grpo")
def dr_grpo_estimator(batch: RolloutBatch, *, const_tol: float = CONST_TOL) -> Tensor:
    """Dr. GRPO: r - group mean (no std division) broadcast over response tokens -> [B, T].

    Pair it with the ``seq-mean-token-sum-norm`` loss aggregation for the full Dr. GRPO recipe.
    """
    adv = grpo_advantages(_rewards_of(batch), batch.group_ids, scale="none", const_tol=const_tol)
    return broadcast(adv, batch.response_mask)


@register_estimator("rloo")
def rloo_estimator(batch: RolloutBatch, *, const_tol: float = CONST_TOL) -> Tensor:
    """RLOO: :func:`rloo_advantages` broadcast over response tokens -> [B, T]."""
    adv = rloo_advantages(_rewards_of(batch), batch.group_ids, const_tol=const_tol)
    return broadcast(adv, batch.response_mask)


@register_estimator("ibpo")
def ibpo_estimator(
    batch: RolloutBatch,
    *,
    lam: float = 0.6,
    rho: float = 0.5,
    eps: float = 1e-6,
    scale: str = "group",
    std: str = "unbiased",
    success_threshold: float = 0.5,
    shaping: bool = True,
    token_mask: bool = True,
    renormalize: bool = False,
    no_repair: str = "sequence",
    empty_edit: str = "error",
    const_tol: float = CONST_TOL,
    phi: str = "indicator",
    sign_rule: str = "safe",
    anchors_only: bool = False,
) -> Tensor:
    """IBPO: shaped group-relative advantage, credited on edited tokens of failed trajectories.

    Reads batch.rewards [B], batch.group_ids [B], batch.repair_success [B] (None -> zeros),
    batch.edit_masks (list of bool arrays over response tokens, or None), batch.response_mask
    [B, T]  ->  [B, T] (0 off-mask).

    ``shaping=False`` is λ = 0 (no reward shaping); ``token_mask=False`` broadcasts the
    sequence-level advantage over all trained tokens (``shaping=False, token_mask=False`` is
    GRPO). With ``token_mask=True`` the rules of :func:`ibpo_token_advantages` apply: an edit
    mask is used only for a failed trajectory with repair_success > 0; for repair_success == 0
    (whatever its edit mask, all-False included) or without edit masks, ``no_repair`` decides
    (default: sequence-level credit on all tokens); an all-False mask with repair_success > 0
    raises unless ``empty_edit`` says otherwise.

    ``phi``: ``"indicator"`` (default, published: φ = ρ·1[a revision verified]) or ``"share"``
    (φ = ρ·share of verified revisions) — see :func:`repair_phi`. ``sign_rule``: ``"safe"``
    (default: a failed trajectory never gets positive credit on any token; its advantage is the
    published shaped one, but at most (1 - λφ) of its GRPO penalty, so a repair can soften the
    penalty, never flip it) or ``"shaped"`` (GRPO on R', the old rule, which can put positive credit
    on the tokens a repair replaced) — see :func:`ibpo_advantages`.
    ``anchors_only=True`` (IOP): correct trajectories serve only as references and in the group
    baseline; they get zero advantage, so no policy-gradient signal (pair it with
    :func:`train_mask` as the loss mask to drop them from the aggregation and KL as well).
    """
    if not isinstance(anchors_only, bool):
        raise ValueError(f"anchors_only must be a bool, got {anchors_only!r}")
    r = _rewards_of(batch)
    seq = ibpo_advantages(
        r,
        batch.group_ids,
        batch.repair_success,
        lam=lam if shaping else 0.0,
        rho=rho,
        eps=eps,
        scale=scale,
        std=std,
        success_threshold=success_threshold,
        const_tol=const_tol,
        phi=phi,
        sign_rule=sign_rule,
    )
    if anchors_only:
        seq = torch.where(r.double() >= success_threshold, torch.zeros_like(seq), seq)
    mask = batch.response_mask
    if not token_mask:
        return broadcast(seq, mask)
    return ibpo_token_advantages(
        seq,
        r,
        batch.repair_success,
        mask,
        batch.edit_mask,
        success_threshold=success_threshold,
        renormalize=renormalize,
        no_repair=no_repair,
        empty_edit=empty_edit,
    )


def ibpo_repair_advantages(
    repaired: RolloutBatch,
    original: RolloutBatch,
    source: Sequence[int],
    *,
    lam: float = 0.6,
    rho: float = 0.5,
    eps: float = 1e-6,
    scale: str = "group",
    std: str = "unbiased",
    success_threshold: float = 0.5,
    const_tol: float = CONST_TOL,
    phi: str = "indicator",
) -> Tensor:
    """IOP bilateral credit for repaired trajectories, on their inserted tokens only.

    repaired: B' repaired trajectories with ``edit_masks`` (True on tokens the repair inserted);
    original: the sampled batch (its ``repair_success``, None -> zeros, gives the shaped rewards);
    source [B']: index into ``original`` of the trajectory each repair rewrote.
    -> [B', T'] (T' = repaired.max_response_len):

        A_j = (R_repaired_j - mean_g R') / (s_g + eps) on repaired.edit_masks[j] ∧ response mask

    g = group of original[source[j]], R' = shaped rewards of ``original`` (:func:`shaped_rewards`, ``phi``),
    s_g per ``scale`` as in :func:`grpo_advantages` (``"none"``: no division). A source group
    with no spread in R' (singleton, or constant within ``const_tol``) has nothing to scale by,
    so there A_j = R_repaired_j - mean_g R' unscaled (finite, never a division by ~0).
    """
    _check_common(eps, scale, std, const_tol)
    if len(repaired) == 0:
        raise ValueError("repaired is empty: need at least one repaired trajectory")
    r0 = _rewards_of(original)
    src = [int(s) for s in source]
    if len(src) != len(repaired):
        raise ValueError(f"source has {len(src)} entries but repaired has {len(repaired)} trajectories")
    bad = [s for s in src if not 0 <= s < len(original)]
    if bad:
        raise ValueError(f"source holds indices {bad} outside the original batch of {len(original)}")
    if repaired.edit_masks is None:
        raise ValueError("repaired.edit_masks is None: IOP credit needs the inserted-token masks")
    rs = shaped_rewards(r0, original.repair_success, lam=lam, rho=rho, success_threshold=success_threshold, phi=phi)
    inv, mean, sd, dead = _group_stats(rs, original.group_ids, std, const_tol)
    gi = inv[torch.tensor(src, dtype=torch.long)]
    adv = repaired.rewards.double() - mean[gi]
    denom = _group_divisor(scale, sd, rs, std, eps)[gi]
    denom = torch.where(dead[gi], torch.ones_like(denom), denom)
    adv = adv / denom
    m = repaired.edit_mask * repaired.response_mask
    return (adv.to(torch.float32)[:, None] * m).to(torch.float32)


# --------------------------------------------------------------------------- step-level baselines
def _spans_of(batch: RolloutBatch, i: int) -> list[tuple[int, int]]:
    from ibpo_lab.steps import step_boundaries  # lazy, as diff: only the step-level estimators need it

    n = len(batch.response_ids[i])
    if batch.step_spans is None:
        return [(0, n)]
    spans = list(batch.step_spans[i])
    step_boundaries(spans, n, name=f"step_spans[{i}]")  # an exact tiling, or tokens would get no credit
    return spans


def prefix_tree_step_advantages(
    step_seqs: Sequence[Sequence[Any]], rewards: Any, shrinkage: float = 0.0
) -> list[np.ndarray]:
    """Step advantages of one group from its prefix trie (shared-prefix value baseline).

    step_seqs: G sequences of hashable step keys, rewards [G] -> G float64 arrays, one value per
    step. V(node) = mean reward of the trajectories through the node (``diff.build_prefix_trie``);
    with ``shrinkage`` k > 0, V(node) = (count·mean + k·V(parent)) / (count + k) pulls rarely
    visited nodes toward their parent. Step k's advantage is V(node_k) - V(node_{k-1}) (node_{-1} =
    root, V(root) = group mean); the last step uses the trajectory's own reward as its terminal
    value, so the steps of a trajectory sum to exactly r - group mean (also when its leaf is
    shared with a trajectory of different reward, or when another trajectory continues past it).
    """
    from ibpo_lab.diff import build_prefix_trie  # lazy: diff is only needed by this estimator

    _check_nonneg(shrinkage, "shrinkage")
    r = np.asarray(torch.as_tensor(rewards, dtype=torch.float64).numpy()).reshape(-1)
    trie = build_prefix_trie(step_seqs, r)
    v = trie.mean.astype(np.float64).copy()
    if shrinkage > 0:
        # nodes are created after their parent, so one pass in id order sees parents first
        for node in range(1, len(v)):
            par = trie.parent[node]
            v[node] = (trie.count[node] * trie.mean[node] + shrinkage * v[par]) / (trie.count[node] + shrinkage)
    out = []
    for i, path in enumerate(trie.paths):
        vals = np.array([v[0]] + [v[n] for n in path], dtype=np.float64)
        if len(path):
            vals[-1] = r[i]
        out.append(np.diff(vals))
    return out


@register_estimator("prefix_tree")
def prefix_tree_estimator(
    batch: RolloutBatch,
    *,
    shrinkage: float = 0.0,
    scale: str = "none",
    eps: float = 1e-6,
    std: str = "unbiased",
    const_tol: float = CONST_TOL,
) -> Tensor:
    """Prefix-tree step advantage: every token of step k gets V(step k) - V(step k-1).

    Reads batch.response_ids, batch.step_spans (None -> the whole response is one step, which
    reduces to Dr. GRPO), batch.rewards, batch.group_ids, batch.response_mask -> [B, T].
    Step keys are the tuples of response token ids of each span (``diff.step_keys``); tries are
    built per group (:func:`prefix_tree_step_advantages`). ``scale="none"`` (default) keeps raw
    value differences; ``"group"``/``"batch"`` divide by the group/batch reward std + eps.
    Singleton and constant groups get 0.
    """
    from ibpo_lab.diff import step_keys

    _check_common(eps, scale, std, const_tol)
    r = _rewards_of(batch).double()
    inv, _, sd, dead = _group_stats(r, batch.group_ids, std, const_tol)
    mask = batch.response_mask
    out = torch.zeros(mask.shape, dtype=torch.float64)
    spans = [_spans_of(batch, i) for i in range(len(batch))]
    divisor = _group_divisor(scale, sd, r, std, eps)
    for members in batch.groups().values():
        gi = inv[members[0]]
        if bool(dead[gi]):
            continue
        seqs = [step_keys(batch.response_ids[i], spans[i]) for i in members]
        step_adv = prefix_tree_step_advantages(seqs, r[members], shrinkage=shrinkage)
        div = float(divisor[gi])
        for i, adv in zip(members, step_adv):
            for (a, b), val in zip(spans[i], adv):
                out[i, a:b] = val / div
    return (out * mask.double()).to(torch.float32)


@register_estimator("vineppo")
def vineppo_estimator(batch: RolloutBatch, *, value_tol: float = 1e-6) -> Tensor:
    """VinePPO step advantage from Monte-Carlo values: tokens of step k get V_{k+1} - V_k.

    Reads batch.step_values (per trajectory V_0..V_n at step boundaries, V_n = the reward),
    batch.step_spans (n spans, tiling the response), batch.response_mask -> [B, T]. Raises
    ValueError if step_values or step_spans are missing, a trajectory has the wrong number of
    values, a value is not finite, or V_n differs from the reward by more than ``value_tol``.
    """
    r = _rewards_of(batch)
    if batch.step_values is None:
        raise ValueError("vineppo needs batch.step_values (Monte-Carlo values at step boundaries); it is None")
    if batch.step_spans is None:
        raise ValueError("vineppo needs batch.step_spans (the steps the values are attached to); it is None")
    mask = batch.response_mask
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for i in range(len(batch)):
        spans = _spans_of(batch, i)
        vals = np.asarray(batch.step_values[i], dtype=np.float64).reshape(-1)
        if len(vals) != len(spans) + 1:
            raise ValueError(
                f"step_values[{i}] has {len(vals)} values but step_spans[{i}] has {len(spans)} steps (need n + 1)"
            )
        if not np.all(np.isfinite(vals)):
            raise ValueError(f"step_values[{i}] must be finite")
        if abs(vals[-1] - float(r[i])) > value_tol:
            raise ValueError(f"step_values[{i}][-1] = {vals[-1]} must equal the reward {float(r[i])} (V_n = R)")
        for (a, b), adv in zip(spans, np.diff(vals)):
            out[i, a:b] = adv
    return (out * mask.double()).to(torch.float32)
