"""GSM8K task: loading (fixture, IBPO_DATA_DIR, offline error), numeric reward, bad input, step labels."""

from __future__ import annotations

import json
import os
import sys
import threading
import types
from pathlib import Path

import pytest

from ibpo_lab.tasks import Example, get_task
from ibpo_lab.tasks.answers import extract_numeric_answer, parse_number
from ibpo_lab.tasks.gsm8k import FIXTURE, GSM8KTask, parse_annotations

DATA_DIR = os.environ.get("IBPO_DATA_DIR")
needs_real = pytest.mark.skipif(
    not (DATA_DIR and Path(DATA_DIR, "gsm8k", "test.jsonl").is_file()), reason="IBPO_DATA_DIR/gsm8k/test.jsonl not available"
)


@pytest.fixture(scope="module")
def task():
    return get_task("gsm8k", path=FIXTURE)


@pytest.fixture(scope="module")
def examples(task):
    return task.examples("test")


def test_fixture_loads_with_gold_answers(task, examples):
    assert len(examples) == 6
    assert [e.id for e in examples] == [f"gsm8k-test-{i}" for i in range(6)]
    # the gold answer is the #### line, thousands separators removed
    assert examples[3].answer == "1350"
    assert examples[0].meta["annotations"] == [("4*12", "48"), ("48-15", "33")]
    assert task.examples("test", n=2) == examples[:2]


def test_gold_scores_one_and_corrupted_zero(task, examples):
    for ex in examples:
        gold = task.gold_response(ex)
        assert task.score(ex, gold) == task.score(ex, gold)  # deterministic
        assert task.reward(ex, gold) == 1.0, ex.id
        # corrupt the final answer: add one to the #### number
        head, _, tail = gold.rpartition("####")
        wrong = head + "#### " + str(parse_number(tail) + 1)
        s = task.score(ex, wrong)
        assert s.reward == 0.0 and s.reason.startswith("wrong answer"), (ex.id, s)


@pytest.mark.parametrize(
    "response, expected",
    [
        ("so she has 33 cookies\n#### 33", 1.0),
        ("The answer is \\boxed{33}.", 1.0),
        ("The answer is 33 cookies.", 1.0),
        ("48 - 15 = 33", 1.0),  # last number
        ("#### 33.0", 1.0),
        ("#### $33", 1.0),
        ("#### 34", 0.0),
        ("33 cookies? no: \\boxed{32}", 0.0),  # boxed wins over an earlier number
        ("#### 33\nactually #### 32", 0.0),  # the last #### counts
    ],
)
def test_answer_extraction(task, examples, response, expected):
    assert task.reward(examples[0], response) == expected


def test_numeric_compare_decimals_and_commas(task, examples):
    tank = examples[4]  # answer 5.5
    assert task.reward(tank, "#### 5.50") == 1.0
    assert task.reward(tank, "#### 11/2") == 1.0
    assert task.reward(tank, "#### 5.6") == 0.0
    pages = examples[3]  # answer 1350
    assert task.reward(pages, "#### 1,350") == 1.0
    assert task.reward(pages, "#### 1.350") == 0.0


def test_extract_numeric_answer_reports_how():
    assert extract_numeric_answer("x\n#### 7") == ("7", "####")
    assert extract_numeric_answer("\\boxed{\\frac{1}{2}}")[1] == "boxed"
    assert extract_numeric_answer("no digits here") == (None, "no final answer")


@pytest.mark.parametrize(
    "response, reason_part",
    [
        ("", "empty"),
        ("   \n\t ", "empty"),
        ("I am not sure.", "no final answer"),
        ("#### many", "#### without a number"),
        (b"\xff\xfe\x00garbage", "UTF-8"),
        ("lone surrogate \udcff 33", "UTF-8"),
        (None, "not text"),
        (12345, "not text"),
        ("7 " * 200_000, "too long"),
        ("\x00\x01\x02", "no final answer"),
    ],
)
def test_bad_responses_score_zero_with_reason(task, examples, response, reason_part):
    s = task.score(examples[0], response)
    assert s.reward == 0.0
    assert reason_part in s.reason, s.reason


