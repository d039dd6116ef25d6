"""VinePPO Monte-Carlo step values on a scripted sampler: boundaries, prefix continuations,
state sharing, batching, V_n = R, and argument checks."""

from __future__ import annotations

import pytest

from _sampler_fakes import CharTok, PredTask, ScriptedSampler, make_batch
from ibpo_lab.mc_values import mc_step_values, step_boundaries, with_step_values

# correct iff the response starts with step "A" and ends with "ok"
TASK = PredTask(lambda r: r.startswith("A\n") and r.endswith("ok"))


def half_ok(prompt: str, j: int) -> str:
    return "ok" if j == 0 else "x"


def spans_of(text: str) -> list[tuple[int, int]]:
    out, start = [], 0
    for pos, c in enumerate(text):
        if c == "\n":
            out.append((start, pos + 1))
            start = pos + 1
    if start < len(text):
        out.append((start, len(text)))
    return out


def batch_with_spans(groups):
    batch, exs = make_batch(groups, TASK)
    return batch.replace(step_spans=[spans_of(t) for t in batch.responses]), exs


def test_step_boundaries():
    assert step_boundaries([(0, 2), (2, 5)], 5) == [0, 2, 5]
    assert step_boundaries([], 0) == [0]
    with pytest.raises(ValueError, match="step_spans"):
        step_boundaries([(0, 2), (3, 5)], 5)
    with pytest.raises(ValueError, match="step_spans"):
        step_boundaries([(0, 2)], 5)


def test_values_are_mean_rewards_of_prefix_continuations():
    batch, exs = batch_with_spans([["A\nB\n", "A\nC\n", "Z\n", "A\nok"]])
    sampler = ScriptedSampler(half_ok)
    vals = mc_step_values(batch, exs, TASK, sampler, k=2, progress=False)
    # V_0: continuations of the bare prompt never start with "A"  -> 0
    # V_1 after "A\n": "A\nok" is correct, "A\nx" is not       -> 0.5
    # V_n: the trajectory's own reward
    assert vals == [[0.0, 0.5, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0], [0.0, 0.5, 1.0]]
    # states are shared: the bare prompt and the "A\n" prefix, sampled once each, in one call
    assert len(sampler.calls) == 1 and sampler.calls[0]["n"] == 2
    assert sampler.calls[0]["prompts"] == [batch.prompts[0], batch.prompts[0] + "A\n"]


def test_chunking_and_distinct_groups():
    batch, exs = batch_with_spans([["A\nB\n"], ["A\nB\n"]])
    batch = batch.replace(prompts=["P0:", "P1:"])  # different prompts: different states
    sampler = ScriptedSampler(half_ok)
    vals = mc_step_values(batch, exs, TASK, sampler, k=4, chunk_size=1, max_new_tokens=7, progress=False)
    assert vals == [[0.0, 0.25, 0.0], [0.0, 0.25, 0.0]]
    assert [c["prompts"] for c in sampler.calls] == [["P0:"], ["P0:A\n"], ["P1:"], ["P1:A\n"]]
    assert all(c["max_new_tokens"] == 7 for c in sampler.calls)


def test_spans_split_when_missing_and_with_step_values():
    batch, exs = make_batch([["A\nB\n", "Z\n"]], TASK)
    out = with_step_values(batch, exs, TASK, ScriptedSampler(half_ok), 2, progress=False)
    assert out.step_spans == [[(0, 2), (2, 4)], [(0, 2)]]
    assert out.step_values == [[0.0, 0.5, 0.0], [0.0, 0.0]]
    # the vineppo estimator accepts them: V_n equals the reward
    from ibpo_lab.advantages import get_estimator

    adv = get_estimator("vineppo")(out)
    assert adv[0, :2].tolist() == [0.5, 0.5] and adv[0, 2:4].tolist() == [-0.5, -0.5]


def test_bad_arguments():
    batch, exs = batch_with_spans([["A\nB\n"]])
    s = ScriptedSampler(half_ok)
    with pytest.raises(ValueError, match="k "):
        mc_step_values(batch, exs, TASK, s, k=0)
    with pytest.raises(ValueError, match="chunk_size"):
        mc_step_values(batch, exs, TASK, s, k=1, chunk_size=0)
    with pytest.raises(ValueError, match="examples"):
        mc_step_values(batch, exs * 2, TASK, s, k=1)
    with pytest.raises(ValueError, match="step_spans"):
        mc_step_values(batch.replace(step_spans=[[(0, 2)]]), exs, TASK, s, k=1)


def test_tokenizer_taken_from_sampler_or_required():
    batch, exs = batch_with_spans([["A\nB\n"]])

    class NoTok:
        def sample(self, *a, **kw):  # pragma: no cover - never reached
            raise AssertionError

    with pytest.raises(ValueError, match="tokenizer"):
        mc_step_values(batch, exs, TASK, NoTok(), k=1)
    vals = mc_step_values(batch, exs, TASK, ScriptedSampler(half_ok), k=2, tokenizer=CharTok(), progress=False)
    assert vals == [[0.0, 0.5, 0.0]]
