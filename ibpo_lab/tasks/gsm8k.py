"""GSM8K task: grade-school word problems with a numeric 0/1 terminal reward and calculator-based step labels.

Data, in this order: an explicit ``path=`` (one jsonl for every split, or ``{"train": ..., "test": ...}``),
``$IBPO_DATA_DIR/gsm8k/<split>.jsonl``, then the hub (``datasets.load_dataset("openai/gsm8k", "main")``)
unless ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set. Rows have ``question`` and ``answer`` (the
worked solution with ``<<expr=result>>`` calculator annotations and a final ``#### N`` line).

Reward: 1 iff the response's final answer (last ``#### N``, else last ``\\boxed{N}``, else last
"answer is N", else the last number) equals the gold number (exact, or relative error < 1e-6). The final
answer must be exactly one number, optionally with unit words around it (``answers.single_number``):
``#### 33 or 34`` and ``\\boxed{9^{9^9}}`` score 0 whatever the gold. Scoring is linear in the
response's length (at most ``max_response_chars``); the final answer itself is read only up to
``answers.MAX_ANSWER_CHARS``.

Step labels (``step_labels``), exactly: the steps are the non-empty lines of the response
(``split_text_steps(response, "newline")``). A step is labelled True iff

* it contains an equality whose right-hand side is a number (``= N`` in plain text, or the result of
  a ``<<expr=N>>`` annotation) with N numerically equal to the result of one of the gold solution's
  calculator annotations, or
* it is a ``#### N`` line whose N (exactly one number) equals the gold answer;

every other step is False (including steps that state no ``= N`` at all). Only the right-hand side
is compared, not whether the left-hand side evaluates to it. When the gold solution has no
``<<...>>`` annotations (or the response cannot be read as text) the labels are None.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from ibpo_lab.tasks.answers import (
    MAX_RESPONSE_CHARS,
    as_text,
    cached_split,
    check_max_response_chars,
    data_dir_file,
    extract_final_number,
    guarded_score,
    hub_offline,
    numbers_equal,
    parse_number,
    read_jsonl,
    resolve_split_path,
    single_number,
)
from ibpo_lab.steps import split_text_steps
from ibpo_lab.tasks.base import Example, Score, Task, register_task

__all__ = ["GSM8KTask", "GSM8K_TEMPLATES", "parse_annotations", "gsm8k_gold_answer", "FIXTURE"]

#: a few GSM8K-format problems written for this project (tests use them instead of the real file)
FIXTURE = Path(__file__).parent / "fixtures" / "gsm8k_mini.jsonl"

GSM8K_TEMPLATES: dict[str, str] = {
    "solve": (
        "Question: {question}\n"
        "Solve step by step, one step per line. End with the final answer on its own line as '#### <number>'.\n"
    ),
    "repair": (
        "Question: {question}\n"
        "A failed attempt:\n{failed}\n"
        "A reference attempt:\n{reference}\n"
        "Rewrite the failed attempt so it is correct, changing as little as possible. "
        "Keep one step per line and end with '#### <number>'.\n"
    ),
    "repair_joint": (
        "Question: {question}\n"
        "A failed attempt:\n{failed}\n"
        "{n_references} reference attempts:\n{references}"
        "Rewrite the failed attempt so it is correct, changing as little as possible. "
        "Keep one step per line and end with '#### <number>'.\n"
    ),
    "repair_joint_item": "Reference attempt {k}:\n{reference}\n",
}

_ANNOTATION_RE = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
# a number right after "=" (optionally "$"), as in "16 - 3 - 4 = 9" or "<<16-3-4=9>>". "\s*(?:\$\s*)?", not
# "\s*\$?\s*": two adjacent \s* split a run of spaces in quadratically many ways before failing
_RHS_RE = re.compile(r"=\s*(?:\$\s*)?([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)(?:\s*/\s*(\d+))?")
_HASH_LINE_RE = re.compile(r"^\s*####\s*(.*)$")


def parse_annotations(solution: str) -> list[tuple[str, str]]:
    """The ``<<expr=result>>`` calculator annotations of a GSM8K solution, as ``(expr, result)``."""
    return [(a.strip(), b.strip()) for a, b in _ANNOTATION_RE.findall(solution)]


def gsm8k_gold_answer(solution: str) -> str:
    """The number after the last ``####`` of a reference solution, commas removed."""
    found = re.findall(r"####\s*([^\n]*)", solution)
    if not found:
        raise ValueError("solution has no '#### <answer>' line")
    return found[-1].strip().replace(",", "")


