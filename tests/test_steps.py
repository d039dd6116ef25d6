"""Tests for ibpo_lab.steps: character offsets for several tokenizer families and step spans."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from _smollm2 import smollm2_tokenizer

import ibpo_lab.steps as steps_module
from ibpo_lab.steps import decode_with_offsets, split_steps, split_text_steps, step_boundaries, token_char_offsets

# multi-line reasoning-like text with multi-byte characters (é, ×, CJK, emoji) so byte-level
# and byte-fallback tokenizers split characters across tokens
CORPUS = [
    "Step 1: compute 3 + 4 = 7.\nStep 2: multiply by 2, giving 14.\n\nSo the answer is 14.",
    "Première étape : on calcule 12 × 3 = 36.\nDeuxième étape : 36 − 6 = 30 ✓\n",
    "第一步：计算 5 + 5 = 10。\n第二步：10 × 2 = 20。\n答案是 20 🎉",
    "def f(x):\n    return x * 2\n\nprint(f(21))  # 42\n",
    "The quick brown fox jumps over the lazy dog; then it naps.\n",
]
ALPHABET = sorted(set("".join(CORPUS)) | set("abcxyz \n\t.,é🎉中"))


# --------------------------------------------------------------------------- tokenizers, built offline
def char_tokenizer() -> PreTrainedTokenizerFast:
    table = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in ALPHABET:
        table[c] = len(table)
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def gpt2_style_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style): every byte is a symbol, so rare characters span tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """Sentencepiece-like BPE (Llama 2 style): '▁' space marker, byte fallback, leading space stripped."""
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = norm
    # train on whitespace-split pieces as sentencepiece does, so no merge crosses a space or a
    # newline; the final tokenizer has no pre-tokenizer, like HF's converted Llama tokenizers
    base.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="never", split=True), pre_tokenizers.Split("\n", "isolated")]
    )
    # a small alphabet so that accented, CJK and emoji characters go through byte fallback
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40, show_progress=False
    )
    base.train_from_iterator(CORPUS * 3, trainer)
    spec = json.loads(base.to_str())["model"]
    vocab = dict(spec["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"char": char_tokenizer(), "gpt2": gpt2_style_tokenizer(), "llama": llama_style_tokenizer()}
FAST = settings(max_examples=60, deadline=None)
# runs of characters and multi-character chunks, so lines, blank lines and words all occur
texts = st.lists(st.sampled_from(ALPHABET + ["\n\n", "  ", "Step ", "the ", "= 10。"]), max_size=40).map("".join)


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _reference_ends(ids, tok) -> list[int]:
    """Brute-force definition: token k ends at the longest stretch of the full decode that some
    prefix ids[:j+1], j <= k, already decodes to (an unfinished trailing character aside;
    byte-fallback decoders blank a whole run of byte tokens while it is incomplete)."""
    full = tok.decode(ids)
    ends, best = [], 0
    for k in range(len(ids)):
        pre = tok.decode(ids[: k + 1]).rstrip("\ufffd")
        best = max(best, len(os.path.commonprefix([pre, full])))
        ends.append(best)
    ends[-1] = len(full)
    return ends


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_streaming_path_serves_standard_tokenizers(name):
    # the linear-time streamed pieces must add up to the decode on their own (no O(n²) fallback)
    tok = TOKENIZERS[name]
    for text in CORPUS:
        ids = _ids(tok, text)
        assert "".join(steps_module._streamed_pieces(ids, tok.decode)) == tok.decode(ids)


def test_tokenizers_really_split_characters():
    # guards the fixtures: byte-level and byte-fallback tokenizers must produce partial characters
    for name in ("gpt2", "llama"):
        tok = TOKENIZERS[name]
        ids = _ids(tok, "é🎉中")
        assert len(ids) > 3, name
        assert any("\ufffd" in tok.decode([i]) for i in ids), name


# --------------------------------------------------------------------------- offsets
@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("text", CORPUS + ["", "x", "  leading spaces", "é🎉 中\n\n  y", "a  b\n"])
def test_offsets_tile_decode_and_match_reference(name, text):
    tok = TOKENIZERS[name]
    ids = _ids(tok, text)
    decoded, offsets = decode_with_offsets(ids, tok)
    assert decoded == tok.decode(ids)
    assert len(offsets) == len(ids)
    if ids:
        assert offsets[0][0] == 0 and offsets[-1][1] == len(decoded)
        assert all(offsets[k][1] == offsets[k + 1][0] for k in range(len(ids) - 1))
        assert all(s <= e for s, e in offsets)
        assert [e for _, e in offsets] == _reference_ends(ids, tok)
    assert "".join(decoded[s:e] for s, e in offsets) == decoded


@pytest.mark.parametrize("name", list(TOKENIZERS))
@FAST
@given(text=texts)
def test_offsets_property(name, text):
    tok = TOKENIZERS[name]
    ids = _ids(tok, text)
    decoded, offsets = decode_with_offsets(ids, tok)
    assert "".join(decoded[s:e] for s, e in offsets) == decoded
    if ids:
        assert [e for _, e in offsets] == _reference_ends(ids, tok)
        # a token whose own decode is complete text owns exactly that text (up to sentencepiece's
        # stripped leading space on the first token)
        for k, (s, e) in enumerate(offsets):
            own = tok.decode([ids[k]])
            if "\ufffd" not in own and k > 0 and name != "llama":
                assert decoded[s:e] == own


def test_offsets_char_tokenizer_one_char_each():
    tok = TOKENIZERS["char"]
    ids = _ids(tok, "ab\ncé🎉")
    assert token_char_offsets(ids, tok) == [(i, i + 1) for i in range(6)]


def test_offsets_partial_characters_go_to_the_completing_token():
    tok = TOKENIZERS["gpt2"]
    ids = _ids(tok, "🎉")
    text, offsets = decode_with_offsets(ids, tok)
    assert text == "🎉" and len(ids) > 1
    assert offsets[:-1] == [(0, 0)] * (len(ids) - 1) and offsets[-1] == (0, 1)


def test_offsets_unfinished_trailing_character():
    tok = TOKENIZERS["gpt2"]
    ids = _ids(tok, "ab🎉")
    cut = ids[:-1]  # the emoji's last byte is missing: decode ends with U+FFFD
    text, offsets = decode_with_offsets(cut, tok)
    assert text.endswith("\ufffd")
    assert offsets[-1][1] == len(text) and "".join(text[s:e] for s, e in offsets) == text


def test_offsets_skip_special_tokens():
    tok = TOKENIZERS["gpt2"]
    ids = _ids(tok, "one\ntwo") + [tok.eos_token_id]
    text, offsets = decode_with_offsets(ids, tok, skip_special_tokens=True)
    assert text == "one\ntwo" and offsets[-1] == (len(text), len(text))
    text_full, offsets_full = decode_with_offsets(ids, tok)
    assert text_full.endswith("<|endoftext|>") and offsets_full[-1][1] - offsets_full[-1][0] == len("<|endoftext|>")


def test_offsets_invalid_bytes_stay_linear():
    # a policy can emit byte tokens that never form valid UTF-8; the streaming window must not
    # wait for a completion that never comes (that would make it quadratic)
    tok = TOKENIZERS["gpt2"]
    # byte 0xA9 (a UTF-8 continuation byte) is the symbol "©" in the GPT-2 byte alphabet
    stray = tok.convert_tokens_to_ids("©")
    assert tok.decode([stray] * 3) == "\ufffd" * 3
    ids = ([stray] * 400 + _ids(tok, "ok\n")) * 3
    calls = []

    class Counting:
        def decode(self, x):
            calls.append(len(x))
            return tok.decode(x)

    text, offsets = decode_with_offsets(ids, Counting())
    assert text == tok.decode(ids) and "".join(text[s:e] for s, e in offsets) == text
    assert max(calls[1:]) <= 24 and len(calls) <= 2 * len(ids) + 2  # short windows, ~2 decodes per token
    assert len(split_steps(ids, tok)) == 3


class _RewritingTokenizer:
    """Not an HF tokenizer: decode joins pieces, then rewrites 'ab' to 'Y' — a decoder whose
    streamed deltas do not add up, forcing the prefix-decoding fallback."""

    pieces = ["a", "b", "c", "\n", " "]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids).replace("ab", "Y")


def test_offsets_fallback_for_rewriting_decoders():
    tok = _RewritingTokenizer()
    ids = [2, 0, 1, 3, 2, 0, 1, 1]  # "cab\ncabb" -> "cY\ncYb"
    text, offsets = decode_with_offsets(ids, tok)
    assert text == "cY\ncYb"
    assert "".join(text[s:e] for s, e in offsets) == text
    assert [e for _, e in offsets] == [1, 1, 2, 3, 4, 4, 5, 6]
    assert split_steps(ids, tok) == [(0, 4), (4, 8)]


@pytest.mark.parametrize("convert", [list, np.array, torch.tensor, lambda x: np.array(x, dtype=np.int32)])
def test_offsets_accept_lists_arrays_tensors(convert):
    tok = TOKENIZERS["char"]
    ids = _ids(tok, "ab\nc")
    assert token_char_offsets(convert(ids), tok) == token_char_offsets(ids, tok)
    assert split_steps(convert(ids), tok) == [(0, 3), (3, 4)]


@pytest.mark.parametrize("bad", [[[1, 2]], [1.0, 2.0], torch.tensor([1.5]), "ab", np.array([True])])
def test_offsets_reject_bad_ids(bad):
    with pytest.raises(ValueError, match="token_ids"):
        token_char_offsets(bad, TOKENIZERS["char"])


def test_offsets_reject_non_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        token_char_offsets([1, 2], object())


class _CountingTokenizer:
    """Wraps a tokenizer and records the length of every ``decode`` call."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids, **kw):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kw)


