"""Tests for ibpo_lab.models: char tokenizer, tiny policy, loading, THE trainer forward pass."""

from __future__ import annotations

import string

import pytest
import torch

from ibpo_lab.models import (
    Policy,
    build_tiny_policy,
    char_tokenizer,
    load_policy,
    position_ids_from_mask,
    response_logprobs,
    tiny_policy_dir,
)
from ibpo_lab.rollout import RolloutBatch

VOCAB = string.printable


@pytest.fixture(scope="module")
def small_policy() -> Policy:
    return build_tiny_policy(VOCAB, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, seed=0)


# ---------------------------------------------------------------------------- tokenizer
def test_char_tokenizer_round_trips_text_with_whitespace():
    tok = char_tokenizer(VOCAB)
    text = "Question: 3 + 4\n  x=7\tdone\n\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1  # one token per character, plus BOS
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id} == {0, 1, 2, 3}
    assert tok.padding_side == "left"


def test_char_tokenizer_unknown_char_and_batch_padding():
    tok = char_tokenizer("ab")
    enc = tok(["ab", "é"], padding=True)
    assert enc["input_ids"][1] == [tok.pad_token_id, tok.bos_token_id, tok.unk_token_id]
    assert enc["attention_mask"][1] == [0, 1, 1]


def test_char_tokenizer_save_load_keeps_ids(tmp_path):
    from transformers import AutoTokenizer

    tok = char_tokenizer(VOCAB)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "line 1\nline 2 = 9"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.decode(again(text)["input_ids"], skip_special_tokens=True) == text


@pytest.mark.parametrize("vocab", ["", ["ab"]])
def test_char_tokenizer_rejects_bad_vocab(vocab):
    with pytest.raises(ValueError, match="vocab"):
        char_tokenizer(vocab)


# ---------------------------------------------------------------------------- tiny policy + loading
def test_build_tiny_policy_default_size():
    pol = build_tiny_policy(VOCAB)
    assert 1e6 <= pol.num_parameters() <= 4e6
    assert pol.context_length >= 512
    assert pol.eos_token_ids == [pol.tokenizer.eos_token_id]


