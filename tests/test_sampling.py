"""Tests for ibpo_lab.sampling: group layout, behaviour log-probs = trainer forward pass, stops,
seeding, bad input, and the vllm adapter's contract against a fake engine."""

from __future__ import annotations

import importlib.util
import string
from types import SimpleNamespace

import pytest
import torch

from ibpo_lab.models import Policy, build_tiny_policy, load_policy, response_logprobs
from ibpo_lab.rollout import RolloutBatch
from ibpo_lab.sampling import HFSampler, VLLMSampler, get_sampler, list_backends, sample

VOCAB = string.ascii_lowercase + string.digits + " \n+=:?"
PROMPTS = ["Q: 1+2=?\n", "a much longer question: 12+30=?\n", "x"]


@pytest.fixture(scope="module")
def policy() -> Policy:
    pol = build_tiny_policy(VOCAB, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, seed=0)
    # a random model almost never says EOS; treat a few characters as EOS too so lengths vary
    tok = pol.tokenizer
    pol.model.generation_config.eos_token_id = [tok.eos_token_id] + tok.convert_tokens_to_ids(list("abcde"))
    return pol


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


# ---------------------------------------------------------------------------- vllm adapter
@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_missing_is_a_clear_error(policy):
    with pytest.raises(ImportError, match=r"vllm.*pip install.*backend='hf'"):
        get_sampler("vllm", policy)


class FakeRunnerModel:
    def __init__(self):
        self.loaded: list[str] = []

    def load_weights(self, weights):
        self.loaded += [name for name, _ in weights]


class FakeLLM:
    """Mimics the parts of vllm.LLM the adapter uses; emits random tokens, ending some with EOS."""

    def __init__(self, eos_id: int, vocab_size: int):
        self.eos_id, self.vocab_size = eos_id, vocab_size
        self.calls: list[str] = []
        self.runner = FakeRunnerModel()
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self.runner)))
        )
        self.requests = None

    def sleep(self, level):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append("wake:" + ",".join(tags))

    def reset_prefix_cache(self):
        self.calls.append("reset")

    def generate(self, requests, sampling_params, use_tqdm=True):
        self.calls.append("generate")
        self.requests, self.params = requests, sampling_params
        g = torch.Generator().manual_seed(sampling_params.seed or 0)
        outs = []
        for _ in requests:
            comps = []
            for j in range(sampling_params.n):
                k = int(torch.randint(1, sampling_params.max_tokens + 1, (1,), generator=g))
                ids = torch.randint(4, self.vocab_size, (k,), generator=g).tolist()
                if j % 2 == 0:
                    ids[-1] = self.eos_id
                lps = [{t: SimpleNamespace(logprob=-1.0)} for t in ids]
                reason = "stop" if j % 2 == 0 else "length"
                comps.append(SimpleNamespace(token_ids=ids, logprobs=lps, finish_reason=reason))
            outs.append(SimpleNamespace(outputs=comps))
        return outs


def _vllm(policy, **kw):
    fake = FakeLLM(policy.tokenizer.eos_token_id, len(policy.tokenizer))
    return fake, VLLMSampler(policy, engine=fake, sampling_params_cls=SimpleNamespace, **kw)


def test_vllm_adapter_contract_with_fake_engine(policy):
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


def test_vllm_engine_logprobs_when_not_recomputed(policy):
    _, sampler = _vllm(policy, recompute_logprobs=False, enable_sleep_mode=False)
    b = sampler.sample(["x"], n=2, max_new_tokens=5, seed=0)
    assert all(v == -1.0 for lp in b.logprobs for v in lp)


def test_vllm_sync_weights_pushes_every_parameter(policy):
    fake, sampler = _vllm(policy, sleep_level=2)
    sampler.sample(["x"], n=1, max_new_tokens=3)
    with pytest.raises(RuntimeError, match="sync_weights"):
        sampler.sample(["x"], n=1, max_new_tokens=3)  # level-2 sleep dropped the weights
    new = policy.reference().model
    sampler.sync_weights(new)
    assert fake.runner.loaded == [name for name, _ in new.named_parameters()]
    assert fake.calls[-2:] == ["wake:weights", "reset"] and sampler.policy.model is new
    sampler.sample(["x"], n=1, max_new_tokens=3)
    assert fake.calls[-3:] == ["wake:kv_cache", "generate", "sleep2"]


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
