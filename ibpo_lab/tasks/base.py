"""Task interface: prompts, terminal rewards, per-step labels and the solve/repair templates.

A task turns examples into prompts (the *solve* template) and into compare-and-correct
prompts (the *repair* template: question + failed attempt + reference attempt; the
*repair_joint* template: question + failed attempt + all K references at once, each shown
through the *repair_joint_item* template — ``CorrectConfig.reference_mode="joint"``), scores a
response with a 0/1 terminal reward that never raises, and — where the task knows — labels
each reasoning step as correct or not.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

__all__ = [
    "Example", "Score", "Task", "register_task", "get_task", "list_tasks", "DEFAULT_TEMPLATES", "TEMPLATE_NAMES",
    "TEMPLATE_FIELDS", "check_template_names",
]


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
    # K >= 2 references in one prompt (reference_mode="joint"); {references} is the items joined
    "repair_joint": (
        "Question: {question}\n"
        "A failed attempt:\n{failed}\n"
        "{n_references} reference attempts:\n{references}"
        "Rewrite the failed attempt so it is correct, changing as little as possible.\n"
    ),
    "repair_joint_item": "Reference attempt {k}:\n{reference}\n",
}

#: the template names a task knows (``Task(templates=...)`` rejects others)
TEMPLATE_NAMES: tuple[str, ...] = tuple(DEFAULT_TEMPLATES)

#: the fields each template must use (checked when the prompt is built: templates are editable
#: data, so a notebook edit that drops one gets one clear error instead of a silently short prompt)
TEMPLATE_FIELDS: dict[str, tuple[str, ...]] = {
    "solve": ("question",),
    "repair": ("failed", "reference"),
    "repair_joint": ("failed", "references"),
    "repair_joint_item": ("reference",),
}


class Task(ABC):
    """Base class. Subclasses set ``name``, implement :meth:`examples` and :meth:`score`, and may
    override :meth:`step_labels`. ``templates`` is a plain dict, editable from a notebook:
    ``task.templates["repair"] = "..."`` (fields: ``{question}``, ``{failed}``, ``{reference}``);
    ``"repair_joint"`` has ``{question}``, ``{failed}``, ``{references}`` (the K items, each
    ``"repair_joint_item"`` with ``{k}`` counted from 1 and ``{reference}``) and ``{n_references}``."""

    name: str = "task"
    #: how responses split into steps (a ``delimiter`` accepted by ``ibpo_lab.steps.split_steps``)
    step_delimiter: str = "newline"

    def __init__(self, templates: dict[str, str] | None = None) -> None:
        self.templates = dict(DEFAULT_TEMPLATES)
        if templates:
            self.templates.update(check_template_names(templates))

    # -- data -------------------------------------------------------------------
    @abstractmethod
    def examples(self, split: str = "train", n: int | None = None) -> list[Example]:
        """The examples of ``split`` (``"train"`` or ``"test"``; tasks may add more), first ``n``."""

    # -- prompts ----------------------------------------------------------------
    def _check_template(self, name: str) -> str:
        """``self.templates[name]``, after checking it uses its required fields (subclasses add
        checks, e.g. the synthetic task's character set)."""
        tpl = self.templates[name]
        missing = [f for f in TEMPLATE_FIELDS.get(name, ()) if "{" + f + "}" not in tpl]
        if missing:
            raise ValueError(f"templates[{name!r}] lacks the field(s) {', '.join('{' + f + '}' for f in missing)}")
        return tpl

    def solve_prompt(self, example: Example) -> str:
        return self._check_template("solve").format(question=example.prompt)

    def repair_prompt(self, example: Example, failed: str, reference: str) -> str:
        return self._check_template("repair").format(question=example.prompt, failed=failed, reference=reference)

    def repair_prompt_joint(self, example: Example, failed: str, references: Sequence[str]) -> str:
        """ONE repair prompt showing the failed attempt and all K ``references`` in order
        (``CorrectConfig.reference_mode="joint"``): the ``"repair_joint"`` template, whose
        ``{references}`` is the ``"repair_joint_item"`` template filled for k = 1..K and concatenated.

        K = 1 gives exactly :meth:`repair_prompt` (the singular template), so ``joint`` and
        ``separate`` coincide at K = 1 and a K = 1 ablation compares like with like."""
        references = list(references)
        if not references:
            raise ValueError("repair_prompt_joint: no references (K must be >= 1)")
        if len(references) == 1:
            return self.repair_prompt(example, failed, references[0])
        item = self._check_template("repair_joint_item")
        block = "".join(item.format(k=k, reference=ref) for k, ref in enumerate(references, start=1))
        return self._check_template("repair_joint").format(
            question=example.prompt, failed=failed, references=block, n_references=len(references)
        )

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


def check_template_names(templates: dict[str, str]) -> dict[str, str]:
    """``templates`` unchanged, or one error naming every unknown template name."""
    unknown = set(templates) - set(TEMPLATE_NAMES)
    if unknown:
        raise ValueError(f"templates: unknown template names {sorted(unknown)}; allowed: {', '.join(TEMPLATE_NAMES)}")
    return templates


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
