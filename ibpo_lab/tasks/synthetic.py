"""The synthetic task: modular arithmetic chains with exact step labels — the embedded default.

A problem is a start value and a multiset of additive operations modulo ``m``::

    question:  4 +3 -7 +5 +2 mod 10
    solution:  4+3=7          one step per line: previous result, one unused operation, result
               7-7=0
               0+5=5
               5+2=7
               ans=7          the answer line closes the chain (it is a step too)

Additions and subtractions commute, so *every order* of the operations is a valid solution
path: siblings of one prompt differ in text, a reference is generally not the ideal repair of
a failed attempt, and "local repair vs full rewrite" is measurable (:meth:`SyntheticTask.oracle_repair`
is the ground-truth local repair). Values stay below ``m`` so a tiny character-level policy
learns the task in minutes.

Step ground truth (see :meth:`SyntheticTask.analyse`). Steps are the non-empty lines of the
response, as ``ibpo_lab.steps.split_text_steps(r, "newline")`` splits them (whitespace-only lines
are not steps; a response of only whitespace is one empty, wrong step). Walking the steps with a running value ``v`` (starts at the start value) and the
multiset ``R`` of unused operations (starts at the problem's operations):

* an operation step ``a±b=c`` is *locally correct* iff ``a == v`` (it carries the most recent
  stated result), ``±b`` is in ``R`` and ``c == (a ± b) mod m`` (canonical, ``0 <= c < m``).
  Whatever its label, a parseable step then sets ``v = c`` and removes ``±b`` from ``R`` if it
  is there — so the steps after an error, recomputed from the wrong value, are locally correct;
* the answer line ``ans=x`` is locally correct iff it is the first answer line, ``R`` is empty
  (the chain used every operation) and ``x == v``;
* an unparsable line, and any line after the first answer line, is not locally correct
  (an unparsable line leaves ``v`` and ``R`` unchanged).

``first_error`` is the index of the first step that is not locally correct; when every step is
locally correct but there is no answer line it is ``len(steps)`` (the missing answer); ``None``
iff the response is a complete correct chain. Because the operations commute, a complete
correct chain always ends in the gold answer.

Failures and repairs: :meth:`SyntheticTask.inject_error` makes realistic failed attempts (``ERROR_KINDS``:
arithmetic slip, wrong carry, wrong operand, repeated or skipped operation, wrong answer line) with
every later step recomputed from the wrong value, and their expected labels; :meth:`SyntheticTask.oracle_repair`
keeps the failed prefix and order, fixes the first error in place and recomputes the rest;
:meth:`SyntheticTask.sft_pairs` builds solve and repair warm-up data from them.

Reward (``reward_on``): ``"chain"`` (default) gives 1 iff ``first_error is None`` — a lucky
final answer after a broken chain earns nothing; ``"answer"`` gives 1 iff the last step is
``ans=<gold>``. Either way the reward never raises; the ``Score.reason`` says why.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein

from ibpo_lab.steps import split_text_steps
from ibpo_lab.tasks.base import Example, Score, Task, check_template_names, register_task

__all__ = [
    "VOCAB",
    "ERROR_KINDS",
    "SYNTHETIC_TEMPLATES",
    "SyntheticConfig",
    "SyntheticTask",
    "ChainCheck",
    "InjectedError",
    "text_steps",
]

#: every character the task's prompts, templates and responses use (the char tokenizer is built
#: from it plus special tokens). Letters are all in, so edited templates in plain English still fit;
#: the prompts check their template against it.
VOCAB: str = "\n " + string.digits + "+-=:;,.?()*" + string.ascii_lowercase + string.ascii_uppercase

#: kinds of realistic errors :meth:`SyntheticTask.inject_error` makes
ERROR_KINDS: tuple[str, ...] = ("slip", "carry", "operand", "repeat", "skip", "answer")

#: compact solve/repair templates: a repair prompt (question + failed + reference) of the default
#: difficulty is ~110 characters, so it fits a 256-token char-level context with its target.
SYNTHETIC_TEMPLATES: dict[str, str] = {
    "solve": "Q: {question}\nA:\n",
    "repair": "Q: {question}\nFailed:\n{failed}\nRef:\n{reference}\nFix:\n",
    # K >= 2 references (reference_mode="joint"): the singular layout with one "Ref:" block per
    # reference, in order. The committed tiny policy was warmed up on the single-reference format
    # only; this layout stays nearest to it (measured on 50 failed attempts, K=2, 8 revisions each:
    # verified share 0.318 vs 0.043 for numbered "Refs:/Ref k:" blocks and 0.620 for 'separate').
    "repair_joint": "Q: {question}\nFailed:\n{failed}\n{references}Fix:\n",
    "repair_joint_item": "Ref:\n{reference}\n",
}

Op = tuple[str, int]  # ("+", 3) is "+3"

_STEP_RE = re.compile(r"(\d{1,9}) *([+-]) *(\d{1,9}) *= *(\d{1,9})")
_ANS_RE = re.compile(r"ans *= *(\d{1,9})")
_QUESTION_RE = re.compile(r"(\d{1,9})((?: [+-]\d{1,9})+) mod (\d{1,9})")


def text_steps(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the steps of ``text``: exactly
    ``ibpo_lab.steps.split_text_steps(text, "newline")`` — a step is a line with its ending newline;
    whitespace-only lines merge into the previous step (into the next one at the very start);
    empty text has no step, whitespace-only text is one step."""
    return split_text_steps(text, "newline")