def test_offsets_do_linear_work():
    # operation count, not wall clock: the streamed path decodes at most two short windows per
    # token (a window spans back to the previous complete boundary, at most _MAX_PENDING tokens
    # of an unfinished character each side), where the O(n²) prefix fallback would decode n
    # prefixes of average length n/2 (33M token decodes here). Timing: benchmarks.speed/alignment.
    tok = TOKENIZERS["gpt2"]
    ids = _ids(tok, "\n".join(CORPUS) * 80)[:8192]
    assert len(ids) == 8192
    counting = _CountingTokenizer(tok)
    offsets = token_char_offsets(ids, counting)
    assert offsets[-1][1] == len(tok.decode(ids))
    calls = counting.lengths[1:]  # the first call is the one full decode
    assert counting.lengths[0] == len(ids)
    assert len(calls) <= 2 * len(ids)
    assert max(calls) <= 2 * (steps_module._MAX_PENDING + 1)
    assert sum(calls) <= 4 * (steps_module._MAX_PENDING + 1) * len(ids)


# --------------------------------------------------------------------------- text steps
def _pieces(text, spans):
    return [text[s:e] for s, e in spans]


def test_split_text_steps_newline():
    text = "a = 1\nb = 2\n\n\nc = 3\n"
    spans = split_text_steps(text)
    assert _pieces(text, spans) == ["a = 1\n", "b = 2\n\n\n", "c = 3\n"]


