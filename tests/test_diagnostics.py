"""Diagnostics: AUC, credit quality against step ground truth, gradient statistics, effective
updates, the on-policy gradient, and (slow) gradient variance on a tiny random policy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ibpo_lab.diagnostics import (
    auc,
    credit_quality,
    effective_updates,
    gradient_stats,
    rel_var_interval,
    step_advantages,
)
from ibpo_lab.rollout import RolloutBatch


# --------------------------------------------------------------------------- AUC
def test_auc_hand_made_cases():
    assert auc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auc([0.5, 0.5, 0.5], [True, False, True]) == 0.5
    # pairs (pos, neg): (.5,.3) win, (.5,.1) win, (.2,.3) loss, (.2,.1) win -> 3/4
    assert auc([0.5, 0.2, 0.3, 0.1], [True, True, False, False]) == 0.75
    # a tie counts one half: (.3,.3) half, (.3,.1) win -> 0.75
    assert auc([0.3, 0.3, 0.1], [True, False, False]) == 0.75
    assert math.isnan(auc([1.0, 2.0], [True, True]))


def test_auc_matches_pair_counting_on_random_data():
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = rng.integers(0, 4, size=15).astype(float)  # many ties
        y = rng.random(15) < 0.5
        if y.all() or not y.any():
            continue
        pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in itertools.product(s[y], s[~y])]
        assert auc(s, y) == pytest.approx(np.mean(pairs))


# --------------------------------------------------------------------------- credit quality
def test_step_advantages_means_per_span():
    adv = torch.tensor([[1.0, 3.0, -2.0, 0.0], [5.0, 5.0, 5.0, 0.0]])
    out = step_advantages(adv, [[(0, 2), (2, 3), (3, 4)], [(0, 3)]])
    assert [o.tolist() for o in out] == [[2.0, -2.0, 0.0], [5.0]]
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 0]])
    assert step_advantages(adv, [[(0, 2), (2, 4)], [(0, 3)]], mask)[0].tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="step_spans"):
        step_advantages(adv, [[(0, 5)], [(0, 1)]])


def test_credit_quality_localisation_and_blame_share():
    step_advs = [
        [0.1, -0.5, -0.2],   # failed, first wrong step 1 is the unique minimum -> hit
        [-0.3, -0.3, 0.0],   # failed, first wrong step 0 ties with step 1 -> half a hit
        [-1.0, 0.2],         # failed, minimum on a correct step -> miss
        [0.4, 0.4],          # correct trajectory
    ]
    labels = [[True, False, False], [False, True, True], [True, False], [True, True]]
    q = credit_quality(step_advs, labels, [0, 0, 0, 1])
    assert q["first_error_localisation"] == pytest.approx((1 + 0.5 + 0) / 3)
    # blame Σ max(-a, 0): on wrong steps 0.5+0.2, 0.3, 0; in all 0.7, 0.6, 1.0
    assert q["wrong_step_credit_share"] == pytest.approx(1.0 / 2.3)
    # per failed trajectory AUC: 1 (separates), 0.75 (one tie, one win), 0 (inverted)
    assert q["auc_within_failed"] == pytest.approx((1 + 0.75 + 0) / 3)
    assert q["n_steps"] == 10 and q["n_wrong_steps"] == 4 and q["n_localisable"] == 3
    correct_scores = [0.1, -0.3, 0.0, -1.0, 0.4, 0.4]
    wrong_scores = [-0.5, -0.2, -0.3, 0.2]
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in correct_scores for b in wrong_scores]
    assert q["auc"] == pytest.approx(np.mean(pairs))


def test_sequence_level_credit_scores_chance_within_failed_trajectories():
    # GRPO-like: one value per trajectory; steps cannot be told apart inside a failed trajectory
    step_advs = [[-1.0] * 4, [-0.5] * 3, [1.0] * 3]
    labels = [[True, True, False, False], [True, False, False], [True, True, True]]
    q = credit_quality(step_advs, labels, [0, 0, 1])
    assert q["auc_within_failed"] == 0.5
    assert q["first_error_localisation"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    # a perfect step credit separates and localises
    perfect = [[0.0, 0.0, -1.0, -0.5], [0.0, -1.0, -0.2], [1.0] * 3]
    q2 = credit_quality(perfect, labels, [0, 0, 1])
    assert q2["auc_within_failed"] == 1.0 and q2["first_error_localisation"] == 1.0 and q2["wrong_step_credit_share"] == 1.0


def test_credit_quality_skips_unlabelled_and_checks_lengths():
    q = credit_quality([[1.0], [0.0, -1.0]], [None, [True, False]], [1, 0])
    assert q["n_unlabelled"] == 1 and q["n_steps"] == 2
    with pytest.raises(ValueError, match="step labels"):
        credit_quality([[1.0, 2.0]], [[True]], [0])


# --------------------------------------------------------------------------- gradient stats
def test_gradient_stats_against_numpy():
    rng = np.random.default_rng(1)
    g = rng.normal(size=(6, 11)) + 0.5
    s = gradient_stats(torch.tensor(g))
    mean = g.mean(0)
    tv = np.var(g, axis=0, ddof=1).sum()
    assert s["total_var"] == pytest.approx(tv)
    assert s["rel_var"] == pytest.approx(tv / (mean @ mean))
    cos = [(x @ mean) / (np.linalg.norm(x) * np.linalg.norm(mean)) for x in g]
    assert s["mean_cos"] == pytest.approx(np.mean(cos))


def test_rel_var_interval_is_the_percentile_bootstrap_of_gradient_stats():
    rng = np.random.default_rng(3)
    g = rng.normal(size=(5, 7)) + 0.3
    lo, hi = rel_var_interval(torch.tensor(g), n_boot=300, seed=11)
    draws = np.random.default_rng(11)  # the same draws, each re-stacked and scored directly
    rel = []
    for _ in range(300):
        idx = draws.integers(0, 5, 5)
        b = g[idx]
        m = b.mean(0)
        rel.append(np.var(b, axis=0, ddof=1).sum() / (m @ m))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(rel, [0.025, 0.975])))
    assert lo <= gradient_stats(torch.tensor(g))["rel_var"] <= hi
    assert rel_var_interval(torch.tensor([[1.0, 2.0]] * 3)) == (0.0, 0.0)  # no spread in any draw
    assert all(math.isnan(v) for v in rel_var_interval(torch.ones(1, 3)))


def test_gradient_stats_identical_and_degenerate():
    g = torch.tensor([[1.0, -2.0, 3.0]] * 4)
    s = gradient_stats(g)
    assert s["total_var"] == 0 and s["rel_var"] == 0 and s["mean_cos"] == pytest.approx(1.0)
    z = gradient_stats(torch.zeros(3, 5))
    assert math.isnan(z["rel_var"]) and math.isnan(z["mean_cos"])
    assert gradient_stats(torch.tensor([[1.0], [-1.0]]))["rel_var"] == math.inf
    with pytest.raises(ValueError, match="grads"):
        gradient_stats(torch.zeros(4))


# --------------------------------------------------------------------------- effective updates
def test_effective_updates_counts_groups_trajectories_tokens():
    b = RolloutBatch(
        prompt_ids=[[1]] * 4, response_ids=[[5, 6], [5], [7, 8, 9], [7]], rewards=[1, 0, 0, 0], group_ids=[0, 0, 1, 1]
    )
    adv = torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 9.0, 0.0]])  # 9.0 is padding
    e = effective_updates(b, adv)
    assert e["group_share"] == 0.5 and e["trajectory_share"] == 0.5 and e["token_share"] == pytest.approx(2 / 7)
    with pytest.raises(ValueError, match="advantages"):
        effective_updates(b, torch.zeros(4, 2))


# --------------------------------------------------------------------------- gradients of a tiny model
@pytest.fixture(scope="module")
def tiny():
    from ibpo_lab.models import build_tiny_policy
    from ibpo_lab.tasks.synthetic import VOCAB

    return build_tiny_policy(VOCAB, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, context_length=256)


def test_policy_gradient_is_the_advantage_weighted_score(tiny):
    from ibpo_lab.diagnostics import policy_gradient
    from ibpo_lab.models import response_logprobs

    tok = tiny.tokenizer
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    b = RolloutBatch(
        prompt_ids=[tok("1+2", add_special_tokens=True)["input_ids"]] * 2,
        response_ids=[enc("1+2=3\nans=3"), enc("1+2=4")],
        rewards=[1, 0], group_ids=[0, 0],
    )
    adv = torch.zeros(2, b.max_response_len)
    adv[0, : len(b.response_ids[0])] = 1.0
    adv[1, :5] = -1.0
    g = policy_gradient(tiny.model, b, adv)
    # token-mean PPO at ratio 1: ∇ of -Σ A·log π / Σ mask
    lp, _ = response_logprobs(tiny.model, b.padded())
    mask = b.response_mask
    ref_loss = -(adv * lp * mask).sum() / mask.sum()
    ref = torch.cat([x.reshape(-1) for x in torch.autograd.grad(ref_loss, list(tiny.model.parameters()))])
    assert g.shape == ref.shape and torch.allclose(g, ref, atol=1e-6)
    assert all(p.grad is None for p in tiny.model.parameters())
    assert policy_gradient(tiny.model, b, torch.zeros_like(adv)).abs().max() == 0


def test_gradient_variance_same_samples_for_every_estimator(tiny):
    from ibpo_lab.config import presets
    from ibpo_lab.diagnostics import gradient_variance
    from ibpo_lab.step import build_lab
    from ibpo_lab.tasks import get_task

    task = get_task("synthetic", n_steps=2, n_train=50, n_test=10)
    exs = task.examples("train", n=2)
    cfg = presets("smoke", model="tiny-random", device="cpu", group_size=3, max_new_tokens=12,
                  correct={"num_references": 1, "no_correct": "any", "max_new_tokens": 12})
    lab = build_lab(cfg, policy=tiny, task=task)
    df = gradient_variance(lab, exs, estimators=["grpo", "rloo", "ibpo", "ibpo_no_mask"], resamples=2, seed=0,
                           progress=False)
    assert df.estimator.tolist() == ["grpo", "rloo", "ibpo", "ibpo_no_mask"]
    assert (df.resamples == 2).all() and len(set(df.reward_mean)) == 1  # same samples for all
    for col in ("total_var", "grad_norm", "group_share", "token_share"):
        assert df[col].notna().all()
    assert (df.total_var >= 0).all()


def test_roc_curve_area_is_the_auc():
    from ibpo_lab.diagnostics import auc, roc_curve

    s = [0.1, 0.4, 0.35, 0.8, 0.4]
    y = [False, True, False, True, False]
    fpr, tpr, a = roc_curve(s, y)
    assert a == auc(s, y)
    # hand-derived: pairs (pos, neg) = (0.4, 0.1) win, (0.4, 0.35) win, (0.4, 0.4) tie, (0.8, *) win x3 -> 5.5/6
    assert a == pytest.approx(5.5 / 6)
    area = np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr)
    assert area == pytest.approx(a)  # the drawn curve and the number are one AUC
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_shaping_moments_use_the_estimators_shaping_threshold():
    from ibpo_lab.diagnostics import shaping_moments

    b = RolloutBatch(prompt_ids=[[1]] * 4, response_ids=[[2]] * 4, rewards=[0.4, 0.4, 1.0, 0.0], group_ids=[0] * 4,
                     repair_success=[1.0, 0.0, 0.0, 0.5])
    # threshold 0.3: rewards of 0.4 count as successes (φ = 0); threshold 0.5: as failures
    lo = shaping_moments(b, lam=1.0, rho=1.0, success_threshold=0.3).iloc[0]
    hi = shaping_moments(b, lam=1.0, rho=1.0, success_threshold=0.5).iloc[0]
    # φ = ρ·1[a revision verified] (the published indicator): the 0.5 share counts as a success
    assert lo.var_phi == pytest.approx(np.var([0, 0, 0, 1.0], ddof=1))
    assert hi.var_phi == pytest.approx(np.var([1.0, 0, 0, 1.0], ddof=1))
