"""Compare-and-correct: reference selection, best-repair choice, φ share, edit masks, IOP K*,
operators (policy / splice / oracle) on scripted samplers, and config validation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from _sampler_fakes import CharTok, PredTask, ScriptedSampler, make_batch
from ibpo_lab.tasks.base import Example, Score
from ibpo_lab.correct import (
    TABLE_COLUMNS,
    CorrectConfig,
    compare_and_correct,
    select_references,
    truncation_blocks,
)
from ibpo_lab.diff import edit_masks

TOK = CharTok()
NO_BANG = PredTask(lambda r: "!" not in r)


def ids(text: str) -> list[int]:
    return TOK.encode(text)


def parse_joint(prompt: str) -> tuple[str, str]:
    """(failed attempt, references block) of the default joint repair template."""
    m = re.search(r"A failed attempt:\n(.*)\n\d+ reference attempts:\n(.*)Rewrite", prompt, re.S)
    assert m, prompt
    return m.group(1), m.group(2)


def parse_repair(prompt: str) -> tuple[str, str]:
    m = re.search(r"A failed attempt:\n(.*)\nA reference attempt:\n(.*)\nRewrite", prompt, re.S)
    assert m, prompt
    return m.group(1), m.group(2)


# --------------------------------------------------------------------------- reference selection
CORRECT = [False, True, False, True, False]


def test_correct_first_prefers_correct_then_fills_with_failed():
    members = [0, 1, 2, 3, 4]
    assert select_references(0, members, CORRECT, 2, "correct_first") == [1, 3]
    assert select_references(0, members, CORRECT, 3, "correct_first") == [1, 3, 2]
    assert select_references(0, members, CORRECT, 4, "correct_only") == [1, 3]
    # 'any' ignores rewards: siblings in batch order
    assert select_references(4, members, CORRECT, 2, "any") == [0, 1]


def test_no_correct_sibling_policy():
    members, corr = [0, 1, 2], [False, False, False]
    for rule in ("correct_first", "correct_only", "any", "most_similar"):
        assert select_references(1, members, corr, 2, rule, "skip", [[1], [2], [3]]) == []
    assert select_references(1, members, corr, 2, "correct_first", "any") == [0, 2]


def test_most_similar_orders_each_class_by_token_edit_distance():
    resp = [ids("abcdef"), ids("zzzzzz"), ids("abcdxx"), ids("abcdeX"), ids("abzzzz")]
    corr = [False, True, False, True, True]
    # correct siblings 1 (far), 3 (1 edit), 4 (4 edits) -> 3, 4, 1; then failed sibling 2
    assert select_references(0, range(5), corr, 4, "most_similar", response_ids=resp) == [3, 4, 1, 2]
    with pytest.raises(ValueError, match="response_ids"):
        select_references(0, range(5), corr, 2, "most_similar")


# --------------------------------------------------------------------------- policy operator
def repair_script(prompt: str, j: int) -> str:
    failed, ref = parse_repair(prompt)
    table = {
        ("ab!cd", "abXcd"): ["abZcd", "ab!c"],
        ("ab!cd", "abYcd"): ["xbZcdd", "abQcd"],
    }
    return table.get((failed, ref), [failed, failed])[j]


def policy_setup(**cfg_kw):
    batch, exs = make_batch([["ab!cd", "abXcd", "qq!qq", "abYcd"], ["!!", "!?", "?!"]], NO_BANG)
    sampler = ScriptedSampler(repair_script, lp=-0.7)
    cfg = CorrectConfig(num_references=2, revisions_per_reference=2, **cfg_kw)
    return batch, exs, sampler, cfg


def test_policy_operator_best_repair_share_and_masks():
    batch, exs, sampler, cfg = policy_setup()
    res = compare_and_correct(batch, exs, NO_BANG, sampler, cfg)
    # one batched sampler call: 2 failed trajectories of group 0 x 2 references; group 1 is skipped
    assert len(sampler.calls) == 1 and sampler.calls[0]["n"] == 2 and len(sampler.calls[0]["prompts"]) == 4
    rs = res.batch.repair_success.tolist()
    assert rs[0] == pytest.approx(3 / 4)  # abZcd, abQcd, xbZcdd verify; ab!c does not
    assert rs[2] == 0.0 and rs[4] == rs[5] == rs[6] == 0.0 and rs[1] == 0.0 and rs[3] == 0.0
    # best = smallest normalised edit distance among verified; the tie abZcd/abQcd keeps the first
    expected_changed, expected_inserted = edit_masks(ids("ab!cd"), ids("abZcd"))
    assert res.batch.edit_masks[0].tolist() == expected_changed.tolist() == [False, False, True, False, False]
    for i in (1, 2, 3, 4, 5, 6):
        assert not res.batch.edit_masks[i].any()
    # the repaired batch: original solve prompt, repair ids, sampler log-probs, inserted mask
    rep = res.repaired
    assert len(rep) == 1
    assert rep.response_ids[0] == ids("abZcd") and rep.responses[0] == "abZcd"
    assert rep.prompt_ids[0] == batch.prompt_ids[0] and rep.prompts[0] == batch.prompts[0]
    assert rep.logprobs[0] == pytest.approx([-0.7] * 5)
    assert rep.edit_masks[0].tolist() == expected_inserted.tolist()
    assert rep.group_ids.tolist() == [0] and rep.meta["source_traj"] == [0] and rep.meta["reference_traj"] == [1]
    assert rep.rewards.tolist() == [1.0]
    # table: one row per revision, exactly one selected, for trajectory 0
    t = res.table
    assert list(t.columns) == TABLE_COLUMNS and len(t) == 8
    sel = t[t.selected]
    assert len(sel) == 1 and sel.iloc[0].revision == "abZcd" and sel.iloc[0].traj == 0
    assert t[t.traj == 0].verified.sum() == 3 and not t[t.traj == 2].verified.any()
    assert set(t.reference_traj) == {1, 3}
    # φ = ρ · 1[a revision verified] (published; one of 5 failed trajectories), and the share variant
    assert res.stats["phi_mean"] == pytest.approx(0.5 * 1 / 5)
    assert res.stats["phi_share_mean"] == pytest.approx(0.5 * 0.75 / 5)
    # no audit configured: nothing rejected, every verified revision accepted
    assert res.stats["audit_rejected"] == 0 and res.stats["audit_rejection_share"] == 0
    assert (t.accepted == t.verified).all() and set(t.audit) == {""}
    assert res.stats["n_skipped"] == 3 and res.stats["n_failed"] == 5 and res.stats["n_repaired"] == 1
    # the input batch is untouched
    assert batch.repair_success is None and batch.edit_masks is None


def test_no_correct_any_uses_failed_siblings():
    batch, exs = make_batch([["!!", "!?"]], NO_BANG)
    sampler = ScriptedSampler(lambda p, j: "ok" if parse_repair(p)[0] == "!!" else "!")
    res = compare_and_correct(batch, exs, NO_BANG, sampler, CorrectConfig(num_references=1, no_correct="any"))
    assert res.table.reference_traj.tolist() == [1, 0]
    assert res.batch.repair_success.tolist() == [1.0, 0.0]
    skip = compare_and_correct(batch, exs, NO_BANG, ScriptedSampler(lambda p, j: "ok"), CorrectConfig(num_references=1))
    assert skip.batch.repair_success.tolist() == [0.0, 0.0] and len(skip.table) == 0 and len(skip.repaired) == 0


def test_no_failed_trajectories_is_a_noop():
    batch, exs = make_batch([["ok", "fine"], ["yes", "sure"]], NO_BANG)
    sampler = ScriptedSampler(lambda p, j: pytest.fail("sampler must not be called"))
    res = compare_and_correct(batch, exs, NO_BANG, sampler, CorrectConfig(num_references=1))
    assert sampler.calls == []
    assert res.batch.repair_success.tolist() == [0.0] * 4
    assert [m.tolist() for m in res.batch.edit_masks] == [[False] * len(r) for r in batch.response_ids]
    assert len(res.repaired) == 0 and list(res.table.columns) == TABLE_COLUMNS and len(res.table) == 0
    assert res.stats["n_failed"] == 0 and res.stats["phi_mean"] == 0


def test_examples_by_group_mapping_and_length_check():
    batch, exs = make_batch([["a!", "ok"]], NO_BANG)
    sampler = ScriptedSampler(lambda p, j: "a")
    res = compare_and_correct(batch, {0: exs[0]}, NO_BANG, sampler, CorrectConfig(num_references=1))
    assert res.batch.repair_success.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="examples"):
        compare_and_correct(batch, exs[:1], NO_BANG, sampler, CorrectConfig(num_references=1))


# --------------------------------------------------------------------------- IOP truncation
def test_truncation_blocks_counts_changed_tokens():
    a, b = ids("a!b!c!d"), ids("aXbXcXd")
    assert truncation_blocks(a, b, 1) == 1 and truncation_blocks(a, b, 2) == 2 and truncation_blocks(a, b, 9) == 3
    # a two-token replace block holds the first 2 changed tokens at once
    assert truncation_blocks(ids("a!!b!c"), ids("aXXbXc"), 2) == 1
    # an insertion changes no failed token unless insertion points are credited
    assert truncation_blocks(ids("ab!c"), ids("aXb.c"), 1) == 2
    assert truncation_blocks(ids("ab!c"), ids("aXb.c"), 1, count_insertions=True) == 1


@pytest.mark.parametrize(
    "window, k_star, n_credit",
    [(3, 1, 1),      # grafting the first edit already verifies -> K* = K = 1
     (5, 2, 2),      # needs the first two edits -> K* = 2K
     (7, -1, 3)],    # only the full repair verifies -> all edits
)
def test_truncate_k_graft_logic(window, k_star, n_credit):
    # correct iff no '!' among the first `window` characters
    task = PredTask(lambda r: "!" not in r[:window])
    batch, exs = make_batch([["a!b!c!d", "aYbYcYd"]], task)
    sampler = ScriptedSampler(lambda p, j: "aXbXcXd")
    res = compare_and_correct(batch, exs, task, sampler, CorrectConfig(num_references=1, truncate_k=1))
    full = edit_masks(ids("a!b!c!d"), ids("aXbXcXd"))[0]
    mask = res.batch.edit_masks[0]
    assert mask.sum() == n_credit
    # credit is the first K* edited tokens of the failed attempt
    assert mask.tolist() == (full & (np.cumsum(full) <= n_credit)).tolist()
    assert res.table.k_star[res.table.selected].tolist() == [k_star]
    # the K* counts in stats: exactly one selected repair, in the bucket of its K*
    bucket = {1: "k_star_k", 2: "k_star_2k", -1: "k_star_all"}
    assert {b: res.stats[b] for b in bucket.values()} == {b: float(b == bucket[k_star]) for b in bucket.values()}
    assert res.repaired.edit_masks[0].sum() == n_credit
    # the grafts that were verified: first edit (and the first two when K failed)
    assert "aXb!c!d" in task.reward_calls
    assert ("aXbXc!d" in task.reward_calls) == (window != 3)


def test_without_truncation_all_edits_are_credited():
    task = PredTask(lambda r: "!" not in r)
    batch, exs = make_batch([["a!b!c!d", "aYbYcYd"]], task)
    res = compare_and_correct(batch, exs, task, ScriptedSampler(lambda p, j: "aXbXcXd"), CorrectConfig(num_references=1))
    assert res.batch.edit_masks[0].sum() == 3 and res.table.k_star.tolist() == [-1]


def test_insertion_credit_marks_the_insertion_point():
    task = PredTask(lambda r: "c" in r)
    batch, exs = make_batch([["ab", "abc"]], task)
    sampler = ScriptedSampler(lambda p, j: "abc")
    plain = compare_and_correct(batch, exs, task, sampler, CorrectConfig(num_references=1, insertion_credit=False))
    assert not plain.batch.edit_masks[0].any() and plain.stats["repaired_without_credit"] == 1
    # default: the token where the omission happened (here the last one: the repair appends)
    credit = compare_and_correct(batch, exs, task, sampler, CorrectConfig(num_references=1))
    assert credit.batch.edit_masks[0].tolist() == [False, True]
    assert credit.stats["repaired_without_credit"] == 0
    has_b = PredTask(lambda r: "b" in r)
    mid = compare_and_correct(*make_batch([["ac", "abc"]], has_b), has_b, sampler, CorrectConfig(num_references=1))
    assert mid.batch.edit_masks[0].tolist() == [False, True]  # 'b' belongs before 'c'


def test_ibpo_estimator_accepts_the_masks():
    from ibpo_lab.advantages import get_estimator

    batch, exs, sampler, cfg = policy_setup()
    res = compare_and_correct(batch, exs, NO_BANG, sampler, cfg)
    adv = get_estimator("ibpo")(res.batch)
    # the repaired failed trajectory gets credit only on its edited token
    assert (adv[0] != 0).tolist()[:5] == res.batch.edit_masks[0].tolist()


# --------------------------------------------------------------------------- splice and oracle
def test_splice_keeps_failed_prefix_and_its_logprobs():
    task = PredTask(lambda r: r.endswith("QRS"))
    batch, exs = make_batch([["abcXYZ", "abcQRS"]], task)
    seen = []

    def cont(prompt, j):
        seen.append(prompt)
        return "QRS"

    sampler = ScriptedSampler(cont, lp=-0.9)
    res = compare_and_correct(batch, exs, task, sampler, CorrectConfig(operator="splice", num_references=1))
    assert seen == [batch.prompts[0] + "abc"]  # solve prompt + failed prefix up to the divergence
    rep = res.repaired
    assert rep.responses == ["abcQRS"] and rep.response_ids[0] == ids("abcQRS")
    assert rep.logprobs[0] == pytest.approx(batch.logprobs[0][:3] + [-0.9] * 3)
    assert res.batch.edit_masks[0].tolist() == [False] * 3 + [True] * 3


def test_oracle_operator_and_its_absence():
    task = PredTask(lambda r: "!" not in r, oracle=lambda failed: failed.replace("!", "."))
    batch, exs = make_batch([["a!b", "!!"]], task)  # no correct sibling: the oracle does not need one
    res = compare_and_correct(batch, exs, task, None, CorrectConfig(operator="oracle"), tokenizer=TOK)
    assert res.batch.repair_success.tolist() == [1.0, 1.0]
    assert res.batch.edit_masks[0].tolist() == [False, True, False]
    assert res.repaired.logprobs is None and res.repaired.responses == ["a.b", ".."]
    assert res.table.reference_traj.tolist() == [-1, -1]
    with pytest.raises(ValueError, match="oracle_repair"):
        compare_and_correct(batch, exs, NO_BANG, None, CorrectConfig(operator="oracle"), tokenizer=TOK)


def test_oracle_keeps_trailing_eos():
    eos = chr(TOK.eos_token_id)
    task = PredTask(lambda r: "!" not in r, oracle=lambda failed: failed.replace("!", "."))
    batch, exs = make_batch([["a!b" + eos, "!!" + eos]], task)
    batch = batch.replace(responses=["a!b", "!!"])  # decoded texts drop the special token
    res = compare_and_correct(batch, exs, task, None, CorrectConfig(operator="oracle"), tokenizer=TOK)
    assert res.repaired.response_ids[0][-1] == TOK.eos_token_id
    assert res.batch.edit_masks[0].tolist() == [False, True, False, False]


# --------------------------------------------------------------------------- K references: separate vs joint
def test_joint_reference_mode_one_prompt_with_all_references():
    batch, exs = make_batch([["ab!cd", "abXcd", "qq!qq", "abYcd"]], NO_BANG)
    script = lambda p, j: {"ab!cd": ["abZcd", "ab!c", "xbZcdd", "abQcd"], "qq!qq": ["qq!qq"] * 4}[parse_joint(p)[0]][j]
    sampler = ScriptedSampler(script)
    cfg = CorrectConfig(num_references=2, revisions_per_reference=2, reference_mode="joint")
    res = compare_and_correct(batch, exs, NO_BANG, sampler, cfg)
    # one call; each failed trajectory's ONE prompt is repeated K = 2 times, n = 2: K·n = 4 revisions each
    call = sampler.calls[0]
    assert len(sampler.calls) == 1 and call["n"] == 2 and len(call["prompts"]) == 4
    assert call["prompts"][0] == call["prompts"][1] != call["prompts"][2] == call["prompts"][3]
    # the task's "repair_joint" template (tasks.base.DEFAULT_TEMPLATES), references in selection order
    failed, refs = parse_joint(call["prompts"][0])
    assert failed == "ab!cd" and refs == "Reference attempt 1:\nabXcd\nReference attempt 2:\nabYcd\n"
    t = res.table
    assert len(t) == 8 and set(t.n_references) == {2} and set(t.reference_traj) == {1}
    # the same budget as 'separate' (2 references x 2 revisions); the scripted sampler answers sample j of each
    # prompt copy with script(prompt, j), j < n = 2: abZcd, ab!c twice -> 2 of 4 verify
    assert res.batch.repair_success.tolist()[0] == pytest.approx(2 / 4)
    assert t[t.traj == 0].revision.tolist() == ["abZcd", "ab!c", "abZcd", "ab!c"]
    # reference_distance: to the nearest of the two references ("abZcd" is 1 edit from either)
    row = t[(t.traj == 0) & (t.revision == "abZcd")].iloc[0]
    assert row.reference_distance == pytest.approx(1 / 5)
    # K = 1: joint and separate send the same prompt
    b1, e1 = make_batch([["ab!cd", "abXcd"]], NO_BANG)
    prompts = {}
    for mode in ("separate", "joint"):
        sm = ScriptedSampler(lambda p, j: "abZcd")
        compare_and_correct(b1, e1, NO_BANG, sm, CorrectConfig(num_references=1, reference_mode=mode))
        prompts[mode] = sm.calls[0]["prompts"]
    assert prompts["separate"] == prompts["joint"]


class DuckTask:
    """A duck-typed task with only repair_prompt, solve_prompt and reward (no repair_prompt_joint,
    no step_delimiter): what a user's own task class may offer."""

    def __init__(self):
        self.inner = PredTask(lambda r: "!" not in r)

    def repair_prompt(self, ex, failed, reference):
        return self.inner.repair_prompt(ex, failed, reference)

    def solve_prompt(self, ex):
        return self.inner.solve_prompt(ex)

    def reward(self, ex, response):
        return self.inner.reward(ex, response)