def _apply(a: int, op: Op, m: int) -> int:
    return (a + op[1]) % m if op[0] == "+" else (a - op[1]) % m


def _effect(op: Op, m: int) -> int:
    return op[1] % m if op[0] == "+" else (-op[1]) % m


def _fmt_op(op: Op) -> str:
    return f"{op[0]}{op[1]}"


def _render(start: int, order: Sequence[Op], m: int) -> list[str]:
    """Step lines of the chain applying ``order`` from ``start``, answer line included."""
    lines, v = [], start
    for op in order:
        c = _apply(v, op, m)
        lines.append(f"{v}{op[0]}{op[1]}={c}")
        v = c
    lines.append(f"ans={v}")
    return lines


def _as_rng(rng: Any) -> random.Random:
    if rng is None:
        return random.Random()
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, (int, np.integer)):
        return random.Random(int(rng))
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(2**63)))
    raise ValueError(f"rng must be a random.Random, numpy Generator, int seed or None, got {type(rng).__name__}")


def _as_text(response: Any) -> tuple[str | None, str]:
    """(text, "") or (None, reason) for a response that is not usable text."""
    if isinstance(response, str):
        return response, ""
    if isinstance(response, (bytes, bytearray)):
        try:
            return bytes(response).decode("utf-8"), ""
        except UnicodeDecodeError:
            return None, "not utf-8"
    return None, "not text"