def test_save_and_load_tiny_via_env(tmp_path, monkeypatch, small_policy):
    small_policy.model.save_pretrained(tmp_path)
    small_policy.tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    monkeypatch.setenv("IBPO_TINY_POLICY", str(tmp_path))
    assert tiny_policy_dir() == tmp_path
    pol = load_policy("tiny")
    assert pol.tokenizer.padding_side == "left" and pol.tokenizer.pad_token_id == 0
    ids = torch.tensor([small_policy.tokenizer("abc\n")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(pol.model(ids).logits, small_policy.model(ids).logits, atol=1e-6)
    by_path = load_policy(str(tmp_path), dtype=torch.bfloat16)
    assert next(by_path.model.parameters()).dtype == torch.bfloat16


def test_load_tiny_missing_checkpoint_says_how_to_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("IBPO_TINY_POLICY", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="ibpo_lab.warmup"):
        load_policy("tiny")


def test_unknown_model_offline_is_one_clear_error(monkeypatch):
    import socket

    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE once, when it is imported, so setting the variable
    # here is not enough: offline mode is switched on in the constant its is_offline_mode() reads.
    # And whatever the environment says, the test must never touch the network: name lookups and
    # connections are refused and recorded.
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access blocked by the test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    with pytest.raises(ValueError, match="not available offline") as e:
        load_policy("ibpo-lab-test/no-such-model-xyz")
    assert "HF_HUB_OFFLINE=1 and it is not in the local HF cache" in str(e.value)
    assert "load_policy(" in str(e.value)
    assert attempts == []


def test_load_policy_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        load_policy("tiny", dtype="float8")
    with pytest.raises(ValueError, match="name_or_path"):
        load_policy("")
    with pytest.raises(ValueError, match="gguf_file"):
        load_policy(str(tmp_path), gguf_file="missing.gguf")


def test_reference_is_a_frozen_independent_copy(small_policy):
    ref = small_policy.reference()
    assert all(not p.requires_grad for p in ref.model.parameters())
    assert not ref.model.training
    p0 = next(small_policy.model.parameters())
    r0 = next(ref.model.parameters())
    assert p0.data_ptr() != r0.data_ptr() and torch.equal(p0, r0)


# ---------------------------------------------------------------------------- the forward pass
def _batch(policy, prompts, responses) -> RolloutBatch:
    tok = policy.tokenizer
    p_ids = [tok(p)["input_ids"] for p in prompts]
    r_ids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    return RolloutBatch(p_ids, r_ids, rewards=[0.0] * len(p_ids), group_ids=list(range(len(p_ids))), pad_id=tok.pad_token_id)


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_unpadded_forward(small_policy, temperature):
    """Padding (left for prompts, right for responses) must not change any token's log-prob."""
    prompts = ["Q: 1+2\n", "a much longer question here?\n", "x"]
    responses = ["3", "some answer\nwith lines", "yz"]
    batch = _batch(small_policy, prompts, responses)
    lp, ent = response_logprobs(small_policy.model, batch.padded(), temperature)
    assert lp.shape == ent.shape == (3, batch.max_response_len)
    for i, (p, r) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            logits = small_policy.model(ids).logits[0, len(p) - 1 : -1].float() / temperature
        logp = torch.log_softmax(logits, -1)
        want = logp.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
        want_ent = -(logp.exp() * logp).sum(-1)
        assert torch.allclose(lp[i, : len(r)], want, atol=1e-5)
        assert torch.allclose(ent[i, : len(r)], want_ent, atol=1e-5)
        assert torch.all(lp[i, len(r) :] == 0) and torch.all(ent[i, len(r) :] == 0)
    assert torch.all(lp <= 0) and torch.all(ent >= 0)


def test_response_logprobs_gradients_are_finite(small_policy):
    batch = _batch(small_policy, ["short\n", "a longer prompt\n"], ["ab", "a longer response"])
    model = small_policy.model
    model.zero_grad()
    lp, _ = response_logprobs(model, batch.padded())
    (lp * batch.response_mask).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()


def test_response_logprobs_rejects_bad_temperature(small_policy):
    batch = _batch(small_policy, ["a"], ["b"])
    with pytest.raises(ValueError, match="temperature"):
        response_logprobs(small_policy.model, batch.padded(), 0.0)


# ---------------------------------------------------------------------------- the committed checkpoint
def test_committed_tiny_policy_loads_and_meets_its_targets(monkeypatch):
    """data/tiny-policy: loads offline, covers the synthetic task's characters, and its recorded
    accuracies are in the ranges RL needs (solve pass@1 in [0.2, 0.6], repair success >= 0.5)."""
    import json

    from ibpo_lab.tasks.synthetic import VOCAB as TASK_VOCAB

    monkeypatch.delenv("IBPO_TINY_POLICY", raising=False)
    folder = tiny_policy_dir()
    pol = load_policy("tiny")
    assert pol.name == "tiny" and pol.context_length >= 512
    ids = pol.tokenizer(TASK_VOCAB, add_special_tokens=False)["input_ids"]
    assert pol.tokenizer.unk_token_id not in ids and len(ids) == len(TASK_VOCAB)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    final = json.loads((folder / "warmup.json").read_text())["final"]
    assert 0.2 <= final["solve_pass@1"] <= 0.6 and final["repair_success"] >= 0.5
    card = (folder / "README.md").read_text()
    assert f"{final['solve_pass@1']:.3f}" in card and f"{final['repair_success']:.3f}" in card


# ---------------------------------------------------------------------------- chunked log-probs: values, gradients, memory
def _reference_logprobs(model, padded, temperature=1.0):
    """The unchunked formula: the model's full logits, one float32 log-softmax over [B, T, V]."""
    ids, attn, P = padded.input_ids, padded.attention_mask, padded.prompt_len
    T = ids.shape[1] - P
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits[:, P - 1 : P + T - 1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(-1, padded.response_ids.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    real = attn[:, P:].bool()
    return torch.where(real, lp, 0.0), torch.where(real, ent, 0.0)


def _qwen(vocab: int, hidden: int = 16, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=512)
    return Qwen2ForCausalLM(cfg).eval()


def _gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=256, attn_pdrop=0, resid_pdrop=0, embd_pdrop=0)
    return GPT2LMHeadModel(cfg).eval()


def _random_padded(B, P, T, V, seed=0):
    from ibpo_lab.gpu_check import _padded_batch

    return _padded_batch(B, P, T, V, torch.device("cpu"), seed=seed)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 4096])
def test_chunked_logprobs_equal_unchunked_formula(small_policy, arch, chunk_tokens):
    """Both paths (lm_head per chunk on hidden states for Llama; the model's own logits for GPT-2)
    give the unchunked values within 1e-5, for chunks smaller than a row, ragged, and one chunk."""
    model = small_policy.model if arch == "llama" else _gpt2(len(small_policy.tokenizer))
    from ibpo_lab.models import _plain_head

    assert (_plain_head(model) is not None) == (arch == "llama")
    padded = _random_padded(4, 6, 9, len(small_policy.tokenizer))
    assert padded.attention_mask[:, :6].eq(0).any() and padded.attention_mask[:, 6:].eq(0).any()  # left + right padding
    with torch.no_grad():
        want_lp, want_ent = _reference_logprobs(model, padded, 0.7)
        lp, ent = response_logprobs(model, padded, 0.7, chunk_tokens=chunk_tokens)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == want_lp.shape
    torch.testing.assert_close(lp, want_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_chunked_logprobs_gradients_equal_unchunked(small_policy, arch):
    model = small_policy.model if arch == "llama" else _gpt2(len(small_policy.tokenizer))
    padded = _random_padded(3, 5, 8, len(small_policy.tokenizer), seed=1)
    w = torch.randn(padded.response_ids.shape, generator=torch.Generator().manual_seed(2))

    def grads(fn):
        model.zero_grad(set_to_none=True)
        lp, ent = fn()
        ((lp * w).sum() + 0.1 * (ent * w).sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads(lambda: _reference_logprobs(model, padded))
    got = grads(lambda: response_logprobs(model, padded, chunk_tokens=5))
    model.zero_grad(set_to_none=True)
    assert set(got) == set(want) and len(want) > 0
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_chunk_tokens_must_be_positive(small_policy):
    padded = _random_padded(2, 3, 4, len(small_policy.tokenizer))
    with pytest.raises(ValueError, match="chunk_tokens"):
        response_logprobs(small_policy.model, padded, chunk_tokens=0)


def test_logprob_pass_memory_at_qwen_vocab_is_one_chunk_not_b_t_v():
    """Qwen2.5's vocabulary (151936) with a tiny hidden size: the live tensor bytes the pass creates
    (TensorMemoryMeter) stay below a few [chunk, V] float32 tensors, while the unchunked formula
    needs several [B, T, V] ones. Bounds from the shapes: B=4, T=64, V=151936, chunk=32."""
    from ibpo_lab.gpu_check import TensorMemoryMeter

    V, B, P, T, C = 151936, 4, 8, 64, 32
    model = _qwen(V)
    padded = _random_padded(B, P, T, V)
    BTV = B * T * V * 4  # one float32 [B, T, V] tensor: 155.6 MB
    CV = C * V * 4  # one float32 [chunk, V] tensor: 19.4 MB

    with torch.no_grad(), TensorMemoryMeter() as old:
        _reference_logprobs(model, padded)
    with torch.no_grad(), TensorMemoryMeter() as new:
        response_logprobs(model, padded, chunk_tokens=C)
    assert old.peak >= 2 * BTV  # at least logits and log-softmax side by side
    assert new.largest <= CV  # no tensor larger than one float32 [chunk, V]
    small = 2**20  # the hidden-16 decoder's own activations: B * (P + T) * 16 floats a few times over
    assert new.peak <= 4 * CV + small  # logits, log-probs, probabilities and their product, one chunk at a time

    # with gradients: backward rebuilds one chunk at a time too
    with TensorMemoryMeter() as new_bw:
        lp, ent = response_logprobs(model, padded, chunk_tokens=C)
        (lp.sum() + ent.sum()).backward()
    with TensorMemoryMeter() as old_bw:
        lp, ent = _reference_logprobs(model, padded)
        (lp.sum() + ent.sum()).backward()
    model.zero_grad(set_to_none=True)
    emb = V * 16 * 4  # the tied embedding's gradient, a [V, H] float32 tensor
    # backward: the chunk rebuilt (logits, log-probs, probabilities) plus their gradients, and the
    # two [V, H] gradients of the tied embedding (as input embedding and as lm_head)
    assert new_bw.peak <= 6 * CV + 2 * emb + small
    assert old_bw.peak >= 3 * BTV


def test_tokenizer_for_and_cached_model_pass_through():
    from ibpo_lab.models import cached_model, tokenizer_for

    assert cached_model("tiny") == "tiny" and cached_model("Qwen/Qwen2.5-1.5B-Instruct").startswith("Qwen")
    tok = tokenizer_for("tiny-random")  # the random tiny policy's character tokenizer over the synthetic vocabulary
    assert tok.decode(tok.encode("3+4", add_special_tokens=False)) == "3+4"
    assert tokenizer_for("no-such-model") is None  # offline and unknown: views fall back to characters