def test_joint_uses_the_tasks_own_joint_prompt_and_rejects_splice():
    class JointTask(PredTask):
        def repair_prompt_joint(self, ex, failed, references):
            return f"A failed attempt:\n{failed}\nA reference attempt:\n{'|'.join(references)}\nRewrite"

    task = JointTask(lambda r: "!" not in r)
    batch, exs = make_batch([["ab!cd", "abXcd", "abYcd"]], task)
    sm = ScriptedSampler(lambda p, j: "abZcd")
    compare_and_correct(batch, exs, task, sm, CorrectConfig(num_references=2, reference_mode="joint"))
    assert parse_repair(sm.calls[0]["prompts"][0]) == ("ab!cd", "abXcd|abYcd")
    # a duck-typed task without repair_prompt_joint: its singular template with join_references
    sm = ScriptedSampler(lambda p, j: "abZcd")
    compare_and_correct(batch, exs, DuckTask(), sm, CorrectConfig(num_references=2, reference_mode="joint"))
    assert parse_repair(sm.calls[0]["prompts"][0]) == ("ab!cd", "Reference 1:\nabXcd\nReference 2:\nabYcd")
    with pytest.raises(ValueError, match="reference_mode"):
        CorrectConfig(operator="splice", reference_mode="joint")


# --------------------------------------------------------------------------- IOP audit and selection score
def audit_setup(revisions, **cfg_kw):
    # failed "xx!xx" (5 tokens), correct reference "abcde"; the scripted revisions in order
    batch, exs = make_batch([["xx!xx", "abcde"]], NO_BANG)
    sampler = ScriptedSampler(lambda p, j: revisions[j])
    cfg = CorrectConfig(num_references=1, revisions_per_reference=len(revisions), **cfg_kw)
    return compare_and_correct(batch, exs, NO_BANG, sampler, cfg)