def test_split_text_steps_blank_line_and_regex():
    text = "p1 l1\np1 l2\n \t\np2\n\n\np3"
    assert _pieces(text, split_text_steps(text, "blank_line")) == ["p1 l1\np1 l2\n \t\n", "p2\n\n\n", "p3"]
    text = "Step 1: x. Step 2: y. Step 3: z."
    spans = split_text_steps(text, r"regex:(?<=\.) ")
    assert _pieces(text, spans) == ["Step 1: x. ", "Step 2: y. ", "Step 3: z."]
    assert split_text_steps(text, re.compile(r"(?<=\.) ")) == spans
    # zero-width separators are allowed (split before each "Step")
    assert _pieces(text, split_text_steps(text, r"regex:(?=Step)")) == ["Step 1: x. ", "Step 2: y. ", "Step 3: z."]


def test_split_text_steps_edge_cases():
    assert split_text_steps("") == []
    assert split_text_steps("  \n\n ") == [(0, 5)]
    assert _pieces("\n\n a\nb", split_text_steps("\n\n a\nb")) == ["\n\n a\n", "b"]
    assert split_text_steps("no separator") == [(0, 12)]


@pytest.mark.parametrize(
    "delimiter,match",
    [
        ("comma", "unknown delimiter"),
        ("regex:", "empty pattern"),
        ("regex:(", "not a valid regex"),
        ("regex:x*", "empty string"),
        (re.compile(r"\s*"), "empty string"),
        (3, "split_steps"),
        (None, "unknown delimiter"),
        (True, "unknown delimiter"),
    ],
)
def test_split_text_steps_bad_delimiter(delimiter, match):
    with pytest.raises(ValueError, match=match):
        split_text_steps("a\nb", delimiter)


