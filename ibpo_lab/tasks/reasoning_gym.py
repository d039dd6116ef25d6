"""reasoning-gym adapter (task family ``rg:<dataset>``): any procedurally generated reasoning-gym dataset, its own scorer as the reward.

``get_task("rg:countdown")``, ``get_task("rg:chain_sum", size=500, seed=1, dataset_kwargs={...})``.
Splits are generated: ``"train"`` with ``seed``, ``"test"`` with ``seed + 1_000_003`` (different
problems, though tiny problem spaces can repeat one). ``examples(split, n)`` generates ``n``
problems (default ``size``).

Answer extraction (documented, because the scorer sees only what we extract): the content of the
last ``<answer>...</answer>`` in the response (``reasoning_gym.utils.extract_answer``); when there is
no such tag, the last non-empty line of the response. Reward: ``dataset.score_answer(answer, entry)``.
Several scorers give partial credit to any non-empty wrong answer (0.01, 0.05...), so by default
(``binary=True``) the reward is 1 iff that score is 1, matching the 0/1 terminal reward of the method;
``binary=False`` passes the score through. The raw score is always in the reason.
Scorers run in-process without a deadline (all built-in ones tried are fast); any exception they
raise is caught and gives reward 0. Step labels: None.
"""

from __future__ import annotations

from typing import Any

from ibpo_lab.tasks.answers import MAX_RESPONSE_CHARS, check_max_response_chars, check_n, guarded_score
from ibpo_lab.tasks.base import Example, Score, Task, register_task

__all__ = ["ReasoningGymTask", "RG_TEMPLATES", "extract_rg_answer", "TEST_SEED_OFFSET"]

#: the test split's seed is ``seed + TEST_SEED_OFFSET``
TEST_SEED_OFFSET = 1_000_003

RG_TEMPLATES: dict[str, str] = {
    "solve": "{question}\nThink step by step, one step per line, then give the final answer as <answer>...</answer>.\n",
    "repair": (
        "{question}\n"
        "A failed attempt:\n{failed}\n"
        "A reference attempt:\n{reference}\n"
        "Rewrite the failed attempt so it is correct, changing as little as possible. "
        "End with the final answer as <answer>...</answer>.\n"
    ),
    "repair_joint": (
        "{question}\n"
        "A failed attempt:\n{failed}\n"
        "{n_references} reference attempts:\n{references}"
        "Rewrite the failed attempt so it is correct, changing as little as possible. "
        "End with the final answer as <answer>...</answer>.\n"
    ),
    "repair_joint_item": "Reference attempt {k}:\n{reference}\n",
}


def extract_rg_answer(text: str) -> str | None:
    """Last ``<answer>...</answer>`` content, else the last non-empty line, else None."""
    from reasoning_gym.utils import extract_answer

    tagged = extract_answer(text, tag_name="answer")
    if tagged is not None:
        return tagged
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else None


class ReasoningGymTask(Task):
    """One reasoning-gym dataset. ``dataset``: its registered name (``countdown``, ``chain_sum``,
    ``gsm_symbolic``...); ``size``: problems per split by default; ``dataset_kwargs``: passed to
    ``reasoning_gym.create_dataset``."""

    step_delimiter = "newline"

    def __init__(
        self,
        dataset: str,
        size: int = 1000,
        seed: int = 0,
        dataset_kwargs: dict[str, Any] | None = None,
        binary: bool = True,
        templates: dict[str, str] | None = None,
        max_response_chars: int = MAX_RESPONSE_CHARS,
    ) -> None:
        super().__init__({**RG_TEMPLATES, **(templates or {})})
        from reasoning_gym.factory import DATASETS  # heavy import: only when an rg task is built

        if not isinstance(dataset, str) or dataset not in DATASETS:
            raise ValueError(
                f"unknown reasoning-gym dataset {dataset!r} (task 'rg:{dataset}'); known: {', '.join(sorted(DATASETS))}"
            )
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        check_max_response_chars(max_response_chars)
        self.dataset = dataset
        self.name = f"rg:{dataset}"
        self.size, self.seed, self.binary = size, seed, bool(binary)
        self.dataset_kwargs = dict(dataset_kwargs or {})
        self.max_response_chars = max_response_chars
        self._datasets: dict[tuple[str, int], Any] = {}

    def _dataset(self, split: str, size: int):
        if (split, size) not in self._datasets:
            import reasoning_gym

            seed = self.seed if split == "train" else self.seed + TEST_SEED_OFFSET
            self._datasets[(split, size)] = reasoning_gym.create_dataset(self.dataset, size=size, seed=seed, **self.dataset_kwargs)
        return self._datasets[(split, size)]

    def examples(self, split: str = "train", n: int | None = None) -> list[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        # not answers.cached_split: a split is generated afresh for each size (reasoning-gym seeds by size)
        check_n(n)
        size = self.size if n is None else n
        if size == 0:
            return []
        ds = self._dataset(split, size)
        out = []
        for i in range(size):
            entry = ds[i]
            out.append(Example(id=f"{self.name}-{split}-{i}", prompt=entry["question"], answer=str(entry["answer"]), meta={"entry": entry}))
        return out

    def gold_response(self, example: Example) -> str:
        """The gold answer in answer tags (scores 1.0)."""
        return f"<answer>{example.meta['entry']['answer']}</answer>"

    def score(self, example: Example, response: Any) -> Score:
        return guarded_score(response, self.max_response_chars, lambda text: self._score_text(example, text),
                             error="scorer error")

    def _score_text(self, example: Example, text: str) -> Score:
        answer = extract_rg_answer(text)
        if answer is None or not answer.strip():
            return Score(0.0, "no final answer")
        raw = float(self._scorer().score_answer(answer, example.meta["entry"]))
        reward = (1.0 if raw >= 1.0 - 1e-9 else 0.0) if self.binary else raw
        return Score(reward, "ok" if raw >= 1.0 - 1e-9 else f"wrong answer (scorer gave {raw:g})")

    def _scorer(self):
        # scoring depends on the entry and the dataset config, not on which split generated it
        if not self._datasets:
            self._dataset("train", 1)
        return next(iter(self._datasets.values()))


@register_task("rg", prefix=True)
def _rg_task(dataset: str, **kw) -> ReasoningGymTask:
    return ReasoningGymTask(dataset, **kw)