def test_audit_rejects_a_copy_of_the_reference():
    # "abcde": distance 0 to the reference, 1 to the failed attempt -> a copy; "xxYxx": 1/5 vs 1 -> a repair
    off = audit_setup(["abcde", "xxYxx"])
    on = audit_setup(["abcde", "xxYxx"], audit_copy=True)
    assert off.batch.repair_success.tolist()[0] == 1.0 and off.stats["audit_rejected"] == 0
    t = on.table
    assert t.audit.tolist() == ["copy", "pass"] and t.accepted.tolist() == [False, True]
    assert t.reference_distance.tolist() == pytest.approx([0.0, 1.0])
    assert on.batch.repair_success.tolist()[0] == pytest.approx(1 / 2)
    assert on.stats["audit_rejected"] == 1 and on.stats["audit_rejection_share"] == pytest.approx(1 / 2)
    assert on.repaired.responses == ["xxYxx"]
    # when the copy is the only verified revision, the audit leaves the trajectory unrepaired
    only = audit_setup(["abcde", "xx!xx"], audit_copy=True)
    assert only.batch.repair_success.tolist()[0] == 0.0 and len(only.repaired) == 0
    assert not only.batch.edit_masks[0].any()
    assert only.stats["audit_rejection_share"] == 1.0 and only.stats["phi_mean"] == 0.0


def test_audit_edit_budget():
    # "xxYxx" edits 1 of 5 tokens (0.2); "YYYxx" edits 3 (0.6): a budget of 0.5 rejects the second
    res = audit_setup(["YYYxx", "xxYxx"], edit_budget=0.5)
    assert res.table.audit.tolist() == ["budget", "pass"] and res.table.n_edited.tolist() == [3, 1]
    assert res.stats["audit_rejected"] == 1
    # at exactly the budget (3/5 = 0.6) the revision is kept
    assert audit_setup(["YYYxx"], edit_budget=0.6).table.audit.tolist() == ["pass"]
    # unverified revisions are not audited
    assert audit_setup(["Y!Yxx"], edit_budget=0.2).table.audit.tolist() == [""]


def test_selection_score_reward_minus_edit_penalty():
    # both verified (reward 1): "xYYYx" is 3/5 from the failed attempt, "xxYxx" 1/5
    res = audit_setup(["xYYYx", "xxYxx"])
    t = res.table
    assert t.score.tolist() == pytest.approx([1 - 3 / 5, 1 - 1 / 5])
    assert t.selected.tolist() == [False, True] and res.repaired.responses == ["xxYxx"]
    # edit_penalty 0: every accepted revision scores its reward; the first wins
    flat = audit_setup(["xYYYx", "xxYxx"], edit_penalty=0.0)
    assert flat.table.selected.tolist() == [True, False] and flat.repaired.responses == ["xYYYx"]


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "field, value",
    [("operator", "magic"), ("num_references", 0), ("revisions_per_reference", 0), ("reference_selection", "best"),
     ("no_correct", "retry"), ("temperature", -1.0), ("top_p", 0.0), ("max_new_tokens", 0), ("truncate_k", 0),
     ("rho", -0.1), ("reference_mode", "both"), ("audit_copy", "yes"), ("edit_budget", 0.0), ("edit_budget", 1.5),
     ("edit_penalty", -1.0)],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        CorrectConfig(**{field: value})


def test_num_references_must_fit_the_group():
    batch, exs = make_batch([["a!", "ok"]], NO_BANG)
    with pytest.raises(ValueError, match="num_references"):
        compare_and_correct(batch, exs, NO_BANG, ScriptedSampler(lambda p, j: "x"), CorrectConfig(num_references=2))


def test_every_config_field_has_help():
    assert all(CorrectConfig.help().values())


# --------------------------------------------------------------------------- real synthetic task
def synthetic_batch(task, tok, n_groups=4, seed=0):
    """Groups of 4: two correct solutions (different orders) and two injected errors, EOS-terminated."""
    import random

    from ibpo_lab.rollout import RolloutBatch
    from ibpo_lab.steps import split_steps

    rng = random.Random(seed)
    exs = task.examples("train", n=n_groups)
    texts, ex_of, gids = [], [], []
    for g, ex in enumerate(exs):
        for j, s in enumerate(task.solutions(ex, 4, rng)):
            texts.append(s if j < 2 else str(task.inject_error(ex, s, rng)))
            ex_of.append(ex)
            gids.append(g)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # noqa: E731
    prompts = [task.solve_prompt(e) for e in ex_of]
    b = RolloutBatch(
        prompt_ids=[tok(p)["input_ids"] for p in prompts], response_ids=[enc(t) for t in texts],
        rewards=task.rewards(ex_of, texts), group_ids=gids, prompts=prompts, responses=texts,
        pad_id=tok.pad_token_id,
    )
    spans = [split_steps(r, tok, task.step_delimiter, skip_special_tokens=True) for r in b.response_ids]
    return b.replace(step_spans=spans), ex_of


