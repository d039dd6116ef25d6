"""Tests of the synthetic task: exact step labels, many solution paths, injected errors, oracle repairs."""

import itertools
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rapidfuzz.distance import Levenshtein

from ibpo_lab.tasks import Example, get_task, list_tasks
from ibpo_lab.tasks.synthetic import ERROR_KINDS, VOCAB, SyntheticTask, text_steps


@pytest.fixture(scope="module")
def task():
    return SyntheticTask()


@pytest.fixture(scope="module")
def train(task):
    return task.examples("train")


def nonempty_lines(text):
    return [ln for ln in text.split("\n") if ln.strip()]


def ops_in_order(text):
    """Operations of the step lines, parsed independently of the task code."""
    out = []
    for ln in nonempty_lines(text):
        if not ln.startswith("ans="):
            left, _ = ln.split("=")
            i = max(left.rfind("+"), left.rfind("-"))
            out.append((left[i], int(left[i + 1:])))
    return out


def chain_value(start, order, m):
    v = start
    for s, b in order:
        v = (v + b) % m if s == "+" else (v - b) % m
    return v


# ---------------------------------------------------------------- registry, knobs, splits
def test_registered_and_built_by_name():
    assert "synthetic" in list_tasks()
    t = get_task("synthetic", n_steps=5, modulus=7, seed=3)
    assert isinstance(t, SyntheticTask)
    assert t.config.n_steps == 5 and t.config.modulus == 7
    ex = t.examples("test", 5)
    assert len(ex) == 5 and all(len(e.meta["ops"]) == 5 for e in ex)


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"n_steps": 1}, "n_steps"),
        ({"modulus": 1}, "modulus"),
        ({"ops": "*"}, "ops"),
        ({"operand_max": 10}, "operand_max"),
        ({"operand_min": 0}, "operand_min"),
        ({"reward_on": "vibes"}, "reward_on"),
        ({"error_kinds": ("typo",)}, "error_kinds"),
        ({"n_train": -1}, "n_train"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_knobs_raise_naming_the_argument(kw, word):
    with pytest.raises(ValueError, match=word):
        SyntheticTask(**kw)


def test_splits_deterministic_disjoint_and_sized():
    a, b = SyntheticTask(seed=7), SyntheticTask(seed=7)
    tr, te = a.examples("train"), a.examples("test")
    assert len(tr) == 2000 and len(te) == 200
    assert [e.prompt for e in tr] == [e.prompt for e in b.examples("train")]
    assert [e.prompt for e in te] == [e.prompt for e in b.examples("eval")]
    assert [e.prompt for e in a.examples("train", 10)] == [e.prompt for e in tr[:10]]
    key = lambda e: (e.meta["start"], tuple(sorted(e.meta["ops"])))  # noqa: E731
    assert len({key(e) for e in tr}) == len(tr) and len({key(e) for e in te}) == len(te)
    assert not {key(e) for e in tr} & {key(e) for e in te}
    assert len({e.id for e in tr}) == len(tr)
    # another seed gives other problems
    other = SyntheticTask(seed=8).examples("train", 50)
    assert [e.prompt for e in other] != [e.prompt for e in tr[:50]]


def test_split_errors():
    t = SyntheticTask(n_train=5, n_test=5)
    with pytest.raises(ValueError, match="split"):
        t.examples("dev")
    with pytest.raises(ValueError, match="n must"):
        t.examples("train", 6)
    with pytest.raises(ValueError, match="too small"):
        SyntheticTask(n_steps=2, modulus=3, n_train=10_000).examples("train")  # more than the whole space
    with pytest.raises(ValueError, match="too small"):
        SyntheticTask(n_steps=2, modulus=3, n_test=15).examples("test")  # more than the test share of it


def test_difficulty_knobs_shape_problems():
    t = SyntheticTask(n_steps=6, modulus=7, ops="+", operand_min=2, operand_max=5, n_train=100)
    for e in t.examples("train"):
        ops = e.meta["ops"]
        assert len(ops) == 6 and all(s == "+" and 2 <= b <= 5 for s, b in ops)
        assert len(set(ops)) >= 2  # at least two orders
        sol = t.solutions(e, 1, 0)[0]
        vals = [int(x) for ln in nonempty_lines(sol) for x in ln.replace("ans", "").replace("+", "=").split("=") if x]
        assert all(0 <= v < 7 for v in vals)


# ---------------------------------------------------------------- gold solutions, many paths
def test_every_valid_order_scores_one(task, train):
    for ex in train[:40]:
        start, ops, m = ex.meta["start"], list(ex.meta["ops"]), ex.meta["modulus"]
        orders = set(itertools.permutations(ops))
        assert len(orders) == task.n_orders(ex) >= 2
        texts = {task.solution(ex, o) for o in orders}
        assert len(texts) == len(orders)  # different paths differ in text
        for o in orders:
            sol = task.solution(ex, o)
            assert ops_in_order(sol) == list(o)
            assert nonempty_lines(sol)[-1] == f"ans={chain_value(start, o, m)}" == f"ans={ex.answer}"
            assert task.score(ex, sol).reward == 1.0
            assert task.step_labels(ex, sol) == [True] * (len(ops) + 1)
            assert task.first_error(ex, sol) is None


def test_solutions_distinct_and_seeded(task, train):
    ex = train[0]
    k = min(4, task.n_orders(ex))
    sols = task.solutions(ex, k, random.Random(3))
    assert len(set(sols)) == k
    assert sols == task.solutions(ex, k, 3)
    assert all(task.score(ex, s).reward == 1.0 for s in sols)
    full = task.solutions(ex, task.n_orders(ex), 0)  # dense path enumerates all
    assert len(set(full)) == task.n_orders(ex)
    with pytest.raises(ValueError, match="k must"):
        task.solutions(ex, task.n_orders(ex) + 1, 0)


def test_answer_is_the_modular_sum(train):
    for ex in train[:200]:
        signed = sum(b if s == "+" else -b for s, b in ex.meta["ops"])
        assert int(ex.answer) == (ex.meta["start"] + signed) % ex.meta["modulus"]
        assert ex.prompt.endswith(f"mod {ex.meta['modulus']}")


def test_example_without_meta_is_parsed_from_the_question(task, train):
    ex = train[3]
    bare = Example(id="x", prompt=ex.prompt, answer=ex.answer)
    sol = task.solutions(ex, 1, 0)[0]
    assert task.score(bare, sol) == task.score(ex, sol)
    assert task.step_labels(bare, sol) == task.step_labels(ex, sol)


# ---------------------------------------------------------------- injected errors
@pytest.mark.parametrize("reward_on", ["chain", "answer"])
def test_injected_errors_fail_with_the_injected_labels(train, reward_on):
    t = SyntheticTask(reward_on=reward_on)
    rng = random.Random(11)
    seen = Counter()
    for i in range(600):
        ex = train[i % len(train)]
        sol = t.solutions(ex, 1, rng)[0]
        inj = t.inject_error(ex, sol, rng)
        seen[inj.kind] += 1
        assert inj.text != sol
        assert t.score(ex, inj.text).reward == 0.0
        assert t.score(ex, inj.text).reason == "wrong answer"  # the final answer is always wrong
        labels = t.step_labels(ex, inj.text)
        assert labels == inj.step_labels
        assert len(labels) == len(nonempty_lines(inj.text))
        assert t.first_error(ex, inj.text) == inj.first_error == labels.index(False)
        n = len(ex.meta["ops"])
        # errors at the answer line: skip (operations left) and answer (wrong value)
        if inj.kind in ("skip", "answer"):
            assert inj.first_error == len(labels) - 1
        else:
            assert inj.first_error < len(labels) - 1
        assert len(labels) == n + 1 + {"repeat": 1, "skip": -1}.get(inj.kind, 0)
    assert set(seen) == set(ERROR_KINDS)


@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_each_error_kind_does_what_it_says(task, train, kind):
    rng = random.Random(kind)
    for i in range(60):
        ex = train[i]
        sol = task.solutions(ex, 1, rng)[0]
        inj = task.inject_error(ex, sol, rng, kind=kind)
        assert inj.kind == kind
        good, bad = nonempty_lines(sol), nonempty_lines(inj.text)
        e = inj.first_error
        if kind != "skip":  # a skip shows only at the answer line, after the shortened chain
            assert bad[:e] == good[:e]  # the prefix before the error is untouched
        ops_good, ops_bad = ops_in_order(sol), ops_in_order(inj.text)
        if kind in ("slip", "carry"):
            assert ops_bad == ops_good and bad[e] != good[e]
        elif kind == "operand":
            assert Counter(ops_bad) != Counter(ops_good) and len(ops_bad) == len(ops_good)
        elif kind == "repeat":
            assert ops_bad[:e] + ops_bad[e + 1:] == ops_good and ops_bad[e] in ops_good[:e]
        elif kind == "skip":
            assert len(ops_bad) == len(ops_good) - 1 and not (Counter(ops_bad) - Counter(ops_good))
        elif kind == "answer":
            assert bad[:-1] == good[:-1] and bad[-1] != good[-1]
        # steps after the error are recomputed from the wrong value: locally correct
        assert all(task.step_labels(ex, inj.text)[e + 1:-1])


def test_injected_error_is_a_str_that_pickles(task, train):
    import pickle

    inj = task.inject_error(train[0], task.solution(train[0]), 0, kind="slip")
    assert isinstance(inj, str) and inj == inj.text and type(inj.text) is str
    assert task.score(train[0], inj).reward == 0.0 and task.oracle_repair(train[0], inj) == task.solution(train[0])
    back = pickle.loads(pickle.dumps(inj))
    assert back == inj and back.kind == "slip" and back.step_labels == inj.step_labels


def test_inject_error_rejects_a_wrong_solution(task, train):
    with pytest.raises(ValueError, match="not a correct chain"):
        task.inject_error(train[0], "1+1=2\nans=2", 0)
    with pytest.raises(ValueError, match="kind"):
        task.inject_error(train[0], task.solution(train[0]), 0, kind="typo")


# ---------------------------------------------------------------- oracle repair
def test_oracle_repair_is_the_minimal_local_fix(task, train):
    rng = random.Random(5)
    for i in range(400):
        ex = train[i]
        sol = task.solutions(ex, 1, rng)[0]
        inj = task.inject_error(ex, sol, rng)
        rep = task.oracle_repair(ex, inj.text)
        assert task.score(ex, rep).reward == 1.0
        e = inj.first_error
        assert nonempty_lines(rep)[:e] == nonempty_lines(inj.text)[:e]  # only steps from the first error change
        if inj.kind == "skip":
            # the skipped operation is appended: the failed order and every value before it are kept
            skipped = list((Counter(ops_in_order(sol)) - Counter(ops_in_order(inj.text))).elements())
            assert ops_in_order(rep) == ops_in_order(inj.text) + skipped
            assert nonempty_lines(rep)[:-2] == nonempty_lines(inj.text)[:-1]
        else:
            # fixing the one wrong step in place and recomputing restores the path it was made from
            assert rep == sol
        assert Levenshtein.distance(inj.text, rep) <= Levenshtein.distance(inj.text, sol)
    assert task.oracle_repair(train[0], task.solution(train[0])) == task.solution(train[0])


def test_oracle_repair_of_odd_failures(task):
    ex = task.make_example(4, ["+3", "+5", "+2"])
    # garbage line: takes the operation no later step uses, in place
    assert task.oracle_repair(ex, "4+3=7\nfoo\n7+5=2\nans=2") == "4+3=7\n7+2=9\n9+5=4\nans=4"
    # premature answer, then more steps and a second answer
    assert task.oracle_repair(ex, "4+3=7\nans=7\n7+5=2\nans=2") == "4+3=7\n7+2=9\n9+5=4\nans=4"
    # an operation that is not in the problem becomes the textually closest unused one
    ex2 = task.make_example(1, ["+3", "-6", "+2"])
    assert task.oracle_repair(ex2, "1+3=4\n4-5=9\n9+2=1\nans=1") == "1+3=4\n4-6=8\n8+2=0\nans=0"
    # a correct chain without its answer line: the first error is the missing answer, which is appended
    sol = task.solution(ex)
    assert task.first_error(ex, sol.rsplit("\n", 1)[0]) == 3
    assert task.oracle_repair(ex, sol.rsplit("\n", 1)[0]) == sol
    # empty attempt: a full solution in question order
    assert task.oracle_repair(ex, "") == task.solution(ex)


def test_oracle_repair_keeps_the_failed_text_verbatim_before_the_error(task, train):
    ex = train[0]
    sol = task.solution(ex)
    lines = sol.split("\n")
    wrong = lines[:2] + ["garbage"] + lines[2:]
    failed = "\n\n".join(wrong[:2]) + "\n" + "\n".join(wrong[2:])
    rep = task.oracle_repair(ex, failed)
    assert rep.startswith("\n\n".join(wrong[:2]) + "\n")
    assert task.score(ex, rep).reward == 1.0
    # a missing answer line is appended
    assert task.oracle_repair(ex, "\n".join(lines[:-1])) == sol


def test_repair_pairs_are_not_copies_of_the_reference(task):
    pairs = task.sft_pairs("repair", 300, seed=1)
    copies, local_closer = 0, 0
    for prompt, target in pairs:
        failed = prompt.split("Failed:\n")[1].split("\nRef:\n")[0]
        reference = prompt.split("\nRef:\n")[1].split("\nFix:\n")[0]
        copies += target == reference
        local_closer += Levenshtein.distance(failed, target) < Levenshtein.distance(failed, reference)
        assert reference != failed
    assert copies / len(pairs) < 0.2  # local repair and full rewrite differ: measurable
    assert local_closer / len(pairs) > 0.8


# ---------------------------------------------------------------- SFT data and vocabulary
def test_sft_pairs_deterministic_and_correct(task):
    solve = task.sft_pairs("solve", 200, seed=0)
    assert solve == task.sft_pairs("solve", 200, seed=0)
    assert solve != task.sft_pairs("solve", 200, seed=1)
    by_prompt = {e.prompt: e for e in task.examples("train")}
    for prompt, target in solve:
        q = prompt.split("Q: ")[1].split("\n")[0]
        assert task.score(by_prompt[q], target).reward == 1.0
    mixed = task.sft_pairs("solve", 200, seed=0, error_rate=0.5)
    rewards = [task.score(by_prompt[p.split("Q: ")[1].split("\n")[0]], t).reward for p, t in mixed]
    assert 0.3 < 1 - sum(rewards) / len(rewards) < 0.7
    with pytest.raises(ValueError, match="mode"):
        task.sft_pairs("rewrite", 3)


@pytest.mark.parametrize("kw", [{}, {"n_steps": 8, "modulus": 100, "n_train": 300, "n_test": 30}])
def test_every_generated_character_is_in_vocab(kw):
    t = SyntheticTask(**kw)
    texts = [t.solve_prompt(e) for e in t.examples("test")]
    for mode in ("solve", "repair"):
        for p, tgt in t.sft_pairs(mode, 100, seed=2, error_rate=0.5):
            texts += [p, tgt]
    assert set("".join(texts)) <= set(VOCAB)
    assert len(VOCAB) == len(set(VOCAB))


def test_default_prompts_fit_a_small_context(task):
    longest_solution = max(len(t) for _, t in task.sft_pairs("solve", 300, seed=0))
    assert longest_solution <= 60
    assert max(len(p) + len(t) for p, t in task.sft_pairs("repair", 300, seed=0)) <= 256


# ---------------------------------------------------------------- robustness of the reward
@pytest.mark.parametrize(
    "response, reason",
    [
        ("", "empty"),
        ("  \n\n ", "empty"),
        ("the answer is seven", "no final answer"),
        (b"\xff\xfe".decode("utf-8", errors="replace"), "no final answer"),
        (b"\xff\xfe", "not utf-8"),
        (None, "not text"),
        (12, "not text"),
        ("1" * 1_000_000, "too long"),
        ("ans=" + "9" * 3000, "no final answer"),
        ("9-8=1\n1-9=2", "no final answer"),
    ],
)
def test_bad_responses_score_zero_without_raising(task, train, response, reason):
    s = task.score(train[0], response)
    assert s.reward == 0.0 and s.reason == reason


def test_reward_modes_differ_on_a_lucky_answer(train):
    ex = train[0]
    lucky = f"ans={ex.answer}"
    assert SyntheticTask(reward_on="chain").score(ex, lucky) == SyntheticTask().score(ex, lucky)
    assert SyntheticTask().score(ex, lucky).reason == "invalid chain"
    assert SyntheticTask(reward_on="answer").score(ex, lucky).reward == 1.0
    assert SyntheticTask(reward_on="answer").score(ex, lucky + "\n1+1=2").reward == 0.0


def test_text_after_the_answer_is_an_error(task, train):
    ex = train[0]
    sol = task.solution(ex)
    labels = task.step_labels(ex, sol + "\nans=" + ex.answer)
    assert labels == [True] * (len(labels) - 1) + [False]
    assert task.score(ex, sol + "\n" + sol).reward == 0.0


_SMALL = SyntheticTask(n_train=50, n_test=5)  # built once: hypothesis calls the tests hundreds of times
_line = st.one_of(
    st.text(alphabet=VOCAB, max_size=12),
    st.builds(lambda a, s, b, c: f"{a}{s}{b}={c}", st.integers(0, 12), st.sampled_from("+-"), st.integers(0, 12), st.integers(0, 12)),
    st.builds(lambda v: f"ans={v}", st.integers(0, 12)),
)
#: (example, response) pairs: any mix of valid, invalid and junk lines under several line separators
_any_response = st.tuples(
    st.integers(0, 49).map(lambda i: _SMALL.examples("train")[i]),
    st.builds(lambda lines, sep: sep.join(lines), st.lists(_line, max_size=8), st.sampled_from(["\n", "\n\n", " \n"])),
)


@settings(max_examples=200, deadline=None)
@given(case=_any_response)
def test_labels_align_with_nonempty_lines_on_any_response(case):
    t, (ex, text) = _SMALL, case
    labels = t.step_labels(ex, text)
    assert len(labels) == len(text_steps(text))
    # one label per non-empty line; text of only whitespace is one (empty, wrong) step
    assert len(labels) == (len(nonempty_lines(text)) or (1 if text else 0))
    s = t.score(ex, text)
    assert s.reward in (0.0, 1.0) and s.reason
    fe = t.first_error(ex, text)
    assert (s.reward == 1.0) == (fe is None)
    if fe is not None and fe < len(labels):
        assert labels[fe] is False and all(labels[:fe])


@settings(max_examples=200, deadline=None)
@given(case=_any_response)
def test_oracle_repair_fixes_any_response_keeping_its_correct_prefix(case):
    t, (ex, text) = _SMALL, case
    rep = t.oracle_repair(ex, text)
    assert t.score(ex, rep).reward == 1.0
    fe = t.first_error(ex, text)
    if fe is None:
        assert rep == text
    else:
        assert t.analyse(ex, rep).steps[:fe] == t.analyse(ex, text).steps[:fe]


def test_text_steps_spans_cover_steps():
    text = "\n4+3=7\n  \n7-1=6 \nans=6"
    spans = text_steps(text)
    assert [text[a:b].strip() for a, b in spans] == ["4+3=7", "7-1=6", "ans=6"]
    assert spans[0][1] == spans[1][0] and spans[-1][1] == len(text)  # separators belong to the step they end


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="\n \t\r4+=ans", max_size=40))
def test_text_steps_agree_with_the_steps_module(text):
    steps = pytest.importorskip("ibpo_lab.steps")
    spans = text_steps(text)
    assert spans == steps.split_text_steps(text, "newline")
    # and both follow the rule the task documents, checked independently: the spans tile the text
    # and each one holds one non-empty line (whitespace-only text: one empty step)
    assert "".join(text[a:b] for a, b in spans) == text and all(a < b for a, b in spans)
    expected = [ln.strip() for ln in nonempty_lines(text)] or ([""] if text else [])
    assert [text[a:b].strip() for a, b in spans] == expected