@dataclass
class SyntheticConfig:
    """Difficulty knobs and splits of the synthetic task (``get_task("synthetic", **fields)``)."""

    n_steps: int = field(default=4, metadata={"help": "operations per problem = operation steps before the answer line (>= 2)"})
    modulus: int = field(default=10, metadata={"help": "all values are taken modulo m (>= 2); 10 keeps every value one digit"})
    ops: str = field(default="+-", metadata={"help": "operation signs drawn, a non-empty subset of '+-' (they commute mod m)"})
    operand_min: int = field(default=1, metadata={"help": "smallest operand (>= 1, so every operation changes the value)"})
    operand_max: int | None = field(default=None, metadata={"help": "largest operand (<= m-1); None = m-1"})
    seed: int = field(default=0, metadata={"help": "seed of the fixed train/test splits"})
    n_train: int = field(default=2000, metadata={"help": "problems in the train split"})
    n_test: int = field(default=200, metadata={"help": "problems in the test split (alias 'eval')"})
    test_fraction: float = field(
        default=0.1, metadata={"help": "share of the problem space hashed into the test split (keeps splits disjoint)"}
    )
    reward_on: str = field(
        default="chain",
        metadata={"help": "'chain': reward 1 iff every step is locally correct and the answer line closes the chain; "
                  "'answer': reward 1 iff the last step is ans=<gold>"},
    )
    error_kinds: tuple[str, ...] = field(
        default=ERROR_KINDS, metadata={"help": "error kinds inject_error draws from: " + ", ".join(ERROR_KINDS)}
    )
    max_response_chars: int = field(default=4096, metadata={"help": "longer responses score 0 ('too long') unread"})

    def __post_init__(self) -> None:
        if not isinstance(self.n_steps, int) or self.n_steps < 2:
            raise ValueError(f"n_steps must be an int >= 2 (two operations give two solution paths), got {self.n_steps!r}")
        if not isinstance(self.modulus, int) or self.modulus < 2:
            raise ValueError(f"modulus must be an int >= 2, got {self.modulus!r}")
        if not self.ops or set(self.ops) - {"+", "-"} or len(set(self.ops)) != len(self.ops):
            raise ValueError(f"ops must be a non-empty subset of '+-' without repeats, got {self.ops!r}")
        if self.operand_max is None:
            self.operand_max = self.modulus - 1
        if not 1 <= self.operand_min <= self.operand_max <= self.modulus - 1:
            raise ValueError(
                f"operand_min/operand_max must satisfy 1 <= operand_min <= operand_max <= modulus-1, "
                f"got operand_min={self.operand_min}, operand_max={self.operand_max}, modulus={self.modulus}"
            )
        if len(set(self.ops)) * (self.operand_max - self.operand_min + 1) < 2:
            raise ValueError("ops/operand_min/operand_max allow a single operation: problems would have one solution path")
        for name in ("n_train", "n_test"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.reward_on not in ("chain", "answer"):
            raise ValueError(f"reward_on must be 'chain' or 'answer', got {self.reward_on!r}")
        self.error_kinds = tuple(self.error_kinds)
        bad = [k for k in self.error_kinds if k not in ERROR_KINDS]
        if not self.error_kinds or bad:
            raise ValueError(f"error_kinds must be a non-empty subset of {ERROR_KINDS}, got {self.error_kinds!r}")
        if not isinstance(self.max_response_chars, int) or self.max_response_chars < 1:
            raise ValueError(f"max_response_chars must be an int >= 1, got {self.max_response_chars!r}")


@dataclass
class ChainCheck:
    """The step-level verdict on one response (:meth:`SyntheticTask.analyse`).

    steps        text of each step (non-empty line, stripped), one per ``text_steps`` span
    labels       locally correct or not, one per step
    why          per step: ``"ok"``, ``"unparsable"``, ``"wrong left operand"``, ``"operation not available"``,
                 ``"wrong arithmetic"``, ``"operations left"``, ``"wrong answer value"``, ``"after answer"``
    first_error  index of the first step not locally correct; ``len(steps)`` when all are correct but
                 there is no answer line; None iff the response is a complete correct chain
    answer       the value on the last step if it is an answer line, else None
    """

    steps: list[str]
    labels: list[bool]
    why: list[str]
    first_error: int | None
    answer: int | None


class InjectedError(str):
    """A failed attempt made from a correct solution by :meth:`SyntheticTask.inject_error`: the text
    itself (a ``str``, usable wherever a response is) carrying what was injected:

    kind         one of ``ERROR_KINDS``
    first_error  index of the injected error's step (for ``skip`` the answer line, where the missing
                 operation shows; for ``operand`` the answer line is wrong too, an operation being unused)
    step_labels  the expected local-correctness label of every step, derived from the construction
    """

    kind: str
    first_error: int
    step_labels: list[bool]

    def __new__(cls, text: str, kind: str, first_error: int, step_labels: list[bool]) -> "InjectedError":
        obj = super().__new__(cls, text)
        obj.kind, obj.first_error, obj.step_labels = kind, first_error, list(step_labels)
        return obj

    @property
    def text(self) -> str:
        """The failed attempt as a plain ``str``."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"InjectedError({self.text!r}, kind={self.kind!r}, first_error={self.first_error})"

    def __reduce__(self):  # pickles (multiprocessing, caching) keep the attributes
        return (InjectedError, (self.text, self.kind, self.first_error, self.step_labels))


class SyntheticTask(Task):
    """Modular arithmetic chains with many valid orders and exact step labels (see module docstring).

    ``SyntheticTask(n_steps=4, modulus=10, seed=0, ...)`` takes the :class:`SyntheticConfig` fields
    as keywords, plus ``templates`` (``{"solve": ..., "repair": ..., "repair_joint": ..., "repair_joint_item": ...}``
    overrides; see ``SYNTHETIC_TEMPLATES``).
    """

    name = "synthetic"
    step_delimiter = "newline"

    def __init__(self, *, templates: dict[str, str] | None = None, **kw: Any) -> None:
        super().__init__()
        self.templates.update(SYNTHETIC_TEMPLATES)
        if templates:
            self.templates.update(check_template_names(templates))
        known = {f.name for f in fields(SyntheticConfig)}
        for k in kw:
            if k not in known:
                raise ValueError(f"SyntheticTask: unknown argument {k!r}; allowed: templates, {', '.join(sorted(known))}")
        self.config = SyntheticConfig(**kw)
        self._splits: dict[str, list[Example]] = {}

    def __repr__(self) -> str:
        c = self.config
        return (f"SyntheticTask(n_steps={c.n_steps}, modulus={c.modulus}, ops={c.ops!r}, "
                f"operands={c.operand_min}..{c.operand_max}, seed={c.seed}, reward_on={c.reward_on!r})")

    # ------------------------------------------------------------------ problems
    def make_example(self, start: int, ops: Sequence[str | Op], id: str = "custom") -> Example:
        """An example from a start value and operations (``["+3", "-7"]`` or ``[("+", 3), ...]``)."""
        m = self.config.modulus
        parsed: list[Op] = []
        for o in ops:
            if isinstance(o, str):
                if not re.fullmatch(r"[+-]\d{1,9}", o):
                    raise ValueError(f"ops: {o!r} is not an operation like '+3' or '-7'")
                parsed.append((o[0], int(o[1:])))
            else:
                sign, b = o
                if sign not in ("+", "-") or not isinstance(b, (int, np.integer)) or b < 0:
                    raise ValueError(f"ops: {o!r} is not an operation like ('+', 3)")
                parsed.append((sign, int(b)))
        if not parsed:
            raise ValueError("ops must not be empty")
        if not isinstance(start, (int, np.integer)) or not 0 <= start < m:
            raise ValueError(f"start must be an int in [0, {m}), got {start!r}")
        start = int(start)
        answer = start
        for op in parsed:
            answer = _apply(answer, op, m)
        question = f"{start} " + " ".join(_fmt_op(o) for o in parsed) + f" mod {m}"
        return Example(id=id, prompt=question, answer=str(answer),
                       meta={"start": start, "ops": tuple(parsed), "modulus": m})

    @staticmethod
    def _problem(ex: Example) -> tuple[int, list[Op], int]:
        """(start, ops, modulus) from the example's meta, or parsed from its question text."""
        meta = ex.meta or {}
        if {"start", "ops", "modulus"} <= set(meta):
            return int(meta["start"]), [(str(s), int(b)) for s, b in meta["ops"]], int(meta["modulus"])
        mt = _QUESTION_RE.fullmatch(ex.prompt.strip()) if isinstance(ex.prompt, str) else None
        if mt is None:
            raise ValueError(f"example {ex.id!r} is not a synthetic problem (no meta, question {ex.prompt!r})")
        ops = [(t[0], int(t[1:])) for t in mt.group(2).split()]
        return int(mt.group(1)), ops, int(mt.group(3))

    def _split_of(self, key: tuple) -> str:
        # hash membership: a problem's split depends only on (seed, problem), so splits are disjoint
        # whatever their sizes, and growing one never changes the other
        h = hashlib.blake2b(f"{self.config.seed}|{key}".encode(), digest_size=8).digest()
        return "test" if int.from_bytes(h, "big") / 2**64 < self.config.test_fraction else "train"

    def _generate(self, split: str, size: int) -> list[Example]:
        c = self.config
        rng = random.Random(f"synthetic|{c.seed}|{split}")
        signs = sorted(c.ops)
        seen: set[tuple] = set()
        out: list[Example] = []
        n_kinds = len(signs) * (c.operand_max - c.operand_min + 1)
        # distinct problems: start values x multisets of n_steps operations, minus one-operation multisets
        space = c.modulus * (math.comb(n_kinds + c.n_steps - 1, c.n_steps) - n_kinds)
        misses = 0
        while len(out) < size:
            # the split gets ~test_fraction (or the rest) of `space`; many misses in a row = it is used up
            if size > space or misses > 20_000:
                raise ValueError(
                    f"only {len(out)} distinct {split} problems found for n_{split}={size}: the problem space of "
                    f"n_steps={c.n_steps}, modulus={c.modulus}, ops={c.ops!r}, operands {c.operand_min}..{c.operand_max} "
                    f"({space} problems in all) is too small; lower n_train/n_test or raise the difficulty"
                )
            misses += 1
            start = rng.randrange(c.modulus)
            ops = [(rng.choice(signs), rng.randint(c.operand_min, c.operand_max)) for _ in range(c.n_steps)]
            if len(set(ops)) < 2:  # one distinct operation = one solution path; we want several
                continue
            key = (start, tuple(sorted(ops)))
            if key in seen or self._split_of(key) != split:
                continue
            seen.add(key)
            misses = 0
            out.append(self.make_example(start, ops, id=f"{split}-{len(out)}"))
        return out

    def examples(self, split: str = "train", n: int | None = None) -> list[Example]:
        """Fixed-seed problems of ``split`` (``"train"``, ``"test"``; ``"eval"`` = ``"test"``), first ``n``.
        Deterministic in ``seed``; train and test never share a problem (same start and operation multiset)."""
        split = {"eval": "test"}.get(split, split)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train', 'test' or 'eval', got {split!r}")
        size = self.config.n_train if split == "train" else self.config.n_test
        if n is not None and (not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n <= size):
            raise ValueError(f"n must be an int in [0, {size}] for the {split} split (n_{split}={size}), got {n!r}")
        if split not in self._splits:
            self._splits[split] = self._generate(split, size)
        exs = self._splits[split]
        return list(exs if n is None else exs[: int(n)])

    # ------------------------------------------------------------------ prompts
    def _check_template(self, name: str) -> str:
        tpl = super()._check_template(name)
        # only the literal text reaches the tokenizer: field names ({n_references}) are not checked
        literal = "".join(text for text, *_ in string.Formatter().parse(tpl))
        bad = sorted(set(literal) - set(VOCAB))
        if bad:
            raise ValueError(f"templates[{name!r}] uses characters outside VOCAB (the char tokenizer lacks them): {bad}")
        return tpl

    # ------------------------------------------------------------------ solutions
    def n_orders(self, ex: Example) -> int:
        """Number of distinct valid solution paths (orders of the operation multiset)."""
        _, ops, _ = self._problem(ex)
        return math.factorial(len(ops)) // math.prod(math.factorial(k) for k in Counter(ops).values())

    def solution(self, ex: Example, order: Sequence[Op] | None = None) -> str:
        """The correct solution applying the operations in ``order`` (default: as listed in the question)."""
        start, ops, m = self._problem(ex)
        order = ops if order is None else [(str(s), int(b)) for s, b in order]
        if Counter(order) != Counter(ops):
            raise ValueError(f"order {order!r} is not a permutation of the problem's operations {ops!r}")
        return "\n".join(_render(start, order, m))

    def solutions(self, ex: Example, k: int = 1, rng: Any = None) -> list[str]:
        """``k`` correct solutions with pairwise distinct operation orders (random ones).
        Raises ValueError when ``k`` exceeds :meth:`n_orders`."""
        total = self.n_orders(ex)
        if not isinstance(k, int) or not 1 <= k <= total:
            raise ValueError(f"k must be an int in [1, {total}] (this problem has {total} distinct orders), got {k!r}")
        r = _as_rng(rng)
        start, ops, m = self._problem(ex)
        orders: list[tuple[Op, ...]] = []
        seen: set[tuple[Op, ...]] = set()
        if k * 3 > total:  # dense request: enumerate the distinct orders and sample without replacement
            orders = r.sample(_distinct_orders(Counter(ops)), k)
        else:
            while len(orders) < k:
                o = list(ops)
                r.shuffle(o)
                t = tuple(o)
                if t not in seen:
                    seen.add(t)
                    orders.append(t)
        return ["\n".join(_render(start, o, m)) for o in orders]

    def order_of(self, ex: Example, solution: str) -> list[Op]:
        """The operation order of a correct solution (ValueError if it is not one)."""
        chk = self.analyse(ex, solution)
        if chk.first_error is not None:
            raise ValueError(f"solution is not a correct chain (first error at step {chk.first_error}: "
                             f"{chk.why[chk.first_error] if chk.first_error < len(chk.why) else 'no answer line'})")
        order = []
        for s in chk.steps[:-1]:
            mt = _STEP_RE.fullmatch(s)
            order.append((mt.group(2), int(mt.group(3))))
        return order

    # ------------------------------------------------------------------ verification
    def analyse(self, ex: Example, response: str | bytes) -> ChainCheck:
        """Step-level verdict (labels, reasons, first error, answer) of ``response``; see the module
        docstring for the exact rules. ValueError if the response is not (UTF-8) text."""
        text, bad = _as_text(response)
        if text is None:
            raise ValueError(f"response is {bad}")
        start, ops, m = self._problem(ex)
        remaining = Counter(ops)
        v = start
        steps, labels, why = [], [], []
        answered = False
        answer: int | None = None
        for a_, b_ in text_steps(text):
            line = text[a_:b_].strip()
            steps.append(line)
            answer = None
            if answered:
                labels.append(False)
                why.append("after answer")
                continue
            mt = _STEP_RE.fullmatch(line)
            if mt is not None:
                a, op, c = int(mt.group(1)), (mt.group(2), int(mt.group(3))), int(mt.group(4))
                if a != v:
                    reason = "wrong left operand"
                elif remaining[op] <= 0:
                    reason = "operation not available"
                elif c != _apply(a, op, m):
                    reason = "wrong arithmetic"
                else:
                    reason = "ok"
                if remaining[op] > 0:
                    remaining[op] -= 1
                v = c
                labels.append(reason == "ok")
                why.append(reason)
                continue
            ma = _ANS_RE.fullmatch(line)
            if ma is not None:
                answered = True
                answer = int(ma.group(1))
                if sum(remaining.values()) > 0:
                    reason = "operations left"
                elif answer != v:
                    reason = "wrong answer value"
                else:
                    reason = "ok"
                labels.append(reason == "ok")
                why.append(reason)
                continue
            labels.append(False)
            why.append("unparsable")
        first = next((i for i, ok in enumerate(labels) if not ok), None)
        if first is None and not answered:
            first = len(steps)
        return ChainCheck(steps=steps, labels=labels, why=why, first_error=first, answer=answer)

    def first_error(self, ex: Example, response: str | bytes) -> int | None:
        """Index of the first step that is not locally correct (``len(steps)`` if all are but the
        answer line is missing; None iff the response is a complete correct chain)."""
        return self.analyse(ex, response).first_error

    def step_labels(self, example: Example, response: str | bytes) -> list[bool] | None:
        """Local correctness of each step, one per non-empty line (``split_text_steps(r, "newline")``);
        None if the response is not text."""
        text, _ = _as_text(response)
        if text is None:
            return None
        return self.analyse(example, text).labels

    def score(self, example: Example, response: Any) -> Score:
        """0/1 terminal reward with its reason; never raises on any response.
        Reasons: ok, not text, not utf-8, empty, too long, no final answer, wrong answer, invalid chain."""
        try:
            text, bad = _as_text(response)
            if text is None:
                return Score(0.0, bad)
            if not text.strip():
                return Score(0.0, "empty")
            if len(text) > self.config.max_response_chars:
                return Score(0.0, "too long")
            chk = self.analyse(example, text)
            if chk.answer is None:
                return Score(0.0, "no final answer")
            if str(chk.answer) != example.answer:
                return Score(0.0, "wrong answer")
            if self.config.reward_on == "chain" and chk.first_error is not None:
                return Score(0.0, "invalid chain")
            return Score(1.0, "ok")
        except Exception as e:  # the reward must never take a training run down
            return Score(0.0, f"error: {type(e).__name__}")

    def scores(self, examples: Sequence[Example], responses: Sequence[Any]) -> list[Score]:
        """:meth:`score` over a batch (same length)."""
        if len(examples) != len(responses):
            raise ValueError(f"scores: {len(examples)} examples but {len(responses)} responses")
        return [self.score(e, r) for e, r in zip(examples, responses)]

    # ------------------------------------------------------------------ failures and repairs
    def inject_error(self, ex: Example, solution: str, rng: Any = None, kind: str | None = None) -> InjectedError:
        """A realistic failed attempt made from the correct ``solution``: one error of ``kind`` (random
        among ``config.error_kinds`` if None), with every later step recomputed from the wrong value:

        slip     step i states a wrong result
        carry    step i starts from a wrong value instead of the previous result
        operand  step i applies an operation not left in the problem (different effect mod m)
        repeat   an extra step re-applies an operation already used up
        skip     step i is left out (shows only at the answer line: operations left)
        answer   the answer line states a wrong value

        The final answer is always wrong. Returns the failed text as an :class:`InjectedError` (a ``str``
        with ``.kind``, ``.first_error`` and ``.step_labels`` expected by construction).
        """
        r = _as_rng(rng)
        start, ops, m = self._problem(ex)
        order = self.order_of(ex, solution)
        n = len(order)
        kinds = list(self.config.error_kinds)
        if kind is not None:
            if kind not in ERROR_KINDS:
                raise ValueError(f"kind must be one of {ERROR_KINDS} or None, got {kind!r}")
            kinds = [kind]
        r.shuffle(kinds)
        c = self.config
        for k in kinds:
            if k in ("slip", "carry", "operand"):
                i = r.randrange(n)
                head = _render(start, order[:i], m)[:-1]
                v = start if i == 0 else _apply_all(start, order[:i], m)
                op = order[i]
                if k == "slip":
                    right = _apply(v, op, m)
                    bad_c = r.choice([x for x in range(m) if x != right])
                    line, after = f"{v}{_fmt_op(op)}={bad_c}", bad_c
                elif k == "carry":
                    a = r.choice([x for x in range(m) if x != v])
                    after = _apply(a, op, m)
                    line = f"{a}{_fmt_op(op)}={after}"
                else:
                    left = set(order[i:])
                    cands = [(s, b) for s in sorted(c.ops) for b in range(c.operand_min, c.operand_max + 1)
                             if (s, b) not in left and _effect((s, b), m) != _effect(op, m)]
                    if not cands:
                        continue
                    bad_op = r.choice(cands)
                    after = _apply(v, bad_op, m)
                    line = f"{v}{_fmt_op(bad_op)}={after}"
                tail = _render(after, order[i + 1:], m)
                labels = [True] * i + [False] + [True] * (n - 1 - i) + [k != "operand"]
                return InjectedError("\n".join(head + [line] + tail), k, i, labels)
            if k == "repeat":
                # an operation is "used up" at position i when all its copies are in order[:i]
                full = Counter(order)
                spots = [(i, op) for i in range(1, n + 1) for op in sorted(set(order[:i]))
                         if Counter(order[:i])[op] == full[op]]
                i, op = r.choice(spots)
                seq = list(order[:i]) + [op] + list(order[i:])
                labels = [True] * i + [False] + [True] * (n - i) + [True]
                return InjectedError("\n".join(_render(start, seq, m)), k, i, labels)
            if k == "skip":
                i = r.randrange(n)
                seq = list(order[:i]) + list(order[i + 1:])
                return InjectedError("\n".join(_render(start, seq, m)), k, n - 1, [True] * (n - 1) + [False])
            if k == "answer":
                lines = _render(start, order, m)
                gold = _apply_all(start, order, m)
                lines[-1] = f"ans={r.choice([x for x in range(m) if x != gold])}"
                return InjectedError("\n".join(lines), k, n, [True] * n + [False])
        raise ValueError(f"no error of kinds {kinds} can be injected into this solution")

    def oracle_repair(self, ex: Example, failed: str) -> str:
        """The ground-truth *local* repair of ``failed``: keep its correct prefix verbatim, fix the
        first error in place, keep the failed order, recompute the values after it.

        From the first error on, each step of ``failed`` is rewritten: a step whose operation is still
        unused keeps that operation (values recomputed from the running value); any other step
        (operation not available, unparsable, an early or extra answer line) is replaced in place by an
        unused operation that no later step of ``failed`` uses (the textually closest one), or deleted
        when there is none; operations still unused are appended; then the answer line. So a slip,
        wrong carry, wrong operand, repeated operation or wrong answer is undone in place, and a skipped
        operation is appended (not re-inserted where it was, which would change every later value).
        Returns ``failed`` unchanged when it is correct.

        Minimal means: the fewest steps changed while keeping the failed order. A pure character
        Levenshtein optimum can differ by reordering steps to match coincidental digits; that is not
        what a local repair is, and a policy could not learn it, so it is not used here.
        """
        if not isinstance(failed, str):
            raise ValueError(f"failed must be a str, got {type(failed).__name__}")
        chk = self.analyse(ex, failed)
        e = chk.first_error
        if e is None:
            return failed
        start, ops, m = self._problem(ex)
        remaining = Counter(ops)
        v = start
        for s in chk.steps[:e]:  # all locally correct operation steps
            mt = _STEP_RE.fullmatch(s)
            remaining[(mt.group(2), int(mt.group(3)))] -= 1
            v = int(mt.group(4))
        # pass 1: which suffix steps keep their operation (greedy, in order, while copies are left)
        rest = Counter(remaining)
        step_ops: list[Op | None] = []
        for s in chk.steps[e:]:
            mt = _STEP_RE.fullmatch(s)
            op = (mt.group(2), int(mt.group(3))) if mt is not None else None
            if op is not None and rest[op] > 0:
                rest[op] -= 1
                step_ops.append(op)
            else:
                step_ops.append(None)
        missing: list[Op] = []
        for op in ops:  # the unused operations, in question order
            if rest[op] > 0:
                rest[op] -= 1
                missing.append(op)
        # pass 2: other steps take a missing operation in place (closest text) or go
        order: list[Op] = []
        for s, op in zip(chk.steps[e:], step_ops):
            if op is not None:
                order.append(op)
            elif missing:
                mt = _STEP_RE.fullmatch(s)
                said = f"{mt.group(2)}{mt.group(3)}" if mt is not None else ""
                pick = min(range(len(missing)), key=lambda j: (Levenshtein.distance(said, _fmt_op(missing[j])), j))
                order.append(missing.pop(pick))
        order += missing
        spans = text_steps(failed)
        head = failed[: spans[e][0]] if e < len(spans) else failed
        if head and not head.endswith("\n"):
            head += "\n"
        return head + "\n".join(_render(v, order, m))

    def sft_pairs(self, mode: str, n: int, seed: int = 0, split: str = "train",
                  error_rate: float = 0.0) -> list[tuple[str, str]]:
        """``n`` (prompt, target) pairs for supervised warm-up, deterministic in (task seed, ``seed``).

        mode ``"solve"``: solve prompt -> a correct solution in a random valid order (so siblings
        differ); with ``error_rate`` > 0 that share of targets carries an injected error instead
        (a policy that sometimes fails, so RL has failures to repair).
        mode ``"repair"``: repair prompt (question, failed attempt with an injected error, reference =
        a correct solution in a different order where the problem allows) -> ``oracle_repair(failed)``.
        """
        if mode not in ("solve", "repair"):
            raise ValueError(f"mode must be 'solve' or 'repair', got {mode!r}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate!r}")
        exs = self.examples(split)
        if not exs:
            raise ValueError(f"the {split} split is empty (n_{split}=0)")
        r = random.Random(f"synthetic-sft|{self.config.seed}|{seed}|{mode}|{split}")
        out: list[tuple[str, str]] = []
        for _ in range(n):
            ex = r.choice(exs)
            if mode == "solve":
                sol = self.solutions(ex, 1, r)[0]
                if error_rate > 0 and r.random() < error_rate:
                    sol = self.inject_error(ex, sol, r).text
                out.append((self.solve_prompt(ex), sol))
            else:
                sol, ref = self.solutions(ex, 2, r)  # two distinct orders (every problem has >= 2)
                failed = self.inject_error(ex, sol, r).text
                out.append((self.repair_prompt(ex, failed, ref), self.oracle_repair(ex, failed)))
        return out


def _distinct_orders(counts: Counter) -> list[tuple[Op, ...]]:
    """Every distinct order of a multiset, sorted (itertools.permutations would repeat duplicates n! times)."""
    if not +counts:
        return [()]
    out = []
    for op in sorted(k for k, c in counts.items() if c > 0):
        counts[op] -= 1
        out += [(op,) + rest for rest in _distinct_orders(counts)]
        counts[op] += 1
    return out


def _apply_all(start: int, order: Sequence[Op], m: int) -> int:
    v = start
    for op in order:
        v = _apply(v, op, m)
    return v


@register_task("synthetic")
def _make_synthetic(**kw: Any) -> SyntheticTask:
    return SyntheticTask(**kw)