@pytest.fixture(scope="module")
def synth():
    from ibpo_lab.models import char_tokenizer
    from ibpo_lab.tasks import get_task
    from ibpo_lab.tasks.synthetic import VOCAB

    return get_task("synthetic", n_train=50, n_test=10), char_tokenizer(VOCAB)


def test_oracle_credit_starts_at_the_first_error_and_beats_sequence_credit(synth):
    from ibpo_lab.advantages import get_estimator
    from ibpo_lab.diagnostics import batch_credit_quality

    task, tok = synth
    b, exs = synthetic_batch(task, tok, n_groups=6)
    assert b.rewards.tolist().count(0.0) == 12
    res = compare_and_correct(b, exs, task, None, CorrectConfig(operator="oracle"), tokenizer=tok)
    assert res.stats["repair_rate"] == 1.0
    for i in np.flatnonzero(b.rewards.numpy() == 0):
        fe = task.first_error(exs[i], b.responses[i])
        m = res.batch.edit_masks[i]
        first_edit = int(np.flatnonzero(m)[0])
        start, end = b.step_spans[i][fe] if fe < len(b.step_spans[i]) else (len(m) - 1, len(m))
        assert start <= first_edit < end, (b.responses[i], fe)
        assert m[len(m) - 1] == False  # noqa: E712  the EOS both end with is not an edit
    q_ibpo = batch_credit_quality(res.batch, get_estimator("ibpo")(res.batch), task, exs)
    q_grpo = batch_credit_quality(res.batch, get_estimator("grpo")(res.batch), task, exs)
    assert q_grpo["auc_within_failed"] == 0.5
    assert q_ibpo["auc_within_failed"] > 0.6
    assert q_ibpo["first_error_localisation"] > q_grpo["first_error_localisation"]
    # the repaired batch carries steps for IOP, split like the sampled ones
    assert res.repaired.step_spans is not None and len(res.repaired) == 12


class AlwaysVerifies:
    """The synthetic task's prompts, but every revision verifies (to exercise a random policy's repairs)."""

    def __init__(self, task):
        self.task = task
        self.step_delimiter = task.step_delimiter

    def repair_prompt(self, ex, failed, reference):
        return self.task.repair_prompt(ex, failed, reference)

    def solve_prompt(self, ex):
        return self.task.solve_prompt(ex)

    def reward(self, ex, response):
        return 1.0


@pytest.fixture(scope="module")
def tiny_sampler(synth):
    from ibpo_lab.models import build_tiny_policy
    from ibpo_lab.sampling import get_sampler
    from ibpo_lab.tasks.synthetic import VOCAB

    policy = build_tiny_policy(VOCAB, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, context_length=512)
    return get_sampler("hf", policy)


def _batch_with_policy_logprobs(synth, tiny_sampler):
    """Two synthetic groups carrying the tiny policy's own behaviour log-probs -> (task, tok, batch, examples)."""
    from ibpo_lab.models import response_logprobs

    task, tok = synth
    b, exs = synthetic_batch(task, tok, n_groups=2)
    with torch.no_grad():
        lp, _ = response_logprobs(tiny_sampler.policy.model, b.padded())
    return task, tok, b.replace(logprobs=[lp[i, : len(r)].tolist() for i, r in enumerate(b.response_ids)]), exs


@pytest.mark.parametrize("operator", ["policy", "splice"])
def test_real_sampler_revisions_carry_behaviour_logprobs(synth, tiny_sampler, operator):
    from ibpo_lab.models import response_logprobs
    from ibpo_lab.rollout import RolloutBatch

    task, tok, b, exs = _batch_with_policy_logprobs(synth, tiny_sampler)
    model = tiny_sampler.policy.model
    calls = []
    orig = tiny_sampler.sample

    def counted(*a, **kw):
        calls.append(a[0])
        return orig(*a, **kw)

    tiny_sampler.sample = counted
    try:
        cfg = CorrectConfig(operator=operator, num_references=2, max_new_tokens=6, temperature=1.0)
        res = compare_and_correct(b, exs, AlwaysVerifies(task), tiny_sampler, cfg, seed=0)
    finally:
        del tiny_sampler.sample
    assert len(calls) == 1 and len(calls[0]) == 4 * 2  # 4 failed x 2 references, one call
    rep = res.repaired
    assert len(rep) == 4 and res.batch.repair_success[b.rewards == 0].tolist() == [1.0] * 4
    # behaviour log-probs: under the repair prompt (policy), under the solve prompt (splice)
    sel = res.table[res.table.selected].reset_index(drop=True)
    for j in range(len(rep)):
        i = rep.meta["source_traj"][j]
        if operator == "policy":
            prompt = task.repair_prompt(exs[i], sel.failed[j], sel.reference[j])
        else:
            prompt = b.prompts[i]
            from ibpo_lab.diff import first_divergence

            cut = first_divergence(b.response_ids[i], b.response_ids[rep.meta["reference_traj"][j]])
            assert rep.response_ids[j][:cut] == b.response_ids[i][:cut]  # the failed prefix is kept
        one = RolloutBatch(prompt_ids=[tok(prompt)["input_ids"]], response_ids=[rep.response_ids[j]], rewards=[1],
                           group_ids=[0], pad_id=tok.pad_token_id)
        with torch.no_grad():
            ref, _ = response_logprobs(model, one.padded())
        assert torch.allclose(torch.tensor(rep.logprobs[j]), ref[0], atol=1e-4)
        assert rep.prompt_ids[j] == b.prompt_ids[i]


# --------------------------------------------------------------------------- repair budgets, copy-drafts, J_rep rows
class DraftingScripted(ScriptedSampler):
    """A scripted sampler that declares per-prompt budgets and drafts (as HFSampler does)."""

    supports_drafts = True


def test_repair_budget_is_failed_length_plus_margin_capped_at_max_new_tokens():
    # failed attempts of group 0: "ab!cd" (5 tokens) and "qq!qq" (5); 2 references each -> 4 prompts
    batch, exs, sampler, cfg = policy_setup(repair_length_margin=3, max_new_tokens=7)
    compare_and_correct(batch, exs, NO_BANG, sampler, cfg)
    # a sampler without supports_drafts gets one budget: the largest cap, min(7, 5 + 3) = 7
    assert sampler.calls[0]["max_new_tokens"] == 7 and "drafts" not in sampler.calls[0]
    batch, exs, _, cfg = policy_setup(repair_length_margin=1)
    drafting = DraftingScripted(repair_script)
    compare_and_correct(batch, exs, NO_BANG, drafting, cfg)
    call = drafting.calls[0]
    # per prompt: min(2 * 5 + 16, 5 + 1) = 6; each prompt's draft is its failed attempt
    assert call["max_new_tokens"] == [6, 6, 6, 6]
    assert call["drafts"] == [ids("ab!cd"), ids("ab!cd"), ids("qq!qq"), ids("qq!qq")]
    batch, exs, _, cfg = policy_setup(repair_length_margin=None, copy_draft=False)
    drafting = DraftingScripted(repair_script)
    compare_and_correct(batch, exs, NO_BANG, drafting, cfg)
    assert drafting.calls[0]["max_new_tokens"] == [26] * 4 and "drafts" not in drafting.calls[0]


def test_splice_drafts_the_failed_tail_after_the_cut():
    batch, exs = make_batch([["ab!cd", "abXcd"]], NO_BANG)
    drafting = DraftingScripted(lambda p, j: "cd")
    compare_and_correct(batch, exs, NO_BANG, drafting, CorrectConfig(operator="splice", num_references=1,
                                                                      repair_length_margin=2))
    call = drafting.calls[0]
    assert call["drafts"] == [ids("!cd")] and call["max_new_tokens"] == [3 + 2]


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_repair_length_margin_validated(bad):
    with pytest.raises(ValueError, match="repair_length_margin"):
        CorrectConfig(repair_length_margin=bad)
    with pytest.raises(ValueError, match="copy_draft"):
        CorrectConfig(copy_draft=1)