def test_split_text_steps_rejects_non_text():
    with pytest.raises(ValueError, match="text"):
        split_text_steps(b"a\nb")


def _check_tiling(text, spans):
    if not text:
        assert spans == []
        return
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(s < e for s, e in spans)


@FAST
@given(text=texts)
def test_split_text_steps_newline_matches_lines(text):
    spans = split_text_steps(text, "newline")
    _check_tiling(text, spans)
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if lines:
        assert [p.strip() for p in _pieces(text, spans)] == lines
        # each step but the last ends with its separator
        assert all(text[e - 1] == "\n" for _, e in spans[:-1])
    else:
        assert len(spans) == (1 if text else 0)


@FAST
@given(text=texts)
def test_split_text_steps_blank_line_matches_paragraphs(text):
    spans = split_text_steps(text, "blank_line")
    _check_tiling(text, spans)
    paragraphs, run = [], []
    for line in text.split("\n") + [""]:
        if line.strip():
            run.append(line)
        elif run:
            paragraphs.append("\n".join(run).strip())
            run = []
    if paragraphs:
        assert [p.strip() for p in _pieces(text, spans)] == paragraphs


# --------------------------------------------------------------------------- token steps
def _check_token_steps(ids, tok, delimiter):
    spans = split_steps(ids, tok, delimiter)
    n = len(ids)
    if n == 0:
        assert spans == []
        return spans
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(s < e for s, e in spans)
    text, offsets = decode_with_offsets(ids, tok)
    steps = split_text_steps(text, delimiter)
    if len(steps) > 1:
        # the invariant the tasks rely on: the k-th token span covers the k-th text step
        assert len(spans) == len(steps)
        for (ts, te), (cs, ce) in zip(spans, steps):
            content = text[cs:ce]
            lo = cs + len(content) - len(content.lstrip())
            hi = ce - (len(content) - len(content.rstrip()))
            assert offsets[ts][0] <= lo and hi <= offsets[te - 1][1], (content, text[offsets[ts][0] : offsets[te - 1][1]])
    return spans


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("delimiter", ["newline", "blank_line", "regex:[.。]"])
def test_split_steps_invariant_on_corpus(name, delimiter):
    tok = TOKENIZERS[name]
    for text in CORPUS:
        _check_token_steps(_ids(tok, text), tok, delimiter)


@pytest.mark.parametrize("name", list(TOKENIZERS))
@FAST
@given(text=texts)
def test_split_steps_invariant_property(name, text):
    tok = TOKENIZERS[name]
    _check_token_steps(_ids(tok, text), tok, "newline")


def test_split_steps_char_tokenizer_exact():
    tok = TOKENIZERS["char"]
    ids = _ids(tok, "ab\n\ncd\ne")
    assert split_steps(ids, tok) == [(0, 4), (4, 7), (7, 8)]
    assert split_steps(ids, tok, "blank_line") == [(0, 4), (4, 8)]


def test_split_steps_trailing_special_token_joins_last_step():
    tok = TOKENIZERS["gpt2"]
    ids = _ids(tok, "one\ntwo") + [tok.eos_token_id]
    for skip in (False, True):
        spans = split_steps(ids, tok, skip_special_tokens=skip)
        assert len(spans) == 2 and spans[-1][1] == len(ids)


