"""Tests for ibpo_lab.sampling: group layout, behaviour log-probs = trainer forward pass, stops,
seeding, bad input, and the vllm adapter's contract against a fake engine."""

from __future__ import annotations

import importlib.util
import math
import random
import string
from types import SimpleNamespace

import pytest
import torch

from ibpo_lab.models import Policy, build_tiny_policy, load_policy, response_logprobs
from ibpo_lab.rollout import RolloutBatch
import ibpo_lab.sampling as sampling
from ibpo_lab.sampling import HFSampler, VLLMSampler, _draw, _mix32, _mul32, _Request, get_sampler, keyed_uniform, list_backends, realign_draft, sample

VOCAB = string.ascii_lowercase + string.digits + " \n+=:?"
PROMPTS = ["Q: 1+2=?\n", "a much longer question: 12+30=?\n", "x"]


@pytest.fixture(scope="module")
def policy() -> Policy:
    pol = build_tiny_policy(VOCAB, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, seed=0)
    # a random model almost never says EOS; treat a few characters as EOS too so lengths vary
    tok = pol.tokenizer
    pol.model.generation_config.eos_token_id = [tok.eos_token_id] + tok.convert_tokens_to_ids(list("abcde"))
    return pol


@pytest.fixture(scope="module")
def long_policy() -> Policy:
    """The same random model without the extra EOS characters: it runs to max_new_tokens."""
    return build_tiny_policy(VOCAB, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, seed=0)


def _assert_logprobs_match(policy, batch: RolloutBatch, temperature: float, atol: float = 1e-4):
    lp, _ = response_logprobs(policy.model, batch.padded(), temperature)
    for i, r in enumerate(batch.response_ids):
        assert torch.allclose(lp[i, : len(r)], torch.tensor(batch.logprobs[i]), atol=atol), i


# ---------------------------------------------------------------------------- layout and log-probs
def test_groups_prompts_and_lengths(policy):
    n = 4
    b = sample(policy, PROMPTS, n=n, max_new_tokens=12, seed=0, group_offset=10)
    assert len(b) == len(PROMPTS) * n
    assert b.group_ids.tolist() == [10 + i // n for i in range(len(b))]
    assert b.prompts == [p for p in PROMPTS for _ in range(n)]
    tok = policy.tokenizer
    for i in range(len(b)):
        assert b.prompt_ids[i] == tok(PROMPTS[i // n])["input_ids"]
        assert 1 <= len(b.response_ids[i]) <= 12
        assert len(b.logprobs[i]) == len(b.response_ids[i])
        assert b.responses[i] == tok.decode(b.response_ids[i], skip_special_tokens=True)
    assert b.pad_id == tok.pad_token_id
    assert torch.all(b.rewards == 0)


def test_eos_ends_and_is_kept(policy):
    b = sample(policy, PROMPTS, n=8, max_new_tokens=16, seed=1)
    eos = set(policy.eos_token_ids)
    reasons = b.meta["finish_reason"]
    assert "eos" in reasons and "length" in reasons  # the fixture makes both happen
    for r, why in zip(b.response_ids, reasons):
        assert not eos & set(r[:-1])  # nothing after an EOS
        assert (r[-1] in eos) == (why == "eos")
        if why == "length":
            assert len(r) == 16


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 1.0)])
def test_behaviour_logprobs_match_trainer_forward(policy, temperature, top_p):
    b = sample(policy, PROMPTS, n=4, max_new_tokens=20, temperature=temperature, top_p=top_p, seed=2)
    assert len({len(r) for r in b.response_ids}) > 1  # ragged responses exercise right padding
    _assert_logprobs_match(policy, b, temperature)


def test_chunked_batches_keep_logprobs_consistent(policy):
    sampler = get_sampler("hf", policy, max_batch_size=3)  # splits groups across chunks
    b = sampler.sample(PROMPTS, n=4, max_new_tokens=10, seed=3)
    assert len(b) == 12 and b.group_ids.tolist() == [i // 4 for i in range(12)]
    _assert_logprobs_match(policy, b, 1.0)
    assert sampler.last_stats["new_tokens"] == sum(len(r) for r in b.response_ids)


def test_greedy_is_deterministic_and_independent_of_batch_padding(policy):
    alone = sample(policy, [PROMPTS[2]], n=2, max_new_tokens=15, temperature=0)
    mixed = sample(policy, PROMPTS, n=2, max_new_tokens=15, temperature=0)
    assert alone.response_ids[0] == alone.response_ids[1]
    # the short prompt is heavily left-padded in the mixed batch: positions must not shift
    assert mixed.response_ids[4] == alone.response_ids[0]
    _assert_logprobs_match(policy, mixed, 1.0)  # greedy log-probs are the temperature-1 ones


def test_tiny_top_p_is_greedy(policy):
    greedy = sample(policy, PROMPTS, n=1, max_new_tokens=10, temperature=0)
    nucleus = sample(policy, PROMPTS, n=3, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5)
    for i in range(len(PROMPTS)):
        for j in range(3):
            assert nucleus.response_ids[3 * i + j] == greedy.response_ids[i]


def test_seeded_runs_reproduce(policy):
    a = sample(policy, PROMPTS, n=3, max_new_tokens=12, seed=7)
    b = sample(policy, PROMPTS, n=3, max_new_tokens=12, seed=7)
    c = sample(policy, PROMPTS, n=3, max_new_tokens=12, seed=8)
    assert a.response_ids == b.response_ids and a.logprobs == b.logprobs
    assert a.response_ids != c.response_ids


def test_stop_string_ends_response_and_stays(policy):
    b = sample(policy, PROMPTS, n=6, max_new_tokens=30, seed=4, stop=["z", "9"])
    reasons = b.meta["finish_reason"]
    assert "stop" in reasons
    for text, why in zip(b.responses, reasons):
        hits = [text.find(s) for s in ("z", "9") if s in text]
        if why == "stop":
            assert text[-1] in "z9" and min(hits) == len(text) - 1  # first occurrence, kept, at the end
        else:
            assert not hits
    _assert_logprobs_match(policy, b, 1.0)


def test_sampling_restores_training_mode(policy):
    policy.model.train()
    sample(policy, ["x"], n=1, max_new_tokens=2, seed=0)
    assert policy.model.training
    policy.model.eval()


def test_hf_sync_weights_repoints_to_new_model(policy):
    sampler = get_sampler("hf", policy)
    other = policy.reference().model
    sampler.sync_weights(other)
    assert sampler.policy.model is other and policy.model is not other


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(prompts=[]), "prompts"),
        (dict(prompts="one string"), "prompts"),
        (dict(n=0), "n "),
        (dict(n=-2), "n "),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(backend="nope"), "backend"),
    ],
)
def test_bad_input_raises_value_error(policy, kw, match):
    args = dict(prompts=["x"], n=2, max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        sample(policy, **args)


def test_prompt_longer_than_context_is_an_error(policy):
    long = "a" * (policy.context_length - 5)
    with pytest.raises(ValueError, match=r"prompts\[1\].*context"):
        sample(policy, ["x", long], n=1, max_new_tokens=10)
    assert len(sample(policy, [long], n=1, max_new_tokens=4, seed=0)) == 1  # fits exactly


def test_backends_registered():
    assert set(list_backends()) >= {"hf", "vllm"}


# ---------------------------------------------------------------------------- keyed noise
def test_keyed_uniform_is_a_function_of_its_key_and_uniform():
    rows = torch.arange(200).repeat_interleave(100)
    pos = torch.arange(100).repeat(200)
    u = keyed_uniform(3, rows, pos)
    assert u.dtype == torch.float64 and bool(((u > 0) & (u < 1)).all())
    assert torch.equal(u, keyed_uniform(3, rows, pos))
    # the same key gives the same value wherever it sits in the call
    assert torch.equal(keyed_uniform(3, rows.flip(0), pos.flip(0)), u.flip(0))
    assert len(set(u.tolist())) == len(u)  # 20000 keys, no collision
    assert not torch.isclose(keyed_uniform(4, rows, pos), u).any()
    assert (keyed_uniform(3, rows + 1, pos) != u).float().mean() == 1.0
    # uniform: 20 equal bins of 20000 draws; chi-square (19 dof) far below 60 (p < 1e-5 for a true uniform)
    counts = torch.bincount((u * 20).long(), minlength=20).double()
    chi2 = float(((counts - 1000) ** 2 / 1000).sum())
    assert chi2 < 60, chi2
    # neighbouring positions of one row are uncorrelated
    a = keyed_uniform(9, torch.zeros(5001, dtype=torch.long), torch.arange(5001))
    assert abs(float(torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1])) < 0.06  # 4 sigma at n = 5000


