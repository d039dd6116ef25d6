"""Tests for ibpo_lab.losses: gradients, clipping, aggregation, GSPO, KL, IS weights, registry."""

from __future__ import annotations

import math

import pytest
import torch

from ibpo_lab import losses as L


def rand_inputs(B=3, T=5, seed=0, spread=0.1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 2 - 0.1
    lp = old + spread * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, T, generator=g, dtype=dtype)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(dtype)
    mask[:, 0] = 1
    return lp, old, adv, mask


# ----------------------------------------------------------------------------- registry
def test_registry():
    assert set(L.list_losses()) >= {"ppo", "gspo"}
    assert L.get_loss("ppo") is L.ppo_loss
    with pytest.raises(ValueError, match="known losses: gspo, ppo"):
        L.get_loss("reinforce++")
    with pytest.raises(ValueError, match="registered twice"):
        L.register_loss("ppo")(lambda *a, **k: None)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", ["ppo", "gspo"])
@pytest.mark.parametrize("agg", L.AGG_MODES)
def test_gradcheck(name, agg):
    # small log-ratios: every ratio is well inside the clip range, away from the kinks
    lp, old, adv, mask = rand_inputs(spread=0.02)
    if name == "gspo":
        # GSPO-token's stop-gradient form is the true gradient of its value only when the
        # advantage is constant over a sequence (the GSPO setting)
        adv = adv[:, :1].expand_as(adv).contiguous()
    ref = old + 0.3
    fn = L.get_loss(name)

    def f(x):
        return fn(x, old, adv, mask, agg=agg, ref_logprobs=ref, kl_coef=0.1)[0]

    assert torch.autograd.gradcheck(f, (lp.clone().requires_grad_(),), eps=1e-6, atol=1e-5)


def test_gradcheck_with_clipped_tokens():
    lp, old, adv, mask = rand_inputs(spread=0.0)
    lp = lp.clone()
    lp[0, 0] = old[0, 0] + 0.7  # ratio ≈ 2: clipped when A > 0
    adv[0, 0] = 1.0
    assert torch.autograd.gradcheck(
        lambda x: L.ppo_loss(x, old, adv, mask, is_weights=torch.full_like(old, 0.5))[0],
        (lp.requires_grad_(),), eps=1e-6, atol=1e-5,
    )