@pytest.mark.parametrize("n,size", [(10, 3), (9, 3), (1, 5), (0, 4), (7, 1)])
def test_split_steps_fixed_chunks(n, size):
    spans = split_steps(list(range(n)), None, size)
    assert [e - s for s, e in spans] == [size] * (n // size) + ([n % size] if n % size else [])
    assert sum(e - s for s, e in spans) == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("delimiter,match", [(0, ">= 1"), (-2, ">= 1"), (True, "unknown"), ("tabs", "unknown")])
def test_split_steps_bad_delimiter(delimiter, match):
    with pytest.raises(ValueError, match=match):
        split_steps([1, 2, 3], TOKENIZERS["char"], delimiter)


def test_split_steps_needs_tokenizer_for_text_delimiters():
    with pytest.raises(ValueError, match="tokenizer"):
        split_steps([1, 2, 3], None, "newline")


def test_split_steps_agrees_with_synthetic_task_labels():
    # the contract tasks rely on: one token span per step label, with the project's char tokenizer
    models = pytest.importorskip("ibpo_lab.models")
    synthetic = pytest.importorskip("ibpo_lab.tasks.synthetic")
    tok = models.char_tokenizer(synthetic.VOCAB)
    task = synthetic.SyntheticTask()
    rng = np.random.default_rng(0)
    checked = 0
    for ex in task.examples("train", n=4):
        for solution in task.solutions(ex, 2, rng):
            for response in (solution, task.inject_error(ex, solution, rng)):
                labels = task.step_labels(ex, response)
                ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                for skip in (False, True):
                    spans = split_steps(ids, tok, task.step_delimiter, skip_special_tokens=skip)
                    assert len(spans) == len(labels) and spans[-1][1] == len(ids)
                checked += 1
    assert checked >= 8


# --------------------------------------------------------------------------- a real tokenizer
@pytest.mark.slow
def test_smollm2_gguf_tokenizer():
    tok = smollm2_tokenizer()
    text = "\n\n".join(CORPUS) + "\nCafé ☕ — naïve 🎉\n"
    ids = _ids(tok, text)
    decoded, offsets = decode_with_offsets(ids, tok)
    assert decoded == tok.decode(ids)
    assert [e for _, e in offsets] == _reference_ends(ids, tok)
    assert "".join(steps_module._streamed_pieces(ids, tok.decode)) == decoded  # linear path, no fallback
    for delimiter in ("newline", "blank_line"):
        spans = _check_token_steps(ids, tok, delimiter)
        assert len(spans) == len(split_text_steps(decoded, delimiter))


def test_step_boundaries_require_an_exact_tiling():
    assert step_boundaries([(0, 2), (2, 2), (2, 5)], 5) == [0, 2, 2, 5]
    assert step_boundaries([], 0) == [0]
    with pytest.raises(ValueError, match=r"spans\[7\]: span 1 = \(3, 5\) does not continue at token 2"):
        step_boundaries([(0, 2), (3, 5)], 5, name="spans[7]")
    with pytest.raises(ValueError, match="end at token 2 but the response has 5"):
        step_boundaries([(0, 2)], 5)
    with pytest.raises(ValueError, match="does not continue"):
        step_boundaries([(0, 3), (3, 1)], 3)  # a span running backwards


# --------------------------------------------------------------------------- token boundaries anywhere
# (written against the survivors of `scripts/mutation.sh steps`: each states a documented rule)
class _ByteTokenizer:
    """decode-only tokenizer whose tokens are arbitrary byte strings, so a token can end inside a
    UTF-8 character or run across a step separator (byte-level BPE merges can do both).
    ``special`` ids are dropped by ``skip_special_tokens=True``."""

    def __init__(self, pieces: list[bytes], special: tuple[int, ...] = ()):
        self.pieces, self.special = pieces, special

    def decode(self, ids, skip_special_tokens: bool = False):
        keep = [i for i in ids if not (skip_special_tokens and i in self.special)]
        return b"".join(self.pieces[i] for i in keep).decode("utf-8", errors="replace")


def test_split_steps_token_joins_the_step_of_its_first_non_space_character():
    # "a" | "\nb" | "c": the second token starts with the separator but its text is "b"
    tok = _ByteTokenizer([b"a", b"\nb", b"c"])
    assert split_text_steps("a\nbc") == [(0, 2), (2, 4)]
    assert split_steps([0, 1, 2], tok) == [(0, 1), (1, 3)]


def test_split_steps_token_holding_a_whole_step_keeps_it():
    # the first token is the whole first step ("a\n"); it is not merged into the next one
    tok = _ByteTokenizer([b"a\n", b"b"])
    assert split_steps([0, 1], tok) == [(0, 1), (1, 2)]


def test_split_steps_empty_token_goes_with_the_next_token():
    # U+3000 (ideographic space, bytes e3 80 80) split over two tokens; the completing token also
    # carries the separator and "b": token 1 has an empty span and joins token 2's step (step 2)
    tok = _ByteTokenizer([b"a", b"\xe3\x80", b"\x80\nb"])
    text, offsets = decode_with_offsets([0, 1, 2], tok)
    assert text == "a\u3000\nb" and offsets == [(0, 1), (1, 1), (1, 4)]
    assert split_steps([0, 1, 2], tok) == [(0, 1), (1, 3)]


def test_special_tokens_are_kept_unless_skipped():
    # a special token whose text holds a separator is a step end only when it is decoded
    tok = _ByteTokenizer([b"a", b"<END>\n", b"b"], special=(1,))
    assert token_char_offsets([0, 1, 2], tok) == [(0, 1), (1, 7), (7, 8)]
    assert token_char_offsets([0, 1, 2], tok, skip_special_tokens=True) == [(0, 1), (1, 1), (1, 2)]
    assert split_steps([0, 1, 2], tok) == [(0, 2), (2, 3)]
    assert split_steps([0, 1, 2], tok, skip_special_tokens=True) == [(0, 3)]


def test_unfinished_trailing_character_stays_on_the_linear_path(monkeypatch):
    def quadratic(*a, **k):
        raise AssertionError("the O(n²) prefix fallback ran")

    monkeypatch.setattr(steps_module, "_prefix_ends", quadratic)
    tok = _ByteTokenizer([b"a", b"b", b"\xf0\x9f"])  # the emoji's last two bytes never come
    text, offsets = decode_with_offsets([0, 1, 2], tok)
    assert text == "ab\ufffd" and offsets == [(0, 1), (1, 2), (2, 3)]


def test_invalid_bytes_wait_at_most_max_pending_tokens():
    # stray continuation bytes never complete a character: each run of tokens waiting for one is
    # released after _MAX_PENDING tokens, so no span swallows an unbounded run
    tok = _ByteTokenizer([b"\xa9", b"x"])
    ids = [0] * 40 + [1]
    text, offsets = decode_with_offsets(ids, tok)
    assert text == "\ufffd" * 40 + "x"
    run = longest = 0
    for s, e in offsets:
        run = run + 1 if s == e else 0
        longest = max(longest, run)
    assert 3 <= longest <= steps_module._MAX_PENDING  # a 4-byte character split in 4 tokens waits 3


def test_fallback_gives_an_empty_span_to_a_token_rewritten_away():
    # "a" alone decodes to "a", but "ab" decodes to "Y": the text never starts with "a", so
    # token 0 ends at 0 and "Y" belongs to token 1
    tok = _RewritingTokenizer()
    assert decode_with_offsets([0, 1, 2], tok) == ("Yc", [(0, 0), (0, 1), (1, 2)])


def test_steps_error_messages():
    class BytesDecoder:
        def decode(self, ids):
            return b"x"

    with pytest.raises(ValueError, match=r"^tokenizer.decode returned bytes, expected str$"):
        token_char_offsets([1], BytesDecoder())
    with pytest.raises(ValueError, match=r"^tokenizer must have a decode\(ids\) method, got object$"):
        token_char_offsets([1], object())
    with pytest.raises(ValueError, match=r"^token_ids must hold integer token ids"):
        split_steps([1.5], TOKENIZERS["char"])
    with pytest.raises(ValueError, match=r"^delimiter: a compiled pattern must be a str pattern, not bytes$"):
        split_text_steps("a", re.compile(b"\n"))
    with pytest.raises(ValueError, match=r"^delimiter 'regex:' has an empty pattern; write e.g. 'regex:\\n\(\?=Step\)'$"):
        split_text_steps("a", "regex:")
    with pytest.raises(ValueError, match=r"^unknown delimiter 'para'; use 'newline', 'blank_line', 'regex:<pattern>', "
                                         r"a compiled re.Pattern or an int \(fixed chunks of n tokens, split_steps only\)$"):
        split_text_steps("a", "para")
    with pytest.raises(ValueError, match=r"matches the empty string"):
        split_text_steps("a", "regex:^$")  # matches only the empty string
    with pytest.raises(ValueError, match=r"^text must be a str, got int$"):
        split_text_steps(3)
    with pytest.raises(ValueError, match=r"^delimiter: fixed chunks of n tokens need token ids; use split_steps\(token_ids, tokenizer, n\)$"):
        split_text_steps("a", 2)
    with pytest.raises(ValueError, match=r"^tokenizer is required unless delimiter is an int \(fixed token chunks\)$"):
        split_steps([1, 2], None, "newline")
    with pytest.raises(ValueError, match=r"^step_spans end at token 1 but the response has 2 tokens$"):
        step_boundaries([(0, 1)], 2)


def test_regex_separator_at_the_very_start_ends_a_step():
    # "X" is a separator; the one at position 0 ends a one-character first step
    assert split_text_steps("XabXc", "regex:X") == [(0, 1), (1, 4), (4, 5)]