def _req(temperature=1.0, top_p=1.0):
    return _Request(["x"], 1, 1, temperature, top_p, (), 0, 0)


def test_draw_is_the_inverse_cdf_of_the_nucleus():
    p = torch.tensor([0.1, 0.2, 0.7])
    logits = p.log()[None].repeat(6, 1)
    u = torch.tensor([0.05, 0.15, 0.29, 0.31, 0.99, 0.5], dtype=torch.float64)
    tok, lp = _draw(logits, _req(), u)
    assert tok.tolist() == [0, 1, 1, 2, 2, 2]  # intervals [0, .1), [.1, .3), [.3, 1)
    assert torch.allclose(lp, p.log()[tok])
    # top_p = 0.75 keeps {0.7, 0.2}, renormalised: intervals [0, 2/9), [2/9, 1); token 0 never drawn
    tok, lp = _draw(logits, _req(top_p=0.75), torch.tensor([0.01, 0.2, 0.25, 0.999, 0.0001, 0.5], dtype=torch.float64))
    assert tok.tolist() == [1, 1, 2, 2, 1, 2]
    assert torch.allclose(lp, p.log()[tok])  # behaviour log-prob: before top-p
    # temperature 2: probabilities ∝ sqrt(p) = [.316, .447, .837] / 1.600 -> intervals [0, .198), [.198, .477), ...
    tok, _ = _draw(logits[:3], _req(temperature=2.0), torch.tensor([0.19, 0.21, 0.47], dtype=torch.float64))
    assert tok.tolist() == [0, 1, 1]
    # greedy ignores the noise
    assert _draw(logits[:2], _req(temperature=0.0), None)[0].tolist() == [2, 2]


def test_draw_frequencies_match_the_distribution():
    p = torch.tensor([0.05, 0.15, 0.3, 0.5])
    N = 20000
    u = keyed_uniform(11, torch.arange(N), torch.zeros(N, dtype=torch.long))
    tok, _ = _draw(p.log()[None].repeat(N, 1), _req(), u)
    freq = torch.bincount(tok, minlength=4).double() / N
    assert torch.allclose(freq, p.double(), atol=0.0175)  # 5 sigma of the largest std, sqrt(.25 / 20000)


# the token step's arithmetic, against references written here from the published definitions
_M32 = 2**32
# a spread of 32-bit values: edges, single high bits, values whose high 16 bits are set, and seeded randoms
_U32 = [0, 1, 2, 0xFFFF, 0x10000, 0x1FFFF, 0x12345, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFF0000, 0xFFFFFFFF]
_U32 += [random.Random(0).getrandbits(32) for _ in range(40)]


def _lowbias32(x: int) -> int:
    """Wellons' lowbias32 (hash-prospector), plain Python ints."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) % _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) % _M32
    return x ^ (x >> 16)


def _lowbias32_inverse(x: int) -> int:
    """Wellons' published inverse of lowbias32 (its own constants: the multiplicative inverses mod 2**32)."""
    x ^= x >> 16
    x = (x * 0x43021123) % _M32
    x ^= (x >> 15) ^ (x >> 30)
    x = (x * 0x1D69E2A5) % _M32
    return x ^ (x >> 16)


def test_mul32_is_multiplication_mod_2_32():
    xs = torch.tensor(_U32, dtype=torch.long)
    for c in [0x7FEB352D, 0x846CA68B, 1, 3, 0x10000, 0x10001, 0xFFFFFFFF] + _U32[12:20]:
        assert _mul32(xs, c).tolist() == [(x * c) % _M32 for x in _U32], hex(c)


def test_mix32_is_lowbias32():
    assert _lowbias32_inverse(_lowbias32(0xDEADBEEF)) == 0xDEADBEEF  # the two references agree
    out = _mix32(torch.tensor(_U32, dtype=torch.long)).tolist()
    assert out == [_lowbias32(x) for x in _U32]
    assert [_lowbias32_inverse(h) for h in out] == _U32  # a bijection on 32 bits, as published
    assert out[0] == 0 and all(0 <= h < _M32 for h in out)


def _keyed_reference(seed: int, row: int, pos: int) -> float:
    """keyed_uniform's documented chain: hash the seed's low and high 32 bits, the row, then the
    position (after adding the golden-ratio constant 0x9E3779B9); half-step offset into (0, 1)."""
    s = seed % 2**64
    h = _lowbias32(s % _M32)
    h = _lowbias32(h ^ (s >> 32))
    h = _lowbias32(h ^ (row % _M32))
    h = _lowbias32(((h + 0x9E3779B9) % _M32) ^ (pos % _M32))
    return (h + 0.5) / 2**32


def test_keyed_uniform_is_the_documented_hash_chain():
    seeds = [0, 1, 7, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**63 + 1, 2**64 - 1, -1]
    rows = torch.tensor([0, 1, 5, 1000, 2**31 + 7, 2**32 - 1])
    pos = torch.tensor([0, 3, 1, 77, 4, 2**32 - 1])
    for seed in seeds:
        u = keyed_uniform(seed, rows, pos)
        assert u.dtype == torch.float64
        assert u.tolist() == [_keyed_reference(seed, r, t) for r, t in zip(rows.tolist(), pos.tolist())], seed


def test_keyed_uniform_depends_on_every_seed_bit():
    rows, pos = torch.arange(4), torch.tensor([0, 1, 2, 3])
    base = keyed_uniform(0x0123456789ABCDEF, rows, pos)
    for k in range(64):
        other = keyed_uniform(0x0123456789ABCDEF ^ (1 << k), rows, pos)
        assert bool((other != base).all()), k
    assert torch.equal(keyed_uniform(-1, rows, pos), keyed_uniform(2**64 - 1, rows, pos))  # a seed is 64 bits


