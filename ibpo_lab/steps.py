"""Reasoning steps: the step spans that step labels, prefix-tree and VinePPO credit, and the step heatmaps use.

A response is cut into steps on its decoded text (by default one step per line) and the cut
is carried back to token spans through the character offsets of the generated ids. Offsets
come from decoding, so they work for any HF tokenizer (byte-level BPE with characters split
over several tokens, sentencepiece with its leading-space marker, char-level tokenizers) and
they always tile exactly the string ``tokenizer.decode(token_ids)``.

Delimiters: ``"newline"``, ``"blank_line"``, ``"regex:<pattern>"`` (the pattern matches the
separators), a compiled ``re.Pattern``, or an ``int`` n (fixed chunks of n tokens). A
separator belongs to the step it ends; whitespace-only pieces merge into the previous step.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ibpo_lab.diff import as_token_array

Span = tuple[int, int]

__all__ = [
    "Span",
    "DELIMITERS",
    "token_char_offsets",
    "decode_with_offsets",
    "split_text_steps",
    "split_steps",
    "step_boundaries",
]

#: named delimiters -> the regex that matches a separator
DELIMITERS: dict[str, str] = {
    "newline": r"\n",
    # a line holding only whitespace (and any run of them) ends a paragraph-sized step
    "blank_line": r"\n(?:[^\S\n]*\n)+",
}

# what an incomplete UTF-8 sequence decodes to in byte-level and byte-fallback decoders
_REPLACEMENT = "\ufffd"
# tokens an unfinished character may wait for its completion (4 UTF-8 bytes, with slack)
_MAX_PENDING = 8


# --------------------------------------------------------------------------- token ids
def _as_ids(token_ids: Any) -> list[int]:
    return as_token_array(token_ids, "token_ids").tolist()


def _decoder(tokenizer: Any, skip_special_tokens: bool):
    if not callable(getattr(tokenizer, "decode", None)):
        raise ValueError(f"tokenizer must have a decode(ids) method, got {type(tokenizer).__name__}")
    if skip_special_tokens:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids)


def _streamed_pieces(ids: list[int], decode) -> list[str] | None:
    """The text each token adds, by streaming detokenisation (as TGI/vLLM do it).

    Each step decodes only a short window that starts at an earlier token boundary where the
    text was complete, so the pass is linear in n, and the window's first token keeps
    sentencepiece's stripped leading space and byte-level merges out of the delta. An
    unfinished multi-byte character (decoded as U+FFFD) is held back until the token that
    completes it. None when a window's text does not extend what was already emitted
    (decoders that rewrite earlier text).
    """
    pieces: list[str] = []
    start = last_complete = 0  # window start, and the latest boundary with complete text
    shown = ""  # the part of decode(ids[start:k]) already handed out
    for k in range(len(ids)):
        new_text = decode(ids[start : k + 1])
        # a UTF-8 character has at most 4 bytes: U+FFFD still pending after more tokens than
        # that is a real replacement character (invalid bytes), not an unfinished one
        if new_text.endswith(_REPLACEMENT) and k + 1 - last_complete <= _MAX_PENDING:
            stable = new_text.rstrip(_REPLACEMENT)
            # byte-fallback decoders may blank a whole run of byte tokens until it is valid
            # UTF-8 again: hand out only text that extends what was shown, else wait
            if stable.startswith(shown):
                pieces.append(stable[len(shown) :])
                shown = stable
            else:
                pieces.append("")
            continue
        if not new_text.startswith(shown):
            return None
        pieces.append(new_text[len(shown) :])
        # complete text: slide the window, keeping the previous complete piece as context
        start, last_complete = last_complete, k + 1
        shown = decode(ids[start : k + 1])
    return pieces


def _prefix_ends(ids: list[int], decode, text: str) -> list[int]:
    """End character of each token from decodes of every prefix: O(n²) but always defined.

    Used only when the streamed pieces do not add up to the full decode (e.g. clean-up rules
    that rewrite earlier text); token k ends where its prefix's decode stops agreeing with
    the full text (never before the previous token's end).
    """
    ends, best = [], 0
    for k in range(len(ids)):
        pre = decode(ids[: k + 1])
        n = min(len(pre), len(text))
        a = np.frombuffer(pre[:n].encode("utf-32-le"), dtype=np.uint32)
        b = np.frombuffer(text[:n].encode("utf-32-le"), dtype=np.uint32)
        mismatch = np.flatnonzero(a != b)
        best = max(best, int(mismatch[0]) if mismatch.size else n)
        ends.append(best)
    ends[-1] = len(text)
    return ends


def decode_with_offsets(token_ids: Any, tokenizer: Any, *, skip_special_tokens: bool = False) -> tuple[str, list[Span]]:
    """``(text, offsets)``: the decode of ``token_ids`` and the character span of each token in it.

    token_ids [n] -> text, n spans ``(start, end)``. The spans tile the text in order:
    ``offsets[0][0] == 0``, ``offsets[k][1] == offsets[k + 1][0]``, ``offsets[-1][1] == len(text)``,
    so ``"".join(text[s:e] for s, e in offsets) == text``. A token that only starts a multi-byte
    character (or decodes to nothing, e.g. a skipped special token) gets an empty span; the
    character goes to the token that completes it. ``tokenizer`` is anything with
    ``decode(list[int]) -> str`` (every HF tokenizer).
    """
    ids = _as_ids(token_ids)
    decode = _decoder(tokenizer, skip_special_tokens)
    text = decode(ids)
    if not isinstance(text, str):
        raise ValueError(f"tokenizer.decode returned {type(text).__name__}, expected str")
    if not ids:
        return text, []
    pieces = _streamed_pieces(ids, decode)
    joined = "".join(pieces) if pieces is not None else None
    if joined is not None and text.startswith(joined) and not text[len(joined) :].strip(_REPLACEMENT):
        # what may be left is a trailing unfinished character: it belongs to the last token
        pieces[-1] += text[len(joined) :]
        ends = np.cumsum([len(p) for p in pieces]).tolist()
    else:
        ends = _prefix_ends(ids, decode, text)
    starts = [0] + ends[:-1]
    return text, list(zip(starts, ends))


def token_char_offsets(token_ids: Any, tokenizer: Any, *, skip_special_tokens: bool = False) -> list[Span]:
    """Character span of each token in ``tokenizer.decode(token_ids)`` (see :func:`decode_with_offsets`)."""
    return decode_with_offsets(token_ids, tokenizer, skip_special_tokens=skip_special_tokens)[1]


# --------------------------------------------------------------------------- text steps
def _separator_pattern(delimiter: Any) -> re.Pattern:
    if isinstance(delimiter, re.Pattern):
        pattern = delimiter
        if isinstance(pattern.pattern, bytes):
            raise ValueError("delimiter: a compiled pattern must be a str pattern, not bytes")
    elif isinstance(delimiter, str) and delimiter in DELIMITERS:
        pattern = re.compile(DELIMITERS[delimiter])
    elif isinstance(delimiter, str) and delimiter.startswith("regex:"):
        source = delimiter[len("regex:") :]
        if not source:
            raise ValueError("delimiter 'regex:' has an empty pattern; write e.g. 'regex:\\n(?=Step)'")
        try:
            pattern = re.compile(source)
        except re.error as e:
            raise ValueError(f"delimiter {delimiter!r} is not a valid regex: {e}") from e
    else:
        allowed = ", ".join(repr(k) for k in DELIMITERS)
        raise ValueError(
            f"unknown delimiter {delimiter!r}; use {allowed}, 'regex:<pattern>', a compiled re.Pattern "
            "or an int (fixed chunks of n tokens, split_steps only)"
        )
    # a pattern that matches nothing at all would cut between every character
    if pattern.search("") is not None:
        raise ValueError(f"delimiter pattern {pattern.pattern!r} matches the empty string; it must match a separator")
    return pattern


def split_text_steps(text: str, delimiter: Any = "newline") -> list[Span]:
    """Character spans of the reasoning steps of ``text``.

    text -> spans ``(start, end)`` that tile ``text`` (contiguous, non-empty, covering it): a
    step ends right after a separator match (the separator belongs to the step it ends) and
    pieces that are only whitespace merge into the previous step (into the next one at the
    very start). Empty text -> ``[]``; whitespace-only text -> one step.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if isinstance(delimiter, (int, np.integer)) and not isinstance(delimiter, bool):
        raise ValueError("delimiter: fixed chunks of n tokens need token ids; use split_steps(token_ids, tokenizer, n)")
    pattern = _separator_pattern(delimiter)
    if not text:
        return []
    cuts = sorted({m.end() for m in pattern.finditer(text)} - {0, len(text)})
    bounds = [0, *cuts, len(text)]
    spans: list[list[int]] = []
    pending_start = None  # leading whitespace-only pieces wait for the first real step
    for s, e in zip(bounds[:-1], bounds[1:]):
        if text[s:e].strip():
            spans.append([s if pending_start is None else pending_start, e])
            pending_start = None
        elif spans:
            spans[-1][1] = e
        elif pending_start is None:
            pending_start = s
    if not spans:
        return [(0, len(text))]
    return [(s, e) for s, e in spans]


# --------------------------------------------------------------------------- token steps
def step_boundaries(spans: Any, n_tokens: int, name: str = "step_spans") -> list[int]:
    """Token boundaries b_0..b_n of n step spans tiling ``n_tokens`` tokens: [0, end_1, ..., end_n].

    Raises ValueError (naming ``name``) unless the spans are contiguous from 0 and end at
    ``n_tokens``: a token outside every step would silently get no step credit."""
    out, pos = [0], 0
    for k, (a, b) in enumerate(spans):
        if a != pos or b < a:
            raise ValueError(f"{name}: span {k} = ({a}, {b}) does not continue at token {pos}")
        pos = b
        out.append(b)
    if pos != n_tokens:
        raise ValueError(f"{name} end at token {pos} but the response has {n_tokens} tokens")
    return out


def _fixed_chunks(n_tokens: int, size: int) -> list[Span]:
    return [(s, min(s + size, n_tokens)) for s in range(0, n_tokens, size)]


def split_steps(
    token_ids: Any, tokenizer: Any = None, delimiter: Any = "newline", *, skip_special_tokens: bool = False
) -> list[Span]:
    """Token spans of the reasoning steps of a response.

    token_ids [n] -> spans ``(start, end)`` into the ids: contiguous, non-empty, covering all n
    tokens. ``delimiter=int`` gives fixed chunks of that many tokens (no tokenizer needed).
    Otherwise the decode is split with :func:`split_text_steps` and each token joins the step
    holding its first non-whitespace character (a whitespace-only token: its first character;
    an empty token: the next token's step), so the k-th token span covers the k-th text step of
    ``split_text_steps(tokenizer.decode(token_ids), delimiter)``. Only if one token holds a
    whole step (impossible for tokenizers that split on whitespace) do two text steps share a span.
    """
    if isinstance(delimiter, (int, np.integer)) and not isinstance(delimiter, bool):
        if delimiter < 1:
            raise ValueError(f"delimiter: fixed chunk size must be >= 1 token, got {delimiter}")
        return _fixed_chunks(len(_as_ids(token_ids)), int(delimiter))
    if isinstance(delimiter, bool):
        raise ValueError(f"unknown delimiter {delimiter!r}")
    pattern = _separator_pattern(delimiter)  # fail on a bad delimiter before decoding
    if tokenizer is None:
        raise ValueError("tokenizer is required unless delimiter is an int (fixed token chunks)")
    text, offsets = decode_with_offsets(token_ids, tokenizer, skip_special_tokens=skip_special_tokens)
    n = len(offsets)
    if n == 0:
        return []
    char_steps = split_text_steps(text, pattern)
    if len(char_steps) <= 1:
        return [(0, n)]
    # step index of every character, then of every token's anchor character
    step_starts = np.array([s for s, _ in char_steps], dtype=np.int64)
    anchors = np.full(n, -1, dtype=np.int64)
    for t, (s, e) in enumerate(offsets):
        if e > s:
            piece = text[s:e]
            lead = len(piece) - len(piece.lstrip())
            anchors[t] = s + (lead if lead < len(piece) else 0)
    step_of = np.full(n, -1, dtype=np.int64)
    has = anchors >= 0
    step_of[has] = np.searchsorted(step_starts, anchors[has], side="right") - 1
    # empty tokens (unfinished characters, skipped specials) go with the next token that has text
    nxt = len(char_steps) - 1
    for t in range(n - 1, -1, -1):
        if step_of[t] < 0:
            step_of[t] = nxt
        nxt = step_of[t]
    bounds = np.flatnonzero(np.diff(step_of)) + 1
    edges = [0, *bounds.tolist(), n]
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
