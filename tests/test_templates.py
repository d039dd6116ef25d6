"""Repair templates: the joint (K references in one prompt) template of every task, its checks,
and that compare-and-correct sends it when ``reference_mode="joint"``."""

from __future__ import annotations

import random

import pytest

from _sampler_fakes import CharTok, ScriptedSampler
from ibpo_lab.correct import CorrectConfig, compare_and_correct
from ibpo_lab.rollout import RolloutBatch
from ibpo_lab.tasks import get_task
from ibpo_lab.tasks.base import DEFAULT_TEMPLATES, TEMPLATE_NAMES, Example
from ibpo_lab.tasks.synthetic import SyntheticTask

TASKS = ["synthetic", "gsm8k", "math", "humaneval", "rg:chain_sum"]
# markers that occur in no template text
REFS = ["REFalpha1", "REFbeta22", "REFgamma3"]
FAILED = "FAILEDzz9"


def make_task(name):
    if name.startswith("rg:"):
        pytest.importorskip("reasoning_gym")
        return get_task(name, size=3)
    return get_task(name)


def an_example(task) -> Example:
    if isinstance(task, SyntheticTask):
        return task.examples("test", 1)[0]
    return Example(id="x", prompt="QUESTIONqq7", answer="1")


@pytest.mark.parametrize("name", TASKS)
def test_every_task_has_a_joint_template(name):
    task = make_task(name)
    assert set(TEMPLATE_NAMES) <= set(task.templates)
    assert "{references}" in task.templates["repair_joint"] and "{reference}" in task.templates["repair_joint_item"]
    ex = an_example(task)
    p = task.repair_prompt_joint(ex, FAILED, REFS)
    # the failed attempt and every reference exactly once, references in the given order, after the failure
    assert p.count(FAILED) == 1 and [p.count(r) for r in REFS] == [1, 1, 1]
    pos = [p.index(FAILED)] + [p.index(r) for r in REFS]
    assert pos == sorted(pos)
    assert ex.prompt in p
    # not the singular template with the references glued together
    assert p != task.repair_prompt(ex, FAILED, "".join(REFS))
    # K = 1: exactly the singular prompt ('joint' and 'separate' coincide)
    assert task.repair_prompt_joint(ex, FAILED, [REFS[0]]) == task.repair_prompt(ex, FAILED, REFS[0])
    with pytest.raises(ValueError, match="references"):
        task.repair_prompt_joint(ex, FAILED, [])


@pytest.mark.parametrize("name", ["gsm8k", "math", "humaneval", "rg:chain_sum"])
def test_joint_wording_is_plural_and_numbered(name):
    task = make_task(name)
    p = task.repair_prompt_joint(an_example(task), FAILED, REFS[:2])
    assert "2 reference" in p
    for k, r in enumerate(REFS[:2], start=1):
        assert f" {k}:\n{r}\n" in p  # "... attempt k:\n<ref>\n" / "... completion k:\n<ref>\n"


def test_default_joint_template_hand_built():
    task = get_task("gsm8k")
    task.templates.update(DEFAULT_TEMPLATES)  # the base template, exactly
    ex = Example(id="x", prompt="Q?", answer="1")
    assert task.repair_prompt_joint(ex, "F", ["R1", "R2"]) == (
        "Question: Q?\nA failed attempt:\nF\n2 reference attempts:\n"
        "Reference attempt 1:\nR1\nReference attempt 2:\nR2\n"
        "Rewrite the failed attempt so it is correct, changing as little as possible.\n"
    )


def test_synthetic_joint_prompt_keeps_the_trained_layout():
    """One "Ref:" block per reference in the singular layout (the tiny policy's warm-up format)."""
    task = SyntheticTask()
    ex = task.examples("test", 1)[0]
    assert task.repair_prompt_joint(ex, "F", ["R1", "R2"]) == f"Q: {ex.prompt}\nFailed:\nF\nRef:\nR1\nRef:\nR2\nFix:\n"
    assert task.repair_prompt(ex, "F", "R1") == f"Q: {ex.prompt}\nFailed:\nF\nRef:\nR1\nFix:\n"


def test_joint_templates_are_editable_and_checked():
    task = SyntheticTask(templates={"repair_joint": "{question};{failed};{n_references};{references}.",
                                    "repair_joint_item": "({k}:{reference})"})
    ex = task.examples("test", 1)[0]
    assert task.repair_prompt_joint(ex, "F", ["A", "B"]) == f"{ex.prompt};F;2;(1:A)(2:B)."
    task.templates["repair_joint_item"] = "<{k}:{reference}>"
    with pytest.raises(ValueError, match="repair_joint_item.*VOCAB"):
        task.repair_prompt_joint(ex, "F", ["A", "B"])
    task.templates["repair_joint_item"] = "({k}:{reference})"
    task.templates["repair_joint"] = "{question} {failed} Fix:\n"  # drops the references
    with pytest.raises(ValueError, match=r"repair_joint.*\{references\}"):
        task.repair_prompt_joint(ex, "F", ["A", "B"])
    task.templates["repair_joint"] = "{question} {failed} {references} \u00e9"
    with pytest.raises(ValueError, match="VOCAB"):
        task.repair_prompt_joint(ex, "F", ["A", "B"])
    with pytest.raises(ValueError, match="repair_joint_item"):
        get_task("gsm8k", templates={"repair_joint_itm": "{reference}"})


# --------------------------------------------------------------------------- through compare_and_correct
def synthetic_batch(task, n_groups=2):
    """Groups [failed, correct order 1, correct order 2] of the synthetic task (char-level ids)."""
    tok, rng = CharTok(), random.Random(0)
    texts, gids, exs = [], [], []
    for g, ex in enumerate([e for e in task.examples("test") if task.n_orders(e) >= 3][:n_groups]):
        sol, r1, r2 = task.solutions(ex, 3, rng)
        for t in (task.inject_error(ex, sol, rng).text, r1, r2):
            texts.append(t), gids.append(g), exs.append(ex)
    prompts = [task.solve_prompt(e) for e in exs]
    batch = RolloutBatch(
        prompt_ids=[tok.encode(p) for p in prompts], response_ids=[tok.encode(t) for t in texts],
        rewards=[task.reward(e, t) for e, t in zip(exs, texts)], group_ids=gids, prompts=prompts, responses=texts,
    )
    assert batch.rewards.tolist() == [0.0, 1.0, 1.0] * n_groups
    return batch, exs, texts


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_compare_and_correct_sends_the_tasks_joint_prompt(mode):
    task = SyntheticTask()
    batch, exs, texts = synthetic_batch(task)
    sampler = ScriptedSampler(lambda p, j: "ans=0")
    res = compare_and_correct(batch, exs, task, sampler, CorrectConfig(num_references=2, reference_mode=mode))
    prompts = sampler.calls[0]["prompts"]
    if mode == "joint":
        # one prompt per failed trajectory (traj 0 and 3), repeated K = 2 times: the same budget
        want = [task.repair_prompt_joint(exs[i], texts[i], [texts[i + 1], texts[i + 2]]) for i in (0, 3)]
        assert prompts == [want[0], want[0], want[1], want[1]]
        assert set(res.table.n_references) == {2}
    else:
        assert prompts == [task.repair_prompt(exs[i], texts[i], texts[i + k]) for i in (0, 3) for k in (1, 2)]
        assert set(res.table.n_references) == {1}