class GSM8KTask(Task):
    """GSM8K. ``path``: a jsonl file (or ``{split: file}``); else ``data_dir``/``$IBPO_DATA_DIR``;
    else the hub when online. ``max_response_chars`` longer responses get reward 0."""

    name = "gsm8k"
    step_delimiter = "newline"

    def __init__(
        self,
        path: str | os.PathLike | Mapping[str, Any] | None = None,
        data_dir: str | os.PathLike | None = None,
        templates: dict[str, str] | None = None,
        max_response_chars: int = MAX_RESPONSE_CHARS,
    ) -> None:
        super().__init__({**GSM8K_TEMPLATES, **(templates or {})})
        self.max_response_chars = check_max_response_chars(max_response_chars)
        self.path = path
        self.data_dir = data_dir
        self._cache: dict[str, list[Example]] = {}

    # -- data -------------------------------------------------------------------
    def _rows(self, split: str) -> tuple[list[tuple[int, dict[str, Any]]], str]:
        file = resolve_split_path(self.path, split) or data_dir_file("gsm8k", split, self.data_dir)
        if file is not None:
            return read_jsonl(file, required=("question", "answer")), str(file)
        if hub_offline():
            raise ValueError(
                f"gsm8k: no local file for split {split!r} and the hub is offline. Pass path='.../{split}.jsonl' "
                f"or set IBPO_DATA_DIR so that $IBPO_DATA_DIR/gsm8k/{split}.jsonl exists "
                "(rows: {\"question\": ..., \"answer\": \"...#### N\"})."
            )
        from datasets import load_dataset  # only when online: the import is slow

        ds = load_dataset("openai/gsm8k", "main", split=split)
        return [(i + 1, dict(r)) for i, r in enumerate(ds)], f"hub:openai/gsm8k/{split}"

    def examples(self, split: str = "train", n: int | None = None) -> list[Example]:
        return cached_split(self._cache, split, n, self._load)

    def _load(self, split: str) -> list[Example]:
        rows, source = self._rows(split)
        out = []
        for i, (line, row) in enumerate(rows):
            try:
                answer = gsm8k_gold_answer(row["answer"])
            except ValueError as e:
                raise ValueError(f"{source}:{line}: {e}") from None
            if parse_number(answer) is None:
                raise ValueError(f"{source}:{line}: final answer {answer!r} is not a number")
            out.append(
                Example(
                    id=f"gsm8k-{split}-{i}",
                    prompt=row["question"],
                    answer=answer,
                    meta={"solution": row["answer"], "annotations": parse_annotations(row["answer"]), "source": f"{source}:{line}"},
                )
            )
        return out

    def gold_response(self, example: Example) -> str:
        """The reference solution, as a response (scores 1.0)."""
        return example.meta["solution"]

    # -- rewards ----------------------------------------------------------------
    def score(self, example: Example, response: str) -> Score:
        return guarded_score(response, self.max_response_chars, lambda text: self._score_text(example, text))

    def _score_text(self, example: Example, text: str) -> Score:
        got, answer, how = extract_final_number(text)
        if answer is None:
            return Score(0.0, how)
        want = parse_number(example.answer)
        if got is None:
            return Score(0.0, f"final answer {answer[:40]!r} is not a number")
        if numbers_equal(got, want):
            return Score(1.0, "ok")
        return Score(0.0, f"wrong answer ({how}: {answer[:40]!r} != {example.answer!r})")

    def step_labels(self, example: Example, response: str) -> list[bool] | None:
        annotations = example.meta.get("annotations") or []
        text, _ = as_text(response, self.max_response_chars)
        if not annotations or text is None:
            return None
        gold_results = [v for v in (parse_number(r) for _, r in annotations) if v is not None]
        gold_answer = parse_number(example.answer)
        labels = []
        for start, end in split_text_steps(text, self.step_delimiter):
            step = text[start:end]
            hash_line = _HASH_LINE_RE.match(step.strip())
            if hash_line:
                labels.append(numbers_equal(single_number(hash_line.group(1))[0], gold_answer))
                continue
            ok = False
            for m in _RHS_RE.finditer(step):
                value = parse_number(m.group(1) + (f"/{m.group(2)}" if m.group(2) else ""))
                if any(numbers_equal(value, g) for g in gold_results):
                    ok = True
                    break
            labels.append(ok)
        return labels


register_task("gsm8k")(GSM8KTask)
