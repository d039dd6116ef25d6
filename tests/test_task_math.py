"""MATH task: MATH-format jsonl, math-verify reward (gold first), deadline from any thread, bad input."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ibpo_lab.tasks import get_task
from ibpo_lab.tasks.mathtask import FIXTURE, MathTask, SafeMathVerifier, _shared_verifier


@pytest.fixture(scope="module")
def task():
    return get_task("math", path=FIXTURE, timeout_s=3.0)


@pytest.fixture(scope="module")
def examples(task):
    return task.examples("test")


def test_fixture_answers_are_last_boxed(examples):
    assert [e.answer for e in examples] == ["\\frac{5}{6}", "4", "5\\sqrt{2}", "\\{-3, 3\\}", "(1, \\infty)", "\\frac{1}{4}"]
    assert examples[0].meta["level"] == "Level 1" and examples[0].meta["type"] == "Prealgebra"


def test_gold_scores_one_and_corrupted_zero(task, examples):
    assert task.rewards(examples, [task.gold_response(e) for e in examples]) == [1.0] * len(examples)
    corrupted = [task.gold_response(e).replace("\\boxed{", "\\boxed{2+") for e in examples]
    scores = [task.score(e, r) for e, r in zip(examples, corrupted)]
    assert [s.reward for s in scores] == [0.0] * len(examples), scores


@pytest.mark.parametrize(
    "i, response, expected",
    [
        (0, "the sum is $\\boxed{\\dfrac{5}{6}}$", 1.0),
        (0, "so \\boxed{10/12}", 1.0),  # equivalent value
        (0, "so \\boxed{0.8333}", 0.0),
        (2, "$\\boxed{\\sqrt{50}}$", 1.0),
        (3, "$\\boxed{\\{3, -3\\}}$", 1.0),  # set order does not matter
        (4, "$\\boxed{[1, \\infty)}$", 0.0),  # closed interval is a different answer
        (1, "x = \\boxed{5}", 0.0),
    ],
)
def test_math_verify_equivalence(task, examples, i, response, expected):
    assert task.reward(examples[i], response) == expected


@pytest.mark.parametrize(
    "response, reason_part",
    [
        ("", "empty"),
        ("I give up.", "no final answer"),
        (b"\xc3\x28 \\boxed{4}", "UTF-8"),
        ("\udcff \\boxed{4}", "UTF-8"),
        ("\\boxed{4} " * 100_000, "too long"),
        (["\\boxed{4}"], "not text"),
    ],
)
def test_bad_responses_score_zero_with_reason(task, examples, response, reason_part):
    s = task.score(examples[1], response)
    assert s.reward == 0.0 and reason_part in s.reason, s


def test_hanging_verification_times_out_and_worker_recovers(examples):
    # sympy evaluates 9^(9^(9^9)) in C: signal-based timeouts cannot stop it, the worker kill does
    # (no wall-clock bound: the deadline branch is proven by its reason and the kill by the restart count)
    t = MathTask(path=FIXTURE, timeout_s=1.0)
    verifier = _shared_verifier(1.0)
    restarts = verifier.restarts
    s = t.score(examples[1], "\\boxed{9^{9^{9^{9}}}}")
    assert (s.reward, s.reason) == (0.0, "verifier timeout after 1s")
    assert verifier.restarts == restarts + 1 and verifier._proc is None  # killed, not left running
    assert t.score(examples[1], "\\boxed{4}").reward == 1.0  # a fresh worker answers
    assert verifier._proc is not None and verifier.restarts == restarts + 1


def test_scoring_from_threads(task, examples):
    # math-verify's own signal timeouts raise outside the main thread; ours do not
    gold = [task.gold_response(e) for e in examples]
    with ThreadPoolExecutor(4) as pool:
        rewards = list(pool.map(task.reward, examples * 2, gold * 2))
    assert rewards == [1.0] * (2 * len(examples))
    out = []
    quick = MathTask(path=FIXTURE, timeout_s=1.0)
    th = threading.Thread(target=lambda: out.append(quick.score(examples[1], "\\boxed{9^{9^{9^{9}}}}")))
    th.start()
    th.join(timeout=30)
    assert out and out[0].reward == 0.0


def test_verifier_validates_timeout():
    with pytest.raises(ValueError, match="timeout_s"):
        SafeMathVerifier(timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        MathTask(path=FIXTURE, timeout_s=-1)


def test_malformed_files_name_file_and_line(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"problem": "p", "solution": "\\boxed{1}"}) + "\n" + json.dumps({"problem": "p", "solution": "no box"}) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: solution has no \\boxed"):
        MathTask(path=f).examples("test")
    g = tmp_path / "g.jsonl"
    g.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"g\.jsonl:1: expected a JSON object"):
        MathTask(path=g).examples("test")


def test_missing_data_says_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.delenv("IBPO_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match=r"IBPO_DATA_DIR.*math/train\.jsonl"):
        MathTask().examples("train")
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "train.jsonl").write_bytes(FIXTURE.read_bytes())
    assert len(MathTask(data_dir=tmp_path).examples("train")) == 6


def test_templates_ask_for_boxed(task, examples):
    assert "\\boxed{}" in task.solve_prompt(examples[0])
    assert "\\boxed{}" in task.repair_prompt(examples[0], "a", "b")


def test_bad_n_and_max_response_chars_are_rejected(task):
    with pytest.raises(ValueError, match="max_response_chars"):
        MathTask(path=FIXTURE, max_response_chars=-5)
    with pytest.raises(ValueError, match="n must be"):
        task.examples("test", n=-1)
    s = MathTask(path=FIXTURE, max_response_chars=10).score(task.examples("test")[1], "x" * 20 + " \\boxed{4}")
    assert s.reward == 0.0 and "too long" in s.reason
