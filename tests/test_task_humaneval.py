"""HumanEval task: shipped data, completion appended to the prompt, sandboxed tests as the reward, bad input."""

from __future__ import annotations

import gzip
import json

import pytest

from ibpo_lab.tasks import get_task
from ibpo_lab.tasks.humaneval import HumanEvalTask, humaneval_program
from ibpo_lab.tasks.sandbox import SandboxConfig, live_processes


@pytest.fixture(scope="module")
def task():
    return get_task("humaneval", sandbox=SandboxConfig(timeout_s=3.0))


@pytest.fixture(scope="module")
def examples(task):
    return task.examples("test")


def test_loads_the_164_shipped_problems(task, examples):
    assert len(examples) == 164
    assert examples[0].id == "HumanEval/0" and examples[0].meta["entry_point"] == "has_close_elements"
    assert task.examples("train", n=3) == examples[:3]
    with pytest.raises(ValueError, match="split"):
        task.examples("validation")


def test_program_is_prompt_plus_completion_plus_check(examples):
    ex = examples[0]
    prog = humaneval_program(ex, "    return False\n")
    assert prog.startswith(ex.prompt + "    return False\n")
    assert prog.rstrip().endswith("check(has_close_elements)")


def test_gold_scores_one_and_corrupted_zero(task, examples):
    # a spread of problems (the full 164 run is in the slow test below)
    sample = examples[::20]
    assert task.rewards(sample, [task.gold_response(e) for e in sample]) == [1.0] * len(sample)
    scores = [task.score(e, "    return None\n") for e in sample]
    assert [s.reward for s in scores] == [0.0] * len(sample)
    assert all(s.reason.startswith("failed") for s in scores), scores


def test_solve_prompt_is_the_code_prompt(task, examples):
    assert task.solve_prompt(examples[0]) == examples[0].prompt
    r = task.repair_prompt(examples[0], "    return 1\n", "    return 2\n")
    assert examples[0].prompt in r and "return 1" in r and "return 2" in r


@pytest.mark.parametrize(
    "response, reason_part",
    [
        ("", "empty"),
        ("I don't know how to solve this.", "SyntaxError"),
        ("\udcff\udcfe", "UTF-8"),
        (b"\xff\xfe    return True\n", "UTF-8"),
        ("    return 1\n" + "#" * 300_000, "too long"),
        (None, "not text"),
    ],
)
def test_bad_responses_score_zero_with_reason(task, examples, response, reason_part):
    s = task.score(examples[0], response)
    assert s.reward == 0.0 and reason_part in s.reason, s


@pytest.mark.parametrize(
    "completion, reason_part",
    [
        ("    while True:\n        pass\n", "timeout"),
        ("    import sys\n    sys.exit(0)\n", "SystemExit"),
        ("    import os\n    os._exit(0)\n", "exited before the end"),
        ("    import os\n    while True:\n        os.fork()\n", "blocked"),
        ("    import socket\n    socket.create_connection(('127.0.0.1', 9))\n    return True\n", "blocked"),
        ("    print('x' * (1 << 30))\n", ""),
    ],
)
def test_hostile_completions_score_zero(examples, completion, reason_part):
    t = HumanEvalTask(sandbox=SandboxConfig(timeout_s=1.5, max_output_bytes=1 << 16))
    s = t.score(examples[0], completion)
    assert s.reward == 0.0 and reason_part in s.reason, s


def test_exit_at_module_level_after_definition_does_not_pass(task, examples):
    # define a correct function, then leave before the tests run
    gold = task.gold_response(examples[0])
    assert task.reward(examples[0], gold + "\nimport os\nos._exit(0)\n") == 0.0


def test_malformed_file_names_the_line(tmp_path):
    row = {"task_id": "X/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    good = tmp_path / "he.jsonl.gz"
    with gzip.open(good, "wt") as f:
        f.write(json.dumps(row) + "\n")
    t = HumanEvalTask(path=good)
    (ex,) = t.examples()
    assert t.reward(ex, "    return 1\n") == 1.0 and t.reward(ex, "    return 2\n") == 0.0
    bad = tmp_path / "he.jsonl"
    bad.write_text(json.dumps(row) + "\n" + json.dumps({k: v for k, v in row.items() if k != "test"}) + "\n")
    with pytest.raises(ValueError, match=r"he\.jsonl:2: .*'test'"):
        HumanEvalTask(path=bad).examples()


def test_parallel_rewards_match_sequential(examples):
    sample = examples[:6]
    responses = ["    return None\n", None] + [e.meta["canonical_solution"] for e in sample[2:]]
    seq = HumanEvalTask(sandbox=SandboxConfig(timeout_s=3.0)).rewards(sample, responses)
    par = HumanEvalTask(sandbox=SandboxConfig(timeout_s=3.0), workers=3).rewards(sample, responses)
    assert seq == par == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="workers"):
        HumanEvalTask(workers=0)
    with pytest.raises(ValueError, match="responses"):
        HumanEvalTask(workers=2).rewards(sample, responses[:2])


@pytest.mark.slow
def test_all_164_gold_solutions_pass(examples):
    task = HumanEvalTask(sandbox=SandboxConfig(timeout_s=10.0), workers=2)
    rewards = task.rewards(examples, [task.gold_response(e) for e in examples])
    failed = [e.id for e, r in zip(examples, rewards) if r != 1.0]
    assert failed == []


def test_sandbox_failure_scores_zero_and_bad_arguments_are_errors(examples, monkeypatch):
    import ibpo_lab.tasks.humaneval as he

    def boom(*args, **kwargs):
        raise OSError("no more processes")

    monkeypatch.setattr(he, "run_check", boom)
    s = HumanEvalTask().score(examples[0], examples[0].meta["canonical_solution"])
    assert s.reward == 0.0 and s.reason == "sandbox error: OSError: no more processes"
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="max_response_chars"):
            HumanEvalTask(max_response_chars=bad)
    with pytest.raises(ValueError, match=r"\bn\b"):
        HumanEvalTask().examples("test", n=-1)
    assert HumanEvalTask().examples("test", n=0) == []
