"""Tests for ibpo_lab.advantages: formulas on tiny groups, loop-vs-vectorised, IBPO rules."""

from __future__ import annotations

import math

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
    for scale in A.SCALES:
        v = A.ibpo_advantages(r, g, p, lam=0.6, rho=0.5, scale=scale)
        ref = A.ibpo_advantages_reference(r, g, p, lam=0.6, rho=0.5, scale=scale)
        assert torch.allclose(v, ref, atol=1e-6)


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
    v = A.ibpo_advantages(r, g, p, scale=scale)
    assert torch.isfinite(v).all()
    assert torch.allclose(v, A.ibpo_advantages_reference(r, g, p, scale=scale), rtol=1e-5, atol=1e-5)
    v = A.rloo_advantages(r, g)
    assert torch.allclose(v, A.rloo_advantages_reference(r, g), rtol=1e-5, atol=1e-3)


# ----------------------------------------------------------------------------- IBPO
def test_shaping_changes_only_failed_rewards():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    p = torch.tensor([0.7, 1.0, 0.5, 0.0])  # a value on a correct one must not be used
    rs = A.shaped_rewards(r, p, lam=0.6, rho=0.5)
    assert torch.allclose(rs, torch.tensor([1.0, 0.3, 0.15, 1.0], dtype=torch.float64))


def test_ibpo_sequence_is_grpo_on_shaped_rewards():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    p = torch.tensor([0.0, 1.0, 0.5, 0.0])
    rs = torch.tensor([1.0, 0.3, 0.15, 0.0])
    m, s = rs.mean(), rs.std()
    expected = (rs - m) / (s + 1e-6)
    assert torch.allclose(A.ibpo_advantages(r, [0] * 4, p), expected, atol=1e-6)
    # repaired failures rank above unrepaired ones
    adv = A.ibpo_advantages(r, [0] * 4, p)
    assert adv[1] > adv[2] > adv[3]


def test_ibpo_lambda_zero_no_token_mask_equals_grpo():
    r, g = random_groups(3)
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 7, size=len(r)).tolist()
    p = np.where(r.numpy() < 0.5, rng.uniform(size=len(r)), 0.0)
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
