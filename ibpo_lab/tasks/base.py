"""Task interface: prompts, terminal rewards, per-step labels and the solve/repair templates.

A task turns examples into prompts (the *solve* template) and into compare-and-correct
prompts (the *repair* template: question + failed attempt + reference attempt), scores a
response with a 0/1 terminal reward that never raises, and — where the task knows — labels
each reasoning step as correct or not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = ["Example", "Score", "Task", "register_task", "get_task", "list_tasks", "DEFAULT_TEMPLATES"]


@dataclass(frozen=True)
class Example:
    """One problem: ``id`` unique within its split, ``prompt`` the question text as shown to the
    model inside the solve template, ``answer`` the gold final answer (string), ``meta`` anything
    else the task needs (gold solution, tests, step ground truth...)."""

    id: str
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Score:
    """A reward with the reason it was given (``"ok"``, ``"wrong answer"``, ``"no final answer"``...)."""

    reward: float
    reason: str


DEFAULT_TEMPLATES: dict[str, str] = {
    "solve": "Question: {question}\nSolve step by step, one step per line, then give the final answer.\n",
    "repair": (
        "Question: {question}\n"
        "A failed attempt:\n{failed}\n"
        "A reference attempt:\n{reference}\n"
        "Rewrite the failed attempt so it is correct, changing as little as possible.\n"
    ),
}


class Task(ABC):
    """Base class. Subclasses set ``name``, implement :meth:`examples` and :meth:`score`, and may
    override :meth:`step_labels`. ``templates`` is a plain dict, editable from a notebook:
    ``task.templates["repair"] = "..."`` (fields: ``{question}``, ``{failed}``, ``{reference}``)."""

    name: str = "task"
    #: how responses split into steps (a ``delimiter`` accepted by ``ibpo_lab.steps.split_steps``)
    step_delimiter: str = "newline"

    def __init__(self, templates: dict[str, str] | None = None) -> None:
        self.templates = dict(DEFAULT_TEMPLATES)
        if templates:
            unknown = set(templates) - {"solve", "repair"}
            if unknown:
                raise ValueError(f"templates: unknown template names {sorted(unknown)}; allowed: solve, repair")
            self.templates.update(templates)

    # -- data -------------------------------------------------------------------
    @abstractmethod
    def examples(self, split: str = "train", n: int | None = None) -> list[Example]:
        """The examples of ``split`` (``"train"`` or ``"test"``; tasks may add more), first ``n``."""

    # -- prompts ----------------------------------------------------------------
    def solve_prompt(self, example: Example) -> str:
        return self.templates["solve"].format(question=example.prompt)

    def repair_prompt(self, example: Example, failed: str, reference: str) -> str:
        return self.templates["repair"].format(question=example.prompt, failed=failed, reference=reference)

    # -- rewards ----------------------------------------------------------------
    @abstractmethod
    def score(self, example: Example, response: str) -> Score:
        """Terminal reward with its reason. Must never raise on any response (bytes included)."""

    def reward(self, example: Example, response: str) -> float:
        return float(self.score(example, response).reward)

    def rewards(self, examples: Sequence[Example], responses: Sequence[str]) -> list[float]:
        if len(examples) != len(responses):
            raise ValueError(f"rewards: {len(examples)} examples but {len(responses)} responses")
        return [self.reward(e, r) for e, r in zip(examples, responses)]

    def step_labels(self, example: Example, response: str) -> list[bool] | None:
        """Per-step correctness aligned with ``split_steps(response, delimiter=self.step_delimiter)``,
        or None when the task cannot tell."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


_TASKS: dict[str, Callable[..., Task]] = {}
_PREFIX_TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str, *, prefix: bool = False):
    """Register a task factory. ``prefix=True`` registers ``name:`` families such as ``rg:<dataset>``
    (the factory then gets the part after the colon as its first argument)."""

    def wrap(factory):
        table = _PREFIX_TASKS if prefix else _TASKS
        if name in table and table[name] is not factory:
            raise ValueError(f"task {name!r} registered twice")
        table[name] = factory
        return factory

    return wrap


def _ensure_builtin_tasks() -> None:
    # importing the package registers the built-in tasks
    import ibpo_lab.tasks  # noqa: F401


def list_tasks() -> list[str]:
    _ensure_builtin_tasks()
    return sorted(_TASKS) + [f"{p}:<name>" for p in sorted(_PREFIX_TASKS)]


def get_task(name: str, **kw) -> Task:
    """Build a task by name: ``synthetic``, ``gsm8k``, ``math``, ``humaneval``, ``rg:<dataset>``."""
    _ensure_builtin_tasks()
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name must be a non-empty string, got {name!r}")
    if ":" in name:
        prefix, rest = name.split(":", 1)
        if prefix in _PREFIX_TASKS:
            return _PREFIX_TASKS[prefix](rest, **kw)
    if name in _TASKS:
        return _TASKS[name](**kw)
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