def test_valid_utf8_bytes_are_scored(task, examples):
    assert task.reward(examples[0], "#### 33".encode()) == 1.0


def test_step_labels_follow_calculator_annotations(task, examples):
    ex = examples[0]  # 4*12=48, 48-15=33, answer 33
    response = (
        "Mira bakes 4 * 12 = 48 cookies.\n"
        "\n"
        "She gives away 15 so she has 48 - 15 = 32 cookies.\n"
        "That is a lot of cookies.\n"
        "#### 32\n"
    )
    # one label per non-empty line; the blank line is no step
    assert task.step_labels(ex, response) == [True, False, False, False]
    fixed = response.replace("= 32", "= 33").replace("#### 32", "#### 33")
    assert task.step_labels(ex, fixed) == [True, True, False, True]
    # the gold solution reproduces every annotation
    assert all(task.step_labels(ex, task.gold_response(ex)))
    # annotation syntax in the response counts like a plain equation
    assert task.step_labels(ex, "4*12 = <<4*12=48>>48\n#### 33") == [True, True]


def test_step_labels_none_without_annotations_or_text(task, examples):
    no_annotations = examples[5]
    assert parse_annotations(no_annotations.meta["solution"]) == []
    assert task.step_labels(no_annotations, "7 + 5 = 12\n#### 12") is None
    assert task.step_labels(examples[0], b"\xff") is None


