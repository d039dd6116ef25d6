"""Tests for ibpo_lab.losses: gradients, clipping, aggregation, GSPO, KL, IS weights, registry."""

from __future__ import annotations

import math
import re

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


# ----------------------------------------------------------------------------- properties (mutation testing)
def test_error_messages_name_the_bad_argument():
    lp, old, adv, mask = rand_inputs()
    esc = re.escape
    with pytest.raises(ValueError, match=r"^logprobs must be a torch\.Tensor, got list$"):
        L.ppo_loss(lp.tolist(), old, adv, mask)
    with pytest.raises(ValueError, match=r"^logprobs must be \[B, T\], got shape \(3,\)$"):
        L.ppo_loss(lp[:, 0], old, adv, mask)
    with pytest.raises(ValueError, match=esc("old_logprobs has shape (3, 4) but logprobs has (3, 5)")):
        L.ppo_loss(lp, old[:, :4], adv, mask)
    with pytest.raises(ValueError, match=esc("advantages has shape (3, 4) but logprobs has (3, 5)")):
        L.ppo_loss(lp, old, adv[:, :4], mask)
    # a mask of another shape is refused up front (not a broadcasting error later)
    with pytest.raises(ValueError, match=esc("mask has shape (3, 6) but logprobs has (3, 5)")):
        L.ppo_loss(lp, old, adv, torch.ones(3, 6, dtype=lp.dtype))
    with pytest.raises(ValueError, match=esc("ref_logprobs has shape (3, 4) but logprobs has (3, 5)")):
        L.ppo_loss(lp, old, adv, mask, ref_logprobs=old[:, :4])
    with pytest.raises(ValueError, match=esc("is_weights has shape (2, 2) but logprobs has (3, 5)")):
        L.ppo_loss(lp, old, adv, mask, is_weights=torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"^gate_mask must hold only 0/1 \(or bool\) values$"):
        L.gspo_loss(lp, old, adv, mask, gate_mask=mask * 0.5)
    with pytest.raises(ValueError, match=r"^mask must hold only 0/1 \(or bool\) values$"):
        L.aggregate(adv, mask * 2)
    with pytest.raises(ValueError, match=r"^values must be \[B, T\], got shape \(5,\)$"):
        L.aggregate(adv[0], mask[0])
    with pytest.raises(
        ValueError,
        match=esc("agg must be one of token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm, got 'sum'"),
    ):
        L.aggregate(adv, mask, "sum")
    with pytest.raises(ValueError, match=esc("ref_logprobs has shape (3, 4) but logprobs has (3, 5)")):
        L.kl_k3(lp, old[:, :4])
    with pytest.raises(ValueError, match=esc("target_logprobs has shape (3, 4) but behaviour_logprobs has (3, 5)")):
        L.truncated_is_weights(lp, old[:, :4])
    with pytest.raises(ValueError, match=r"^clip_high must be a finite number >= 0, got inf$"):
        L.ppo_loss(lp, old, adv, mask, clip_high=math.inf)
    with pytest.raises(ValueError, match=r"^clip_high must be a finite number >= 0, got -0\.1$"):
        L.ppo_loss(lp, old, adv, mask, clip_high=-0.1)
    with pytest.raises(ValueError, match=r"^kl_coef must be a finite number >= 0, got inf$"):
        L.ppo_loss(lp, old, adv, mask, ref_logprobs=old, kl_coef=math.inf)
    with pytest.raises(ValueError, match=r"^kl_coef must be a finite number >= 0, got -1$"):
        L.ppo_loss(lp, old, adv, mask, ref_logprobs=old, kl_coef=-1)
    with pytest.raises(ValueError, match="^" + esc("kl_coef > 0 needs ref_logprobs (the reference policy's log-probs)") + "$"):
        L.ppo_loss(lp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"^ref_logprobs must be \[B, T\], got shape \(5,\)$"):
        L.ppo_loss(lp, old, adv, mask, ref_logprobs=old[0])


def test_clip_range_edges_are_accepted():
    # clip_low = 0 and clip_high = 0 are legal (no movement allowed on that side)
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = torch.log(torch.tensor([[0.9, 1.1]], dtype=torch.float64))
    loss, m = L.ppo_loss(lp, old, -torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64), clip_low=0.0)
    # A < 0: the 0.9 token is clipped up to 1 (max(0.9, 1.0)), the 1.1 token is inside [1, 1.2]
    assert float(loss) == pytest.approx((1.0 + 1.1) / 2) and m["clip_frac_low"] == pytest.approx(0.5)
    loss, m = L.ppo_loss(lp, old, torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64), clip_high=0.0)
    # A > 0: 1.1 is clipped down to 1
    assert float(loss) == pytest.approx(-(0.9 + 1.0) / 2) and m["clip_frac_high"] == pytest.approx(0.5)


