"""Verifier helpers for the real-data tasks: response hygiene, numeric final answers, data files.

Shared by ``gsm8k``, ``math``, ``humaneval`` and ``rg:<dataset>`` so that every task treats bad
input the same way: a response that is not text, not UTF-8, empty or absurdly long gets reward 0
with a reason, never an exception (:func:`guarded_score`); a malformed data file raises one
``ValueError`` naming the file and the line.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ibpo_lab.tasks.base import Score

__all__ = [
    "MAX_RESPONSE_CHARS",
    "as_text",
    "check_max_response_chars",
    "guarded_score",
    "cached_split",
    "check_n",
    "parse_number",
    "numbers_equal",
    "extract_numeric_answer",
    "extract_final_number",
    "single_number",
    "MAX_ANSWER_CHARS",
    "last_boxed",
    "read_jsonl",
    "data_dir_file",
    "hub_offline",
]

#: responses longer than this are refused before any parsing (the verifiers are regex/sympy based;
#: a megabyte of text is not a real answer and only costs time)
MAX_RESPONSE_CHARS = 200_000


def as_text(response: Any, max_chars: int = MAX_RESPONSE_CHARS) -> tuple[str | None, str]:
    """Coerce a response to ``str`` or say why it cannot be scored.

    Returns ``(text, "ok")`` or ``(None, reason)``. Bytes must be valid UTF-8; ``str`` must be
    encodable as UTF-8 (no lone surrogates, which is what ``errors="surrogateescape"`` leaves).
    """
    if isinstance(response, (bytes, bytearray, memoryview)):
        try:
            response = bytes(response).decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"response is not valid UTF-8 ({e.reason} at byte {e.start})"
    if not isinstance(response, str):
        return None, f"response is not text (got {type(response).__name__})"
    if len(response) > max_chars:
        return None, f"response too long ({len(response)} > {max_chars} characters)"
    try:
        response.encode("utf-8")
    except UnicodeEncodeError as e:
        return None, f"response is not valid UTF-8 ({e.reason} at character {e.start})"
    if not response.strip():
        return None, "empty response"
    return response, "ok"


def check_max_response_chars(value: Any) -> int:
    """A task's ``max_response_chars``: a positive int (ValueError otherwise)."""
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"max_response_chars must be a positive int, got {value!r}")
    return value


def guarded_score(response: Any, max_chars: int, verify: Callable[[str], Score], *,
                  error: str = "verifier error") -> Score:
    """``verify(text)`` for a response that :func:`as_text` accepts, else ``Score(0, reason)``.

    Never raises: an exception anywhere becomes ``Score(0, "<error>: <type>: <message>")`` (``error``
    names what failed, e.g. ``"sandbox error"``)."""
    try:
        text, reason = as_text(response, max_chars)
        if text is None:
            return Score(0.0, reason)
        return verify(text)
    except Exception as e:  # a verifier must never take the training loop down
        return Score(0.0, f"{error}: {type(e).__name__}: {e}")


# a number as people write it in answers: -1,234.50  3/4  .5  1e3 (thousands commas only in groups
# of three, so "1,2,3" reads as three numbers; no letter or dot right before it, so "x2" is no number)
_NUMBER_BODY = r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(r"(?<![\w.])" + _NUMBER_BODY)
_VALUE_RE = re.compile(r"(?<![\w.])(" + _NUMBER_BODY + r")(?:[eE]([-+]?\d+))?(?:\s*/\s*(\d+))?")
# the optional sign is "(?:(-)\s*)?" rather than "(-?)\s*": with the latter every position in a run of
# whitespace starts a match attempt that scans the rest of the run (quadratic in the run's length)
_LATEX_FRAC_RE = re.compile(r"(?:(-)\s*)?\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_HASH_RE = re.compile(r"####\s*([^\n]*)")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_RE = re.compile(r"[{}]")
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:)\s*([^\n]*)", re.IGNORECASE)


def parse_number(text: str) -> Fraction | None:
    """Exact value of the first number in ``text``, written as ``-1,234.5``, ``$12``, ``40%``,
    ``3/4``, ``\\frac{3}{4}`` or ``1e3`` (``$``, units after the number and a trailing period are
    ignored); None when ``text`` holds no number."""
    if not isinstance(text, str):
        return None
    return _first_number(_normalise(text))[0]


def _normalise(text: str) -> str:
    return text.replace("\\$", "$").replace("\\!", "").replace("\\,", "").replace("{,}", ",")


