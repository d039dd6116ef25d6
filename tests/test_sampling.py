"""Tests for ibpo_lab.sampling: group layout, behaviour log-probs = trainer forward pass, stops,
seeding, bad input, and the vllm adapter's contract against a fake engine."""

from __future__ import annotations

import importlib.util
import string

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


def test_vllm_bad_settings_are_value_errors(policy, fake_vllm):
    for kw, match in [(dict(gpu_memory_utilization=0), "gpu_memory_utilization"), (dict(sleep_level=3), "sleep_level"),
                      (dict(logprob_batch_size=0), "logprob_batch_size")]:
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
