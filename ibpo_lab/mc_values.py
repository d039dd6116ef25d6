"""VinePPO baseline: Monte-Carlo values of every step boundary from fresh policy continuations.

For trajectory i with n steps (token spans s_1..s_n) the boundaries are b_0 = 0 and
b_j = end of s_j. For j < n, V_j = mean reward of ``k`` continuations sampled from the policy
given the solve prompt followed by the response prefix ``response[:b_j]``; V_n = the
trajectory's own reward (the episode is over). The ``vineppo`` estimator then credits step j
with V_j − V_{j−1}.

A value is a function of the state, so identical (prompt, prefix) states — every trajectory's
V_0 within a group, shared prefixes — are estimated once and shared (fewer samples, same
estimator). All continuations go through the sampler in a few large calls (``chunk_size``
prompts each), with a tqdm bar.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from ibpo_lab.correct import _decode, _example_of, _resolve_tokenizer, _task_step_spans, _texts
from ibpo_lab.rollout import RolloutBatch
from ibpo_lab.steps import step_boundaries

__all__ = ["step_boundaries", "mc_step_values", "with_step_values"]  # step_boundaries: re-exported from steps


def mc_step_values(
    batch: RolloutBatch,
    examples: Sequence[Any] | Mapping[int, Any],
    task: Any,
    sampler: Any,
    k: int,
    *,
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    tokenizer: Any = None,
    chunk_size: int = 64,
    success_threshold: float | None = None,
    progress: bool = True,
) -> list[list[float]]:
    """Monte-Carlo step values V_0..V_n per trajectory (VinePPO).

    batch: B trajectories with ``step_spans`` (or a tokenizer to split them with
    ``task.step_delimiter``) and ``prompts`` (or examples + ``task.solve_prompt``);
    examples: Example per trajectory (len B) or mapping group id -> Example; sampler:
    ``.sample(prompts, n, max_new_tokens, temperature, top_p, stop, seed) -> RolloutBatch``;
    k: continuations per boundary; max_new_tokens: continuation budget (None = the longest
    response of the batch); tokenizer: decodes response prefixes (default ``sampler.tokenizer`` /
    ``sampler.policy.tokenizer``); chunk_size: prefixes per sampler call; success_threshold: if
    set, a continuation's reward is thresholded to 0/1 before averaging.
    -> B lists, list i of length n_steps_i + 1, last entry = rewards[i].
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (continuations per step boundary) must be an int >= 1, got {k!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    B = len(batch)
    example_of = _example_of(examples, batch)
    tokenizer = _resolve_tokenizer(tokenizer, sampler)
    if tokenizer is None:
        raise ValueError("tokenizer is required (to decode response prefixes); the sampler has none")
    spans = batch.step_spans
    if spans is None:
        spans = _task_step_spans(batch.response_ids, task, tokenizer)
    if max_new_tokens is None:
        max_new_tokens = max(batch.max_response_len, 1)

    # ---- the distinct states (prompt, prefix ids) to evaluate
    state_index: dict[tuple[str, tuple[int, ...]], int] = {}
    states: list[tuple[int, str, tuple[int, ...]]] = []  # (trajectory it came from, prompt, prefix)
    slots: list[list[int]] = []  # per trajectory, state id of each boundary j < n
    for i in range(B):
        ids = batch.response_ids[i]
        bounds = step_boundaries(spans[i], len(ids))
        prompt = batch.prompts[i] if batch.prompts is not None else task.solve_prompt(example_of(i))
        row = []
        for b in bounds[:-1]:
            key = (prompt, tuple(ids[:b]))
            if key not in state_index:
                state_index[key] = len(states)
                states.append((i, prompt, key[1]))
            row.append(state_index[key])
        slots.append(row)

    # ---- sample k continuations of every state, in chunks
    values = np.zeros(len(states))
    bar = tqdm(total=len(states), desc="MC step values", disable=not progress, leave=False)
    for c0 in range(0, len(states), chunk_size):
        chunk = states[c0 : c0 + chunk_size]
        prefix_texts = [_decode(tokenizer, p) for _, _, p in chunk]
        out = sampler.sample(
            [pr + pt for (_, pr, _), pt in zip(chunk, prefix_texts)], n=k, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, stop=stop, seed=None if seed is None else seed + c0,
        )
        if len(out) != len(chunk) * k:
            raise ValueError(f"sampler returned {len(out)} trajectories for {len(chunk)} prompts x k={k}")
        conts = _texts(out, tokenizer)
        for s, ((i, _, _), pt) in enumerate(zip(chunk, prefix_texts)):
            ex = example_of(i)
            rs = [float(task.reward(ex, pt + conts[s * k + j])) for j in range(k)]
            if success_threshold is not None:
                rs = [float(r >= success_threshold) for r in rs]
            values[c0 + s] = float(np.mean(rs))
        bar.update(len(chunk))
    bar.close()

    rewards = batch.rewards.tolist()
    return [[float(values[s]) for s in slots[i]] + [float(rewards[i])] for i in range(B)]


def with_step_values(batch: RolloutBatch, examples, task, sampler, k: int, **kw) -> RolloutBatch:
    """``batch`` with ``step_values`` filled by :func:`mc_step_values` (and ``step_spans`` if missing)."""
    if batch.step_spans is None:
        tokenizer = _resolve_tokenizer(kw.get("tokenizer"), sampler)
        if tokenizer is None:
            raise ValueError("tokenizer is required to split steps (batch.step_spans is None)")
        batch = batch.replace(step_spans=_task_step_spans(batch.response_ids, task, tokenizer))
    return batch.replace(step_values=mc_step_values(batch, examples, task, sampler, k, **kw))