def test_non_finite_advantages_only_matter_on_trained_tokens():
    lp, old, adv, mask = rand_inputs()
    mask[0, 1] = 0
    off = adv.clone()
    off[0, 1] = math.nan  # off the mask: ignored (e.g. padding), in the value and in the gradient
    for fn in (L.ppo_loss, L.gspo_loss):
        x = lp.clone().requires_grad_()
        loss, _ = fn(x, old, off, mask)
        loss.backward()
        assert float(loss.detach()) == pytest.approx(float(fn(lp, old, adv, mask)[0]), rel=1e-12)
        assert torch.isfinite(x.grad).all() and x.grad[0, 1] == 0
    on = adv.clone()
    on[0, 0] = math.inf  # on the mask: refused
    with pytest.raises(ValueError, match=r"^advantages must be finite on masked tokens$"):
        L.ppo_loss(lp, old, on, mask)


def test_clip_fractions_count_each_side_only():
    # A > 0 tokens can only clip high, A < 0 tokens only low; each metric counts its own side
    old = torch.zeros(1, 4, dtype=torch.float64)
    lp = torch.log(torch.tensor([[1.3, 1.2, 0.7, 0.75]], dtype=torch.float64))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.float64)
    # clip_low 0.3 > clip_high 0.1: 1.3 and 1.2 clip high (> 1.1); 0.7 and 0.75 are inside [0.7, ...] -> no low clip
    _, m = L.ppo_loss(lp, old, adv, mask, clip_low=0.3, clip_high=0.1)
    assert m["clip_frac"] == pytest.approx(0.5)
    assert m["clip_frac_high"] == pytest.approx(0.5) and m["clip_frac_low"] == 0.0
    # default 0.2 / 0.2: 1.3 clips high, 0.7 and 0.75 clip low, 1.2 is on the boundary (not clipped)
    _, m = L.ppo_loss(lp, old, adv, mask)
    assert m["clip_frac_high"] == pytest.approx(0.25) and m["clip_frac_low"] == pytest.approx(0.5)
    assert m["clip_frac"] == pytest.approx(0.75)
    # clip_low 0.35 > clip_high 0.5 on the other side: 0.6 clips low (< 0.65) although it is above 1 - clip_high
    lo = torch.log(torch.tensor([[0.6, 1.0]], dtype=torch.float64))
    _, m = L.ppo_loss(lo, torch.zeros(1, 2, dtype=torch.float64), -torch.ones(1, 2, dtype=torch.float64),
                      torch.ones(1, 2, dtype=torch.float64), clip_low=0.35, clip_high=0.5)
    assert m["clip_frac_low"] == pytest.approx(0.5) and m["clip_frac_high"] == 0.0


def test_metrics_with_empty_and_single_token_masks():
    lp, old, adv, _ = rand_inputs(spread=0.3)
    empty = torch.zeros_like(lp)
    loss, m = L.ppo_loss(lp, old, adv, empty, ref_logprobs=old)
    # nothing to train: loss and means are 0 (not NaN); the ratio range is undefined
    assert float(loss) == 0.0 and m["pg_loss"] == 0.0
    assert m["clip_frac"] == 0.0 and m["approx_kl"] == 0.0 and m["kl_ref"] == 0.0
    assert math.isnan(m["ratio_mean"]) and math.isnan(m["ratio_min"]) and math.isnan(m["ratio_max"])
    # exactly one trained token: the metrics are that token's
    one = torch.zeros_like(lp)
    one[1, 2] = 1
    lp1 = lp.clone()
    lp1[1, 2] = old[1, 2] + math.log(1.5)
    a1 = adv.clone()
    a1[1, 2] = 2.0
    loss, m = L.ppo_loss(lp1, old, a1, one)
    assert m["ratio_mean"] == pytest.approx(1.5) and m["ratio_min"] == pytest.approx(1.5)
    assert m["clip_frac"] == 1.0 and m["clip_frac_high"] == 1.0  # 1.5 > 1.2 with A > 0
    assert float(loss) == pytest.approx(-2.0 * 1.2) and m["pg_loss"] == pytest.approx(-2.4)
    assert m["approx_kl"] == pytest.approx(1.5 - math.log(1.5) - 1)


def test_approx_kl_is_k3_of_kl_old_to_new_by_hand():
    # tokens sampled by the old policy; k3 of KL(old || new) per token is r - log r - 1 with r = new/old
    old = torch.log(torch.tensor([[0.5, 0.2, 0.1]], dtype=torch.float64))
    new = torch.log(torch.tensor([[0.25, 0.3, 0.1]], dtype=torch.float64))
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    r = [0.5, 1.5]  # new/old on the two trained tokens
    k3 = [x - math.log(x) - 1 for x in r]  # 0.19315, 0.09453
    _, m = L.ppo_loss(new, old, torch.zeros_like(old), mask)
    assert m["approx_kl"] == pytest.approx(sum(k3) / 2, rel=1e-12)
    # not KL(new || old): that would be 1/r - log(1/r) - 1 per token
    assert m["approx_kl"] != pytest.approx(sum(1 / x + math.log(x) - 1 for x in r) / 2, rel=1e-3)
    # kl_ref is k3 of KL(new || ref) from the same tokens: exp(ref - new) - (ref - new) - 1
    _, m = L.ppo_loss(new, old, torch.zeros_like(old), mask, ref_logprobs=old)
    assert m["kl_ref"] == pytest.approx(sum(1 / x + math.log(x) - 1 for x in r) / 2, rel=1e-12)