def test_revisions_batch_under_the_repair_prompt():
    batch, exs, sampler, cfg = policy_setup()
    res = compare_and_correct(batch, exs, NO_BANG, sampler, cfg)
    rv, t = res.revisions, res.table
    assert len(rv) == len(t) == 8
    for j in range(8):
        failed, ref = parse_repair(rv.prompts[j])
        assert failed == t.failed[j] and ref == t.reference[j]
        assert rv.prompt_ids[j] == ids(rv.prompts[j]) and rv.responses[j] == t.revision[j]
        assert rv.logprobs[j] == pytest.approx([-0.7] * len(rv.response_ids[j]))
    assert rv.group_ids.tolist() == t.traj.tolist() == rv.meta["source_traj"]
    assert rv.meta["accepted"] == t.accepted.tolist() and rv.meta["selected"] == t.selected.tolist()
    assert rv.rewards.tolist() == t.reward.tolist()
    # splice revisions live under the solve prompt (bilateral trains them), oracle ones are not samples
    b2, e2 = make_batch([["ab!cd", "abXcd"]], NO_BANG)
    res = compare_and_correct(b2, e2, NO_BANG, ScriptedSampler(lambda p, j: "Xcd"), CorrectConfig(operator="splice", num_references=1))
    assert res.revisions is None


def test_copy_draft_does_not_change_the_repairs(synth, tiny_sampler):
    """Same seed, copy-drafts on or off: the same revisions token for token, log-probs within 1e-5."""
    task, tok, b, exs = _batch_with_policy_logprobs(synth, tiny_sampler)
    out = {}
    for on in (True, False):
        cfg = CorrectConfig(num_references=2, revisions_per_reference=2, temperature=1.0, copy_draft=on,
                            repair_length_margin=4)
        out[on] = compare_and_correct(b, exs, AlwaysVerifies(task), tiny_sampler, cfg, seed=3).revisions
        if on:
            assert tiny_sampler.last_stats["draft_fed"] > 0
        else:
            assert tiny_sampler.last_stats["draft_fed"] == 0
    assert out[True].response_ids == out[False].response_ids
    for a, c in zip(out[True].logprobs, out[False].logprobs):
        assert np.allclose(a, c, atol=1e-5)
    # each revision within its budget: its failed attempt's length + 4
    src = out[True].meta["source_traj"]
    assert all(len(r) <= len(b.response_ids[i]) + 4 for r, i in zip(out[True].response_ids, src))
    assert any(len(r) == len(b.response_ids[i]) + 4 for r, i in zip(out[True].response_ids, src))


# --------------------------------------------------------------------------- thresholds, stats by hand
class HalfTask(PredTask):
    """reward 0.5 (exactly the default success_threshold) when ``ok(response)``, else 0."""

    def score(self, example, response):
        self.reward_calls.append(response)
        return Score(0.5 if self.ok(response) else 0.0, "ok" if self.ok(response) else "wrong")


def test_reward_exactly_at_the_threshold_is_a_success():
    # the sibling rewarded exactly 0.5 is correct (a reference), so the failed one gets repaired
    task = HalfTask(lambda r: "!" not in r)
    batch, exs = make_batch([["ab!cd", "abXcd"]], task)
    assert batch.rewards.tolist() == [0.0, 0.5]
    sampler = ScriptedSampler(lambda p, j: "abZcd")
    res = compare_and_correct(batch, exs, task, sampler, CorrectConfig(num_references=1))
    assert len(sampler.calls) == 1 and parse_repair(sampler.calls[0]["prompts"][0]) == ("ab!cd", "abXcd")
    # a revision rewarded exactly 0.5 verifies
    assert res.table.reward.tolist() == [0.5] and res.table.verified.tolist() == [True]
    assert res.batch.repair_success.tolist() == [1.0, 0.0] and res.stats["n_failed"] == 1
    # and so does an IOP graft: correct iff no '!' in the first 3 characters, so the graft of the
    # first edit "aXb!c!d" (reward 0.5) already verifies -> K* = K = 1
    window = HalfTask(lambda r: "!" not in r[:3])
    batch, exs = make_batch([["a!b!c!d", "aYbYcYd"]], window)
    res = compare_and_correct(batch, exs, window, ScriptedSampler(lambda p, j: "aXbXcXd"),
                              CorrectConfig(num_references=1, truncate_k=1))
    assert res.table.k_star.tolist() == [1] and res.batch.edit_masks[0].tolist() == [False, True] + [False] * 5


STATS_KEYS = {
    "n_trajectories", "n_failed", "n_attempted", "n_skipped", "n_revisions", "revision_success_rate", "n_repaired",
    "repair_rate", "repair_success_mean", "phi_mean", "phi_share_mean", "audit_rejected", "audit_rejection_share",
    "edited_tokens_mean", "edited_fraction_mean", "repaired_without_credit",
}