def _first_number(s: str) -> tuple[Fraction | None, tuple[int, int] | None]:
    """Value and span of the first number of the normalised ``s``; ``(None, span)`` for a number that
    has no exact value here (zero denominator, huge exponent); ``(None, None)`` when there is none."""
    frac = _LATEX_FRAC_RE.search(s)
    m = _VALUE_RE.search(s)
    if frac and (m is None or frac.start() <= m.start()):
        den = int(frac.group(3))
        if den == 0:
            return None, frac.span()
        value = Fraction(int(frac.group(2)), den)
        return (-value if frac.group(1) else value), frac.span()
    if m is None:
        return None, None
    return _value_of(m), m.span()


def _value_of(m: re.Match) -> Fraction | None:
    try:
        value = Fraction(m.group(1).replace(",", ""))
        if m.group(2):
            exp = int(m.group(2))
            if abs(exp) > 400:  # 1e999999999 would take forever to materialise exactly
                return None
            value *= Fraction(10) ** exp
        if m.group(3):
            den = int(m.group(3))
            if den == 0:
                return None
            value /= den
    except (ValueError, ZeroDivisionError, OverflowError):
        return None
    return value


def numbers_equal(a: Fraction | None, b: Fraction | None, rel_tol: float = 1e-6) -> bool:
    """Exact equality, or relative difference below ``rel_tol`` (answers like 0.333333 for 1/3)."""
    if a is None or b is None:
        return False
    if a == b:
        return True
    scale = max(abs(a), abs(b))
    return bool(abs(a - b) <= Fraction(rel_tol) * scale)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, or None.

    Linear in ``len(text)``: one pass pairs every ``{`` with its ``}`` (a stack of open positions), then
    the boxes are tried from the last one. (Scanning forward from each box, as before, was quadratic:
    200k characters of ``\\boxed{`` took minutes.)"""
    # balanced-brace scan written here because the \boxed{} content must be found before any
    # LaTeX parsing (and latex2sympy's extract_boxed_content joins several boxes, which we don't want)
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    if not starts:
        return None
    close_of = _matching_braces(text)
    for start in reversed(starts):
        end = close_of.get(start - 1)  # the box's "{" is the last character of the match
        if end is not None:
            return text[start:end]
    return None


def _matching_braces(text: str) -> dict[int, int]:
    """``{open_position: close_position}`` for every balanced ``{...}`` of ``text``, in one pass over
    its braces. A ``}`` with no open ``{`` is skipped; an ``{`` never closed gets no entry."""
    stack: list[int] = []
    pairs: dict[int, int] = {}
    for m in _BRACE_RE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            pairs[stack.pop()] = m.start()
    return pairs


#: the longest final answer (the text after ``####``, inside ``\\boxed{}``, after "answer is") that is
#: read at all: one number with a unit word is far shorter, and the cap makes the cost of checking an
#: answer a constant whatever the response holds (a response itself may be ``MAX_RESPONSE_CHARS`` long)
MAX_ANSWER_CHARS = 100

# what may stand around the one number of a final answer: unit words and punctuation ("$33", "33 cookies.",
# "**33**", "33\%"). No digit (a second number), and none of ^ _ { } ( ) [ ] * / + = < > ! | ~ \ (so
# 9^{9^9}, 5!, \sqrt{4}, 2*3 are not read as their first number)
_ANSWER_DECORATION_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}\d]*)\}|\*\*|\\[()\[\]]|\\%")
_ALLOWED_AROUND_RE = re.compile(r"(?:[^\W\d_]|[\s.,:;$%'\"\u20ac\u00a3\u00a5])*")
_SENTENCE_END_RE = re.compile(r"[.;!?](?=\s|$)")


def single_number(answer: str) -> tuple[Fraction | None, str]:
    """Value of ``answer`` when it is exactly one number, as :func:`parse_number` reads it, with at most
    unit words and punctuation around it; else ``(None, reason)``.

    ``"33"``, ``"$1,350"``, ``"33 cookies."``, ``"\\frac{1}{2}"``, ``"11/2"``, ``"**33**"`` are one number;
    ``"33 or 34"``, ``"9^{9^{9^9}}"``, ``"5!"``, ``"\\sqrt{4}"`` are not (a reward must not go to the first
    of several numbers, or to a number an operator changes). Answers over ``MAX_ANSWER_CHARS`` are refused
    unread."""
    answer = answer.strip()
    if len(answer) > MAX_ANSWER_CHARS:
        return None, f"final answer too long ({len(answer)} > {MAX_ANSWER_CHARS} characters)"
    s = _normalise(answer)
    value, span = _first_number(s)
    if span is None:
        return None, "no number"
    around = s[: span[0]] + " " + s[span[1] :]
    if not _ALLOWED_AROUND_RE.fullmatch(around):  # (the common case, plain units, needs no rewriting)
        around = _ANSWER_DECORATION_RE.sub(lambda d: d.group(1) or " ", around)
        if not _ALLOWED_AROUND_RE.fullmatch(around):
            return None, f"final answer {answer[:40]!r} is not exactly one number"
    if value is None:
        return None, f"final answer {answer[:40]!r} is not a number"
    return value, "ok"


def extract_numeric_answer(text: str) -> tuple[str | None, str]:
    """Final numeric answer of a worked solution: the last ``#### N``, else the last ``\\boxed{N}``,
    else the last "answer is N" (up to the end of that sentence), else the last number in the text.
    The answer found must be exactly one number (:func:`single_number`).

    Returns ``(answer_string, how)`` where ``how`` is ``"####"``, ``"boxed"``, ``"answer is"``,
    ``"last number"``; ``(None, reason)`` when there is no such answer. Linear in ``len(text)``.
    """
    _, answer, how = extract_final_number(text)
    return answer, how


def extract_final_number(text: str) -> tuple[Fraction | None, str | None, str]:
    """:func:`extract_numeric_answer` with the answer's value: ``(value, answer_string, how)``, or
    ``(None, None, reason)``."""
    hashes = _HASH_RE.findall(text)
    if hashes:
        return _one_number(hashes[-1], "####", "#### without a number")
    boxed = last_boxed(text)
    if boxed is not None:
        return _one_number(boxed, "boxed", "\\boxed{} without a number")
    said = _ANSWER_IS_RE.findall(text)
    if said:
        sentence = _SENTENCE_END_RE.split(said[-1], maxsplit=1)[0]
        if _NUMBER_RE.search(sentence[: MAX_ANSWER_CHARS + 1]):
            found = _one_number(sentence, "answer is", "")
            if found[2]:  # else no number with a value there: the last number of the text, as before
                return found
    nums = _NUMBER_RE.findall(text)
    if nums:
        return parse_number(nums[-1]), nums[-1], "last number"
    return None, None, "no final answer"


def _one_number(answer: str, how: str, none_reason: str) -> tuple[Fraction | None, str | None, str]:
    value, reason = single_number(answer)
    if value is not None:
        return value, answer.strip(), how
    if reason == "no number" or reason.endswith("is not a number"):  # (1/0 has no value)
        return None, None, none_reason
    return None, None, f"{how}: {reason}"


# -- data files ------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike, required: Iterable[str] = ()) -> list[tuple[int, dict[str, Any]]]:
    """``(line_number, row)`` for each row of a jsonl(.gz) file (blank lines skipped). Raises one
    ``ValueError`` naming ``path:line`` for invalid JSON, a row that is not an object, or a
    missing/non-string ``required`` field."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    required = tuple(required)
    rows: list[tuple[int, dict[str, Any]]] = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in required:
                if not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{lineno}: missing or non-string field {key!r} (need {list(required)})")
            rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def check_n(n: Any) -> int | None:
    """``Task.examples``' ``n``: a non-negative int or None (ValueError otherwise)."""
    if n is not None and (not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    return n


def cached_split(cache: dict[str, list], split: str, n: int | None, load: Callable[[str], list]) -> list:
    """The first ``n`` items (all for None) of ``split``, as a new list; ``load(split)`` runs once per
    split and its result is kept in ``cache``. ``n`` is checked before anything is loaded."""
    check_n(n)
    if split not in cache:
        cache[split] = load(split)
    return list(cache[split][:n] if n is not None else cache[split])


def data_dir_file(subdir: str, split: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """``<data_dir or $IBPO_DATA_DIR>/<subdir>/<split>.jsonl`` if it exists, else None."""
    root = data_dir if data_dir is not None else os.environ.get("IBPO_DATA_DIR")
    if not root:
        return None
    candidate = Path(root) / subdir / f"{split}.jsonl"
    return candidate if candidate.is_file() else None


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    return any(os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"} for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def resolve_split_path(path: str | os.PathLike | Mapping[str, Any] | None, split: str) -> Path | None:
    """``path`` as given to a task: one file for every split, or a mapping split -> file."""
    if path is None:
        return None
    if isinstance(path, Mapping):
        if split not in path:
            raise ValueError(f"path: no file for split {split!r} (have {sorted(path)})")
        return Path(path[split])
    return Path(path)