def test_kl_k3_log_ratio_is_clamped_at_20_both_ways():
    a = torch.zeros(1, 2, dtype=torch.float64)
    b = torch.tensor([[100.0, -100.0]], dtype=torch.float64)
    got = L.kl_k3(a, b)
    assert got[0, 0] == pytest.approx(math.exp(20) - 20 - 1, rel=1e-12)
    assert got[0, 1] == pytest.approx(math.exp(-20) + 20 - 1, rel=1e-12)


def test_truncated_is_weights_cap_only_from_above():
    # ratios 0.1 (below 1/cap), 0.8, 1.0, 1.9, 5 (above cap): only the last is truncated, to cap
    beh = torch.zeros(1, 5, dtype=torch.float64)
    tgt = torch.log(torch.tensor([[0.1, 0.8, 1.0, 1.9, 5.0]], dtype=torch.float64))
    w = L.truncated_is_weights(beh, tgt)  # default cap = 2
    assert torch.allclose(w, torch.tensor([[0.1, 0.8, 1.0, 1.9, 2.0]], dtype=torch.float64), rtol=1e-12)
    w4 = L.truncated_is_weights(beh, tgt, cap=4.0)
    assert torch.allclose(w4, torch.tensor([[0.1, 0.8, 1.0, 1.9, 4.0]], dtype=torch.float64), rtol=1e-12)
    # any positive cap is legal, also one below 1
    wh = L.truncated_is_weights(beh, tgt, cap=0.5)
    assert torch.allclose(wh, torch.tensor([[0.1, 0.5, 0.5, 0.5, 0.5]], dtype=torch.float64), rtol=1e-12)
    for bad in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"^cap must be a positive finite number"):
            L.truncated_is_weights(beh, tgt, cap=bad)


def test_aggregation_edge_cases_by_hand():
    v = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]], dtype=torch.float64)
    # exactly one sequence has tokens: its token mean, not halved
    m1 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert float(L.aggregate(v, m1, "seq-mean-token-mean")) == pytest.approx(1.5)
    # one sequence (B = 1): Σ / (1 · norm_len)
    assert float(L.aggregate(v[:1], torch.ones(1, 3, dtype=torch.float64), "seq-mean-token-sum-norm")) == pytest.approx(7 / 3)
    assert float(L.aggregate(v[:1], torch.ones(1, 3, dtype=torch.float64), "seq-mean-token-sum")) == pytest.approx(7.0)
    # a positive norm_len below 1 is legal
    assert float(L.aggregate(v, torch.ones_like(v), "seq-mean-token-sum-norm", norm_len=0.5)) == pytest.approx(63 / (2 * 0.5))
    for bad in (0, -2, math.inf, math.nan, "3"):
        with pytest.raises(ValueError, match="norm_len must be a positive number"):
            L.aggregate(v, torch.ones_like(v), "seq-mean-token-sum-norm", norm_len=bad)
    # an empty batch (B = 0) gives 0 in every mode, never NaN
    for mode in L.AGG_MODES:
        out = L.aggregate(torch.zeros(0, 3), torch.zeros(0, 3), mode)
        assert float(out) == 0.0, mode


def test_loss_keeps_the_logprobs_dtype_whatever_the_mask_dtype():
    lp, old, adv, mask = rand_inputs(dtype=torch.float32)
    for m in (mask.double(), mask.bool(), mask.long()):
        loss, _ = L.ppo_loss(lp, old, adv, m)
        assert loss.dtype == torch.float32
        assert float(loss) == pytest.approx(float(L.ppo_loss(lp, old, adv, mask)[0]), rel=1e-6)
        assert L.aggregate(adv, m).dtype == torch.float32


def test_norm_len_reaches_the_loss_and_the_kl_term():
    lp, old, adv, mask = rand_inputs(spread=0.0)
    ref = old - 0.3
    agg = "seq-mean-token-sum-norm"
    loss, m = L.ppo_loss(lp, old, adv, mask, agg=agg, norm_len=10)
    assert float(loss) == pytest.approx(float((-adv * mask).sum()) / (3 * 10))
    assert m["pg_loss"] == pytest.approx(float(loss))
    with_kl, m = L.ppo_loss(lp, old, adv, mask, agg=agg, norm_len=10, ref_logprobs=ref, kl_coef=0.5)
    kl = L.kl_k3(lp, ref)
    assert float(with_kl) == pytest.approx(float(loss) + 0.5 * float((kl * mask).sum()) / (3 * 10))
    # pg_loss is the policy-gradient part only, before the KL penalty
    assert m["pg_loss"] == pytest.approx(float(loss))
