"""Diagnostics of the credit an estimator assigns: gradient variance, step-level credit quality
and effective updates — the measurements behind IBPO's claims (lower-variance, better-localised
credit than sequence-level GRPO; signal in groups where GRPO's advantage is zero).

Pure parts (numpy / torch in, numbers out): :func:`step_advantages`, :func:`auc`,
:func:`credit_quality`, :func:`gradient_stats`, :func:`effective_updates`. Model parts:
:func:`policy_gradient` (one backward of the on-policy surrogate) and :func:`gradient_variance`
(R independent group resamples of fixed prompts, every estimator on the same samples).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ibpo_lab.rollout import RolloutBatch, Span

__all__ = [
    "step_advantages",
    "auc",
    "credit_quality",
    "batch_credit_quality",
    "gradient_stats",
    "policy_gradient",
    "gradient_variance",
    "effective_updates",
]


# --------------------------------------------------------------------------- credit quality
def step_advantages(advantages: Tensor, step_spans: Sequence[Sequence[Span]], mask: Tensor | None = None) -> list[np.ndarray]:
    """Mean token advantage of every step.

    advantages [B, T], step_spans B lists of (start, end) token spans, mask [B, T] optional (mean
    over masked-in tokens only; a step with none gets 0) -> B float64 arrays, one value per step.
    """
    adv = torch.as_tensor(advantages).detach().cpu().double()
    if adv.dim() != 2:
        raise ValueError(f"advantages must be [B, T], got shape {tuple(adv.shape)}")
    B, T = adv.shape
    if len(step_spans) != B:
        raise ValueError(f"step_spans has {len(step_spans)} entries but advantages has {B} rows")
    m = None if mask is None else torch.as_tensor(mask).detach().cpu().double()
    if m is not None and tuple(m.shape) != (B, T):
        raise ValueError(f"mask has shape {tuple(m.shape)}, expected {(B, T)}")
    out = []
    for i, spans in enumerate(step_spans):
        vals = np.zeros(len(spans))
        for k, (a, b) in enumerate(spans):
            if not 0 <= a < b <= T:
                raise ValueError(f"step_spans[{i}][{k}] = ({a}, {b}) is empty or outside the {T} advantage columns")
            if m is None:
                vals[k] = float(adv[i, a:b].mean())
            else:
                w = m[i, a:b]
                vals[k] = float((adv[i, a:b] * w).sum() / w.sum()) if w.sum() > 0 else 0.0
        out.append(vals)
    return out


def _average_ranks(x: np.ndarray) -> np.ndarray:
    # ties get their average rank (what scipy.stats.rankdata does); a few numpy lines instead of a scipy dependency
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mid = ends - (counts - 1) / 2.0
    return mid[inv]


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` separating positives (label True) from negatives:
    P(score_pos > score_neg) + ½·P(tie), via the Mann–Whitney rank statistic. NaN without both classes."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if len(s) != len(y):
        raise ValueError(f"scores has {len(s)} entries but labels has {len(y)}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def credit_quality(
    step_advs: Sequence[Sequence[float]],
    step_labels: Sequence[Sequence[bool] | None],
    rewards: Sequence[float],
    success_threshold: float = 0.5,
) -> dict[str, float]:
    """How well per-step credit matches step ground truth.

    step_advs: B per-step advantages (:func:`step_advantages`); step_labels: B per-step
    correctness lists (True = correct step) or None (unlabelled, not counted); rewards [B].
    Returns

    * ``auc``: AUC of step advantage separating correct (positive) from wrong steps, all steps;
    * ``auc_within_failed``: mean over failed trajectories (with both kinds of step) of the AUC
      among that trajectory's own steps — the step-level signal: sequence-level credit gives every
      step of a trajectory the same value and scores exactly 0.5;
    * ``first_error_localisation``: share of failed trajectories with a wrong step whose most
      negative step is the first wrong one (ties at the minimum split the hit: 1/n_tied);
    * ``wrong_step_credit_share``: on failed trajectories, share of the blame mass
      Σ max(−adv, 0) that falls on wrong steps (steps weighted equally);
    * counts ``n_steps``, ``n_wrong_steps``, ``n_localisable``, ``n_unlabelled``.
    """
    B = len(step_advs)
    if len(step_labels) != B or len(rewards) != B:
        raise ValueError(f"step_advs, step_labels and rewards must have the same length, got {B}, "
                         f"{len(step_labels)}, {len(rewards)}")
    scores, labels, within = [], [], []
    hits: list[float] = []
    blame_wrong = blame_all = 0.0
    unlabelled = 0
    for i in range(B):
        if step_labels[i] is None:
            unlabelled += 1
            continue
        a = np.asarray(step_advs[i], dtype=np.float64).reshape(-1)
        y = np.asarray(step_labels[i], dtype=bool).reshape(-1)
        if len(a) != len(y):
            raise ValueError(f"trajectory {i}: {len(a)} step advantages but {len(y)} step labels")
        scores.append(a)
        labels.append(y)
        if float(rewards[i]) >= success_threshold:
            continue
        if y.any() and (~y).any():
            within.append(auc(a, y))
        blame = np.maximum(-a, 0.0)
        blame_wrong += float(blame[~y].sum())
        blame_all += float(blame.sum())
        if (~y).any():
            first = int(np.flatnonzero(~y)[0])
            tied = np.flatnonzero(a == a.min())
            hits.append(1.0 / len(tied) if first in tied else 0.0)
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dtype=dt)  # noqa: E731
    s, y = cat(scores, np.float64), cat(labels, bool)
    return {
        "auc": auc(s, y),
        "auc_within_failed": float(np.mean(within)) if within else float("nan"),
        "first_error_localisation": float(np.mean(hits)) if hits else float("nan"),
        "wrong_step_credit_share": blame_wrong / blame_all if blame_all > 0 else float("nan"),
        "n_steps": float(len(y)),
        "n_wrong_steps": float((~y).sum()),
        "n_localisable": float(len(hits)),
        "n_unlabelled": float(unlabelled),
    }


def batch_credit_quality(
    batch: RolloutBatch,
    advantages: Tensor,
    task: Any,
    examples: Sequence[Any] | Mapping[int, Any],
    success_threshold: float = 0.5,
) -> dict[str, float]:
    """:func:`credit_quality` of a batch: step advantages over ``batch.step_spans`` (response
    mask applied), labels from ``task.step_labels(example, response)``. A trajectory whose label
    count differs from its span count is counted unlabelled (``n_unlabelled``), never guessed."""
    if batch.step_spans is None:
        raise ValueError("batch.step_spans is None: split steps first (ibpo_lab.steps.split_steps)")
    if batch.responses is None:
        raise ValueError("batch.responses is None: step labels are computed from the response texts")
    if isinstance(examples, Mapping):
        exs = [examples[g] for g in batch.group_ids.tolist()]
    else:
        if len(examples) != len(batch):
            raise ValueError(f"examples has {len(examples)} entries but the batch has {len(batch)} trajectories")
        exs = list(examples)
    sa = step_advantages(advantages, batch.step_spans, batch.response_mask)
    labels = []
    for i, (ex, resp) in enumerate(zip(exs, batch.responses)):
        lab = task.step_labels(ex, resp)
        labels.append(lab if lab is not None and len(lab) == len(sa[i]) else None)
    return credit_quality(sa, labels, batch.rewards.tolist(), success_threshold)


# --------------------------------------------------------------------------- effective updates
def effective_updates(batch: RolloutBatch, advantages: Tensor, tol: float = 0.0) -> dict[str, float]:
    """Share of groups, trajectories and trained tokens that receive a non-zero advantage.

    advantages [B, T]; a token counts when |A| > tol and it is on ``batch.response_mask``.
    GRPO gives all-correct and all-wrong groups zero advantage; IBPO's φ revives all-wrong ones.
    """
    adv = torch.as_tensor(advantages).detach().cpu()
    mask = batch.response_mask
    if tuple(adv.shape) != tuple(mask.shape):
        raise ValueError(f"advantages has shape {tuple(adv.shape)}, expected {tuple(mask.shape)}")
    live = (adv.abs() > tol) & (mask > 0)
    traj_live = live.any(dim=1)
    groups = batch.groups()
    group_live = [bool(traj_live[idx].any()) for idx in groups.values()]
    n_tok = float(mask.sum())
    return {
        "group_share": float(np.mean(group_live)) if group_live else float("nan"),
        "trajectory_share": float(traj_live.float().mean()) if len(batch) else float("nan"),
        "token_share": float(live.sum()) / n_tok if n_tok else float("nan"),
    }


# --------------------------------------------------------------------------- gradients
def gradient_stats(grads: Tensor | np.ndarray) -> dict[str, float]:
    """Spread of R gradient estimates of the same expected gradient.

    grads [R, P] -> ``total_var`` = Σ_p Var_r(g_rp) (trace of the covariance, unbiased for R > 1),
    ``rel_var`` = total_var / ‖ḡ‖² (NaN if ḡ = 0 and total_var = 0, inf if only ḡ = 0),
    ``mean_cos`` = mean_r cos(g_r, ḡ) (NaN if ḡ = 0), ``mean_grad_norm`` = ‖ḡ‖,
    ``grad_norm`` = mean_r ‖g_r‖. Computed in float64.
    """
    g = torch.as_tensor(grads).detach().cpu().double()
    if g.dim() != 2 or g.shape[0] < 1:
        raise ValueError(f"grads must be [R, P] with R >= 1, got shape {tuple(g.shape)}")
    R = g.shape[0]
    mean = g.mean(0)
    total_var = float(((g - mean) ** 2).sum() / (R - 1)) if R > 1 else 0.0
    m2 = float(mean.pow(2).sum())
    norms = g.norm(dim=1)
    if m2 > 0:
        rel = total_var / m2
        cos = (g @ mean) / (norms * mean.norm()).clamp(min=1e-300)
        mean_cos = float(cos.mean())
    else:
        rel = float("nan") if total_var == 0 else float("inf")
        mean_cos = float("nan")
    return {
        "total_var": total_var,
        "rel_var": rel,
        "mean_cos": mean_cos,
        "mean_grad_norm": m2 ** 0.5,
        "grad_norm": float(norms.mean()),
    }


def policy_gradient(
    model: torch.nn.Module,
    batch: RolloutBatch,
    advantages: Tensor,
    loss_name: str = "ppo",
    temperature: float = 1.0,
    **loss_kw,
) -> Tensor:
    """Flat gradient of the on-policy surrogate: one forward + backward.

    old log-probs = the current ones detached (ratio 1, so the clip is inactive and the gradient is
    the policy gradient Σ A ∇log π aggregated as the loss aggregates). advantages [B, T] ->
    float32 [P] over ``model``'s trainable parameters in ``parameters()`` order (0 where unused).
    ``model.grad`` fields are not touched.
    """
    from ibpo_lab.losses import get_loss
    from ibpo_lab.models import response_logprobs

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    device = params[0].device
    padded = batch.padded().to(device)
    adv = torch.as_tensor(advantages).to(device=device, dtype=torch.float32)
    if tuple(adv.shape) != tuple(padded.response_mask.shape):
        raise ValueError(f"advantages has shape {tuple(adv.shape)}, expected {tuple(padded.response_mask.shape)}")
    lp, _ = response_logprobs(model, padded, temperature=temperature)
    loss, _ = get_loss(loss_name)(lp, lp.detach(), adv, padded.response_mask, **loss_kw)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float().cpu() for p, g in zip(params, grads)])


#: estimators that need compare-and-correct / Monte-Carlo values on the batch before they run
_NEEDS_REPAIR = ("ibpo",)
_NEEDS_MC = ("vineppo",)


def gradient_variance(
    policy: Any,
    task: Any,
    examples: Sequence[Any],
    estimators: Sequence[str] | Mapping[str, Mapping[str, Any]] = ("grpo", "ibpo"),
    resamples: int = 8,
    sampler_kwargs: Mapping[str, Any] | None = None,
    correct_cfg: Any = None,
    seed: int = 0,
    loss_name: str = "ppo",
    mc_k: int = 4,
    progress: bool = True,
) -> pd.DataFrame:
    """Gradient variance of each estimator over R independent group resamples of fixed prompts.

    policy: ``models.Policy``; examples: the fixed prompts (one group each); estimators: names or
    name -> estimator kwargs; sampler_kwargs: ``n`` (group size, default 8), ``max_new_tokens``
    (default 64), ``temperature``, ``top_p``, ``stop``, ``backend`` ("hf"); correct_cfg:
    ``CorrectConfig`` for estimators that read repairs (``ibpo``); mc_k: continuations per step
    boundary for ``vineppo``. Per resample r one batch is sampled (seed + r), rewarded, split into
    steps, repaired / valued once if any estimator needs it, and every estimator's gradient
    (:func:`policy_gradient`) is taken on that same batch. IOP's repaired trajectories are not
    part of the gradient (the sampled batch only). Memory: R·P float32 per estimator.
    -> one row per estimator: estimator, resamples, the :func:`gradient_stats` columns,
    reward_mean and the mean :func:`effective_updates` shares.
    """
    from tqdm.auto import tqdm

    from ibpo_lab.advantages import get_estimator
    from ibpo_lab.sampling import get_sampler
    from ibpo_lab.steps import split_steps

    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 2:
        raise ValueError(f"resamples must be an int >= 2 (a variance needs two samples), got {resamples!r}")
    if not examples:
        raise ValueError("examples is empty: need at least one fixed prompt")
    est = {name: {} for name in estimators} if not isinstance(estimators, Mapping) else {k: dict(v) for k, v in estimators.items()}
    if not est:
        raise ValueError("estimators is empty")
    fns = {name: get_estimator(name) for name in est}
    kw = dict(sampler_kwargs or {})
    backend = kw.pop("backend", "hf")
    n = int(kw.pop("n", 8))
    kw.setdefault("max_new_tokens", 64)
    unknown = set(kw) - {"max_new_tokens", "temperature", "top_p", "stop"}
    if unknown:
        raise ValueError(f"sampler_kwargs: unknown keys {sorted(unknown)}")
    sampler = get_sampler(backend, policy)
    tok = policy.tokenizer
    prompts = [task.solve_prompt(e) for e in examples]
    per_traj = [e for e in examples for _ in range(n)]
    needs_repair = any(name.startswith(_NEEDS_REPAIR) for name in est)
    needs_mc = any(name.startswith(_NEEDS_MC) for name in est)
    if needs_repair:
        from ibpo_lab.correct import CorrectConfig, compare_and_correct

        correct_cfg = CorrectConfig() if correct_cfg is None else correct_cfg
    grads: dict[str, list[Tensor]] = {name: [] for name in est}
    eff: dict[str, list[dict]] = {name: [] for name in est}
    rewards_mean = []
    for r in tqdm(range(resamples), desc="gradient resamples", disable=not progress):
        b = sampler.sample(prompts, n=n, seed=seed + r, **kw)
        b = b.replace(
            rewards=task.rewards(per_traj, b.responses),
            step_spans=[split_steps(ids, tok, getattr(task, "step_delimiter", "newline")) for ids in b.response_ids],
        )
        if needs_repair:
            b = compare_and_correct(b, per_traj, task, sampler, correct_cfg, tokenizer=tok, seed=seed + 10_000 + r).batch
        if needs_mc:
            from ibpo_lab.mc_values import mc_step_values

            b = b.replace(step_values=mc_step_values(b, per_traj, task, sampler, mc_k, seed=seed + 20_000 + r,
                                                     tokenizer=tok, progress=False, **kw))
        rewards_mean.append(float(b.rewards.mean()))
        for name, fn in fns.items():
            adv = fn(b, **est[name])
            grads[name].append(policy_gradient(policy.model, b, adv, loss_name=loss_name))
            eff[name].append(effective_updates(b, adv))
    rows = []
    for name in est:
        stats = gradient_stats(torch.stack(grads[name]))
        e = pd.DataFrame(eff[name]).mean().to_dict()
        rows.append({"estimator": name, "resamples": resamples, **stats, "reward_mean": float(np.mean(rewards_mean)), **e})
    return pd.DataFrame(rows)