def test_labels_align_with_steps_module():
    steps = pytest.importorskip("ibpo_lab.steps")
    t = SyntheticTask(n_train=20, n_test=5)
    ex = t.examples("train")[0]
    sol = t.solution(ex)
    for text in [sol, sol + "\n", "\n" + sol, sol.replace("\n", "\n\n"), sol.replace("\n", " \n  \n"), "junk\n" + sol, " \n"]:
        spans = steps.split_text_steps(text, "newline")
        assert len(spans) == len(t.step_labels(ex, text))
        assert [text[a:b].strip() for a, b in spans] == t.analyse(ex, text).steps


# ---------------------------------------------------------------- templates
def test_templates_are_editable_data(train):
    t = SyntheticTask()
    assert "{question}" in t.templates["solve"] and "{reference}" in t.templates["repair"]
    t.templates["solve"] = "Solve: {question}\n"
    assert t.solve_prompt(train[0]) == f"Solve: {train[0].prompt}\n"
    t2 = SyntheticTask(templates={"repair": "{question};{failed};{reference};"})
    assert t2.repair_prompt(train[0], "F", "R") == f"{train[0].prompt};F;R;"
    t.templates["solve"] = "Solve \u00e9 {question}"
    with pytest.raises(ValueError, match="VOCAB"):
        t.solve_prompt(train[0])
    with pytest.raises(ValueError, match="templates"):
        SyntheticTask(templates={"critique": "x"})


def test_batch_scores_match_single_scores(task, train):
    sols = [task.solutions(e, 1, 0)[0] for e in train[:50]]
    bad = [s[:-1] + str((int(s[-1]) + 1) % 10) for s in sols]
    got = task.scores(train[:50] * 2, sols + bad)
    assert [s.reward for s in got] == [1.0] * 50 + [0.0] * 50
    assert task.rewards(train[:50], sols) == [1.0] * 50
    with pytest.raises(ValueError, match="scores"):
        task.scores(train[:2], sols[:1])
