"""Diagnostics of the credit an estimator assigns: gradient variance, step-level credit quality
and effective updates — the measurements behind IBPO's claims (lower-variance, better-localised
credit than sequence-level GRPO; signal in groups where GRPO's advantage is zero).

Pure parts (numpy / torch in, numbers out): :func:`step_advantages`, :func:`auc` (and its curve,
:func:`roc_curve`), :func:`credit_quality`, :func:`gradient_stats`, :func:`effective_updates`,
:func:`shaping_moments` (φ from ``advantages.shaped_rewards``). Model parts: :func:`policy_gradient`
(one backward of the on-policy surrogate) and :func:`gradient_variance` (R independent steps of
fixed prompts, every method on the same samples). Tables of one ``step.Step`` (the notebooks'
credit tables): :func:`credit_summary`, :func:`step_credit_frame`, :func:`sequence_advantages`,
:func:`group_views`, :func:`k_sweep`, :func:`rewrite_comparison`, :func:`shaping_grid`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ibpo_lab.rollout import RolloutBatch, Span

if TYPE_CHECKING:  # annotations only: step imports diagnostics' callers, not the reverse
    from ibpo_lab.step import Step

__all__ = [
    "step_advantages",
    "auc",
    "roc_curve",
    "credit_quality",
    "batch_credit_quality",
    "gradient_stats",
    "rel_var_interval",
    "policy_gradient",
    "gradient_variance",
    "effective_updates",
    "sequence_advantages",
    "step_credit_frame",
    "credit_summary",
    "group_views",
    "divergence_summary",
    "k_sweep",
    "rewrite_comparison",
    "shaping_grid",
    "shaping_moments",
    "shaping_variance_curve",
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


def _scored(scores, labels) -> tuple[np.ndarray, np.ndarray, int, int]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if len(s) != len(y):
        raise ValueError(f"scores has {len(s)} entries but labels has {len(y)}")
    return s, y, int(y.sum()), int((~y).sum())


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` separating positives (label True) from negatives:
    P(score_pos > score_neg) + ½·P(tie), via the Mann–Whitney rank statistic. NaN without both classes."""
    s, y, n_pos, n_neg = _scored(scores, labels)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _average_ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of ``scores`` for boolean ``labels`` (True = positive): (fpr, tpr, :func:`auc`).

    Ties share one point (a sort and two cumulative sums; no scikit-learn dependency for one curve),
    so the area under the drawn curve equals the Mann-Whitney :func:`auc`.
    """
    s, y, n_pos, n_neg = _scored(scores, labels)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("labels must contain both classes to draw a ROC curve")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]
    tps = np.cumsum(y_sorted)[distinct]
    fps = (distinct + 1) - tps
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos], auc(s, y)


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


def rel_var_interval(grads: Tensor | np.ndarray, level: float = 0.95, n_boot: int = 2000,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``rel_var`` (:func:`gradient_stats`) over the R resamples.

    grads [R, P] -> (lo, hi). Each bootstrap draw resamples the R gradients with replacement;
    with counts w (Σ w = R) and the Gram matrix G = g gᵀ [R, R], the draw's ‖ḡ‖² = wᵀGw / R² and
    total_var = (Σ_r w_r G_rr − R‖ḡ‖²) / (R − 1), so no [R, P] copy is made per draw (hand-written
    for this reason: a generic bootstrap would re-stack the gradients 2000 times). Draws with
    ḡ = 0 count as +inf (they widen the upper end). NaN bounds for R < 2. With few resamples
    (the smoke profile's 3) the interval is coarse: it is what R resamples can say.
    """
    g = torch.as_tensor(grads).detach().cpu().double()
    if g.dim() != 2 or g.shape[0] < 1:
        raise ValueError(f"grads must be [R, P] with R >= 1, got shape {tuple(g.shape)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    R = g.shape[0]
    if R < 2:
        return math.nan, math.nan
    G = (g @ g.T).numpy()
    rng = np.random.default_rng(seed)
    W = np.stack([np.bincount(rng.integers(0, R, R), minlength=R) for _ in range(n_boot)]).astype(float)
    m2 = np.einsum("br,rs,bs->b", W, G, W) / R**2
    tv = np.maximum(W @ np.diag(G) - R * m2, 0.0) / (R - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(m2 > 0, tv / np.where(m2 > 0, m2, 1.0), np.where(tv > 0, np.inf, 0.0))
    a = (1 - level) / 2
    lo, hi = np.quantile(rel, [a, 1 - a], method="linear")
    return float(lo), float(hi)


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


def gradient_variance(
    lab: Any,
    examples: Sequence[Any],
    estimators: Sequence[str] | Mapping[str, Mapping[str, Any]] = ("grpo", "ibpo"),
    resamples: int = 8,
    seed: int = 0,
    loss_name: str = "ppo",
    progress: bool = True,
) -> pd.DataFrame:
    """Gradient variance of each method over R independent group resamples of fixed prompts.

    lab: ``step.Lab`` (its config gives the group size, lengths, corrector and Monte-Carlo K);
    examples: the fixed prompts (one group each); estimators: names or label -> TrainConfig
    overrides, as ``step.Step.advantages_for``. Per resample r one step is taken
    (``step.take_step``, seed + r; repairs seed + 10000 + r and step values seed + 20000 + r when a
    method needs them) and every method's gradient (:func:`policy_gradient`) is taken on that same
    batch. IOP's repaired trajectories are not part of the gradient. Memory: R·P float32 per method.
    -> one row per method: estimator, resamples, the :func:`gradient_stats` columns,
    rel_var_lo/rel_var_hi (:func:`rel_var_interval`, 95% bootstrap over the resamples), reward_mean
    and the mean :func:`effective_updates` shares.
    """
    from tqdm.auto import tqdm

    from ibpo_lab.step import take_step, variant_config

    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 2:
        raise ValueError(f"resamples must be an int >= 2 (a variance needs two samples), got {resamples!r}")
    if not examples:
        raise ValueError("examples is empty: need at least one fixed prompt")
    specs = {n: None for n in estimators} if not isinstance(estimators, Mapping) else dict(estimators)
    if not specs:
        raise ValueError("estimators is empty")
    cfgs = [variant_config(lab.cfg, n, s) for n, s in specs.items()]
    needs_repair = any(c.uses_correction for c in cfgs)
    needs_mc = any(c.uses_step_values for c in cfgs)
    grads: dict[str, list[Tensor]] = {name: [] for name in specs}
    eff: dict[str, list[dict]] = {name: [] for name in specs}
    rewards_mean = []
    for r in tqdm(range(resamples), desc="gradient resamples", disable=not progress):
        st = take_step(lab, examples, seed=seed + r, correct=needs_repair, values=needs_mc,
                       correct_seed=seed + 10_000 + r, values_seed=seed + 20_000 + r, advantages=False)
        rewards_mean.append(float(st.batch.rewards.mean()))
        for name, adv in st.advantages_for(specs).items():
            grads[name].append(policy_gradient(lab.policy.model, st.batch, adv, loss_name=loss_name,
                                               temperature=lab.cfg.temperature))
            eff[name].append(effective_updates(st.batch, adv))
    rows = []
    for name in specs:
        stacked = torch.stack(grads[name])
        stats = gradient_stats(stacked)
        lo, hi = rel_var_interval(stacked, seed=seed)
        e = pd.DataFrame(eff[name]).mean().to_dict()
        rows.append({"estimator": name, "resamples": resamples, **stats, "rel_var_lo": lo, "rel_var_hi": hi,
                     "reward_mean": float(np.mean(rewards_mean)), **e})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- credit tables of a step
def _with_batch(step, batch):
    """The same step with another batch (e.g. other edit masks); advantages recomputed on demand."""
    import dataclasses

    return dataclasses.replace(step, batch=batch, advantages={})


def sequence_advantages(sample: "Step", advantages: Mapping[str, Tensor]) -> pd.DataFrame:
    """One row per trajectory: reward, repair share and, per estimator, the mean advantage over its
    trained tokens (for sequence-level estimators, the advantage itself)."""
    b = sample.batch
    mask = b.response_mask
    n = mask.sum(1).clamp(min=1)
    df = pd.DataFrame({"traj": np.arange(len(b)), "group": b.group_ids.numpy(), "reward": b.rewards.numpy()})
    if b.repair_success is not None:
        df["repair_success"] = b.repair_success.numpy()
    for name, adv in advantages.items():
        if tuple(adv.shape) != tuple(mask.shape):
            raise ValueError(f"advantages[{name!r}] has shape {tuple(adv.shape)}, expected {tuple(mask.shape)}")
        df[name] = ((adv * mask).sum(1) / n).numpy()
    return df


def step_credit_frame(sample: "Step", advantages: Mapping[str, Tensor]) -> pd.DataFrame:
    """Long table, one row per (estimator, trajectory, step): mean token advantage of the step
    (``diagnostics.step_advantages``), its ground-truth label ``correct``, ``first_error`` (the
    trajectory's first wrong step), the trajectory's reward and group. Unlabelled trajectories and
    trajectories whose label count differs from their step count are left out (counted in
    ``credit_summary``'s ``n_unlabelled``)."""
    b = sample.batch
    if b.step_spans is None:
        raise ValueError("sample.batch has no step spans")
    rows = []
    for name, adv in advantages.items():
        per = step_advantages(adv, b.step_spans, b.response_mask)
        for i, (vals, labs) in enumerate(zip(per, sample.step_labels)):
            if labs is None or len(labs) != len(vals):
                continue
            wrong = [k for k, ok in enumerate(labs) if not ok]
            first = wrong[0] if wrong else -1
            for k, (v, ok) in enumerate(zip(vals, labs)):
                rows.append({"estimator": name, "traj": i, "group": int(b.group_ids[i]), "step": k,
                             "advantage": float(v), "correct": bool(ok), "first_error": k == first,
                             "reward": float(b.rewards[i])})
    return pd.DataFrame(rows, columns=["estimator", "traj", "group", "step", "advantage", "correct", "first_error",
                                       "reward"])


def credit_summary(sample: "Step", advantages: Mapping[str, Tensor]) -> pd.DataFrame:
    """One row per estimator: ``diagnostics.credit_quality`` (AUC, within-failure AUC, first-error
    localisation, blame share on wrong steps) and ``effective_updates`` on the sample."""
    b = sample.batch
    rows = []
    for name, adv in advantages.items():
        per = step_advantages(adv, b.step_spans, b.response_mask)
        labs = [lab if lab is not None and len(lab) == len(v) else None for lab, v in zip(sample.step_labels, per)]
        q = credit_quality(per, labs, b.rewards.tolist())
        rows.append({"estimator": name, **q, **{f"live_{k}": v for k, v in effective_updates(b, adv).items()}})
    return pd.DataFrame(rows)


def group_views(sample: "Step", group: int = 0) -> dict[str, Any]:
    """A group's token and step divergence matrices, its step prefix trie and member indices."""
    from ibpo_lab.diff import build_prefix_trie, divergence_matrix, step_divergence_matrix, step_keys

    b = sample.batch
    groups = b.groups()
    if group not in groups:
        raise ValueError(f"group {group} not in the sample; groups: {sorted(groups)}")
    idx = groups[group]
    ids = [b.response_ids[i] for i in idx]
    steps = [step_keys(b.response_ids[i], b.step_spans[i]) for i in idx]
    r = b.rewards[idx].numpy()
    return {"members": idx, "rewards": r, "token_divergence": divergence_matrix(ids),
            "step_divergence": step_divergence_matrix(steps), "trie": build_prefix_trie(steps, r)}


def divergence_summary(views: Mapping[str, Any], group: int = -1) -> dict[str, float]:
    """Numbers behind a group's heatmaps (:func:`group_views` output): mean shared token prefix and
    shared steps over pairs, as a share of the shorter trajectory too, and the trie's size."""
    T = np.asarray(views["token_divergence"], dtype=float)
    S = np.asarray(views["step_divergence"], dtype=float)
    G = T.shape[0]
    off = ~np.eye(G, dtype=bool)
    lens, steps = np.diag(T), np.diag(S)
    shorter = np.minimum.outer(lens, lens)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(shorter > 0, T / shorter, np.nan)
    trie = views["trie"]
    return {"group": group, "G": G, "reward_mean": float(np.mean(views["rewards"])),
            "mean_len": float(lens.mean()), "mean_steps": float(steps.mean()),
            "shared_tokens": float(T[off].mean()) if G > 1 else math.nan,
            "shared_token_share": float(np.nanmean(share[off])) if G > 1 else math.nan,
            "shared_steps": float(S[off].mean()) if G > 1 else math.nan,
            "trie_nodes": int(trie.n_nodes), "root_branches": int(trie.branching()[0])}


def _repair_stats(s: "Step") -> dict[str, float]:
    b = s.batch
    failed = (b.rewards < 0.5).numpy()
    rs = b.repair_success.numpy()
    n_edit = np.array([m.sum() for m in b.edit_masks]) if b.edit_masks is not None else np.zeros(len(b))
    lens = np.array([max(len(r), 1) for r in b.response_ids])
    rep = failed & (rs > 0)
    return {"n_failed": int(failed.sum()), "repaired_share": float(rep.sum() / max(failed.sum(), 1)),
            "phi_share_mean": float(rs[failed].mean()) if failed.any() else math.nan,
            "edited_fraction": float((n_edit[rep] / lens[rep]).mean()) if rep.any() else math.nan}


def k_sweep(sample: "Step", ks: Sequence[int], *, seed: int = 1) -> pd.DataFrame:
    """Number of sibling references K: for each K, compare-and-correct on the same batch, then the
    repair statistics and IBPO's credit quality. One row per K."""
    rows = []
    G = min(len(v) for v in sample.batch.groups().values())
    for k in ks:
        if not 1 <= int(k) <= G - 1:
            raise ValueError(f"ks: K={k} needs 1 <= K <= group size - 1 = {G - 1}")
        s = sample.recorrect(correct={"num_references": int(k)}, seed=seed)
        q = credit_summary(s, s.advantages_for(["ibpo"])).iloc[0].to_dict()
        rows.append({"K": int(k), **_repair_stats(s), **{k2: q[k2] for k2 in
                     ("auc", "auc_within_failed", "first_error_localisation", "live_group_share")}})
    return pd.DataFrame(rows)


def rewrite_comparison(sample: "Step") -> pd.DataFrame:
    """Local repair vs full rewrite on one corrected batch. For the failed trajectories with a
    verified repair, the credited tokens come from:

    * ``local repair``: the edit mask of the policy's own minimal repair (IBPO);
    * ``full rewrite``: the edit mask against the reference sibling it was repaired from — what a
      repair that simply rewrites the attempt as the reference would change;
    * ``no mask``: every token (sequence-level credit of the shaped reward).

    One row per variant: edited fraction and IBPO's credit quality with those masks.
    """
    from ibpo_lab.diff import edit_masks

    c = sample.correction
    if c is None:
        raise ValueError("sample has no correction: take_step(correct=True)")
    b = sample.batch
    table = c.table
    sel = table[table["selected"].astype(bool)] if len(table) else table
    ref_of = {int(t): int(r) for t, r in zip(sel.get("traj", []), sel.get("reference_traj", [])) if int(r) >= 0}
    rewrite = []
    for i in range(len(b)):
        m = b.edit_masks[i] if b.edit_masks is not None else np.zeros(len(b.response_ids[i]), bool)
        if i in ref_of:
            m = edit_masks(b.response_ids[i], b.response_ids[ref_of[i]])[0]
            if not m.any():  # identical to the reference: nothing to rewrite, credit its last token
                m = np.zeros(len(m), bool)
                m[-1:] = True
        rewrite.append(np.asarray(m, bool))
    variants = {
        "local repair": (sample, {"estimator": "ibpo"}),
        "full rewrite": (_with_batch(sample, b.replace(edit_masks=rewrite)), {"estimator": "ibpo"}),
        "no mask": (sample, {"estimator": "ibpo", "estimator_kwargs": {"token_mask": False}}),
    }
    rows = []
    for name, (s, spec) in variants.items():
        adv = s.advantages_for({name: {**spec, "estimator_kwargs": {**sample.variant("ibpo").estimator_kwargs, **spec.get("estimator_kwargs", {})}}})
        q = credit_summary(s, adv).iloc[0].to_dict()
        st = _repair_stats(s)
        if name == "no mask":
            st["edited_fraction"] = 1.0 if not math.isnan(st["edited_fraction"]) else math.nan
        rows.append({"credit": name, "edited_fraction": st["edited_fraction"], "repaired_share": st["repaired_share"],
                     **{k: q[k] for k in ("auc", "auc_within_failed", "first_error_localisation",
                                          "wrong_step_credit_share")}})
    return pd.DataFrame(rows)


def shaping_grid(sample: "Step", lams: Sequence[float], rhos: Sequence[float]) -> pd.DataFrame:
    """Sensitivity to λ and ρ on one corrected batch: for every (λ, ρ), the pooled within-group
    variance of the shaped reward, the share of groups IBPO gives a non-zero signal, and its
    credit quality. One row per (λ, ρ)."""
    rows = []
    for rho in rhos:
        for lam in lams:
            pooled = shaping_moments(sample, lam, rho).iloc[-1]
            ibpo = sample.variant("ibpo")
            adv = sample.advantages_for({"ibpo": {"estimator": "ibpo",
                                                  "estimator_kwargs": {**ibpo.estimator_kwargs, "lam": lam, "rho": rho}}})
            q = credit_summary(sample, adv).iloc[0]
            eff = effective_updates(sample.batch, adv["ibpo"])
            rows.append({"lam": float(lam), "rho": float(rho), "var_shaped": pooled.var_shaped,
                         "live_group_share": eff["group_share"], "auc": q.auc,
                         "auc_within_failed": q.auc_within_failed,
                         "first_error_localisation": q.first_error_localisation})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the variance argument
def _shaping_parts(sample, lam: float, rho: float, success_threshold: float | None):
    """(R, λφ, group ids) as float64 numpy, φ from ``advantages.shaped_rewards`` (the estimator's own shaping)."""
    from ibpo_lab.advantages import shaped_rewards

    b = getattr(sample, "batch", sample)
    if b.repair_success is None:
        raise ValueError("the batch has no repair_success: run compare-and-correct first")
    if success_threshold is None:  # the step's estimator decides what failed, as in training
        cfg = getattr(sample, "cfg", None)
        success_threshold = (cfg.estimator_kwargs.get("success_threshold", 0.5) if cfg is not None else 0.5)
    r = b.rewards.double()
    phi = shaped_rewards(r, b.repair_success, lam=1.0, rho=rho, success_threshold=success_threshold) - r
    return r.numpy(), phi.numpy(), b.group_ids.numpy(), success_threshold


def shaping_moments(sample: "Step | RolloutBatch", lam: float = 0.6, rho: float = 0.5,
                    success_threshold: float | None = None) -> pd.DataFrame:
    """The variance argument, measured. Per group and pooled over groups (within-group moments,
    what group normalisation divides by): Var(R), Var(φ), Cov(R, φ), corr, Var(R + λφ), and the
    decomposition Var(R) + λ²Var(φ) + 2λCov(R, φ) (equal to it up to rounding).

    φ = ρ·(share of successful repairs) on failed trajectories, 0 on correct ones, exactly as
    ``advantages.shaped_rewards`` shapes (``success_threshold``: default the step's estimator's).
    """
    if lam < 0 or rho < 0:
        raise ValueError(f"lam and rho must be >= 0, got lam={lam}, rho={rho}")
    r, phi, g, thr = _shaping_parts(sample, lam, rho, success_threshold)
    rows = []
    for gid in np.unique(g):
        m = g == gid
        rr, pp = r[m], phi[m]
        if len(rr) < 2:
            continue
        c = np.cov(np.stack([rr, pp]), ddof=1)
        shaped = np.var(rr + lam * pp, ddof=1)
        rows.append({"group": int(gid), "n": int(m.sum()), "reward_mean": rr.mean(), "var_R": c[0, 0],
                     "var_phi": c[1, 1], "cov_R_phi": c[0, 1], "var_shaped": shaped,
                     "var_decomposed": c[0, 0] + lam**2 * c[1, 1] + 2 * lam * c[0, 1],
                     "all_failed": bool(rr.max() < thr), "all_correct": bool(rr.min() >= thr)})
    df = pd.DataFrame(rows)
    if df.empty:
        raise ValueError("no group with >= 2 trajectories")
    pooled = {"group": -1, "n": int(df.n.sum()), "reward_mean": float(r.mean()), "all_failed": False,
              "all_correct": False}
    for col in ("var_R", "var_phi", "cov_R_phi", "var_shaped", "var_decomposed"):
        pooled[col] = float(np.average(df[col], weights=df.n - 1))  # pooled within-group moments
    df = pd.concat([df, pd.DataFrame([pooled])], ignore_index=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        df["corr_R_phi"] = df.cov_R_phi / np.sqrt(df.var_R * df.var_phi)
    return df


def shaping_variance_curve(sample: "Step | RolloutBatch", lams: Sequence[float], rho: float = 0.5) -> pd.DataFrame:
    """Pooled within-group Var(R + λφ) for each λ, measured and from the decomposition."""
    rows = []
    for lam in lams:
        pooled = shaping_moments(sample, lam, rho).iloc[-1]
        rows.append({"lam": float(lam), "rho": rho, "var_shaped": pooled.var_shaped, "var_decomposed": pooled.var_decomposed,
                     "var_R": pooled.var_R, "cov_R_phi": pooled.cov_R_phi, "var_phi": pooled.var_phi})
    return pd.DataFrame(rows)