def test_path_per_split_and_malformed_files(tmp_path):
    good = tmp_path / "g.jsonl"
    good.write_text(json.dumps({"question": "q?", "answer": "1+1=<<1+1=2>>2\n#### 2"}) + "\n\n")
    t = GSM8KTask(path={"train": good})
    assert [e.answer for e in t.examples("train")] == ["2"]
    with pytest.raises(ValueError, match="split 'test'"):
        t.examples("test")

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        GSM8KTask(path=bad_json).examples("test")

    missing = tmp_path / "missing_field.jsonl"
    missing.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"missing_field\.jsonl:1: .*'answer'"):
        GSM8KTask(path=missing).examples("test")

    no_hash = tmp_path / "no_hash.jsonl"
    no_hash.write_text(json.dumps({"question": "q", "answer": "1"}) + "\n" + json.dumps({"question": "q", "answer": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no_hash\.jsonl:1: .*####"):
        GSM8KTask(path=no_hash).examples("test")

    with pytest.raises(ValueError, match="does not exist"):
        GSM8KTask(path=tmp_path / "nope.jsonl").examples("test")


def test_offline_without_file_says_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.delenv("IBPO_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="IBPO_DATA_DIR"):
        GSM8KTask().examples("test")
    # data_dir / IBPO_DATA_DIR layout: <dir>/gsm8k/<split>.jsonl
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_bytes(FIXTURE.read_bytes())
    monkeypatch.setenv("IBPO_DATA_DIR", str(tmp_path))
    assert len(GSM8KTask().examples("test")) == 6


def test_hub_is_used_only_when_online(monkeypatch):
    # a stand-in `datasets` module: the test checks the call, not the network (importing the real one is slow)
    datasets = types.ModuleType("datasets")
    monkeypatch.setitem(sys.modules, "datasets", datasets)
    calls = []

    def fake_load_dataset(*args, **kw):
        calls.append((args, kw))
        return [{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}]

    datasets.load_dataset = fake_load_dataset
    monkeypatch.delenv("IBPO_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="offline"):
        GSM8KTask().examples("train")
    assert calls == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    (ex,) = GSM8KTask().examples("train")
    assert calls == [(("openai/gsm8k", "main"), {"split": "train"})]
    assert ex.answer == "2" and ex.meta["source"] == "hub:openai/gsm8k/train:1"


def test_unknown_task_name():
    with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
        get_task("gsm9k")


def test_templates(task, examples):
    p = task.solve_prompt(examples[0])
    assert examples[0].prompt in p and "####" in p
    r = task.repair_prompt(examples[0], "FAILED", "REFERENCE")
    assert examples[0].prompt in r and "FAILED" in r and "REFERENCE" in r


def test_score_from_worker_thread(task, examples):
    out = []
    th = threading.Thread(target=lambda: out.append(task.reward(examples[0], "#### 33")))
    th.start()
    th.join()
    assert out == [1.0]


@needs_real
def test_real_gsm8k_every_gold_scores_one():
    t = get_task("gsm8k")  # via IBPO_DATA_DIR
    test = t.examples("test")
    assert len(test) == 1319
    assert len(t.examples("train")) == 7473
    rewards = t.rewards(test, [t.gold_response(e) for e in test])
    assert rewards == [1.0] * len(test)
    wrong = [t.gold_response(e).rpartition("####")[0] + f"#### {parse_number(e.answer) + 1}" for e in test[:200]]
    assert sum(t.rewards(test[:200], wrong)) == 0.0
    # gold solutions with annotations label every annotated line True
    labels = [t.step_labels(e, t.gold_response(e)) for e in test[:50]]
    assert any(lab is not None and all(lab) for lab in labels)


# ---------------------------------------------------------------- shared task helpers (tasks/answers.py)
def test_guarded_score_never_raises_and_only_verifies_text():
    from ibpo_lab.tasks.answers import guarded_score
    from ibpo_lab.tasks.base import Score

    seen = []

    def verify(text):
        seen.append(text)
        return Score(1.0, "ok")

    assert guarded_score(b"#### 4", 100, verify) == Score(1.0, "ok") and seen == ["#### 4"]
    assert guarded_score(b"\xff", 100, verify).reward == 0.0 and seen == ["#### 4"]  # not UTF-8: never verified
    assert guarded_score("x" * 101, 100, verify).reason.startswith("response too long")

    def broken(text):
        raise ZeroDivisionError("boom")

    assert guarded_score("#### 4", 100, broken) == Score(0.0, "verifier error: ZeroDivisionError: boom")


def test_cached_split_checks_n_first_loads_once_and_returns_copies():
    from ibpo_lab.tasks.answers import cached_split

    calls = []

    def load(split):
        calls.append(split)
        return [1, 2, 3]

    cache: dict = {}
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match="n must be"):
            cached_split(cache, "train", bad, load)
    assert calls == []  # a bad n fails before any data is read
    first = cached_split(cache, "train", None, load)
    first.append(99)  # callers get their own list
    assert cached_split(cache, "train", 2, load) == [1, 2] and cached_split(cache, "train", None, load) == [1, 2, 3]
    assert calls == ["train"]


def test_bad_n_and_max_response_chars_are_rejected(task):
    with pytest.raises(ValueError, match="max_response_chars"):
        GSM8KTask(path=FIXTURE, max_response_chars=0)
    with pytest.raises(ValueError, match="n must be"):
        task.examples("test", n=-1)
    # a response over the limit scores 0 with a reason, unread
    short = GSM8KTask(path=FIXTURE, max_response_chars=10)
    ex = short.examples("test")[0]
    assert short.score(ex, f"#### {ex.answer}").reward == 1.0
    s = short.score(ex, "x" * 20 + f"\n#### {ex.answer}")
    assert s.reward == 0.0 and "too long" in s.reason


# ---------------------------------------------------------------- issue 14, items 10 and 11
class _CountingStr(str):
    """A str that counts character-by-character indexing (how the quadratic box scan read the text)."""

    reads = 0

    def __getitem__(self, key):
        type(self).reads += 1
        return str.__getitem__(self, key)


def _indexing_reads(text: str) -> int:
    from ibpo_lab.tasks.answers import last_boxed

    _CountingStr.reads = 0
    last_boxed(_CountingStr(text))
    return _CountingStr.reads


def test_last_boxed_does_not_rescan_the_text_per_box():
    # n unclosed boxes: scanning forward from each box reads ~n^2/2 characters one by one
    # (2000 boxes: ~14 million reads); one pass over the braces reads none one by one
    small, big = _indexing_reads("\\boxed{" * 1000), _indexing_reads("\\boxed{" * 2000)
    assert big <= 2 * small + 2, (small, big)
    assert big <= 2000  # at most one read per box, far below n^2/2 = 2 million


@pytest.mark.parametrize(
    "response, reward, reason_part",
    [
        ("\\boxed{" * 28_571, 0.0, "no final answer"),  # 200k characters, no box ever closes
        ("\\boxed{" * 28_570 + "33}", 1.0, "ok"),  # only the innermost box closes: its content counts
        ("{" * 199_990 + "\\boxed{33}", 1.0, "ok"),
        ("}" * 199_990 + "\\boxed{33}", 1.0, "ok"),
        (" " * 199_990 + "#### 33", 1.0, "ok"),
        ("#### " + " " * 199_990 + "x", 0.0, "#### without a number"),
        ("The answer is " + " " * 199_980 + "33", 1.0, "ok"),
        ("#### 3" + "3" * 199_990, 0.0, "too long"),
        ("\\boxed{" + " " * 199_990 + "33}", 1.0, "ok"),
        ("-" * 100_000 + " " * 99_990 + "7", 0.0, "wrong answer"),
    ],
    ids=["open-boxes", "nested-boxes", "open-braces", "close-braces", "spaces-then-hash", "hash-then-spaces",
         "answer-is-spaces", "huge-number", "boxed-spaces", "dashes-spaces"],
)
def test_adversarial_200k_responses_score_right(task, examples, response, reward, reason_part):
    # every one of these took minutes (some hours) with the quadratic scans; a linear scorer takes
    # milliseconds. Here only the values are asserted (no clock); test_last_boxed_does_not_rescan...
    # asserts the linearity of the box scan structurally.
    assert len(response) <= task.max_response_chars
    s = task.score(examples[0], response)  # gold 33
    assert s.reward == reward and reason_part in s.reason, s


def test_adversarial_parse_number_and_step_labels():
    assert parse_number(" " * 200_000 + "5") == 5  # was quadratic in the run of spaces (\frac pattern)
    t = GSM8KTask(path=FIXTURE)
    ex = t.examples("test")[0]  # annotations 48, 33
    # "= <200k spaces> 48": the optional "$" between two \s* made this quadratic (hours at 200k)
    assert t.step_labels(ex, "= " + " " * 199_990 + "x") == [False]
    assert t.step_labels(ex, "x =" + " " * 199_990 + "48") == [True]


def _gold(answer: str) -> Example:
    return Example(id="x", prompt="q", answer=answer)


@pytest.mark.parametrize(
    "response, gold",
    [
        ("\\boxed{9^{9^{9^9}}}", "9"),
        ("#### 33 or 34", "33"),
        ("#### 33, 34", "33"),
        ("The answer is 33 or 34.", "33"),
        ("\\boxed{\\sqrt{9}}", "9"),
        ("#### 5!", "5"),
        ("\\boxed{2 \\times 3}", "2"),
        ("#### 33 - 1", "33"),
        ("\\boxed{33}\\boxed{ 3^3 }", "3"),
    ],
)
def test_final_answer_must_be_exactly_one_number(task, response, gold):
    s = task.score(_gold(gold), response)
    assert s.reward == 0.0 and "not exactly one number" in s.reason, s


@pytest.mark.parametrize(
    "response, gold",
    [
        ("#### 33", "33"),
        ("#### $33", "33"),
        ("#### 33 cookies.", "33"),
        ("#### 1,350 pages", "1350"),
        ("\\boxed{33 \\text{ cookies}}", "33"),
        ("\\boxed{\\$1{,}350}", "1350"),
        ("\\boxed{\\frac{11}{2}}", "5.5"),
        ("#### 11/2", "5.5"),
        ("The answer is **33**.", "33"),
        ("The answer is 33. Then 4 more lines follow.", "33"),
        ("#### 40%", "40"),
        ("#### -5", "-5"),
        ("\\(\\boxed{33}\\)", "33"),
    ],
)
def test_one_number_with_units_still_scores(task, response, gold):
    assert task.score(_gold(gold), response) == task.score(_gold(gold), response)
    s = task.score(_gold(gold), response)
    assert s.reward == 1.0, s


def test_hash_step_label_needs_exactly_one_number(task, examples):
    ex = examples[0]  # gold 33
    assert task.step_labels(ex, "4 * 12 = 48\n#### 33") == [True, True]
    assert task.step_labels(ex, "4 * 12 = 48\n#### 33 or 34") == [True, False]
