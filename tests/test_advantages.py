"""Tests for ibpo_lab.advantages: formulas on tiny groups, loop-vs-vectorised, IBPO rules."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ibpo_lab import advantages as A
from ibpo_lab.rollout import RolloutBatch


def make_batch(rewards, group_ids, lens=None, **kw):
    B = len(rewards)
    lens = lens or [3] * B
    rng = np.random.default_rng(0)
    resp = kw.pop("response_ids", None) or [rng.integers(1, 50, size=n).tolist() for n in lens]
    return RolloutBatch(prompt_ids=[[1]] * B, response_ids=resp, rewards=rewards, group_ids=group_ids, **kw)


def random_groups(seed, n_groups=6, max_size=9, binary=True):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_size + 1, size=n_groups)
    gids = np.repeat(rng.permutation(100)[:n_groups], sizes)
    perm = rng.permutation(len(gids))  # groups interleaved, not contiguous
    gids = gids[perm]
    r = rng.integers(0, 2, size=len(gids)).astype(np.float32) if binary else rng.normal(size=len(gids)).astype(np.float32)
    return torch.tensor(r), torch.tensor(gids)


# ----------------------------------------------------------------------------- registry
def test_registry_names_and_unknown():
    assert set(A.list_estimators()) >= {"grpo", "dr_grpo", "rloo", "prefix_tree", "vineppo", "ibpo"}
    with pytest.raises(ValueError, match="known estimators: .*grpo"):
        A.get_estimator("nope")


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="registered twice"):
        A.register_estimator("grpo")(lambda batch: None)
    # re-registering the same function is idempotent (module reloads)
    A.register_estimator("grpo")(A.ESTIMATORS["grpo"])


# ----------------------------------------------------------------------------- hand-derived values
def test_grpo_matches_verl_pair():
    adv = A.grpo_advantages([0.0, 1.0], [7, 7])
    # unbiased std of [0, 1] is 1/sqrt(2): (±0.5) / 0.7071 = ±0.7071
    assert torch.allclose(adv, torch.tensor([-1 / math.sqrt(2), 1 / math.sqrt(2)]), atol=1e-5)


def test_grpo_population_std_and_scales():
    r, g = [0.0, 0.0, 1.0, 3.0], [0, 0, 0, 0]
    m = 1.0
    pop = math.sqrt(sum((x - m) ** 2 for x in r) / 4)
    unb = math.sqrt(sum((x - m) ** 2 for x in r) / 3)
    exp_pop = torch.tensor([(x - m) / (pop + 1e-6) for x in r])
    exp_unb = torch.tensor([(x - m) / (unb + 1e-6) for x in r])
    assert torch.allclose(A.grpo_advantages(r, g, std="population"), exp_pop, atol=1e-6)
    assert torch.allclose(A.grpo_advantages(r, g), exp_unb, atol=1e-6)
    assert torch.allclose(A.grpo_advantages(r, g, scale="none"), torch.tensor([x - m for x in r]))


def test_dr_grpo_sums_to_zero_and_is_centred():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = A.grpo_advantages(r, g, scale="none")
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -2 / 3]), atol=1e-6)
    assert abs(float(adv[:3].sum())) < 1e-6 and abs(float(adv[3:].sum())) < 1e-6


def test_batch_scale_uses_batch_std():
    r = torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0, 2.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    bstd = float(r.double().std())
    adv = A.grpo_advantages(r, g, scale="batch")
    assert torch.allclose(adv, torch.tensor([-0.5, 0.5, 0, 0, 0, 0]) / (bstd + 1e-6), atol=1e-6)


def test_rloo_identity():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = A.rloo_advantages(r, [0, 0, 0, 0])
    expected = torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])
    assert torch.allclose(adv, expected, atol=1e-6)
    # RLOO = G/(G-1) · Dr. GRPO
    assert torch.allclose(adv, 4 / 3 * A.grpo_advantages(r, [0] * 4, scale="none"), atol=1e-6)


def test_singleton_groups_get_zero():
    adv = A.grpo_advantages([1.0, 0.0, 1.0], [0, 1, 1])
    assert adv[0] == 0.0 and adv[1] < 0 < adv[2]
    assert A.rloo_advantages([1.0, 0.0, 1.0], [0, 1, 1])[0] == 0.0


@pytest.mark.parametrize("fn", ["grpo", "dr_grpo", "rloo", "ibpo", "prefix_tree"])
def test_equal_rewards_and_float_noise_give_exact_zero(fn):
    base = torch.tensor([1.0, 1.0, 1.0, 0.3, 0.3, 0.3], dtype=torch.float32)
    noise = torch.tensor([0.0, 1e-7, -1e-7, 1e-7, 0.0, 2e-7], dtype=torch.float32)
    b = make_batch(base + noise, [0, 0, 0, 1, 1, 1])
    adv = A.get_estimator(fn)(b)
    assert torch.equal(adv, torch.zeros_like(adv))


def test_noise_is_not_blown_up_by_eps():
    # without the constant-group rule this would be ~noise/eps, order 0.1 (or 1e6 with eps tiny)
    adv = A.grpo_advantages(torch.tensor([0.5, 0.5 + 1e-7, 0.5 - 1e-7]), [0, 0, 0], eps=1e-12)
    assert torch.equal(adv, torch.zeros(3))


# ----------------------------------------------------------------------------- loop vs vectorised
@pytest.mark.parametrize("seed", range(12))
def test_loop_and_vectorised_agree(seed):
    r, g = random_groups(seed, binary=seed % 2 == 0)
    for scale in A.SCALES:
        for std in A.STDS:
            v = A.grpo_advantages(r, g, scale=scale, std=std)
            ref = A.grpo_advantages_reference(r, g, scale=scale, std=std)
            assert torch.allclose(v, ref, atol=1e-6), (scale, std)
            assert torch.isfinite(v).all()
    assert torch.allclose(A.rloo_advantages(r, g), A.rloo_advantages_reference(r, g), atol=1e-6)
    p = torch.tensor(np.random.default_rng(seed).uniform(size=len(r)), dtype=torch.float32)
    p[::3] = 0.0  # some unrepaired failures
    for scale in A.SCALES:
        for rule in A.SIGN_RULES:
            for phi in A.PHI_MODES:
                kw = dict(lam=0.6, rho=0.5, scale=scale, sign_rule=rule, phi=phi)
                v = A.ibpo_advantages(r, g, p, **kw)
                ref = A.ibpo_advantages_reference(r, g, p, **kw)
                assert torch.allclose(v, ref, atol=1e-6), kw


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.floats(-1e3, 1e3, allow_nan=False, width=32), st.floats(0, 1)),
        min_size=1,
        max_size=24,
    ),
    st.sampled_from(A.SCALES),
)
def test_property_finite_and_loop_agrees(rows, scale):
    g = torch.tensor([x[0] for x in rows])
    r = torch.tensor([x[1] for x in rows], dtype=torch.float32)
    p = torch.tensor([x[2] for x in rows], dtype=torch.float32)
    for fn, ref in ((A.grpo_advantages, A.grpo_advantages_reference),):
        v = fn(r, g, scale=scale)
        assert torch.isfinite(v).all()
        assert torch.allclose(v, ref(r, g, scale=scale), rtol=1e-5, atol=1e-5)
    for rule in A.SIGN_RULES:
        v = A.ibpo_advantages(r, g, p, scale=scale, sign_rule=rule)
        assert torch.isfinite(v).all()
        assert torch.allclose(v, A.ibpo_advantages_reference(r, g, p, scale=scale, sign_rule=rule), rtol=1e-5, atol=1e-5)
        if rule == "safe":
            assert (v[r < 0.5] <= 0).all()
    v = A.rloo_advantages(r, g)
    assert torch.allclose(v, A.rloo_advantages_reference(r, g), rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------- IBPO
def test_shaping_changes_only_failed_rewards():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    p = torch.tensor([0.7, 1.0, 0.5, 0.0])  # a value on a correct one must not be used
    # default φ = ρ·1[a revision verified]: both failures with repair_success > 0 get λρ = 0.3
    rs = A.shaped_rewards(r, p, lam=0.6, rho=0.5)
    assert torch.allclose(rs, torch.tensor([1.0, 0.3, 0.3, 1.0], dtype=torch.float64))
    # the share option: φ = ρ·share
    rs = A.shaped_rewards(r, p, lam=0.6, rho=0.5, phi="share")
    assert torch.allclose(rs, torch.tensor([1.0, 0.3, 0.15, 1.0], dtype=torch.float64))


def test_repair_phi_indicator_and_share():
    r = [1.0, 0.0, 0.0, 0.0, 0.4]
    p = [1.0, 0.25, 0.0, 1.0, 0.5]
    # correct (r=1) -> 0 whatever its share; failed with share > 0 -> ρ; share 0 -> 0; 0.4 < 0.5 is a failure
    assert A.repair_phi(r, p, rho=0.5).tolist() == [0.0, 0.5, 0.0, 0.5, 0.5]
    assert A.repair_phi(r, p, rho=0.5, phi="share").tolist() == [0.0, 0.125, 0.0, 0.5, 0.25]
    # success_threshold moves which trajectories count as failed
    assert A.repair_phi(r, p, rho=0.5, success_threshold=0.3).tolist() == [0.0, 0.5, 0.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="phi"):
        A.repair_phi(r, p, phi="mean")


def test_ibpo_shaped_rule_is_grpo_on_shaped_rewards():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    p = torch.tensor([0.0, 1.0, 0.5, 0.0])
    rs = torch.tensor([1.0, 0.3, 0.15, 0.0])
    m, s = rs.mean(), rs.std()
    expected = (rs - m) / (s + 1e-6)
    old = dict(sign_rule="shaped", phi="share")
    assert torch.allclose(A.ibpo_advantages(r, [0] * 4, p, **old), expected, atol=1e-6)
    # repaired failures rank above unrepaired ones
    adv = A.ibpo_advantages(r, [0] * 4, p, **old)
    assert adv[1] > adv[2] > adv[3]
    # the safe rule keeps the ranking (share φ: 0.3 and 0.15 bonuses), with every failure <= 0
    safe = A.ibpo_advantages(r, [0] * 4, p, phi="share")
    assert safe[1] > safe[2] > safe[3] and (safe[1:] < 0).all()


def _sd(x):  # unbiased std by hand
    m = sum(x) / len(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))


# the issue's cases (λ = 0.6, ρ = 0.5, so a repaired failure's shaped reward is λρ = 0.3)
ISSUE_CASES = {
    # name: (rewards, repair_success, old shaped-rule value on the repaired failures)
    "three_repaired": ([1, 0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0], 0.183),
    "one_repaired": ([1, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0], 0.388),
    "all_failed": ([0, 0, 0, 0], [1, 1, 0, 0], 0.866),
}


@pytest.mark.parametrize("case", list(ISSUE_CASES))
def test_issue_cases_old_rule_reproduces_the_defect(case):
    r, p, old = ISSUE_CASES[case]
    adv = A.ibpo_advantages(r, [0] * len(r), p, sign_rule="shaped")
    repaired = [i for i, x in enumerate(p) if x > 0]
    # R' = R + 0.3 on repaired failures; GRPO on R' puts them above the mean
    rs = [ri + 0.3 * (pi > 0) for ri, pi in zip(r, p)]
    m, s = sum(rs) / len(rs), _sd(rs)
    for i in repaired:
        assert float(adv[i]) == pytest.approx((rs[i] - m) / (s + 1e-6), abs=1e-5)
        assert float(adv[i]) == pytest.approx(old, abs=5e-4)


@pytest.mark.parametrize("case", list(ISSUE_CASES))
def test_issue_cases_safe_rule_hand_values(case):
    r, p, _ = ISSUE_CASES[case]
    G = len(r)
    rs = [ri + 0.3 * (pi > 0) for ri, pi in zip(r, p)]
    m, s = sum(rs) / G, _sd(rs) + 1e-6  # shaped mean and std
    mr = sum(r) / G
    sr = _sd(r) + 1e-6 if len(set(r)) > 1 else None  # unshaped; an all-failed group has no GRPO signal
    adv = A.ibpo_advantages(r, [0] * G, p)
    for i in range(G):
        published = (rs[i] - m) / s
        if r[i] == 1:  # correct: the shaped advantage, as published
            expected = published
        else:  # failed: published, but at most (1 - λφ) of its GRPO penalty
            grpo = (r[i] - mr) / sr if sr else 0.0
            expected = min(published, min(0.0, grpo) * (1 - 0.3 * (p[i] > 0)))
        assert float(adv[i]) == pytest.approx(expected, abs=1e-5), i
    # the hand values, written out. GRPO penalty of a failure among [1,0,0,0,0,0,0,0]: -0.125 / sqrt(0.125)
    grpo_fail = -0.125 / math.sqrt(0.125)  # -0.3536
    if case == "three_repaired":
        s3 = math.sqrt(0.81875 / 7)  # R' = [1, .3, .3, .3, 0, 0, 0, 0]: mean 0.2375
        assert float(adv[1]) == pytest.approx(0.7 * grpo_fail, abs=1e-5)  # -0.2475 (published +0.183)
        assert float(adv[4]) == pytest.approx(-0.2375 / s3, abs=1e-5)  # -0.6944 (published, unchanged)
    if case == "one_repaired":
        s1 = math.sqrt(0.87875 / 7)  # R' = [1, .3, 0 x 6]: mean 0.1625
        assert float(adv[1]) == pytest.approx(0.7 * grpo_fail, abs=1e-5)  # -0.2475 (published +0.388)
        assert float(adv[2]) == pytest.approx(-0.1625 / s1, abs=1e-5)  # -0.4586 (published, unchanged)
    if case == "all_failed":
        s0 = math.sqrt(0.09 / 3)  # R' = [.3, .3, 0, 0]: mean 0.15
        assert float(adv[0]) == 0.0 and float(adv[1]) == 0.0  # published +0.866; no GRPO penalty to shrink
        assert float(adv[2]) == pytest.approx(-0.15 / s0, abs=1e-5)  # -0.8660 (published, unchanged)


@pytest.mark.parametrize("case", list(ISSUE_CASES))
def test_issue_cases_no_positive_credit_on_failed_tokens(case):
    r, p, _ = ISSUE_CASES[case]
    G = len(r)
    # every repair edited tokens 1 and 2 of 4 (edit masks of unrepaired ones are ignored)
    edits = [[0, 1, 1, 0]] * G
    b = make_batch([float(x) for x in r], [0] * G, lens=[4] * G, repair_success=p, edit_masks=edits)
    adv = A.get_estimator("ibpo")(b)
    failed = torch.tensor(r) < 0.5
    assert (adv[failed] <= 0).all()
    assert A.failed_positive_share(adv, b.rewards, b.response_mask) == 0.0
    repaired = [i for i in range(G) if p[i] > 0]
    unrepaired = [i for i in range(G) if p[i] == 0 and r[i] == 0]
    has_correct = max(r) == 1
    for i in repaired:
        if has_correct:
            assert (adv[i, 1:3] < 0).all()  # edited tokens: strictly negative
        assert (adv[i, [0, 3]] == 0).all()  # unedited tokens: zero
        for j in unrepaired:  # a near miss is penalised less per token than an unrepaired failure
            assert (adv[j] < 0).all() and (adv[i, 1:3].abs() < adv[j, 1:3].abs()).all()
    # the old rule: positive credit on exactly the edited tokens of the repaired failures
    old = A.get_estimator("ibpo")(b, sign_rule="shaped")
    assert (old[repaired][:, 1:3] > 0).all()
    share = A.failed_positive_share(old, b.rewards, b.response_mask)
    # credited failed tokens: 2 per repaired failure, 4 per unrepaired one; positive: the repaired ones'
    assert share == pytest.approx(2 * len(repaired) / (2 * len(repaired) + 4 * len(unrepaired)))


def test_safe_rule_edge_cases():
    g = [0] * 4
    # equal rewards, no repairs: nothing to learn
    assert torch.equal(A.ibpo_advantages([0, 0, 0, 0], g, [0, 0, 0, 0]), torch.zeros(4))
    # all failed and all repaired (indicator φ equal): R' constant -> 0
    assert torch.equal(A.ibpo_advantages([0, 0, 0, 0], g, [1, 0.5, 1, 0.25]), torch.zeros(4))
    # with the share φ they differ (R' = .3, .15, .3, .075; mean .20625): the published value where it is
    # negative, 0 where it is positive (an all-failed group has no GRPO penalty to shrink)
    sh = A.ibpo_advantages([0, 0, 0, 0], g, [1, 0.5, 1, 0.25], phi="share")
    assert sh[0] == sh[2] == 0 > sh[1] > sh[3]
    pub = A.ibpo_advantages([0, 0, 0, 0], g, [1, 0.5, 1, 0.25], phi="share", sign_rule="shaped")
    assert torch.equal(sh[[1, 3]], pub[[1, 3]]) and (pub[[0, 2]] > 0).all()
    # graded failure above the group mean: GRPO would give it +, the safe rule 0
    r = [0.4, 0.0, 0.0, 0.0]
    assert float(A.grpo_advantages(r, g)[0]) > 0
    assert float(A.ibpo_advantages(r, g, [0, 0, 0, 0])[0]) == 0.0
    # success_threshold decides who failed: with 0.3, 0.4 is a success and keeps its shaped credit
    hi = A.ibpo_advantages(r, g, [0, 0, 0, 0], success_threshold=0.3)
    assert torch.allclose(hi, A.grpo_advantages(r, g), atol=1e-6)
    # lam = 0: GRPO exactly for 0/1 rewards
    r2, g2 = random_groups(5)
    p2 = torch.rand(len(r2))
    assert torch.allclose(A.ibpo_advantages(r2, g2, p2, lam=0.0), A.grpo_advantages(r2, g2), atol=1e-6)
    # λρ >= 1: the repaired failure would be worth a success; its penalty factor is clamped to 0
    big = A.ibpo_advantages([1, 0, 0, 0], g, [0, 1, 0, 0], lam=2.0, rho=0.5)
    assert float(big[1]) == 0.0 and float(big[2]) < 0
    with pytest.raises(ValueError, match="sign_rule"):
        A.ibpo_advantages([1, 0], [0, 0], [0, 1], sign_rule="sign")


def test_safe_rule_is_monotone_in_phi_and_never_above_unrepaired():
    # G = 16, one correct, one repaired: a failure far above the shaped mean (R' = 0.3 > 1.3/16);
    # -|shaped advantage| would penalise it MORE than the unrepaired ones; the safe rule does not:
    # GRPO penalty -(1/16) / 0.25 = -0.25, times 1 - 0.3
    r = [1.0] + [0.0] * 15
    p = [0.0, 1.0] + [0.0] * 14
    adv = A.ibpo_advantages(r, [0] * 16, p)
    assert adv[2] < adv[1] < 0
    assert float(adv[1]) == pytest.approx(-0.25 * 0.7, abs=1e-5)
    # every failure repaired: R' is affine in R, so the published advantage is GRPO's, and it is kept
    allrep = A.ibpo_advantages([1.0] + [0.0] * 7, [0] * 8, [0.0] + [1.0] * 7)
    assert torch.allclose(allrep, A.grpo_advantages([1.0] + [0.0] * 7, [0] * 8), atol=1e-5)
    prev = None
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        a = float(A.ibpo_advantages(r, [0] * 16, [0.0, share] + [0.0] * 14, phi="share")[1])
        assert a < 0 and (prev is None or a >= prev)
        prev = a


def test_failed_positive_share_and_active_ratio_by_hand():
    adv = torch.tensor([[1.0, -1.0, 0.0], [0.5, 0.0, 0.0], [-2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    r = [0.0, 1.0, 0.0]
    # failed rows 0 and 2; credited trained tokens: (0,0)+, (0,1)-, (2,0)- [(2,1) is off-mask] -> 1/3
    assert A.failed_positive_share(adv, r, mask) == pytest.approx(1 / 3)
    # without a mask (2,1) counts too: 2 positive of 4
    assert A.failed_positive_share(adv, r) == pytest.approx(2 / 4)
    assert math.isnan(A.failed_positive_share(torch.zeros(3, 3), r, mask))
    # active tokens: 6 trained, non-zero at (0,0), (0,1), (1,0), (2,0) -> 4/6
    assert A.active_token_ratio(adv, mask) == pytest.approx(4 / 6)
    assert math.isnan(A.active_token_ratio(adv, torch.zeros(3, 3)))
    with pytest.raises(ValueError, match="rewards"):
        A.failed_positive_share(adv, [0.0, 1.0], mask)


def test_anchors_only_and_train_mask():
    b = _ibpo_batch()
    adv = A.get_estimator("ibpo")(b)
    anc = A.get_estimator("ibpo")(b, anchors_only=True)
    correct = b.rewards >= 0.5
    assert (anc[correct] == 0).all() and (adv[correct] != 0).any()
    assert torch.equal(anc[~correct], adv[~correct])  # failures keep their credit and baseline
    m = A.train_mask(b.rewards, b.response_mask, anchors_only=True)
    assert torch.equal(m[~correct], b.response_mask[~correct]) and (m[correct] == 0).all()
    assert torch.equal(A.train_mask(b.rewards, b.response_mask), b.response_mask)
    with pytest.raises(ValueError, match="anchors_only"):
        A.get_estimator("ibpo")(b, anchors_only="yes")


def test_ibpo_lambda_zero_no_token_mask_equals_grpo():
    r, g = random_groups(3)
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 7, size=len(r)).tolist()
    p = np.where(r.numpy() < 0.5, rng.uniform(size=len(r)), 0.0)
    p[::2] = 0.0  # some failures unrepaired, or (indicator φ) every group's R' would be affine in R
    edits = [rng.integers(0, 2, size=n).astype(bool) for n in lens]
    for i, n in enumerate(lens):
        edits[i][0] = True
    b = make_batch(r, g, lens=lens, repair_success=p, edit_masks=edits)
    grpo = A.get_estimator("grpo")(b)
    assert torch.allclose(A.get_estimator("ibpo")(b, lam=0.0, token_mask=False), grpo, atol=1e-6)
    assert torch.allclose(A.get_estimator("ibpo")(b, shaping=False, token_mask=False), grpo, atol=1e-6)
    # with shaping on, something differs (there are repaired failures in a mixed group)
    assert not torch.allclose(A.get_estimator("ibpo")(b, token_mask=False), grpo, atol=1e-4)


def _ibpo_batch():
    # group 0: one correct, one repaired failure, one unrepaired failure; group 1: correct + repaired
    return make_batch(
        [1.0, 0.0, 0.0, 1.0, 0.0],
        [0, 0, 0, 1, 1],
        lens=[3, 4, 3, 2, 5],
        repair_success=[0.0, 1.0, 0.0, 0.0, 0.5],
        edit_masks=[[1, 1, 0], [0, 1, 1, 0], [1, 0, 0], [0, 1], [0, 0, 0, 0, 1]],
    )


def test_ibpo_token_credit_only_on_edited_tokens_of_failed():
    b = _ibpo_batch()
    adv = A.get_estimator("ibpo")(b)
    seq = A.ibpo_advantages(b.rewards, b.group_ids, b.repair_success)
    mask, edit = b.response_mask, b.edit_mask
    # correct trajectories keep sequence credit on all tokens, edit masks ignored
    for i in (0, 3):
        assert torch.allclose(adv[i], seq[i] * mask[i])
    # repaired failures: credit only where edited
    for i in (1, 4):
        assert torch.allclose(adv[i], seq[i] * edit[i])
        assert (adv[i][edit[i] == 0] == 0).all()
    # failed without successful repair: sequence fallback by default, zero on request
    assert torch.allclose(adv[2], seq[2] * mask[2])
    z = A.get_estimator("ibpo")(b, no_repair="zero")
    assert (z[2] == 0).all() and torch.allclose(z[1], adv[1])


def test_ibpo_renormalise_keeps_sequence_sum():
    b = _ibpo_batch()
    seq = A.ibpo_advantages(b.rewards, b.group_ids, b.repair_success)
    adv = A.get_estimator("ibpo")(b, renormalize=True)
    lens = b.response_mask.sum(1)
    assert torch.allclose(adv.sum(1), seq * lens, atol=1e-6)
    assert (adv[1][b.edit_mask[1] == 0] == 0).all()


def test_ibpo_without_edit_masks_falls_back_to_sequence():
    b = _ibpo_batch().replace(edit_masks=None)
    seq = A.ibpo_advantages(b.rewards, b.group_ids, b.repair_success)
    assert torch.allclose(A.get_estimator("ibpo")(b), seq[:, None] * b.response_mask)


def test_ibpo_empty_edit_with_success_is_an_error_by_default():
    b = make_batch([1.0, 0.0], [0, 0], lens=[2, 2], repair_success=[0.0, 1.0], edit_masks=[[0, 0], [0, 0]])
    with pytest.raises(ValueError, match="edit_mask"):
        A.get_estimator("ibpo")(b)
    seq = A.ibpo_advantages(b.rewards, b.group_ids, b.repair_success)
    assert torch.allclose(A.get_estimator("ibpo")(b, empty_edit="sequence")[1], seq[1] * torch.ones(2))
    assert (A.get_estimator("ibpo")(b, empty_edit="zero")[1] == 0).all()
    # an all-False mask with repair_success 0 just means "no edit info"
    b0 = b.replace(repair_success=torch.tensor([0.0, 0.0]))
    assert torch.isfinite(A.get_estimator("ibpo")(b0)).all()


def test_ibpo_respects_response_mask():
    b = _ibpo_batch()
    rm = [np.ones(n, dtype=bool) for n in (3, 4, 3, 2, 5)]
    rm[0][0] = False
    rm[1][1] = False
    adv = A.get_estimator("ibpo")(b.replace(response_masks=rm))
    assert adv[0, 0] == 0 and adv[1, 1] == 0 and adv[1, 2] != 0


def test_ibpo_repair_advantages():
    orig = _ibpo_batch()
    rep = make_batch([1.0, 1.0], [0, 1], lens=[4, 6], edit_masks=[[0, 1, 1, 0], [0, 0, 0, 0, 1, 1]])
    adv = A.ibpo_repair_advantages(rep, orig, [1, 4], lam=0.6, rho=0.5)
    rs = A.shaped_rewards(orig.rewards, orig.repair_success)
    g0, g1 = rs[:3], rs[3:]
    a0 = (1.0 - g0.mean()) / (g0.std() + 1e-6)
    a1 = (1.0 - g1.mean()) / (g1.std() + 1e-6)
    assert torch.allclose(adv[0], (a0 * rep.edit_mask[0]).float(), atol=1e-6)
    assert torch.allclose(adv[1], (a1 * rep.edit_mask[1]).float(), atol=1e-6)
    with pytest.raises(ValueError, match="source"):
        A.ibpo_repair_advantages(rep, orig, [1])
    with pytest.raises(ValueError, match="source"):
        A.ibpo_repair_advantages(rep, orig, [1, 9])


def test_ibpo_repair_advantages_constant_group_is_finite():
    orig = make_batch([0.0, 0.0], [0, 0], repair_success=[1.0, 1.0])
    rep = make_batch([1.0], [0], edit_masks=[[1, 1, 0]])
    adv = A.ibpo_repair_advantages(rep, orig, [0])
    assert torch.isfinite(adv).all()
    assert torch.allclose(adv[0], torch.tensor([0.7, 0.7, 0.0]), atol=1e-6)


# ----------------------------------------------------------------------------- step-level
def test_prefix_tree_steps_sum_to_r_minus_mean():
    rng = np.random.default_rng(0)
    for _ in range(5):
        G = int(rng.integers(2, 8))
        # few distinct step keys so prefixes are shared; some trajectories are prefixes of others
        seqs = [[int(k) for k in rng.integers(0, 2, size=rng.integers(1, 5))] for _ in range(G)]
        r = rng.integers(0, 2, size=G).astype(float)
        steps = A.prefix_tree_step_advantages(seqs, r)
        for i in range(G):
            assert len(steps[i]) == len(seqs[i])
            assert abs(steps[i].sum() - (r[i] - r.mean())) < 1e-12


def test_prefix_tree_hand_values():
    # a: (x, y) r=1 ; b: (x, z) r=0 ; c: (w,) r=0     root mean = 1/3, V(x) = 1/2
    steps = A.prefix_tree_step_advantages([["x", "y"], ["x", "z"], ["w"]], [1.0, 0.0, 0.0])
    assert np.allclose(steps[0], [1 / 2 - 1 / 3, 1 - 1 / 2])
    assert np.allclose(steps[1], [1 / 2 - 1 / 3, 0 - 1 / 2])
    assert np.allclose(steps[2], [0 - 1 / 3])
    # shrinkage pulls V(x) toward the root: (2·0.5 + 2·1/3) / 4
    shr = A.prefix_tree_step_advantages([["x", "y"], ["x", "z"], ["w"]], [1.0, 0.0, 0.0], shrinkage=2.0)
    vx = (2 * 0.5 + 2 / 3) / 4
    assert np.allclose(shr[0], [vx - 1 / 3, 1 - vx])


def test_prefix_tree_estimator_tokens_get_step_advantage():
    resp = [[5, 6, 7], [5, 8], [9, 9, 9, 9]]
    spans = [[(0, 1), (1, 3)], [(0, 1), (1, 2)], [(0, 4)]]
    b = make_batch([1.0, 0.0, 0.0], [0, 0, 0], response_ids=resp, step_spans=spans)
    adv = A.get_estimator("prefix_tree")(b)
    assert torch.allclose(adv[0, :3], torch.tensor([1 / 6, 1 / 2, 1 / 2]), atol=1e-6)
    assert torch.allclose(adv[1, :2], torch.tensor([1 / 6, -1 / 2]), atol=1e-6)
    assert torch.allclose(adv[2], torch.full((4,), -1 / 3), atol=1e-6)
    assert adv[0, 3] == 0 and adv[1, 2:].abs().sum() == 0
    # one step per response: reduces to Dr. GRPO
    nb = b.replace(step_spans=None)
    assert torch.allclose(A.get_estimator("prefix_tree")(nb), A.get_estimator("dr_grpo")(nb), atol=1e-6)
    # group scaling divides by the reward std
    s = A.get_estimator("prefix_tree")(b, scale="group")
    assert torch.allclose(s, adv / (b.rewards.double().std() + 1e-6).float(), atol=1e-6)


def test_prefix_tree_rejects_non_tiling_spans():
    b = make_batch([1.0, 0.0], [0, 0], lens=[3, 3], step_spans=[[(0, 1)], [(0, 3)]])
    with pytest.raises(ValueError, match=r"step_spans\[0\]"):  # names the trajectory
        A.get_estimator("prefix_tree")(b)
    gap = make_batch([1.0, 0.0], [0, 0], lens=[3, 3], step_spans=[[(0, 3)], [(0, 1), (2, 3)]])
    with pytest.raises(ValueError, match=r"step_spans\[1\]"):
        A.get_estimator("prefix_tree")(gap)


def test_vineppo():
    b = make_batch(
        [1.0, 0.0], [0, 0], lens=[3, 2], step_spans=[[(0, 1), (1, 3)], [(0, 2)]],
        step_values=[[0.5, 0.75, 1.0], [0.5, 0.0]],
    )
    adv = A.get_estimator("vineppo")(b)
    assert torch.allclose(adv, torch.tensor([[0.25, 0.25, 0.25], [-0.5, -0.5, 0.0]]))
    with pytest.raises(ValueError, match="step_values"):
        A.get_estimator("vineppo")(b.replace(step_values=None))
    with pytest.raises(ValueError, match="step_spans"):
        A.get_estimator("vineppo")(b.replace(step_spans=None))
    with pytest.raises(ValueError, match="step_values"):
        A.get_estimator("vineppo")(b.replace(step_values=[[0.5, 1.0], [0.5, 0.0]]))


# ----------------------------------------------------------------------------- shapes, finiteness, validation
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "ibpo", "prefix_tree"])
@pytest.mark.parametrize("seed", range(4))
def test_estimators_shape_masked_and_finite(name, seed):
    r, g = random_groups(seed, n_groups=4, max_size=6)
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 6, size=len(r)).tolist()
    p = np.where(r.numpy() < 0.5, rng.integers(0, 2, size=len(r)) * rng.uniform(size=len(r)), 0.0)
    edits = [np.zeros(n, dtype=bool) for n in lens]
    for i, n in enumerate(lens):
        if n:
            edits[i][rng.integers(0, n)] = True
    p = np.where(np.array(lens) == 0, 0.0, p)
    b = make_batch(r, g, lens=lens, repair_success=p, edit_masks=edits)
    adv = A.get_estimator(name)(b)
    assert adv.shape == (len(r), max(lens))
    assert torch.isfinite(adv).all()
    assert (adv[b.response_mask == 0] == 0).all()


def test_validation_errors():
    with pytest.raises(ValueError, match="group_ids"):
        A.grpo_advantages([0.0, 1.0], [0])
    with pytest.raises(ValueError, match="rewards"):
        A.grpo_advantages([], [])
    with pytest.raises(ValueError, match="NaN"):
        A.grpo_advantages([0.0, float("nan")], [0, 0])
    with pytest.raises(ValueError, match="scale"):
        A.grpo_advantages([0.0, 1.0], [0, 0], scale="groups")
    with pytest.raises(ValueError, match="std"):
        A.grpo_advantages([0.0, 1.0], [0, 0], std="biased")
    with pytest.raises(ValueError, match="repair_success"):
        A.ibpo_advantages([0.0, 1.0], [0, 0], [1.5, 0.0])
    with pytest.raises(ValueError, match="repair_success"):
        A.ibpo_advantages([0.0, 1.0], [0, 0], [0.5])
    with pytest.raises(ValueError, match="lam"):
        A.ibpo_advantages([0.0, 1.0], [0, 0], [0.5, 0.0], lam=-0.1)
    seq = torch.zeros(2)
    with pytest.raises(ValueError, match="edit_mask"):
        A.ibpo_token_advantages(seq, [0.0, 1.0], [0.5, 0.0], torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="response_mask"):
        A.ibpo_token_advantages(seq, [0.0, 1.0], [0.5, 0.0], torch.ones(3, 3), None)
    empty = RolloutBatch(prompt_ids=[], response_ids=[], rewards=[], group_ids=[])
    with pytest.raises(ValueError, match="empty"):
        A.get_estimator("grpo")(empty)


# ----------------------------------------------------------------------------- properties (mutation testing)
def test_metric_and_mask_errors_name_the_argument():
    adv = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"^advantages must be \[B, T\], got shape \(3,\)$"):
        A.failed_positive_share(adv[:, 0], [0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"^rewards has 2 entries but advantages has 3 rows$"):
        A.failed_positive_share(adv, [0.0, 1.0])
    with pytest.raises(ValueError, match=re.escape("response_mask has shape (3, 2) but advantages has (3, 4)")):
        A.failed_positive_share(adv, [0.0, 1.0, 0.0], torch.ones(3, 2))
    with pytest.raises(ValueError, match=re.escape("response_mask has shape (3, 2) but advantages has (3, 4)")):
        A.active_token_ratio(adv, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"^advantages must be \[B, T\], got shape \(4,\)$"):
        A.active_token_ratio(adv[0])
    with pytest.raises(ValueError, match=r"^response_mask must be \[B, T\], got shape \(3,\)$"):
        A.train_mask([0.0, 1.0, 0.0], torch.ones(3))
    with pytest.raises(ValueError, match=r"^anchors_only must be a bool, got 'yes'$"):
        A.train_mask([0.0, 1.0, 0.0], torch.ones(3, 4), anchors_only="yes")
    seq = torch.zeros(2)
    with pytest.raises(ValueError, match=r"^no_repair must be one of 'sequence', 'zero', got 'none'$"):
        A.ibpo_token_advantages(seq, [0.0, 1.0], None, torch.ones(2, 3), None, no_repair="none")
    with pytest.raises(ValueError, match=r"^empty_edit must be one of 'error', 'sequence', 'zero', got 'skip'$"):
        A.ibpo_token_advantages(seq, [0.0, 1.0], None, torch.ones(2, 3), None, empty_edit="skip")
    with pytest.raises(ValueError, match=r"^rewards has 3 entries but seq_adv has 2$"):
        A.ibpo_token_advantages(seq, [0.0, 1.0, 0.0], None, torch.ones(2, 3), None)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "edit_mask: failed trajectories [0, 2] have repair_success > 0 but no edited trained token; "
            "pass empty_edit='sequence' or 'zero' to accept this"
        ),
    ):
        A.ibpo_token_advantages(torch.zeros(3), [0.0, 1.0, 0.0], [1.0, 0.0, 0.5], torch.ones(3, 2), torch.zeros(3, 2))


def test_reward_at_the_threshold_is_a_success():
    # R >= success_threshold is correct: a trajectory exactly at 0.5 is not failed anywhere
    r = [0.5, 0.0, 1.0]
    adv = torch.tensor([[0.7, 0.7], [-0.3, 0.0], [0.2, 0.2]])
    # failed: row 1 only; its credited token is negative -> share 0 (row 0's positive tokens do not count)
    assert A.failed_positive_share(adv, r) == 0.0
    assert torch.equal(A.train_mask(r, torch.ones(3, 2), anchors_only=True), torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    # token credit: the 0.5 trajectory carries a repair share and an edit mask, but is correct: every token
    seq = torch.tensor([0.4, -0.6, 0.8])
    edit = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    tok = A.ibpo_token_advantages(seq, r, [1.0, 1.0, 1.0], torch.ones(3, 2), edit)
    assert torch.allclose(tok, torch.tensor([[0.4, 0.4], [0.0, -0.6], [0.8, 0.8]]))


@pytest.mark.parametrize("fn", [A.ibpo_advantages, A.ibpo_advantages_reference])
def test_shaping_treats_a_reward_at_the_threshold_as_correct(fn):
    # rewards [0.5, 0.0] in one group, both with a successful repair: only trajectory 1 is failed, so
    # φ = ρ·[0, 1] = [0, 0.5], R' = R + λφ = [0.5, 0.3]; GRPO on R' (unbiased std of two values
    # |0.5 - 0.3| / √2) gives ±0.1 / (0.1·√2 + eps) ≈ ±1/√2. The floor on the failure: A^R = -1/√2,
    # keep = 1 - λφ = 0.7, floor = -0.7/√2 > -1/√2, so min keeps -1/√2. A threshold-valued trajectory
    # counted as failed would get a φ of its own (R' = [0.8, 0.3]) or be floored to 0.
    assert A.repair_phi([0.5, 0.0], [1.0, 1.0]).tolist() == [0.0, 0.5]
    assert A.shaped_rewards([0.5, 0.0], [1.0, 1.0]).tolist() == pytest.approx([0.5, 0.3])
    adv = fn(torch.tensor([0.5, 0.0]), torch.tensor([0, 0]), torch.tensor([1.0, 1.0]), lam=0.6, rho=0.5, eps=1e-6)
    want = 0.1 / (0.2 / 2**0.5 + 1e-6)
    assert adv.tolist() == pytest.approx([want, -want], rel=1e-6)


def test_token_advantages_defaults_by_hand():
    # called with its defaults only (success_threshold 0.5, renormalize False, no_repair "sequence")
    seq = torch.tensor([0.9, -0.25, -0.5, -0.75])
    rewards = [1.0, 0.0, 0.0, 0.0]
    repair = [0.5, 1.0, 0.0, 0.25]  # a correct trajectory with a repair share: it gets no edit credit
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    edit = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.float32)
    out = A.ibpo_token_advantages(seq, rewards, repair, mask, edit)
    expected = torch.tensor(
        [
            [0.9, 0.9, 0.9, 0.0],  # correct: every trained token, edit mask ignored
            [0.0, -0.25, -0.25, 0.0],  # repaired failure: its edited tokens only, not scaled
            [-0.5, -0.5, 0.0, 0.0],  # unrepaired failure: sequence credit on every trained token
            [0.0, 0.0, 0.0, -0.75],
        ]
    )
    assert torch.equal(out, expected)
    assert out.dtype == torch.float32
    # renormalize=True: n_i/|E_i| = 4/2 and 4/1 on the repaired failures, nothing else changes
    ren = A.ibpo_token_advantages(seq, rewards, repair, mask, edit, renormalize=True)
    assert torch.equal(ren[[0, 2]], expected[[0, 2]])
    assert torch.equal(ren[1], torch.tensor([0.0, -0.5, -0.5, 0.0])) and torch.equal(ren[3], torch.tensor([0.0, 0.0, 0.0, -3.0]))


def test_repair_advantages_errors():
    orig = _ibpo_batch()
    rep = make_batch([1.0], [0], edit_masks=[[1, 1, 0]])
    empty = RolloutBatch(prompt_ids=[], response_ids=[], rewards=[], group_ids=[], edit_masks=[])
    with pytest.raises(ValueError, match=r"^repaired is empty: need at least one repaired trajectory$"):
        A.ibpo_repair_advantages(empty, orig, [])
    # the source index must be inside the original batch: len(original) is one past the end
    with pytest.raises(ValueError, match=re.escape("source holds indices [5] outside the original batch of 5")):
        A.ibpo_repair_advantages(rep, orig, [5])
    with pytest.raises(ValueError, match=re.escape("source holds indices [-1] outside the original batch of 5")):
        A.ibpo_repair_advantages(rep, orig, [-1])
    with pytest.raises(ValueError, match=r"^source has 2 entries but repaired has 1 trajectories$"):
        A.ibpo_repair_advantages(rep, orig, [1, 2])
    with pytest.raises(ValueError, match=r"^repaired.edit_masks is None"):
        A.ibpo_repair_advantages(rep.replace(edit_masks=None), orig, [1])


def test_token_advantages_output_dtype_follows_the_mask():
    seq = torch.tensor([0.5, -0.5])
    r = [1.0, 0.0]
    for mask, dtype in ((torch.ones(2, 2, dtype=torch.float64), torch.float64), (torch.ones(2, 2, dtype=torch.bool), torch.float32),
                        (torch.ones(2, 2, dtype=torch.long), torch.float32), (torch.ones(2, 2), torch.float32)):
        out = A.ibpo_token_advantages(seq, r, None, mask, None)
        assert out.dtype == dtype
        assert torch.equal(out, torch.tensor([[0.5, 0.5], [-0.5, -0.5]], dtype=dtype))


def test_estimators_on_a_one_trajectory_batch_and_the_empty_error():
    one = make_batch([1.0], [0], lens=[3], repair_success=[0.0], edit_masks=[[0, 1, 0]])
    for name in ("grpo", "dr_grpo", "rloo", "ibpo", "prefix_tree"):
        adv = A.get_estimator(name)(one)  # a singleton group: no baseline, zero advantage
        assert torch.equal(adv, torch.zeros(1, 3)), name
    empty = RolloutBatch(prompt_ids=[], response_ids=[], rewards=[], group_ids=[])
    with pytest.raises(ValueError, match=r"^batch is empty: need at least one trajectory$"):
        A.get_estimator("ibpo")(empty)


def test_repair_advantages_pass_every_shaping_setting_by_hand():
    # original group 0: R = [1, 0, 0.4], repair_success [0.5, 0.5, 0.25]; one repair of trajectory 1 (R = 1)
    orig = make_batch([1.0, 0.0, 0.4], [0, 0, 0], lens=[2, 2, 2], repair_success=[0.5, 0.5, 0.25])
    rep = make_batch([1.0], [0], lens=[3], edit_masks=[[0, 1, 1]])

    def by_hand(rs, divisor):
        m = sum(rs) / 3
        return (1.0 - m) / divisor

    def sd(x):
        m = sum(x) / len(x)
        return math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))

    # defaults (λ .6, ρ .5, indicator φ, threshold .5): R' = [1, .3, .7]; a correct one's share is not used
    rs = [1.0, 0.3, 0.7]
    got = A.ibpo_repair_advantages(rep, orig, [1])
    assert torch.allclose(got, torch.tensor([[0.0, 1.0, 1.0]]) * by_hand(rs, sd(rs) + 1e-6), atol=1e-6)
    # λ = 1, ρ = .4, share φ: R' = [1, 0 + .4·.5, .4 + .4·.25] = [1, .2, .5]
    rs = [1.0, 0.2, 0.5]
    got = A.ibpo_repair_advantages(rep, orig, [1], lam=1.0, rho=0.4, phi="share")
    assert torch.allclose(got[0, 1], torch.tensor(by_hand(rs, sd(rs) + 1e-6), dtype=torch.float32), atol=1e-6)
    # success_threshold .3: 0.4 is a success now, unshaped: R' = [1, .3, .4]
    rs = [1.0, 0.3, 0.4]
    got = A.ibpo_repair_advantages(rep, orig, [1], success_threshold=0.3)
    assert torch.allclose(got[0, 1], torch.tensor(by_hand(rs, sd(rs) + 1e-6), dtype=torch.float32), atol=1e-6)
    # batch scale: the std of all shaped rewards of the original batch (here one group), unbiased or population
    rs = [1.0, 0.3, 0.7]
    pop = math.sqrt(sum((v - sum(rs) / 3) ** 2 for v in rs) / 3)
    got = A.ibpo_repair_advantages(rep, orig, [1], scale="batch")
    assert torch.allclose(got[0, 1], torch.tensor(by_hand(rs, sd(rs) + 1e-6), dtype=torch.float32), atol=1e-6)
    got = A.ibpo_repair_advantages(rep, orig, [1], scale="batch", std="population")
    assert torch.allclose(got[0, 1], torch.tensor(by_hand(rs, pop + 1e-6), dtype=torch.float32), atol=1e-6)
    assert got.dtype == torch.float32


def test_prefix_tree_shrinkage_below_one_and_error_name():
    # V(x) = (2·0.5 + k·1/3) / (2 + k) with k = 0.5
    k = 0.5
    steps = A.prefix_tree_step_advantages([["x", "y"], ["x", "z"], ["w"]], [1.0, 0.0, 0.0], shrinkage=k)
    vx = (2 * 0.5 + k / 3) / (2 + k)
    assert np.allclose(steps[0], [vx - 1 / 3, 1 - vx]) and np.allclose(steps[1], [vx - 1 / 3, 0 - vx])
    with pytest.raises(ValueError, match=r"^shrinkage must be a finite number >= 0, got -1$"):
        A.prefix_tree_step_advantages([["x"]], [1.0], shrinkage=-1)


def test_broadcast_by_hand_any_mask_dtype_and_errors():
    seq = torch.tensor([0.5, -0.25])
    mask = [[1, 1, 0], [1, 0, 0]]
    expected = torch.tensor([[0.5, 0.5, 0.0], [-0.25, 0.0, 0.0]])
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bool, torch.long):
        out = A.broadcast(seq, torch.tensor(mask, dtype=dtype))
        assert out.dtype == (dtype if dtype.is_floating_point else torch.float32)
        assert torch.equal(out, expected.to(out.dtype)), dtype
        assert not torch.signbit(out[1, 1:]).any()  # 0.0, not -0.0, off the mask of a negative advantage
    with pytest.raises(ValueError, match=re.escape("response_mask must be [B, T] with B = 2, got shape (3, 3)")):
        A.broadcast(seq, torch.ones(3, 3))
    with pytest.raises(ValueError, match=re.escape("response_mask must be [B, T] with B = 2, got shape (2, 3)")):
        A.broadcast(seq[:, None], torch.ones(2, 3))  # seq_adv must be 1-D
    with pytest.raises(ValueError, match=re.escape("response_mask must be [B, T] with B = 2, got shape (2,)")):
        A.broadcast(seq, torch.ones(2))


@pytest.mark.parametrize(
    "base, spread, is_equal",
    [
        (0.0, 1e-5, True),  # spread exactly const_tol·max(1, |r|) near zero: equal
        (0.0, 1.5e-5, False),  # 1.5x the tolerance near zero: a real (tiny) difference
        (1000.0, 0.005, True),  # large magnitude: the tolerance is relative, 1e-5·1000 = 0.01
        (1000.0, 0.02, False),
        (-1000.0, 0.005, True),
    ],
)
def test_equal_reward_groups_near_zero_and_at_large_magnitude(base, spread, is_equal):
    r = torch.tensor([base, base + spread, base], dtype=torch.float64)
    g = [0, 0, 0]
    for fn in (A.grpo_advantages, A.grpo_advantages_reference, A.rloo_advantages, A.rloo_advantages_reference):
        adv = fn(r, g)
        if is_equal:
            assert torch.equal(adv, torch.zeros(3, dtype=torch.float64)), fn.__name__
        else:
            assert adv[1] > 0 > adv[0] and adv[0] == adv[2], fn.__name__
    # the sequence-level IBPO rule (both sign rules, and the reference twin) treats it the same way
    for rule in A.SIGN_RULES:
        for fn in (A.ibpo_advantages, A.ibpo_advantages_reference):
            adv = fn(r, g, None, sign_rule=rule)
            assert bool((adv == 0).all()) == is_equal, (fn.__name__, rule)


def test_reference_twins_by_hand_and_in_float64():
    # the plain-loop twins are what the vectorised code is held to, so they are checked by hand too
    r = torch.tensor([0.0, 1.0], dtype=torch.float64)
    bsd = 1 / math.sqrt(2)  # unbiased std of the whole batch [0, 1]
    for fn in (A.grpo_advantages, A.grpo_advantages_reference):
        assert torch.allclose(fn(r, [0, 0], eps=0.5, scale="batch"), torch.tensor([-0.5, 0.5], dtype=torch.float64) / (bsd + 0.5), rtol=1e-12)
        assert torch.allclose(fn(r, [0, 0]), torch.tensor([-0.5, 0.5], dtype=torch.float64) / (bsd + 1e-6), rtol=1e-12)
    # float noise in a group is not blown up by eps in the twins either
    noisy = torch.tensor([0.5, 0.5 + 1e-7, 0.5 - 1e-7], dtype=torch.float64)
    for fn in (A.grpo_advantages_reference, A.rloo_advantages_reference):
        assert torch.equal(fn(noisy, [0, 0, 0]), torch.zeros(3, dtype=torch.float64))
    # float64 in, float64 arithmetic out (no float32 round trip)
    r3 = torch.tensor([0.1, 0.7, 0.35, 1.0], dtype=torch.float64)
    g3 = [0, 0, 0, 0]
    p3 = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    m = float(r3.mean())
    sd = float(r3.std())
    assert torch.allclose(A.grpo_advantages_reference(r3, g3), (r3 - m) / (sd + 1e-6), rtol=1e-13, atol=0)
    assert torch.allclose(A.rloo_advantages_reference(r3, g3), 4 / 3 * (r3 - m), rtol=1e-13, atol=0)
    for kw in ({}, dict(eps=0.5), dict(std="population"), dict(const_tol=0.7), dict(scale="batch", eps=0.25)):
        v = A.ibpo_advantages(r3, g3, p3, **kw)
        ref = A.ibpo_advantages_reference(r3, g3, p3, **kw)
        assert v.dtype == ref.dtype == torch.float64
        assert torch.allclose(v, ref, rtol=1e-12, atol=1e-15), kw
    # eps and std really reach the twin: different settings give different numbers
    assert not torch.allclose(A.ibpo_advantages_reference(r3, g3, p3, eps=0.5), A.ibpo_advantages_reference(r3, g3, p3))
    assert not torch.allclose(A.ibpo_advantages_reference(r3, g3, p3, std="population"), A.ibpo_advantages_reference(r3, g3, p3))
    # const_tol reaches it: a spread of 0.9 counts as equal with const_tol 1 -> all zero
    assert torch.equal(A.ibpo_advantages_reference(r3, g3, p3, const_tol=1.0), torch.zeros(4, dtype=torch.float64))
    # defaults: the twin's defaults are the vectorised function's
    assert torch.allclose(A.ibpo_advantages_reference(r3, g3, p3), A.ibpo_advantages(r3, g3, p3), rtol=1e-12)
    assert torch.allclose(A.grpo_advantages_reference(r3, g3), A.grpo_advantages(r3, g3), rtol=1e-12)


def test_reference_twin_errors_name_the_argument():
    r, g, p = [0.0, 1.0], [0, 0], [0.5, 0.0]
    with pytest.raises(ValueError, match=r"^sign_rule must be one of 'safe', 'shaped', got 'sign'$"):
        A.ibpo_advantages_reference(r, g, p, sign_rule="sign")
    with pytest.raises(ValueError, match=r"^phi must be one of 'indicator', 'share', got 'mean'$"):
        A.ibpo_advantages_reference(r, g, p, phi="mean")
    with pytest.raises(ValueError, match=r"^lam must be a finite number >= 0, got -1$"):
        A.ibpo_advantages_reference(r, g, p, lam=-1)
    with pytest.raises(ValueError, match=r"^rho must be a finite number >= 0, got -0.5$"):
        A.ibpo_advantages_reference(r, g, p, rho=-0.5)


def test_input_errors_name_the_argument_exactly():
    with pytest.raises(ValueError, match=re.escape("rewards must be 1-D [B], got shape (2, 2)")):
        A.grpo_advantages([[0.0, 1.0], [1.0, 0.0]], [0, 0])
    with pytest.raises(ValueError, match=r"^rewards is empty: need at least one trajectory$"):
        A.grpo_advantages([], [])
    with pytest.raises(ValueError, match=r"^rewards must be numeric, got dtype torch.complex64$"):
        A.grpo_advantages(torch.tensor([1 + 1j, 0j], dtype=torch.complex64), [0, 0])
    with pytest.raises(ValueError, match=re.escape("rewards contains NaN at trajectories [1, 3]")):
        A.grpo_advantages([0.0, math.nan, 1.0, math.nan], [0, 0, 0, 0])
    with pytest.raises(ValueError, match=re.escape("rewards must be finite (found ±inf)")):
        A.grpo_advantages([0.0, math.inf], [0, 0])
    with pytest.raises(ValueError, match=r"^group_ids must be integers$"):
        A.grpo_advantages([0.0, 1.0], [0.0, 0.5])
    # integral float ids are fine (ids from a float column): same groups as the ints
    assert torch.equal(A.grpo_advantages([0.0, 1.0, 1.0], [0.0, 0.0, 1.0]), A.grpo_advantages([0.0, 1.0, 1.0], [0, 0, 1]))
    with pytest.raises(ValueError, match=r"^eps must be a finite number >= 0, got -1$"):
        A.grpo_advantages([0.0, 1.0], [0, 0], eps=-1)
    with pytest.raises(ValueError, match=r"^const_tol must be a finite number >= 0, got -1$"):
        A.grpo_advantages([0.0, 1.0], [0, 0], const_tol=-1)
    with pytest.raises(ValueError, match=r"^const_tol must be a finite number >= 0, got -1$"):
        A.rloo_advantages([0.0, 1.0], [0, 0], const_tol=-1)
    with pytest.raises(ValueError, match=r"^scale must be one of 'group', 'batch', 'none', got 'groups'$"):
        A.grpo_advantages([0.0, 1.0], [0, 0], scale="groups")
    with pytest.raises(ValueError, match=r"^std must be one of 'unbiased', 'population', got 'biased'$"):
        A.grpo_advantages([0.0, 1.0], [0, 0], std="biased")
    with pytest.raises(ValueError, match=r"^repair_success contains NaN$"):
        A.ibpo_advantages([0.0, 1.0], [0, 0], [math.nan, 0.0])
    # 0 and 1 are in range; only the entries outside [0, 1] are listed
    with pytest.raises(ValueError, match=re.escape("repair_success must lie in [0, 1]; out of range at trajectories [1, 3]")):
        A.ibpo_advantages([0.0, 0.0, 1.0, 0.0, 0.0], [0] * 5, [0.0, -0.1, 1.0, 1.5, 0.5])
    with pytest.raises(ValueError, match=r"^success_threshold must be finite, got inf$"):
        A.repair_phi([0.0, 1.0], [0.5, 0.0], success_threshold=math.inf)
    with pytest.raises(ValueError, match=r"^rho must be a finite number >= 0, got -1$"):
        A.repair_phi([0.0, 1.0], [0.5, 0.0], rho=-1)
    with pytest.raises(ValueError, match=r"^phi must be one of 'indicator', 'share', got 'mean'$"):
        A.repair_phi([0.0, 1.0], [0.5, 0.0], phi="mean")
    with pytest.raises(ValueError, match=r"^lam must be a finite number >= 0, got -1$"):
        A.shaped_rewards([0.0, 1.0], [0.5, 0.0], lam=-1)
    with pytest.raises(ValueError, match=r"^sign_rule must be one of 'safe', 'shaped', got 'sign'$"):
        A.ibpo_advantages([0.0, 1.0], [0, 0], [0.5, 0.0], sign_rule="sign")


def test_shaping_settings_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.3], dtype=torch.float64)
    p = [0.5, 0.1, 0.0, 1.0]
    # repair_phi with its defaults: ρ = 0.5 on failures with a verified revision
    assert A.repair_phi(r, p).tolist() == [0.0, 0.5, 0.0, 0.5]
    # share φ keeps the share in float64 (0.1 is not rounded through float32)
    assert A.repair_phi(r, p, phi="share", rho=1.0).tolist() == [0.0, 0.1, 0.0, 1.0]
    # rho and success_threshold reach the shaping: λ = 0.5, ρ = 0.25 -> bonus 0.125; with threshold .2, .3 is a success
    assert A.shaped_rewards(r, p, lam=0.5, rho=0.25).tolist() == [1.0, 0.125, 0.0, 0.425]
    assert A.shaped_rewards(r, p, lam=0.5, rho=0.25, success_threshold=0.2).tolist() == [1.0, 0.125, 0.0, 0.3]
    # ... and the sequence advantage (shaped rule: GRPO on R')
    for kw, rs in (
        (dict(rho=0.25), [1.0, 0.15, 0.0, 0.45]),  # λ .6 · ρ .25 = .15
        (dict(success_threshold=0.2), [1.0, 0.3, 0.0, 0.3]),
    ):
        m = sum(rs) / 4
        sd = math.sqrt(sum((x - m) ** 2 for x in rs) / 3)
        got = A.ibpo_advantages(r, [0] * 4, p, sign_rule="shaped", **kw)
        assert torch.allclose(got, torch.tensor([(x - m) / (sd + 1e-6) for x in rs], dtype=torch.float64), atol=1e-12), kw


def test_zero_advantages_are_positive_zero_and_batch_scale_edges():
    # λρ >= 1: the repaired failure's factor is 0, so min(A', 0 · A^R) is a zero, and a +0.0 one
    big = A.ibpo_advantages([1, 0, 0, 0], [0] * 4, [0, 1, 0, 0], lam=2.0, rho=0.5)
    assert float(big[1]) == 0.0 and not torch.signbit(big[1])
    # one trajectory with batch scale: a singleton group, 0 (the batch std is never used)
    assert torch.equal(A.grpo_advantages([1.0], [0], scale="batch"), torch.zeros(1))
    # two trajectories with batch scale: the batch std of two rewards is used
    assert torch.allclose(A.grpo_advantages([0.0, 2.0], [0, 0], scale="batch"), torch.tensor([-1.0, 1.0]) / (math.sqrt(2) + 1e-6))


def test_prefix_tree_steps_keep_float64_rewards():
    # plain Python floats are read as float64 (no float32 round trip): the steps sum to r - mean exactly
    r = [0.1, 0.7, 0.35]
    steps = A.prefix_tree_step_advantages([["a", "b"], ["a", "c"], ["d"]], r)
    m = sum(r) / 3
    for i in range(3):
        assert abs(steps[i].sum() - (r[i] - m)) < 1e-15
    assert steps[2][0] == pytest.approx(0.35 - m, abs=1e-15)


def test_reference_twin_zeros_are_positive_zero():
    # the plain-loop twin also returns +0.0 where the factor 1 - λρ is 0 (λρ >= 1)
    ref = A.ibpo_advantages_reference([1, 0, 0, 0], [0] * 4, [0, 1, 0, 0], lam=2.0, rho=0.5)
    assert float(ref[1]) == 0.0 and not torch.signbit(ref[1])
    assert torch.equal(ref, A.ibpo_advantages([1, 0, 0, 0], [0] * 4, [0, 1, 0, 0], lam=2.0, rho=0.5))