def test_stats_by_hand():
    script = {
        ("!", "ok"): ["X", "!"],                # 1 of 2 verify; "X" edits 1 of 1 token
        ("ab!cd", "abXcd"): ["aYZcd", "YYZcd"],  # 2 of 2 verify; the closer "aYZcd" edits 2 of 5 tokens
        ("!!!", "abc"): ["!!!", "!!"],          # none verifies
    }
    batch, exs = make_batch([["!", "ok"], ["ab!cd", "abXcd"], ["z!", "y!"], ["!!!", "abc"]], NO_BANG)
    # trajectory 2 is failed at success_threshold 0.8 but would be correct at the default 0.5
    batch = batch.replace(rewards=[0.0, 1.0, 0.6, 1.0, 0.0, 0.0, 0.0, 1.0])
    sampler = ScriptedSampler(lambda p, j: script[parse_repair(p)][j])
    cfg = CorrectConfig(num_references=1, revisions_per_reference=2, rho=0.25, success_threshold=0.8)
    res = compare_and_correct(batch, exs, NO_BANG, sampler, cfg)
    # failed: 0, 2, 4, 5, 6; group 2 (trajectories 4, 5) has no correct sibling -> skipped
    assert res.batch.repair_success.tolist() == [0.5, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert set(res.stats) == STATS_KEYS
    expected = {
        "n_trajectories": 8.0, "n_failed": 5.0, "n_attempted": 3.0, "n_skipped": 2.0, "n_revisions": 6.0,
        "revision_success_rate": 3 / 6,
        "n_repaired": 2.0, "repair_rate": 2 / 5,
        "repair_success_mean": (0.5 + 1.0) / 5,
        "phi_mean": 0.25 * 2 / 5,                  # ρ·1[a revision verified], over the 5 failed
        "phi_share_mean": 0.25 * (0.5 + 1.0) / 5,  # ρ·share
        "audit_rejected": 0.0, "audit_rejection_share": 0 / 3,
        "edited_tokens_mean": (1 + 2) / 2,
        "edited_fraction_mean": (1 / 1 + 2 / 5) / 2,
        "repaired_without_credit": 0.0,
    }
    assert res.stats == pytest.approx(expected)


def test_stats_of_a_batch_without_failures_are_quiet():
    import warnings

    batch, exs = make_batch([["ok", "fine"], ["yes", "sure"]], NO_BANG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" noise in every quiet step
        res = compare_and_correct(batch, exs, NO_BANG, ScriptedSampler(lambda p, j: "x"), CorrectConfig(num_references=1))
    s = res.stats
    assert set(s) == STATS_KEYS
    zeros = ("n_failed", "n_attempted", "n_skipped", "n_revisions", "n_repaired", "repair_success_mean", "phi_mean",
             "phi_share_mean", "audit_rejected", "repaired_without_credit")
    assert {k: s[k] for k in zeros} == dict.fromkeys(zeros, 0.0) and s["n_trajectories"] == 4.0
    nans = ("revision_success_rate", "repair_rate", "audit_rejection_share", "edited_tokens_mean", "edited_fraction_mean")
    assert all(np.isnan(s[k]) for k in nans)


def test_k_star_buckets_count_k_2k_and_all_for_k_2():
    # five one-token edits; correct iff no '!' in the first 7 characters: the graft of the first
    # 2 edits "aXbXc!d!e!f" fails, the graft of the first 4 "aXbXcXdXe!f" verifies -> K* = 2K = 4
    task = PredTask(lambda r: "!" not in r[:7])
    batch, exs = make_batch([["a!b!c!d!e!f", "aYbYcYdYeYf"]], task)
    res = compare_and_correct(batch, exs, task, ScriptedSampler(lambda p, j: "aXbXcXdXeXf"),
                              CorrectConfig(num_references=1, truncate_k=2))
    assert res.table.k_star.tolist() == [4]
    assert res.batch.edit_masks[0].tolist() == [i in (1, 3, 5, 7) for i in range(11)]
    assert {k: res.stats[k] for k in ("k_star_k", "k_star_2k", "k_star_all")} == {
        "k_star_k": 0.0, "k_star_2k": 1.0, "k_star_all": 0.0}
    assert set(res.stats) == STATS_KEYS | {"k_star_k", "k_star_2k", "k_star_all"}


# --------------------------------------------------------------------------- IOP K* on hand-built alignments
@pytest.mark.parametrize(
    "failed, repair, k_star, credit, verifier_calls",
    [
        # one 3-token replace block: the graft of the block holding the first edited token is the whole
        # (verified) repair -> K* = 1 without asking the verifier again; credit the first edited token
        ("a!!!b", "aXXXb", 1, [0, 1, 0, 0, 0], ["aXXXb"]),
        # the same as a deletion (3 failed tokens changed, none inserted)
        ("a!!!b", "ab", 1, [0, 1, 0, 0, 0], ["ab"]),
        # one changed token: K = the number of changed tokens -> K* = all (None, -1 in the table)
        ("a!b", "aXb", -1, [0, 1, 0], ["aXb"]),
        # an insertion (credited at 'b') then a replace: the graft of the insertion alone "aXb!c" fails,
        # the first 2K = 2 credited tokens are all of them -> all
        ("ab!c", "aXb.c", -1, [0, 1, 1, 0], ["aXb.c", "aXb!c"]),
    ],
)
def test_iop_k_star_on_hand_built_alignments(failed, repair, k_star, credit, verifier_calls):
    batch, exs = make_batch([[failed, repair]], NO_BANG)
    res = compare_and_correct(batch, exs, NO_BANG, ScriptedSampler(lambda p, j: repair),
                              CorrectConfig(num_references=1, truncate_k=1))
    assert res.table.k_star.tolist() == [k_star]
    assert res.batch.edit_masks[0].tolist() == [bool(c) for c in credit]
    assert NO_BANG.reward_calls == verifier_calls


class WindowTask(PredTask):
    """Correct iff no '!' among the first ``int(example.answer)`` characters: the window is per example."""

    def __init__(self, windows):
        super().__init__(lambda r: True)
        self.windows = windows

    def examples(self, split="train", n=None):
        return [Example(id=str(i), prompt=f"q{i}", answer=str(w)) for i, w in enumerate(self.windows[: n or 1])]

    def score(self, example, response):
        self.reward_calls.append(response)
        ok = "!" not in response[: int(example.answer)]
        return Score(float(ok), "ok" if ok else "wrong")


def test_grafts_are_verified_against_their_own_example():
    # the same failed attempt and repair in two groups whose examples differ: window 3 -> K* = 1, 5 -> K* = 2
    task = WindowTask([3, 5])
    batch, exs = make_batch([["a!b!c!d", "aYbYcYd"], ["a!b!c!d", "aYbYcYd"]], task)
    res = compare_and_correct(batch, exs, task, ScriptedSampler(lambda p, j: "aXbXcXd"),
                              CorrectConfig(num_references=1, truncate_k=1))
    assert res.table.traj.tolist() == [0, 2] and res.table.k_star.tolist() == [1, 2]


def test_credit_masks_without_a_precomputed_alignment():
    from ibpo_lab.correct import _credit_masks

    # "ab!c" -> "aXb.c": X inserted before 'b' (insertion point: failed token 1), '!' replaced by '.'
    a, b = ids("ab!c"), ids("aXb.c")
    changed, inserted = _credit_masks(a, b, CorrectConfig(), None)
    assert changed.tolist() == [False, True, True, False] and inserted.tolist() == [False, True, False, True, False]
    changed, inserted = _credit_masks(a, b, CorrectConfig(), 1)
    assert changed.tolist() == [False, True, False, False] and inserted.tolist() == [False, True, False, False, False]
    changed, _ = _credit_masks(a, b, CorrectConfig(insertion_credit=False), None)
    assert changed.tolist() == [False, False, True, False]


def test_truncation_blocks_counts_a_credited_insertion_as_one_token():
    # insert block (1 credited token), then the replace '!' -> '.': the first 2 credited tokens need both blocks
    assert truncation_blocks(ids("ab!c"), ids("aXb.c"), 2, count_insertions=True) == 2
    assert truncation_blocks(ids("ab!c"), ids("aXb.c"), 1, count_insertions=True) == 1


# --------------------------------------------------------------------------- what reaches the sampler
def test_sampling_settings_reach_the_sampler():
    batch, exs, sampler, _ = policy_setup()
    cfg = CorrectConfig(num_references=2, revisions_per_reference=2, temperature=0.7, top_p=0.9, stop=["\n\n"],
                        max_new_tokens=50, repair_length_margin=1)
    compare_and_correct(batch, exs, NO_BANG, sampler, cfg, seed=11)
    (call,) = sampler.calls
    # a sampler without per-prompt budgets gets one: the largest cap min(50, 5 + 1) = 6 (failed attempts of 5 tokens)
    assert call == dict(prompts=call["prompts"], n=2, max_new_tokens=6, temperature=0.7, top_p=0.9, stop=["\n\n"],
                        seed=11)
    # defaults: max_new_tokens None = 2 x the longest response (5) + 16 = 26, capped at 5 + 16 = 21
    batch, exs, sampler, cfg = policy_setup(temperature=0.0)
    compare_and_correct(batch, exs, NO_BANG, sampler, cfg)
    (call,) = sampler.calls
    assert call == dict(prompts=call["prompts"], n=2, max_new_tokens=21, temperature=0.0, top_p=1.0, stop=None,
                        seed=None)


def test_repair_budget_of_a_one_token_attempt_and_margin_zero_is_one_token():
    # a one-token failed attempt and margin 0: the budget is 1 + 0 = 1 token
    batch, exs = make_batch([["!", "ok"]], NO_BANG)
    drafting = DraftingScripted(lambda p, j: "X")
    compare_and_correct(batch, exs, NO_BANG, drafting, CorrectConfig(num_references=1, repair_length_margin=0))
    assert drafting.calls[0]["max_new_tokens"] == [1] and drafting.calls[0]["drafts"] == [ids("!")]


class Textless:
    """A duck-typed sampler: the scripted samples WITHOUT response texts (the corrector decodes them);
    a tokenizer only where ``policy`` has one (HFSampler's layout), no ``policy`` at all if None."""

    def __init__(self, script, policy=None):
        self.inner = ScriptedSampler(script)
        if policy is not None:
            self.policy = policy

    def sample(self, prompts, n=1, **kw):
        return self.inner.sample(prompts, n, **kw).replace(responses=None)


def test_texts_are_decoded_without_special_tokens_when_absent():
    from types import SimpleNamespace

    eos = chr(TOK.eos_token_id)
    # neither the batch nor the sampler has texts: both are decoded, the EOS (a special token) dropped
    batch, exs = make_batch([["ab!cd" + eos, "abXcd" + eos]], NO_BANG)
    batch = batch.replace(responses=None)
    sampler = Textless(lambda p, j: "abZcd" + eos, policy=SimpleNamespace(tokenizer=CharTok()))
    res = compare_and_correct(batch, exs, NO_BANG, sampler, CorrectConfig(num_references=1))
    assert parse_repair(sampler.inner.calls[0]["prompts"][0]) == ("ab!cd", "abXcd")
    assert res.table.revision.tolist() == ["abZcd"] and res.repaired.responses == ["abZcd"]
    assert res.repaired.response_ids == [ids("abZcd" + eos)]
    assert res.batch.edit_masks[0].tolist() == [False, False, True, False, False, False]


def test_a_sampler_needs_no_tokenizer_unless_something_must_be_decoded():
    from types import SimpleNamespace

    batch, exs = make_batch([["ab!cd", "abXcd"]], NO_BANG)
    for policy in (None, SimpleNamespace()):  # no policy; a policy without a tokenizer
        plain = Textless(lambda p, j: "abZcd", policy)
        plain.sample = plain.inner.sample  # texts included: nothing to decode
        res = compare_and_correct(batch, exs, NO_BANG, plain, CorrectConfig(num_references=1))
        assert res.repaired.responses == ["abZcd"]
        with pytest.raises(ValueError) as e:
            compare_and_correct(batch, exs, NO_BANG, Textless(lambda p, j: "abZcd", policy), CorrectConfig(num_references=1))
        assert str(e.value) == "tokenizer is required when the sampler returns no response texts"
        with pytest.raises(ValueError) as e:
            compare_and_correct(batch.replace(responses=None), exs, NO_BANG, plain, CorrectConfig(num_references=1))
        assert str(e.value) == "tokenizer is required when the batch has no response texts"
        # a one-edit repair needs no graft (it is the whole repair); a two-edit one does
        res = compare_and_correct(batch, exs, NO_BANG, plain, CorrectConfig(num_references=1, truncate_k=1))
        assert res.table.k_star.tolist() == [-1]
        two, two_exs = make_batch([["a!b!c", "aYbYc"]], NO_BANG)
        graft = Textless(lambda p, j: "aXbXc", policy)
        graft.sample = graft.inner.sample
        with pytest.raises(ValueError) as e:
            compare_and_correct(two, two_exs, NO_BANG, graft, CorrectConfig(num_references=1, truncate_k=1))
        assert str(e.value) == "tokenizer is required for truncate_k (the graft is decoded and verified)"


def test_sampler_returning_the_wrong_number_of_samples_is_an_error():
    class Short(ScriptedSampler):
        def sample(self, prompts, n=1, **kw):  # answers the first prompt only
            return super().sample(prompts[:1], n, **kw)

    batch, exs, _, cfg = policy_setup()
    with pytest.raises(ValueError) as e:
        compare_and_correct(batch, exs, NO_BANG, Short(repair_script), cfg)
    assert str(e.value) == "sampler returned 2 trajectories for 4 prompts x n=2"


# --------------------------------------------------------------------------- inputs and their errors
def test_default_config_is_two_references_one_revision_each():
    batch, exs = make_batch([["ab!cd", "abXcd", "abYcd"]], NO_BANG)
    sampler = ScriptedSampler(lambda p, j: "abZcd")
    res = compare_and_correct(batch, exs, NO_BANG, sampler)
    assert sampler.calls[0]["n"] == 1 and [parse_repair(p) for p in sampler.calls[0]["prompts"]] == [
        ("ab!cd", "abXcd"), ("ab!cd", "abYcd")]
    assert res.table.reference_traj.tolist() == [1, 2]


def test_input_errors_name_the_argument_exactly():
    batch, exs = make_batch([["a!", "ok"]], NO_BANG)
    sampler = ScriptedSampler(lambda p, j: "a")
    cases = [
        (dict(cfg={"num_references": 1}), "cfg must be a CorrectConfig, got dict"),
        (dict(batch=[batch]), "batch must be a RolloutBatch, got list"),
        (dict(cfg=CorrectConfig(num_references=2)),
         "num_references=2 but group 0 has only 2 trajectories (at most 1 siblings)"),
        (dict(examples=exs[:1]), "examples has 1 entries but the batch has 2 trajectories "
                                 "(pass one Example per trajectory, or a mapping group id -> Example)"),
        (dict(examples={1: exs[0]}), "examples (a mapping by group id) has no entry for groups [0]"),
    ]
    for kw, message in cases:
        args = dict(batch=batch, examples=exs, task=NO_BANG, sampler=sampler, cfg=CorrectConfig(num_references=1))
        args.update(kw)
        with pytest.raises(ValueError) as e:
            compare_and_correct(**args)
        assert str(e.value) == message
    # a mapping missing many groups names the first five
    big, big_exs = make_batch([["a!", "ok"]] * 7, NO_BANG)
    with pytest.raises(ValueError) as e:
        compare_and_correct(big, {}, NO_BANG, sampler, CorrectConfig(num_references=1))
    assert str(e.value) == "examples (a mapping by group id) has no entry for groups [0, 1, 2, 3, 4]"


def test_select_references_errors_name_the_argument_exactly():
    for kw, message in [
        (dict(rule="best"), "reference_selection must be one of ('correct_first', 'correct_only', 'any', "
                            "'most_similar'), got 'best'"),
        (dict(no_correct="retry"), "no_correct must be one of ('skip', 'any'), got 'retry'"),
        (dict(rule="most_similar"), "response_ids is required for reference_selection='most_similar'"),
    ]:
        with pytest.raises(ValueError) as e:
            select_references(0, [0, 1, 2, 3, 4], CORRECT, 2, **kw)
        assert str(e.value) == message


def test_select_references_defaults_and_most_similar_among_failed_siblings():
    # default rule: correct_first
    assert select_references(0, [0, 1, 2, 3, 4], CORRECT, 2) == [1, 3]
    assert select_references(0, [0, 1, 2, 3, 4], CORRECT, 3) == [1, 3, 2]
    # no correct sibling, no_correct="any": the failed siblings, closest first (1: 6 edits, 2: 2, 3: 1)
    resp = [ids("abcdef"), ids("zzzzzz"), ids("abcdxx"), ids("abcdeX")]
    assert select_references(0, range(4), [False] * 4, 3, "most_similar", "any", resp) == [3, 2, 1]
    assert select_references(0, range(4), [False] * 4, 3, "correct_first", "any", resp) == [1, 2, 3]


def test_most_similar_references_in_compare_and_correct():
    # siblings: "zzzzz" (correct, 5 edits away), "abXcd" (correct, 1 edit): the close one is the reference
    batch, exs = make_batch([["ab!cd", "zzzzz", "abXcd"]], NO_BANG)
    sampler = ScriptedSampler(lambda p, j: "abZcd")
    res = compare_and_correct(batch, exs, NO_BANG, sampler, CorrectConfig(num_references=1, reference_selection="most_similar"))
    assert res.table.reference_traj.tolist() == [2] and parse_repair(sampler.calls[0]["prompts"][0])[1] == "abXcd"


def test_repairs_keep_the_batch_prompts_or_build_the_solve_prompt():
    batch, exs = make_batch([["ab!cd", "abXcd"]], NO_BANG, prompts=["my own prompt"])
    sampler = ScriptedSampler(lambda p, j: "abZcd")
    res = compare_and_correct(batch, exs, NO_BANG, sampler, CorrectConfig(num_references=1))
    assert res.repaired.prompts == ["my own prompt"] and res.repaired.prompt_ids == [ids("my own prompt")]
    # without prompt texts: the task's solve prompt of the trajectory's example
    res = compare_and_correct(batch.replace(prompts=None), exs, NO_BANG, sampler, CorrectConfig(num_references=1))
    assert res.repaired.prompts == [NO_BANG.solve_prompt(exs[0])] != ["my own prompt"]
    assert "Question: q0\n" in res.repaired.prompts[0]


# --------------------------------------------------------------------------- the table, row by row
def test_table_columns_by_hand():
    # group 0 all correct; group 1: "ab!!cd" (6 tokens) repaired by deleting "!!", and one unverified revision
    batch, exs = make_batch([["fine", "good"], ["ab!!cd", "abXcd"]], NO_BANG)
    res = compare_and_correct(batch, exs, NO_BANG, ScriptedSampler(lambda p, j: ["abcd", "ab!!cd"][j]),
                              CorrectConfig(num_references=1, revisions_per_reference=2))
    t = res.table
    assert t.group.tolist() == [1, 1] and t.traj.tolist() == [2, 2] and t.reference_traj.tolist() == [3, 3]
    assert t.n_references.tolist() == [1, 1] and t.operator.tolist() == ["policy", "policy"]
    assert t.failed.tolist() == ["ab!!cd"] * 2 and t.reference.tolist() == ["abXcd"] * 2
    assert t.revision.tolist() == ["abcd", "ab!!cd"] and t.reward.tolist() == [1.0, 0.0]
    assert t.verified.tolist() == [True, False] and t.accepted.tolist() == [True, False]
    # normalised by the longer sequence: 2 deletions of 6; 0
    assert t.edit_distance.tolist() == pytest.approx([2 / 6, 0.0])
    # to "abXcd": "abcd" is 1 deletion of 5; "ab!!cd" 1 replace + 1 insertion of 6
    assert t.reference_distance.tolist() == pytest.approx([1 / 5, 2 / 6])
    # n_edited counts the failed tokens the revision changes (the two deleted "!"), not inserted ones
    assert t.n_edited.tolist() == [2, 0] and t.audit.tolist() == ["", ""]
    assert t.score.tolist() == pytest.approx([1 - 2 / 6, 0.0])
    # only the selected revision gets a K*; every row without one says -1
    assert t.selected.tolist() == [True, False] and t.k_star.tolist() == [-1, -1]


def test_an_unrepaired_failure_does_not_stop_the_next_one():
    # trajectory 0 gets no verified revision; trajectory 2, after it, does
    batch, exs = make_batch([["qq!qq", "abXcd", "ab!cd"]], NO_BANG)
    script = lambda p, j: {"qq!qq": "qq!qq", "ab!cd": "abZcd"}[parse_repair(p)[0]]  # noqa: E731
    res = compare_and_correct(batch, exs, NO_BANG, ScriptedSampler(script), CorrectConfig(num_references=1))
    assert res.batch.repair_success.tolist() == [0.0, 0.0, 1.0]
    assert res.batch.edit_masks[2].tolist() == [False, False, True, False, False]
    assert res.repaired.meta["source_traj"] == [2]


def test_joint_table_shows_all_references():
    batch, exs = make_batch([["ab!cd", "abXcd", "abYcd"]], NO_BANG)
    res = compare_and_correct(batch, exs, NO_BANG, ScriptedSampler(lambda p, j: "abZcd"),
                              CorrectConfig(num_references=2, reference_mode="joint"))
    assert res.table.reference.tolist() == ["Reference 1:\nabXcd\nReference 2:\nabYcd"] * 2


# --------------------------------------------------------------------------- the repaired and revisions batches
class SemicolonSteps(PredTask):
    step_delimiter = "regex:;"


def test_repaired_batch_carries_steps_pad_id_and_zero_repair_success():
    task = SemicolonSteps(lambda r: "!" not in r)
    batch, exs = make_batch([["ab;!d;e", "ab;Xd;e"]], task)
    batch = batch.replace(step_spans=[[(0, 7)], [(0, 7)]], pad_id=7)
    res = compare_and_correct(batch, exs, task, ScriptedSampler(lambda p, j: "ab;Zd;e"), CorrectConfig(num_references=1))
    rep = res.repaired
    # split with the task's own delimiter ';' (the separator ends its step): "ab;" "Zd;" "e"
    assert rep.step_spans == [[(0, 3), (3, 6), (6, 7)]]
    assert rep.pad_id == 7 and res.revisions.pad_id == 7
    assert rep.repair_success.tolist() == [0.0]  # repairs are correct trajectories: φ = 0
    # a task without step_delimiter: newline steps
    duck = DuckTask()  # no step_delimiter: steps split at newlines
    batch, exs = make_batch([["ab\n!d", "ab\nXd"]], duck.inner)
    batch = batch.replace(step_spans=[[(0, 5)], [(0, 5)]])
    res = compare_and_correct(batch, exs, duck, ScriptedSampler(lambda p, j: "ab\nZd"), CorrectConfig(num_references=1))
    assert res.repaired.step_spans == [[(0, 3), (3, 5)]]
    # a batch without steps: a repaired batch without steps (even though a tokenizer is at hand)
    batch, exs = make_batch([["ab!cd", "abXcd"]], NO_BANG)
    res = compare_and_correct(batch, exs, NO_BANG, ScriptedSampler(lambda p, j: "abZcd"), CorrectConfig(num_references=1))
    assert res.repaired.step_spans is None and len(res.repaired) == 1


# --------------------------------------------------------------------------- operators by name
def test_a_registered_operator_is_used_by_name_and_its_output_checked():
    from ibpo_lab.correct import OPERATORS, Revision, list_operators, register_operator

    try:
        @register_operator("test_copy_reference")
        def copy_reference(requests, ctx):
            return [[Revision(ids=list(r.reference_ids), text=r.reference_text, logprobs=None)] for r in requests]

        @register_operator("test_forgetful")
        def forgetful(requests, ctx):
            return []

        assert {"test_copy_reference", "test_forgetful"} <= set(list_operators())
        batch, exs = make_batch([["ab!cd", "abXcd"]], NO_BANG)
        res = compare_and_correct(batch, exs, NO_BANG, None, CorrectConfig(operator="test_copy_reference", num_references=1))
        assert res.table.operator.tolist() == ["test_copy_reference"] and res.repaired.responses == ["abXcd"]
        with pytest.raises(ValueError) as e:
            compare_and_correct(batch, exs, NO_BANG, None, CorrectConfig(operator="test_forgetful", num_references=1))
        assert str(e.value) == "operator 'test_forgetful' returned 0 revision lists for 1 requests"
    finally:
        OPERATORS.pop("test_copy_reference", None)
        OPERATORS.pop("test_forgetful", None)


# --------------------------------------------------------------------------- audit edges
def test_audit_edges():
    # equally far from the reference and from the failed attempt (3 of 5 tokens each): not a copy
    eq = audit_setup(["xxYde"], audit_copy=True)
    assert eq.table.edit_distance.tolist() == pytest.approx([3 / 5])
    assert eq.table.reference_distance.tolist() == pytest.approx([3 / 5]) and eq.table.audit.tolist() == ["pass"]
    # a one-token attempt whose one token is replaced edits 100% of it: over a 0.5 budget
    batch, exs = make_batch([["!", "ok"]], NO_BANG)
    res = compare_and_correct(batch, exs, NO_BANG, ScriptedSampler(lambda p, j: "X"),
                              CorrectConfig(num_references=1, edit_budget=0.5))
    assert res.table.audit.tolist() == ["budget"] and res.batch.repair_success.tolist() == [0.0, 0.0]
    # the oracle has no reference: no reference distance, nothing to be a copy of
    task = PredTask(lambda r: "!" not in r, oracle=lambda failed: failed.replace("!", "."))
    batch, exs = make_batch([["a!b", "ok"]], task)
    res = compare_and_correct(batch, exs, task, None, CorrectConfig(operator="oracle", audit_copy=True), tokenizer=TOK)
    assert np.isnan(res.table.reference_distance[0]) and res.table.audit.tolist() == ["pass"]


# --------------------------------------------------------------------------- config boundaries and messages
@pytest.mark.parametrize(
    "kw",
    [dict(temperature=0.0), dict(temperature=0.5), dict(top_p=1.0), dict(top_p=0.01), dict(max_new_tokens=1),
     dict(truncate_k=1), dict(rho=0.0), dict(repair_length_margin=0), dict(edit_budget=1), dict(edit_budget=1.0),
     dict(edit_penalty=0), dict(num_references=np.int64(1)), dict(revisions_per_reference=1)],
)
def test_config_boundaries_are_legal(kw):
    cfg = CorrectConfig(**kw)
    assert all(getattr(cfg, k) == v for k, v in kw.items())


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(operator="magic"), "operator must be one of ['oracle', 'policy', 'splice'], got 'magic'"),
        (dict(num_references=True), "num_references must be an int >= 1, got True"),
        (dict(num_references=1.5), "num_references must be an int >= 1, got 1.5"),
        (dict(revisions_per_reference=0), "revisions_per_reference must be an int >= 1, got 0"),
        (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
        (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
        (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
        (dict(max_new_tokens=0), "max_new_tokens must be None or an int >= 1, got 0"),
        (dict(max_new_tokens=2.0), "max_new_tokens must be None or an int >= 1, got 2.0"),
        (dict(truncate_k=True), "truncate_k must be None or an int >= 1, got True"),
        (dict(truncate_k=1.5), "truncate_k must be None or an int >= 1, got 1.5"),
        (dict(rho=-0.1), "rho must be >= 0, got -0.1"),
        (dict(repair_length_margin=-1), "repair_length_margin must be None or an int >= 0, got -1"),
        (dict(edit_budget=True), "edit_budget must be None or a number in (0, 1], got True"),
        (dict(edit_budget="0.5"), "edit_budget must be None or a number in (0, 1], got '0.5'"),
        (dict(edit_budget=1.01), "edit_budget must be None or a number in (0, 1], got 1.01"),
        (dict(edit_penalty=True), "edit_penalty must be a finite number >= 0, got True"),
        (dict(edit_penalty=float("inf")), "edit_penalty must be a finite number >= 0, got inf"),
        (dict(operator="splice", reference_mode="joint"),
         "reference_mode='joint' does not apply to operator 'splice' (it continues from the first divergence "
         "from ONE reference); use reference_mode='separate'"),
    ],
)
def test_config_errors_name_the_field_exactly(kw, message):
    with pytest.raises(ValueError) as e:
        CorrectConfig(**kw)
    assert str(e.value) == message