@pytest.mark.parametrize("name", ["ppo", "gspo"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sgd_step_moves_logprob_with_advantage_sign(name, sign):
    torch.manual_seed(0)
    T, V = 4, 6
    logits = torch.nn.Parameter(torch.randn(T, V))
    tokens = torch.randint(0, V, (1, T))

    def logprobs():
        return torch.log_softmax(logits, -1).gather(-1, tokens.T).T  # [1, T]

    old = logprobs().detach()
    adv = torch.full((1, T), sign)
    loss, _ = L.get_loss(name)(logprobs(), old, adv, torch.ones(1, T))
    loss.backward()
    with torch.no_grad():
        logits -= 0.1 * logits.grad
    delta = logprobs().detach() - old
    assert (torch.sign(delta) == sign).all()


def test_gradient_zero_outside_mask():
    lp, old, adv, mask = rand_inputs(spread=0.05)
    x = lp.clone().requires_grad_()
    L.ppo_loss(x, old, adv, mask)[0].backward()
    assert (x.grad[mask == 0] == 0).all()


# ----------------------------------------------------------------------------- clipping
def test_clip_higher_is_asymmetric():
    old = torch.zeros(1, 4)
    # ratios: 0.75 (below 1-0.2), 0.85 (inside), 1.25 (inside 1+0.28), 1.35 (above 1+0.28)
    lp = torch.log(torch.tensor([[0.75, 0.85, 1.25, 1.35]])).requires_grad_()
    mask = torch.ones(1, 4)
    pos = torch.ones(1, 4)
    loss, m = L.ppo_loss(lp, old, pos, mask, clip_low=0.2, clip_high=0.28)
    loss.backward()
    # A > 0: only the token above 1+clip_high is clipped (zero gradient); low-ratio tokens never clip for A > 0
    assert lp.grad[0, 3] == 0 and (lp.grad[0, :3] != 0).all()
    assert m["clip_frac"] == pytest.approx(0.25) and m["clip_frac_high"] == pytest.approx(0.25)
    assert float(loss.detach()) == pytest.approx(-(0.75 + 0.85 + 1.25 + 1.28) / 4, rel=1e-6)
    lp2 = lp.detach().clone().requires_grad_()
    loss2, m2 = L.ppo_loss(lp2, old, -pos, mask, clip_low=0.2, clip_high=0.28)
    loss2.backward()
    # A < 0: only the token below 1-clip_low is clipped
    assert lp2.grad[0, 0] == 0 and (lp2.grad[0, 1:] != 0).all()
    assert m2["clip_frac_low"] == pytest.approx(0.25)
    assert float(loss2.detach()) == pytest.approx((0.8 + 0.85 + 1.25 + 1.35) / 4, rel=1e-6)


def test_ratio_exactly_at_boundary_is_not_clipped():
    old = torch.zeros(1, 1, dtype=torch.float64)
    lp = torch.tensor([[math.log(1.2)]], dtype=torch.float64, requires_grad=True)
    loss, m = L.ppo_loss(lp, old, torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64))
    assert m["clip_frac"] == 0.0 and float(loss.detach()) == pytest.approx(-1.2)


def test_metrics():
    lp, old, adv, mask = rand_inputs(spread=0.3, dtype=torch.float32)
    loss, m = L.ppo_loss(lp, old, adv, mask, ref_logprobs=old)
    r = torch.exp(lp - old)[mask > 0]
    assert m["ratio_mean"] == pytest.approx(float(r.mean()), rel=1e-5)
    assert m["ratio_min"] == pytest.approx(float(r.min()), rel=1e-5)
    assert m["ratio_max"] == pytest.approx(float(r.max()), rel=1e-5)
    assert m["approx_kl"] > 0 and m["kl_ref"] > 0
    assert all(isinstance(v, float) for v in m.values())
    assert 0 <= m["clip_frac"] <= 1


# ----------------------------------------------------------------------------- aggregation
def test_aggregation_modes_by_hand():
    v = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [5.0, 6.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # third sequence is fully masked
    assert float(L.aggregate(v, m, "token-mean")) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert float(L.aggregate(v, m, "seq-mean-token-mean")) == pytest.approx((2.0 + 4.0) / 2)
    assert float(L.aggregate(v, m, "seq-mean-token-sum")) == pytest.approx((6 + 4 + 0) / 3)
    assert float(L.aggregate(v, m, "seq-mean-token-sum-norm")) == pytest.approx(10 / (3 * 4))
    assert float(L.aggregate(v, m, "seq-mean-token-sum-norm", norm_len=10)) == pytest.approx(10 / 30)
    assert float(L.aggregate(v, torch.zeros_like(m), "token-mean")) == 0.0
    with pytest.raises(ValueError, match="agg"):
        L.aggregate(v, m, "sum")
    with pytest.raises(ValueError, match="norm_len"):
        L.aggregate(v, m, "seq-mean-token-sum-norm", norm_len=0)


def test_loss_uses_aggregation():
    lp, old, adv, mask = rand_inputs(spread=0.0)
    # at ratio 1 nothing clips: per-token loss = -A
    for agg in L.AGG_MODES:
        loss, _ = L.ppo_loss(lp, old, adv, mask, agg=agg)
        assert float(loss) == pytest.approx(float(L.aggregate(-adv, mask, agg)))


# ----------------------------------------------------------------------------- GSPO
def test_gspo_equals_ppo_with_one_token_per_sequence():
    lp, old, adv, _ = rand_inputs(B=5, T=4, spread=0.4)
    mask = torch.zeros_like(lp)
    mask[torch.arange(5), torch.tensor([0, 3, 1, 2, 0])] = 1
    a = lp.clone().requires_grad_()
    b = lp.clone().requires_grad_()
    la, ma = L.ppo_loss(a, old, adv, mask, clip_low=0.2, clip_high=0.28)
    lb, mb = L.gspo_loss(b, old, adv, mask, clip_low=0.2, clip_high=0.28)
    la.backward()
    lb.backward()
    assert float(la.detach()) == pytest.approx(float(lb.detach()), rel=1e-10)
    assert torch.allclose(a.grad, b.grad)
    assert ma["clip_frac"] == mb["clip_frac"]


def test_gspo_uses_sequence_geometric_mean_ratio():
    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = torch.tensor([[0.3, -0.1, 0.1]], dtype=torch.float64, requires_grad=True)
    adv = torch.ones(1, 3, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.float64)
    loss, m = L.gspo_loss(lp, old, adv, mask, clip_low=0.5, clip_high=0.5)
    s = math.exp(0.1)
    assert float(loss.detach()) == pytest.approx(-s)
    loss.backward()
    # each token's gradient is s·(-A)/T under token-mean
    assert torch.allclose(lp.grad, torch.full((1, 3), -s / 3, dtype=torch.float64))
    # a whole sequence clips together: s = e^0.1 > 1 + 0.05
    lp2 = lp.detach().clone().requires_grad_()
    L.gspo_loss(lp2, old, adv, mask, clip_low=0.05, clip_high=0.05)[0].backward()
    assert (lp2.grad == 0).all()


def test_gspo_gated_ratio_by_hand():
    # B = 2, T = 3; row 0: tokens 0 and 2 gated; row 1: all tokens trained, token 1 gated
    old = torch.zeros(2, 3, dtype=torch.float64)
    lp0 = torch.tensor([[0.2, 0.9, -0.1], [0.4, 0.1, -0.3]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, 0.5, 2.0], [1.0, -1.0, 0.5]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    gate = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.float64)  # (1, 2) is off-mask: ignored
    lp = lp0.clone().requires_grad_()
    loss, met = L.gspo_loss(lp, old, adv, mask, gate_mask=gate, clip_low=0.5, clip_high=0.5)
    w0 = math.exp((0.2 - 0.1) / 2)  # mean log-ratio over tokens 0 and 2 (token 1's 0.9 is not in it)
    w1 = math.exp(0.1)  # token 1 only
    # no clipping (|w - 1| < 0.5); token-mean over the 5 trained tokens of -A·w
    expected = -(w0 * (-1.0 + 0.5 + 2.0) + w1 * (1.0 - 1.0)) / 5
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # gradient of token t: -A_t · w_i / 5 (GSPO-token form), on every trained token
    g_exp = torch.tensor([[1.0 * w0, -0.5 * w0, -2.0 * w0], [-1.0 * w1, 1.0 * w1, 0.0]], dtype=torch.float64) / 5
    assert torch.allclose(lp.grad, g_exp)
    assert met["seq_ratio_mean"] == pytest.approx((w0 + w1) / 2)
    assert met["gate_frac"] == pytest.approx(3 / 5)
    # an ungated token's log-ratio does not enter w, and its own loss term is -A·w: the value is unchanged
    lp2 = lp0.clone()
    lp2[0, 1] += 0.7
    loss2, _ = L.gspo_loss(lp2, old, adv, mask, gate_mask=gate, clip_low=0.5, clip_high=0.5)
    assert float(loss2) == pytest.approx(expected, rel=1e-12)
    # while with the full gate (plain GSPO) it does
    loss3, _ = L.gspo_loss(lp2, old, adv, mask, clip_low=0.5, clip_high=0.5)
    loss4, _ = L.gspo_loss(lp0, old, adv, mask, clip_low=0.5, clip_high=0.5)
    assert float(loss3) != pytest.approx(float(loss4))


def test_gspo_credited_gate_uses_nonzero_advantages():
    old = torch.zeros(2, 4, dtype=torch.float64)
    lp = torch.tensor([[0.3, 0.05, -0.2, 0.6], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    adv = torch.tensor([[0.0, -1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # IBPO-like
    mask = torch.ones(2, 4, dtype=torch.float64)
    loss, met = L.gspo_loss(lp, old, adv, mask, gate="credited", clip_low=0.5, clip_high=0.5)
    w0 = math.exp((0.05 - 0.2) / 2)
    assert float(loss) == pytest.approx(-(-1.0 * w0 * 2) / 8, rel=1e-12)
    assert met["seq_ratio_mean"] == pytest.approx(w0)  # row 1 has no credited token
    assert met["gate_frac"] == pytest.approx(2 / 8)
    # same as passing that gate explicitly; different from the full-mask ratio
    explicit, _ = L.gspo_loss(lp, old, adv, mask, gate_mask=(adv != 0).double(), clip_low=0.5, clip_high=0.5)
    full, _ = L.gspo_loss(lp, old, adv, mask, clip_low=0.5, clip_high=0.5)
    assert float(explicit) == pytest.approx(float(loss)) and float(full) != pytest.approx(float(loss))
    # a sequence that clips on the gated tokens clips as a whole: w0 = e^-0.075 < 1 - 0.05, A < 0 -> no gradient
    x = lp.clone().requires_grad_()
    L.gspo_loss(x, old, adv, mask, gate="credited", clip_low=0.05, clip_high=0.05)[0].backward()
    assert (x.grad == 0).all()
    with pytest.raises(ValueError, match="gate"):
        L.gspo_loss(lp, old, adv, mask, gate="edited")


# ----------------------------------------------------------------------------- KL and IS
def test_kl_k3_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(1)
    a, b = -torch.rand(4, 6, generator=g) * 3, -torch.rand(4, 6, generator=g) * 3
    assert (L.kl_k3(a, b) >= 0).all()
    assert torch.equal(L.kl_k3(a, a), torch.zeros_like(a))
    assert torch.isfinite(L.kl_k3(a, a - 1e4)).all()
    d = b - a
    assert torch.allclose(L.kl_k3(a, b), torch.exp(d) - d - 1)


def test_kl_penalty_is_added():
    lp, old, adv, mask = rand_inputs(spread=0.0)
    ref = old - 0.5
    base, _ = L.ppo_loss(lp, old, adv, mask)
    with_kl, m = L.ppo_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.5)
    expected = float(base) + 0.5 * float(L.aggregate(L.kl_k3(lp, ref), mask))
    assert float(with_kl) == pytest.approx(expected)
    assert m["kl_ref"] > 0
    with pytest.raises(ValueError, match="ref_logprobs"):
        L.ppo_loss(lp, old, adv, mask, kl_coef=0.1)


def test_truncated_is_weights():
    beh = torch.log(torch.tensor([[0.5, 0.1, 0.4]]))
    tgt = torch.log(torch.tensor([[0.25, 0.5, 0.4]])).requires_grad_()
    w = L.truncated_is_weights(beh, tgt, cap=2.0)
    assert torch.allclose(w, torch.tensor([[0.5, 2.0, 1.0]]))
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap"):
        L.truncated_is_weights(beh, tgt, cap=0)


def test_is_weights_scale_the_token_loss():
    lp, old, adv, mask = rand_inputs(spread=0.0)
    w = torch.full_like(lp, 0.5)
    a, _ = L.ppo_loss(lp, old, adv, mask)
    b, _ = L.ppo_loss(lp, old, adv, mask, is_weights=w)
    assert float(b) == pytest.approx(0.5 * float(a))


# ----------------------------------------------------------------------------- validation
def test_validation():
    lp, old, adv, mask = rand_inputs()
    with pytest.raises(ValueError, match="advantages"):
        L.ppo_loss(lp, old, adv[:, :2], mask)
    with pytest.raises(ValueError, match="mask"):
        L.ppo_loss(lp, old, adv, mask * 0.5 + 0.25)
    with pytest.raises(ValueError, match="clip_low"):
        L.ppo_loss(lp, old, adv, mask, clip_low=1.0)
    with pytest.raises(ValueError, match="agg"):
        L.gspo_loss(lp, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="old_logprobs"):
        L.ppo_loss(lp, old[0], adv, mask)
    with pytest.raises(ValueError, match="is_weights"):
        L.ppo_loss(lp, old, adv, mask, is_weights=torch.ones(2, 2))
