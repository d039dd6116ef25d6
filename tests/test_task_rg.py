"""reasoning-gym adapter: rg:<dataset> tasks, answer extraction, the dataset's scorer as a 0/1 reward, bad input."""

from __future__ import annotations

import pytest

from ibpo_lab.tasks import get_task, list_tasks
from ibpo_lab.tasks.reasoning_gym import ReasoningGymTask, extract_rg_answer

DATASETS = ["countdown", "chain_sum", "gsm_symbolic"]


@pytest.fixture(scope="module", params=DATASETS)
def task(request):
    return get_task(f"rg:{request.param}", size=8, seed=3)


def test_registered_as_prefix_family():
    assert "rg:<name>" in list_tasks()
    t = get_task("rg:chain_sum", size=2)
    assert isinstance(t, ReasoningGymTask) and t.name == "rg:chain_sum"


def test_examples_are_deterministic_and_splits_differ(task):
    train = task.examples("train")
    assert len(train) == 8 and task.examples("train", n=3) == train[:3]
    again = get_task(task.name, size=8, seed=3).examples("train")
    assert [e.prompt for e in again] == [e.prompt for e in train]
    test = task.examples("test")
    assert [e.prompt for e in test] != [e.prompt for e in train]
    assert all(e.id.startswith(f"{task.name}-train-") for e in train)


def test_gold_scores_one_and_corrupted_zero(task):
    examples = task.examples("test")
    assert task.rewards(examples, [task.gold_response(e) for e in examples]) == [1.0] * len(examples)
    # corrupted: a wrong number put in front of the gold answer (gsm_symbolic reads the first number)
    corrupted = [f"<answer>1000003 {e.answer}</answer>" for e in examples]
    scores = [task.score(e, r) for e, r in zip(examples, corrupted)]
    assert [s.reward for s in scores] == [0.0] * len(examples), scores
    assert all("scorer gave" in s.reason for s in scores)


def test_answer_extraction_rules(task):
    ex = task.examples("test", n=1)[0]
    assert task.reward(ex, f"thinking...\n<answer>wrong</answer>\n<answer>{ex.answer}</answer>") == 1.0  # last tag
    assert task.reward(ex, f"some steps\n{ex.answer}\n\n") == 1.0  # no tag: last non-empty line
    assert task.reward(ex, f"{ex.answer}\nbut then more text") == 0.0
    assert extract_rg_answer("a\n<answer> 42 </answer>\nb") == "42"
    assert extract_rg_answer("a\nb\n") == "b"


@pytest.mark.parametrize(
    "response, reason_part",
    [
        ("", "empty"),
        ("<answer></answer>", "no final answer"),
        (b"\xff\xfe\xfd", "UTF-8"),
        ("\ud800", "UTF-8"),
        ("<answer>1</answer>" * 50_000, "too long"),
        (3.14, "not text"),
    ],
)
def test_bad_responses_score_zero_with_reason(task, response, reason_part):
    ex = task.examples("test", n=1)[0]
    s = task.score(ex, response)
    assert s.reward == 0.0 and reason_part in s.reason, s


def test_partial_credit_only_when_not_binary():
    raw = get_task("rg:countdown", size=4, binary=False)
    binary = get_task("rg:countdown", size=4)
    ex = raw.examples("test", n=1)[0]
    wrong = "<answer>1 + 1</answer>"
    assert binary.reward(ex, wrong) == 0.0
    assert 0.0 < raw.reward(ex, wrong) < 1.0  # countdown gives partial credit to a well-formed wrong expression
    assert raw.reward(ex, raw.gold_response(ex)) == 1.0


def test_unknown_dataset_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'no_such_set'"):
        get_task("rg:no_such_set")
    with pytest.raises(ValueError, match="size"):
        get_task("rg:chain_sum", size=0)
    with pytest.raises(ValueError, match="split"):
        get_task("rg:chain_sum", size=2).examples("dev")


def test_templates_ask_for_answer_tags(task):
    ex = task.examples("test", n=1)[0]
    assert ex.prompt in task.solve_prompt(ex) and "<answer>" in task.solve_prompt(ex)
    r = task.repair_prompt(ex, "F", "R")
    assert "F" in r and "R" in r and "<answer>" in r


def test_scorer_failure_scores_zero_and_bad_arguments_are_errors(monkeypatch):
    t = get_task("rg:chain_sum", size=2)
    ex = t.examples("train", n=1)[0]

    class Broken:
        def score_answer(self, answer, entry):
            raise KeyError("metadata")

    monkeypatch.setattr(t, "_scorer", lambda: Broken())
    s = t.score(ex, t.gold_response(ex))
    assert s.reward == 0.0 and s.reason == "scorer error: KeyError: 'metadata'"
    with pytest.raises(ValueError, match="max_response_chars"):
        get_task("rg:chain_sum", size=2, max_response_chars=0)
    with pytest.raises(ValueError, match=r"\bn\b"):
        t.examples("train", n=-2)