def test_keyed_uniform_broadcasts_and_stays_on_the_rows_device():
    rows, pos = torch.tensor([[0], [3], [9]]), torch.tensor([[2, 0, 5, 1]])
    u = keyed_uniform(5, rows, pos)
    assert u.shape == (3, 4)
    for i, r in enumerate([0, 3, 9]):
        for j, t in enumerate([2, 0, 5, 1]):
            assert u[i, j].item() == keyed_uniform(5, torch.tensor([r]), torch.tensor([t])).item()
    # the noise is computed where the keys live (on a GPU: no host tensor mixed in); meta stands in for it
    m = keyed_uniform(5, rows.to("meta"), pos.to("meta"))
    assert m.device.type == "meta" and m.shape == (3, 4) and m.dtype == torch.float64


def test_draw_boundary_goes_to_the_next_token():
    """Intervals are half-open, [F(k-1), F(k)): a u exactly on F(k) draws token k+1. Equal logits
    make the boundaries exact: with p the float value of each probability, F(k) = (k + 1) p and
    u * total = u * 4p = F(k) exactly for u = (k + 1) / 4."""
    logits = torch.tensor([[0.0] * 4, [5.0] * 4, [-2.0] * 4])  # N = 3 rows, V = 4
    u = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    for top_p in (1.0, 0.99):  # 0.99 keeps all four (the smallest tail, 1/4, is above 1 - 0.99)
        tok, lp = _draw(logits, _req(top_p=top_p), u)
        assert tok.tolist() == [1, 2, 3]
        assert torch.allclose(lp, torch.full((3,), -math.log(4.0)))


_U_MAX = (2**32 - 1 + 0.5) / 2**32  # the largest value keyed_uniform returns (h = 2**32 - 1)
_U_MIN = 0.5 / 2**32  # the smallest (h = 0)


def test_draw_never_picks_a_zero_probability_token_at_the_ends_of_the_noise_range():
    """The largest uniform lands in the last interval of positive width, never on a token of zero
    probability after it (masked with -inf, or outside the nucleus); the smallest in the first."""
    inf = float("inf")
    # probabilities ∝ e^0.1 .. e^0.4, then a masked token; the float64 sum of the float32
    # probabilities is not exactly 1 (rounding), so the search must scale u by that sum
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4, -inf], [-inf, 1.0, -inf, 2.0, -inf]])
    for u0, want in ((_U_MAX, [3, 3]), (_U_MIN, [0, 1])):
        tok, lp = _draw(logits, _req(), torch.full((2,), u0, dtype=torch.float64))
        assert tok.tolist() == want and bool(torch.isfinite(lp).all())
    # top_p = 0.9 (hand-computed nuclei; probabilities in vocabulary order, the dropped tails sum to <= 0.1):
    #   [3, 2, 1, -1, -2]:     .654 .241 .089 .012 .004 -> keeps tokens 0-2 (tail .016)
    #   [2.5, 2, .5, -1, -3]:  .563 .341 .076 .017 .002 -> keeps tokens 0-1 (tail .096)
    #   [1, .9, .8, -2, -2.5]: .357 .323 .292 .018 .011 -> keeps tokens 0-2 (tail .029)
    nucleus = torch.tensor([[3.0, 2.0, 1.0, -1.0, -2.0], [2.5, 2.0, 0.5, -1.0, -3.0], [1.0, 0.9, 0.8, -2.0, -2.5]])
    tok, lp = _draw(nucleus, _req(top_p=0.9), torch.full((3,), _U_MAX, dtype=torch.float64))
    assert tok.tolist() == [2, 1, 2]
    assert torch.allclose(lp, torch.log_softmax(nucleus, -1)[torch.arange(3), tok])  # before top-p
    tok, _ = _draw(nucleus, _req(top_p=0.9), torch.full((3,), _U_MIN, dtype=torch.float64))
    assert tok.tolist() == [0, 0, 0]


def test_draw_top_p_one_skips_the_nucleus_filter(monkeypatch):
    """top_p = 1 keeps the whole distribution, so no nucleus filter (a full-vocabulary sort per
    drawn token) runs; top_p < 1 runs it once per call."""
    import transformers.generation.logits_process as lp_mod

    calls = []

    class Counting(lp_mod.TopPLogitsWarper):
        def __call__(self, input_ids, scores):
            calls.append(self.top_p)
            return super().__call__(input_ids, scores)

    monkeypatch.setattr(lp_mod, "TopPLogitsWarper", Counting)
    logits = torch.tensor([[0.1, 0.2, 0.3], [2.0, 0.0, 1.0]])
    u = torch.tensor([0.5, 0.5], dtype=torch.float64)
    _draw(logits, _req(top_p=1.0), u)
    assert calls == []
    _draw(logits, _req(top_p=0.95), u)
    assert calls == [0.95]


def test_greedy_draw_is_the_argmax_with_its_temperature_one_logprob():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])  # N = 2, V = 3, argmax 1 and 0
    tok, lp = _draw(logits, _req(temperature=0.0), None)
    assert tok.tolist() == [1, 0]
    e = math.e
    want = [3 - math.log(e + e**3 + e**2), 5 - math.log(e**5 + 1 + e)]
    assert lp.tolist() == pytest.approx(want, abs=1e-6)

def test_chunking_does_not_change_samples(policy):
    whole = get_sampler("hf", policy).sample(PROMPTS, n=4, max_new_tokens=10, seed=3)
    chunked = get_sampler("hf", policy, max_batch_size=3).sample(PROMPTS, n=4, max_new_tokens=10, seed=3)
    assert chunked.response_ids == whole.response_ids


