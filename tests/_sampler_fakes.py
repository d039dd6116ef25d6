"""Test fakes shared by test_correct / test_mc_values / test_diagnostics: a character tokenizer,
a scripted sampler and a tiny task whose correctness rule is a plain Python predicate."""

from __future__ import annotations

from typing import Callable, Sequence

from ibpo_lab.rollout import RolloutBatch
from ibpo_lab.tasks.base import Example, Score, Task

EOS = 3  # a control character id, never produced by ord() of the printable test texts


class CharTok:
    """ids = code points; EOS is special (dropped by decode with skip_special_tokens)."""

    eos_token_id = EOS
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False):
        return {"input_ids": [ord(c) for c in text]}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join("" if (i == EOS and skip_special_tokens) else chr(i) for i in ids)


class PredTask(Task):
    """reward 1 iff ``ok(response)``; repair prompt default template; optional oracle."""

    name = "pred"

    def __init__(self, ok: Callable[[str], bool], oracle: Callable[[str], str] | None = None):
        super().__init__()
        self.ok = ok
        self.reward_calls: list[str] = []
        if oracle is not None:
            self.oracle_repair = lambda ex, failed: oracle(failed)

    def examples(self, split="train", n=None):
        return [Example(id=str(i), prompt=f"q{i}", answer="") for i in range(n or 1)]

    def score(self, example, response):
        self.reward_calls.append(response)
        return Score(float(self.ok(response)), "ok" if self.ok(response) else "wrong")


class ScriptedSampler:
    """``.sample(prompts, n, ...)`` answers each prompt with ``script(prompt, j)`` for j < n.

    Records every call (prompts, n and kwargs) so tests can check batching."""

    def __init__(self, script: Callable[[str, int], str], lp: float = -0.5):
        self.script = script
        self.lp = lp
        self.calls: list[dict] = []
        self.tokenizer = CharTok()

    def sample(self, prompts: Sequence[str], n: int = 1, max_new_tokens: int = 64, **kw) -> RolloutBatch:
        self.calls.append(dict(prompts=list(prompts), n=n, max_new_tokens=max_new_tokens, **kw))
        tok = self.tokenizer
        texts = [self.script(p, j) for p in prompts for j in range(n)]
        return RolloutBatch(
            prompt_ids=[tok.encode(p) for p in prompts for _ in range(n)],
            response_ids=[tok.encode(t) for t in texts],
            rewards=[0.0] * len(texts),
            group_ids=[i for i in range(len(prompts)) for _ in range(n)],
            logprobs=[[self.lp] * len(t) for t in texts],
            prompts=[p for p in prompts for _ in range(n)],
            responses=texts,
        )


def make_batch(groups: Sequence[Sequence[str]], task: Task, prompts: Sequence[str] | None = None) -> tuple[RolloutBatch, list[Example]]:
    """One group per entry of ``groups`` (its response texts); rewards from ``task``."""
    tok = CharTok()
    exs = task.examples(n=len(groups))
    prompts = list(prompts) if prompts is not None else [task.solve_prompt(e) for e in exs]
    texts, gids, ex_of, pr = [], [], [], []
    for g, resp in enumerate(groups):
        for t in resp:
            texts.append(t)
            gids.append(g)
            ex_of.append(exs[g])
            pr.append(prompts[g])
    batch = RolloutBatch(
        prompt_ids=[tok.encode(p) for p in pr],
        response_ids=[tok.encode(t) for t in texts],
        rewards=[task.reward(e, t) for e, t in zip(ex_of, texts)],
        group_ids=gids,
        logprobs=[[-0.25 - 0.01 * k for k in range(len(t))] for t in texts],
        prompts=pr,
        responses=texts,
    )
    task.reward_calls.clear()
    return batch, ex_of