def test_per_prompt_max_new_tokens_cuts_the_same_samples(policy):
    s = get_sampler("hf", policy)
    long = s.sample(PROMPTS, n=3, max_new_tokens=20, seed=6)
    caps = [3, 20, 7]
    short = s.sample(PROMPTS, n=3, max_new_tokens=caps, seed=6)
    for b in range(len(long)):
        cap = caps[b // 3]
        assert short.response_ids[b] == long.response_ids[b][:cap]
        assert short.logprobs[b] == pytest.approx(long.logprobs[b][:cap], abs=1e-5)
        assert short.meta["finish_reason"][b] == ("length" if len(long.response_ids[b]) > cap else long.meta["finish_reason"][b])


# ---------------------------------------------------------------------------- copy-draft decoding
def test_realign_draft_rules():
    d = [10, 11, 12, 13, 14, 15, 16, 17]
    assert realign_draft(d, [10, 11, 99], miss=2) == 3  # no n-gram matches: substitution, continue after d[2]
    assert realign_draft(d, [10, 11, 15, 16], miss=2) == 7  # deletion: [15, 16] found, continue at 17
    assert realign_draft(d, [10, 11, 13, 14], miss=2) == 5  # one token deleted
    assert realign_draft(d, [99, 17], miss=1) == 2  # a lone matching token is no match (no 1-grams)
    # the longest n-gram wins; among its occurrences the one ending nearest to miss + 1
    rep = [1, 2, 3, 1, 2, 4, 1, 2, 3]
    assert realign_draft(rep, [7, 1, 2, 3], miss=4) == 3  # [1, 2, 3] ends at 3 and 9; 3 is nearer to 5
    assert realign_draft(rep, [7, 1, 2, 3], miss=7) == 9
    assert realign_draft(rep, [7, 8, 1, 2], miss=3) == 5  # [1, 2] ends at 2, 5, 8; 5 is nearest to 4
    assert realign_draft(rep, [4, 1, 2], miss=3) == 8  # the trigram [4, 1, 2] beats the nearer bigram ...
    assert realign_draft(rep, [4, 1, 2], miss=3, ngram=2) == 5  # ... unless ngram stops at bigrams
    assert realign_draft([5, 6, 5, 6], [9, 5, 6], miss=2, ngram=2) == 4  # ends 2 and 4 tie around 3: the later


def _plain_and_drafted(policy, prompts, n, drafts, seed, **kw):
    s = get_sampler("hf", policy, draft_tokens=kw.pop("draft_tokens", 4))
    plain = s.sample(prompts, n=n, seed=seed, **kw)
    plain_stats = dict(s.last_stats)
    drafted = s.sample(prompts, n=n, seed=seed, drafts=drafts, **kw)
    return plain, drafted, plain_stats, dict(s.last_stats)


def _assert_same(plain, drafted):
    assert drafted.response_ids == plain.response_ids
    assert drafted.meta["finish_reason"] == plain.meta["finish_reason"]
    for a, b in zip(drafted.logprobs, plain.logprobs):
        assert a == pytest.approx(b, abs=1e-5)


def _edit(ids, k):
    """a local edit of ``ids``: one token replaced, one inserted, one deleted (k picks where)."""
    out = list(ids)
    if len(out) > 6:
        out[k % len(out)] = 30
        out.insert((3 * k) % len(out), 31)
        del out[(5 * k) % len(out)]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["full", "edited", "unrelated", "longer", "shorter", "mixed"])
def test_drafted_equals_plain(policy, seed, kind):
    n, mx = 3, 24
    ref = sample(policy, PROMPTS, n=n, max_new_tokens=mx, seed=seed)
    outs = [ref.response_ids[i * n] for i in range(len(PROMPTS))]  # the first trajectory of each prompt
    g = torch.Generator().manual_seed(seed)
    drafts = {
        "full": outs,
        "edited": [_edit(o, k + seed) for k, o in enumerate(outs)],
        "unrelated": [torch.randint(5, 40, (mx,), generator=g).tolist() for _ in outs],
        "longer": [o + torch.randint(5, 40, (20,), generator=g).tolist() for o in outs],
        "shorter": [o[: len(o) // 2] for o in outs],
        "mixed": [outs[0], None, []],
    }[kind]
    plain, drafted, ps, ds = _plain_and_drafted(policy, PROMPTS, n, drafts, seed, max_new_tokens=mx)
    assert plain.response_ids == ref.response_ids
    _assert_same(plain, drafted)
    _assert_logprobs_match(policy, drafted, 1.0)
    assert ps["tokens_per_forward"] == 1.0 and ps["draft_fed"] == 0
    assert ds["draft_accepted"] <= ds["draft_fed"]
    assert ds["new_tokens"] == ps["new_tokens"]
    assert ds["tokens_per_forward"] == ds["new_tokens"] / ds["row_forwards"]
    if kind == "full":  # trajectory 0 of each prompt is its draft: all its tokens after the first are confirmed
        # draft tokens, less one per decode forward (the token drawn after the last fed one)
        K = 4
        assert ds["draft_accepted"] >= sum(len(o) - 1 - -(-(len(o) - 1) // (K + 1)) for o in outs)
        assert ds["model_calls"] <= ps["model_calls"]


def test_eos_stop_and_length_inside_an_accepted_span(policy):
    prompts = PROMPTS + [p + "?" for p in PROMPTS]
    ref = sample(policy, prompts, n=1, max_new_tokens=30, seed=4, stop=["z", "9"])
    assert {"eos", "stop"} <= set(ref.meta["finish_reason"])
    # each draft runs on past where its output ended, so the end falls inside an accepted span
    drafts = [r + [20, 21, 22, 23, 24, 25] for r in ref.response_ids]
    for mx in (30, 5):  # 5: the length limit cuts inside the drafted span
        plain, drafted, _, ds = _plain_and_drafted(policy, prompts, 1, drafts, 4, max_new_tokens=mx, stop=["z", "9"], draft_tokens=8)
        _assert_same(plain, drafted)
        assert drafted.response_ids == [r[:mx] for r in ref.response_ids]
        # every row copies its draft: after the prefill's token, each forward yields 9 tokens (8 confirmed
        # draft tokens and the draw after them) until the output ends
        assert ds["row_forwards"] == sum(1 + -(-(len(r) - 1) // 9) for r in drafted.response_ids)


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.9), (0.0, 1.0), (1.5, 1.0)])
def test_drafted_logprobs_match_trainer_forward(long_policy, temperature, top_p):
    policy = long_policy
    ref = sample(policy, PROMPTS, n=1, max_new_tokens=20, temperature=temperature, top_p=top_p, seed=5)
    drafts = [_edit(r, 2) for r in ref.response_ids]
    plain, drafted, _, ds = _plain_and_drafted(
        policy, PROMPTS, 2, drafts, 5, max_new_tokens=20, temperature=temperature, top_p=top_p
    )
    _assert_same(plain, drafted)
    _assert_logprobs_match(policy, drafted, temperature if temperature > 0 else 1.0)
    assert ds["draft_accepted"] > 0


def test_drafted_with_kv_compaction_equals_plain(long_policy, monkeypatch):
    policy = long_policy
    calls = []
    compact = sampling._compact
    monkeypatch.setattr(sampling, "_should_compact", lambda width, live: width > live)  # compact at every hole
    monkeypatch.setattr(sampling, "_compact", lambda cache, attn: calls.append(attn.shape[1]) or compact(cache, attn))
    ref = sample(policy, PROMPTS, n=2, max_new_tokens=40, seed=8)
    drafts = [ref.response_ids[0], _edit(ref.response_ids[2], 1), list(range(5, 40))]
    plain, drafted, _, _ = _plain_and_drafted(policy, PROMPTS, 2, drafts, 8, max_new_tokens=40, draft_tokens=6)
    assert calls  # rejected draft columns piled up and were compacted away
    _assert_same(plain, drafted)
    _assert_logprobs_match(policy, drafted, 1.0)


def test_compaction_gets_the_longest_rows_live_width_and_removes_every_hole(long_policy, monkeypatch):
    """Whenever the compaction rule is consulted it gets the mask's width and the longest row's live
    column count; a compaction leaves no hole: the cache and the mask shrink to that count, every row
    keeps its live columns."""
    asked, done = [], []
    compact = sampling._compact

    def should(width, live):
        asked.append((width, live))
        return width > live  # compact at every hole

    def spy(cache, attn):
        before = (attn != 0).sum(-1)
        assert asked[-1] == (attn.shape[1], int(before.max()))
        out = compact(cache, attn)
        assert out.shape[1] == int(before.max()) and torch.equal((out != 0).sum(-1), before)
        assert all(t.shape[2] == out.shape[1] for _, _, t in sampling._cache_kv(cache))
        done.append(out.shape[1])
        return out

    monkeypatch.setattr(sampling, "_should_compact", should)
    monkeypatch.setattr(sampling, "_compact", spy)
    ref = sample(long_policy, PROMPTS, n=2, max_new_tokens=40, seed=8)
    drafts = [ref.response_ids[0], _edit(ref.response_ids[2], 1), list(range(5, 40))]
    plain, drafted, _, _ = _plain_and_drafted(long_policy, PROMPTS, 2, drafts, 8, max_new_tokens=40, draft_tokens=6)
    _assert_same(plain, drafted)
    assert done and asked and all(live <= width for width, live in asked)


class _OldForward(torch.nn.Module):
    """A causal LM whose forward names the KV cache `past_key_values` and has no `logits_to_keep`
    and no **kwargs (transformers before 5.2x): the sampler may pass only the keywords it names.
    It keeps the documented `use_cache` contract strictly (None: the config's value; the cache is
    returned only when it is on), as older transformers did; the current one returns a cache it was
    given whatever `use_cache` says."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.generation_config = inner, inner.config, inner.generation_config

    def _run(self, use_cache, **kw):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        out = self.inner(use_cache=use_cache, **kw)
        return out.logits, (out.cache if use_cache else None)

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=None):
        logits, cache = self._run(use_cache, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, cache=past_key_values)
        return SimpleNamespace(logits=logits, past_key_values=cache)


class _NewForward(_OldForward):
    """The same with the newer names (`cache`, `logits_to_keep`), again without **kwargs."""

    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=None, logits_to_keep=0):
        logits, cache = self._run(use_cache, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, logits_to_keep=logits_to_keep)
        return SimpleNamespace(logits=logits, cache=cache)


@pytest.mark.parametrize("wrapper", [_OldForward, _NewForward])
def test_sampler_passes_the_cache_by_the_name_the_forward_accepts(long_policy, monkeypatch, wrapper):
    from dataclasses import replace

    want = sample(long_policy, PROMPTS, n=2, max_new_tokens=6, seed=0)
    # a model config that says use_cache=False (as set for gradient checkpointing) must not matter
    monkeypatch.setattr(long_policy.model.config, "use_cache", False)
    pol = replace(long_policy, model=wrapper(long_policy.model))
    got = sample(pol, PROMPTS, n=2, max_new_tokens=6, seed=0)
    assert got.response_ids == want.response_ids
    _assert_logprobs_match(long_policy, got, 1.0)

def test_committed_tiny_policy_drafted_repairs_equal_plain():
    from ibpo_lab.tasks import get_task

    pol, task = load_policy("tiny"), get_task("synthetic")
    exs = task.examples("train", n=4)
    solves = sample(pol, [task.solve_prompt(e) for e in exs], n=2, max_new_tokens=48, seed=0)
    prompts = [task.repair_prompt(exs[i // 2], solves.responses[i], solves.responses[i ^ 1]) for i in range(len(solves))]
    caps = [len(r) + 8 for r in solves.response_ids]
    plain, drafted, _, ds = _plain_and_drafted(pol, prompts, 1, solves.response_ids, 1, max_new_tokens=caps, draft_tokens=8)
    _assert_same(plain, drafted)
    _assert_logprobs_match(pol, drafted, 1.0)
    assert ds["tokens_per_forward"] > 1.0


def test_prefill_once_per_distinct_prompt_last_logits_only(long_policy):
    """The prefill feeds each distinct prompt once (left-padded to the longest), computes the logits
    of its last position only (not [prompts, P, V]), and every later call feeds one token per row;
    ids, masks and positions are integer tensors (float positions break learned position embeddings)."""
    seen = []

    def record(module, args, kwargs, out):
        seen.append((tuple(kwargs["input_ids"].shape), tuple(out.logits.shape), kwargs["attention_mask"].clone()))
        assert {kwargs[k].dtype for k in ("input_ids", "attention_mask", "position_ids")} == {torch.long}

    tok = long_policy.tokenizer
    lens = [len(tok(p)["input_ids"]) for p in PROMPTS]
    handle = long_policy.model.register_forward_hook(record, with_kwargs=True)
    try:
        b = get_sampler("hf", long_policy).sample(PROMPTS, n=4, max_new_tokens=3, seed=0)
    finally:
        handle.remove()
    V, P = long_policy.model.config.vocab_size, max(lens)
    assert [s[:2] for s in seen] == [((3, P), (3, 1, V)), ((12, 1), (12, 1, V)), ((12, 1), (12, 1, V))]
    assert seen[0][2].tolist() == [[0] * (P - n) + [1] * n for n in lens]  # left padding
    # the decode calls attend to the prompt's real tokens and the tokens sampled so far, per row
    assert seen[2][2].tolist() == [[0] * (P - lens[i // 4]) + [1] * (lens[i // 4] + 2) for i in range(12)]
    assert [len(r) for r in b.response_ids] == [3] * 12

def test_decode_counts_by_hand(long_policy):
    """last_stats counted by hand. The long policy runs every row to its cap (asserted), so the
    response lengths are the caps, 5, 9 and 3 tokens, whatever the tokens are."""
    caps = [5, 9, 3]
    s = get_sampler("hf", long_policy, draft_tokens=2)
    plain = s.sample(PROMPTS, n=2, max_new_tokens=caps, seed=0)
    assert plain.meta["finish_reason"] == ["length"] * 6 and [len(r) for r in plain.response_ids] == [5, 5, 9, 9, 3, 3]
    st = s.last_stats
    # one token per row per forward: the prefill gives every row its first token, then each decode
    # call one more to every row still running; the longest row (9 tokens) sets the number of calls
    assert (st["row_forwards"], st["model_calls"], st["positions"], st["new_tokens"]) == (34, 9, 34, 34)
    assert (st["draft_fed"], st["draft_accepted"], st["tokens_per_forward"]) == (0, 0, 1.0)
    # chunks of 2 rows = one prompt each: 5 + 9 + 3 calls, the same rows and tokens
    chunked = get_sampler("hf", long_policy, max_batch_size=2)
    assert chunked.sample(PROMPTS, n=2, max_new_tokens=caps, seed=0).response_ids == plain.response_ids
    st = chunked.last_stats
    assert (st["row_forwards"], st["model_calls"], st["positions"], st["new_tokens"]) == (34, 17, 34, 34)

    # drafts = each prompt's own output (n = 1), 2 draft tokens per forward: every fed token is confirmed.
    # After the prefill (3 rows, width 1) a row of cap L has 1 token, its pointer at draft[1], room L - 1,
    # and feeds m = min(2, draft left, room - 1) tokens, getting m + 1 tokens back:
    #   call 1: rows 5, 9, 3 feed 2, 2, 1 (width 3)  -> 4, 4, 3 tokens (row 3 done)
    #   call 2: rows 5, 9 feed 0, 2 (room 1 and 5)   -> 5, 7 tokens (row 5 done)
    #   call 3: row 9 feeds 1 (room 2)               -> 9 tokens, done
    one = s.sample(PROMPTS, n=1, max_new_tokens=caps, seed=0)
    drafted = s.sample(PROMPTS, n=1, max_new_tokens=caps, seed=0, drafts=one.response_ids)
    assert drafted.response_ids == one.response_ids
    st = s.last_stats
    assert st["model_calls"] == 4
    assert st["row_forwards"] == 3 + 3 + 2 + 1
    assert st["positions"] == 3 * 1 + 3 * 3 + 2 * 3 + 1 * 2  # padding of the shorter feeds included
    assert st["draft_fed"] == st["draft_accepted"] == (2 + 2 + 1) + (0 + 2) + 1
    assert st["new_tokens"] == 17 and st["tokens_per_forward"] == 17 / 9

def _absent_token(outputs) -> int:
    """A token id (not a special one) that occurs in none of ``outputs``: a draft of it is always rejected."""
    return min(set(range(4, 46)) - {t for o in outputs for t in o})


def test_rejected_drafts_by_hand(long_policy, monkeypatch):
    """Drafts of a token the output never contains: every fed draft token is rejected, each forward
    yields one token, the rejected columns are cropped before the next call, and the KV cache is
    re-indexed only when a row leaves the batch."""
    from transformers import DynamicCache

    caps = [4, 6, 3]
    s = get_sampler("hf", long_policy, draft_tokens=2)
    plain = s.sample(PROMPTS, n=1, max_new_tokens=caps, seed=0)
    assert [len(r) for r in plain.response_ids] == caps
    x = _absent_token(plain.response_ids)
    selects, masks = [], []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices", lambda self, idx: selects.append(len(idx)) or select(self, idx))
    handle = long_policy.model.register_forward_hook(
        lambda m, a, kw, out: masks.append(kw["attention_mask"].tolist()), with_kwargs=True
    )
    try:
        drafted = s.sample(PROMPTS, n=1, max_new_tokens=caps, seed=0, drafts=[[x] * 10] * 3)
    finally:
        handle.remove()
    assert drafted.response_ids == plain.response_ids
    # a row of cap L with t tokens feeds m = min(2, L - t - 1) draft tokens (the draft never runs out):
    #   call 1: t = 1, rows 4, 6, 3 feed 2, 2, 1 (width 3); call 2: t = 2, feed 1, 2, 0 (width 3), row 3 done;
    #   call 3: t = 3, rows 4, 6 feed 0, 2 (width 3), row 4 done; call 4: feeds 1 (width 2); call 5: 0 (width 1)
    st = s.last_stats
    assert (st["model_calls"], st["row_forwards"], st["new_tokens"]) == (6, 13, 13)
    assert st["positions"] == 3 + 3 * 3 + 3 * 3 + 2 * 3 + 2 + 1
    assert (st["draft_fed"], st["draft_accepted"]) == ((2 + 1 + 0) + (2 + 2 + 2 + 1 + 0) + (1 + 0), 0)
    # every call sees the prompt, one kept column per earlier decode call, and its own inputs
    P = len(masks[0][0])
    assert [len(m[0]) for m in masks] == [P, P + 0 + 3, P + 1 + 3, P + 2 + 3, P + 3 + 2, P + 4 + 1]
    assert [row[P:] for row in masks[1]] == [[1, 1, 1], [1, 1, 1], [1, 1, 0]]  # the cap-3 row feeds 1 + 1
    # re-indexed: the prefill's copy to the rows, then once each when a row leaves (the last one: no re-index)
    assert selects == [3, 2, 1]


def test_draft_pointer_realigns_after_an_insertion_by_hand(long_policy, monkeypatch):
    """A draft with one token inserted (the output o has 12 distinct tokens, asserted): the pointer
    follows the draft while it matches and re-aligns, with the sampler's draft_ngram, only after a
    difference."""
    s = get_sampler("hf", long_policy, draft_tokens=2, draft_ngram=2)
    o = s.sample(PROMPTS[1:2], n=1, max_new_tokens=12, seed=8).response_ids[0]
    assert len(set(o)) == 12
    x = _absent_token([o])
    d = o[:5] + [x] + o[5:]  # d[i] = o[i] for i < 5, d[5] = x, d[i] = o[i - 1] after
    seen = []
    realign = sampling.realign_draft
    monkeypatch.setattr(
        sampling, "realign_draft", lambda draft, gen, miss, ngram=3: seen.append((len(gen), miss, ngram)) or realign(draft, gen, miss, ngram)
    )
    out = s.sample(PROMPTS[1:2], n=1, max_new_tokens=12, seed=8, drafts=[d])
    assert out.response_ids[0] == o
    # prefill: o0 (= d0, pointer 1). call 1 feeds d1 d2 = o1 o2: both confirmed, o3 drawn (= d3, pointer 4).
    # call 2 feeds d4 d5 = o4 x: o4 confirmed, o5 differs from x -> re-align at miss 5: no bigram of
    #   (o4, o5) in d -> 6 (a substitution guess). call 3 feeds d6 d7 = o5 o6: o6 differs from o5 ->
    #   re-align at miss 6: the bigram (o5, o6) ends at 8. call 4 feeds d8 d9 = o7 o8: confirmed, o9
    #   drawn (= d10, pointer 11). call 5 (room 2) feeds d11 = o10: confirmed, o11 ends the row.
    assert seen == [(6, 5, 2), (7, 6, 2)]
    st = s.last_stats
    assert (st["model_calls"], st["row_forwards"], st["positions"]) == (6, 6, 1 + 3 + 3 + 3 + 3 + 2)
    assert (st["draft_fed"], st["draft_accepted"]) == (2 + 2 + 2 + 2 + 1, 2 + 1 + 0 + 2 + 1)

@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(drafts=[[1, 2]]), r"drafts has 1 entries for 3 prompts"),
        (dict(drafts=[1, 2, 3]), r"drafts\[0\] must be a list"),
        (dict(drafts="abc"), "drafts must be a list"),
        (dict(drafts=[[1], None, [10**6]]), r"drafts\[2\].*token ids"),
        (dict(drafts=[[1], None, [-1]]), r"drafts\[2\].*token ids"),
        (dict(max_new_tokens=[4, 4]), "max_new_tokens has 2 entries for 3 prompts"),
        (dict(max_new_tokens=[4, 0, 4]), r"max_new_tokens\[1\]"),
        (dict(max_new_tokens=[4, 2.5, 4]), r"max_new_tokens\[1\]"),
    ],
)
def test_bad_drafts_and_caps_raise(policy, kw, match):
    args = dict(max_new_tokens=4)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        get_sampler("hf", policy).sample(PROMPTS, n=1, seed=0, **args)


def test_hf_sampler_advertises_drafts(policy):
    assert get_sampler("hf", policy).supports_drafts is True


@pytest.mark.parametrize("kw,match", [(dict(draft_tokens=0), "draft_tokens"), (dict(draft_ngram=1), "draft_ngram")])
def test_bad_draft_settings_raise(policy, kw, match):
    with pytest.raises(ValueError, match=match):
        HFSampler(policy, **kw)


# ---------------------------------------------------------------------------- vllm adapter
@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_missing_is_a_clear_error(policy):
    with pytest.raises(ImportError, match=r"vllm.*pip install.*backend='hf'"):
        get_sampler("vllm", policy)


@pytest.fixture
def fake_vllm(monkeypatch):
    """A clean engine cache and vLLM/torchrun environment around each test."""
    from ibpo_lab.sampling import close_vllm_engines

    from _sampler_fakes import FakeLLM

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING"):
        monkeypatch.delenv(var, raising=False)  # restored after the test
    close_vllm_engines()
    FakeLLM.built.clear()
    yield
    close_vllm_engines()
    FakeLLM.built.clear()


def _vllm(policy, **kw):
    from functools import partial

    from _sampler_fakes import FakeLLM, FakeSamplingParams

    llm_cls = partial(FakeLLM, eos_id=policy.tokenizer.eos_token_id, vocab_size=len(policy.tokenizer))
    sampler = VLLMSampler(policy, llm_cls=llm_cls, sampling_params_cls=FakeSamplingParams, **kw)
    return sampler.engine, sampler


def test_vllm_engine_runs_in_process_like_trl_colocate(policy, fake_vllm):
    import os

    fake, sampler = _vllm(policy, gpu_memory_utilization=0.35)
    kw = fake.kwargs
    assert fake.model == policy.model.name_or_path
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["logprobs_mode"] == "processed_logprobs"
    assert kw["gpu_memory_utilization"] == 0.35 and kw["max_model_len"] == policy.context_length
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert {os.environ[v] for v in ("RANK", "LOCAL_RANK")} == {"0"} and os.environ["WORLD_SIZE"] == "1"
    assert int(os.environ["MASTER_PORT"]) > 0


def test_vllm_adapter_contract_with_fake_engine(policy, fake_vllm):
    fake, sampler = _vllm(policy)
    b = sampler.sample(PROMPTS, n=4, max_new_tokens=8, temperature=0.8, top_p=0.95, stop=["\n"], seed=3, group_offset=2)
    assert isinstance(b, RolloutBatch) and len(b) == 12
    assert b.group_ids.tolist() == [2 + i // 4 for i in range(12)]
    tok = policy.tokenizer
    assert [r["prompt_token_ids"] for r in fake.requests] == [tok(p)["input_ids"] for p in PROMPTS]
    p = fake.params
    assert (p.n, p.temperature, p.top_p, p.max_tokens, p.stop, p.seed, p.logprobs) == (4, 0.8, 0.95, 8, ["\n"], 3, 0)
    assert p.include_stop_str_in_output
    # behaviour log-probs recomputed with the trainer's forward pass; the engine's kept aside
    _assert_logprobs_match(policy, b, 0.8)
    assert b.meta["engine_logprobs"][0] == [-1.0] * len(b.response_ids[0])
    assert b.meta["finish_reason"][0] == "eos" and b.meta["finish_reason"][1] == "length"
    assert fake.calls == ["generate", "sleep1"]
    b2 = sampler.sample(PROMPTS, n=1, max_new_tokens=4)
    assert fake.calls[2:] == ["wake:weights,kv_cache", "generate", "sleep1"] and len(b2) == 3


def test_vllm_engine_logprobs_only_when_top_p_is_one(policy, fake_vllm):
    _, sampler = _vllm(policy, recompute_logprobs=False, enable_sleep_mode=False)
    b = sampler.sample(["x"], n=2, max_new_tokens=5, seed=0)
    assert all(v == -1.0 for lp in b.logprobs for v in lp)  # vLLM's processed log-probs, as asked
    # top_p < 1: vLLM's are of the renormalised nucleus, so the trainer's forward pass recomputes them
    b = sampler.sample(PROMPTS, n=2, max_new_tokens=6, temperature=0.9, top_p=0.5, seed=1)
    assert b.meta["engine_logprobs"][0] == [-1.0] * len(b.response_ids[0])
    _assert_logprobs_match(policy, b, 0.9)


def test_vllm_greedy_with_n_above_one_decodes_once_per_prompt(policy, fake_vllm):
    fake, sampler = _vllm(policy, recompute_logprobs=False)
    b = sampler.sample(PROMPTS, n=3, max_new_tokens=6, temperature=0)
    assert fake.params.n == 1 and fake.params.temperature == 0  # vLLM's SamplingParams refuses n > 1 here
    assert len(b) == 9 and b.group_ids.tolist() == [i // 3 for i in range(9)]
    for g in range(3):
        assert b.response_ids[3 * g] == b.response_ids[3 * g + 1] == b.response_ids[3 * g + 2]
    _assert_logprobs_match(policy, b, 1.0)  # greedy: temperature-1 log-probs from the trainer's pass


def test_vllm_sync_weights_loads_every_parameter_through_collective_rpc(policy, fake_vllm):
    fake, sampler = _vllm(policy, sleep_level=2)
    sampler.sample(["x"], n=1, max_new_tokens=3)
    with pytest.raises(RuntimeError, match="sync_weights"):
        sampler.sample(["x"], n=1, max_new_tokens=3)  # level-2 sleep dropped the weights
    new = policy.reference().model
    with torch.no_grad():
        next(new.parameters()).add_(1.0)  # make the pushed weights distinguishable
    sampler.sync_weights(new)
    loaded = fake.runner_model.loaded
    assert list(loaded) == [name for name, _ in new.named_parameters()]
    assert all(torch.equal(loaded[n], p) for n, p in new.named_parameters())
    assert fake.calls[-3:] == ["wake:weights", "rpc", "reset"] and sampler.policy.model is new
    sampler.sample(["x"], n=1, max_new_tokens=3)
    assert fake.calls[-3:] == ["wake:kv_cache", "generate", "sleep2"]


def test_vllm_engine_is_reused_by_the_next_run_and_replaced_on_a_new_config(policy, fake_vllm):
    from ibpo_lab.sampling import close_vllm_engines

    from _sampler_fakes import FakeLLM

    first, s1 = _vllm(policy)
    s1.sample(["x"], n=1, max_new_tokens=3)  # leaves the engine asleep
    again, s2 = _vllm(policy)  # the next run of a grid, same settings
    assert again is first and len(FakeLLM.built) == 1
    other = policy.reference().model
    s2.sync_weights(other)  # the new run's weights go into the shared engine, which knows it sleeps
    assert first.calls[-3:] == ["wake:weights", "rpc", "reset"]
    s2.sample(["x"], n=1, max_new_tokens=3)
    assert first.calls[-3:] == ["wake:kv_cache", "generate", "sleep1"]
    executor = first.llm_engine.engine_core.engine_core.model_executor
    assert not executor.is_shut_down
    third, _ = _vllm(policy, gpu_memory_utilization=0.5)  # a different engine: the old one goes first
    assert third is not first and executor.is_shut_down and len(FakeLLM.built) == 2
    assert close_vllm_engines() == 1
    assert third.llm_engine.engine_core.engine_core.model_executor.is_shut_down


def test_vllm_recompute_runs_under_the_runs_precision_context(policy, fake_vllm):
    """A bf16 (mixed precision) run: the recomputed behaviour log-probs are the trainer's autocast pass,
    not the float32 one; a float32 run's stay float32."""
    from ibpo_lab.step import precision_context

    _, s32 = _vllm(policy)
    _, s16 = _vllm(policy, trainer_dtype="bfloat16")
    assert s32.trainer_dtype == "float32"
    kw = dict(n=4, max_new_tokens=8, temperature=0.8, seed=3)
    b32, b16 = s32.sample(PROMPTS, **kw), s16.sample(PROMPTS, **kw)
    assert b16.response_ids == b32.response_ids  # the same fake engine draws: only the precision differs
    pad = b16.padded()
    with torch.no_grad():
        lp32, _ = response_logprobs(policy.model, pad, 0.8)
        with precision_context("bfloat16", "cpu"):
            lp16, _ = response_logprobs(policy.model, pad, 0.8)
    gap = 0.0
    for i, r in enumerate(b16.response_ids):
        assert torch.allclose(torch.tensor(b16.logprobs[i]), lp16[i, : len(r)], atol=1e-6), i
        assert torch.allclose(torch.tensor(b32.logprobs[i]), lp32[i, : len(r)], atol=1e-6), i
        gap = max(gap, (lp16[i, : len(r)] - lp32[i, : len(r)]).abs().max().item())
    assert gap > 1e-4  # bf16 matmuls do change them, so the two cases above are distinguishable
    assert next(policy.model.parameters()).dtype == torch.float32  # autocast, not a cast of the weights


def test_build_lab_gives_the_vllm_sampler_the_runs_dtype(monkeypatch):
    import ibpo_lab.step as step
    from ibpo_lab.config import load_config

    seen = []
    monkeypatch.setattr(step, "get_sampler", lambda backend, policy, **kw: seen.append((backend, kw)) or object())
    for dtype in ("bfloat16", "float32"):
        step.build_lab(load_config("smoke").with_overrides(["backend=vllm", f"dtype={dtype}", "device=cpu"]))
    assert [(b, kw.get("trainer_dtype")) for b, kw in seen] == [("vllm", "bfloat16"), ("vllm", "float32")]
    step.build_lab(load_config("smoke").with_overrides(["dtype=bfloat16", "device=cpu"]))  # hf: wrapped instead
    assert seen[-1] == ("hf", {})


def test_vllm_bad_settings_are_value_errors(policy, fake_vllm):
    for kw, match in [(dict(gpu_memory_utilization=0), "gpu_memory_utilization"), (dict(sleep_level=3), "sleep_level"),
                      (dict(logprob_batch_size=0), "logprob_batch_size"), (dict(trainer_dtype="float16"), "trainer_dtype")]:
        with pytest.raises(ValueError, match=match):
            _vllm(policy, **kw)


# ---------------------------------------------------------------------------- real models
def test_committed_tiny_policy_samples():
    pol = load_policy("tiny")
    b = sample(pol, PROMPTS[:2], n=4, max_new_tokens=32, seed=0)
    _assert_logprobs_match(pol, b, 1.0)


@pytest.mark.slow
def test_smollm2_loads_offline_and_samples():
    pol = load_policy("smollm2")
    assert type(pol.model).__name__ == "LlamaForCausalLM"
    assert 1.2e8 < pol.num_parameters() < 1.5e8
    assert pol.tokenizer.padding_side == "left" and pol.tokenizer.pad_token_id is not None
    prompts = ["The capital of France is", "Write one word:"]
    b = sample(pol, prompts, n=2, max_new_tokens=8, temperature=0.8, seed=0)
    assert len(b) == 4 and all(len(r) >= 1 for r in b.response_ids)
    _assert_logprobs_match(pol, b, 0.8, atol=2e-3)
    greedy = sample(pol, prompts[:1], n=1, max_new_tokens=3, temperature=0)
    assert "Paris" in greedy.responses[0]


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_the_token_step_makes_its_tensors_on_the_policys_device(policy, monkeypatch, temperature):
    """A notebook may have called ``torch.set_default_device("cuda")`` with a CPU policy (or the
    reverse): every tensor the token step makes must live on the policy's device, never on torch's
    default one. On a CPU-only machine the "meta" device stands in for the other device: a tensor
    made there cannot meet the policy's (no data, and a device mismatch), so the run raises."""
    n, mx = 3, 24
    ref = sample(policy, PROMPTS, n=n, max_new_tokens=mx, seed=1, temperature=temperature)
    # edited drafts: accepted and rejected draft tokens, rows finishing at different steps
    drafts = [_edit(ref.response_ids[i * n], k) for k, i in enumerate(range(len(PROMPTS)))]
    kw = dict(max_new_tokens=mx, temperature=temperature)
    want = _plain_and_drafted(policy, PROMPTS, n, drafts, 1, **kw)
    assert want[3]["draft_accepted"] < want[3]["draft_fed"]  # some drafted columns were rejected
    decode = HFSampler._decode_chunk

    def under_another_default_device(self, *args, **kwargs):
        with torch.device("meta"):
            return decode(self, *args, **kwargs)

    monkeypatch.setattr(HFSampler, "_decode_chunk", under_another_default_device)
    got = _plain_and_drafted(policy, PROMPTS, n, drafts, 1, **kw)
    _assert_same(want[0], got[0])
    _assert_same(want[1], got[1])
    counts = ("row_forwards", "model_calls", "positions", "draft_fed", "draft_accepted")
    assert [{k: s[k] for k in counts} for s in got[2:]] == [{k: s[k] for k in counts} for s in want[2:]]


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_nan_logits_are_an_error_naming_the_rows(temperature, top_p):
    nan = float("nan")
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, nan, 1.0], [nan, nan, nan], [-math.inf, 0.0, 0.0]])
    with pytest.raises(ValueError) as e:
        _draw(logits, _req(temperature, top_p), torch.full((4,), 0.5, dtype=torch.float64))
    assert str(e.value) == ("the policy returned NaN logits for 2 of 4 rows (first: [1, 2]); its weights or "
                            "activations diverged (e.g. an overflow in float16)")
    # the message names the first five rows of many
    many = torch.zeros(9, 3)
    many[1:, 2] = nan
    with pytest.raises(ValueError, match=r"for 8 of 9 rows \(first: \[1, 2, 3, 4, 5\]\);"):
        _draw(many, _req(temperature, top_p), torch.full((9,), 0.5, dtype=torch.float64))
    # -inf is a masked token, not an error: rows 0 and 3 alone draw, and never the masked token
    token, lp = _draw(logits[[0, 3]], _req(temperature, top_p), torch.tensor([0.01, 0.01], dtype=torch.float64))
    assert token[1].item() != 0 and bool(torch.isfinite(lp).all())
