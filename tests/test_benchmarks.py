"""Benchmarks: the reporting helpers, the bookkeeping each benchmark does around ibpo_lab's functions,
and one ``run_all --quick`` pass (tiny sizes; it checks the scripts run end to end and write what they
promise, never how fast anything is)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import alignment, common, learning, run_all, speed


# ------------------------------------------------------------------------------------------ reporting
def test_markdown_table_formats_numbers_and_escapes_pipes():
    df = pd.DataFrame({"name": ["a|b", "c"], "x": [0.123456, float("nan")], "n": [3, 40]})
    lines = common.markdown_table(df).splitlines()
    assert lines[0] == "| name | x | n |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| a\\|b | 0.123 | 3 |"
    assert lines[3] == "| c | – | 40 |"


def test_markdown_table_rejects_non_frames():
    with pytest.raises(ValueError, match="df"):
        common.markdown_table([[1, 2]])


def test_mean_std_and_spread_ignore_nan():
    m, s = common.mean_std([1.0, float("nan"), 3.0])
    assert m == 2.0 and s == pytest.approx(math.sqrt(2.0))
    assert math.isnan(common.mean_std([5.0])[1])
    assert common.fmt_spread([5.0]) == "5"
    assert common.fmt_spread([1.0, 3.0]).startswith("2 ± 1.4")
    assert common.fmt_spread([]) == "–"


def test_report_header_names_date_machine_command_and_commit(tmp_path):
    rep = common.Report(name="t", title="T", tables=[("tab", pd.DataFrame({"a": [1]}))],
                        targets=[common.Target("x", "≤ 1", 2.0, False, "because")], seconds=1.0)
    text = common.write_report(rep, tmp_path, command="python -m benchmarks.t").read_text()
    for needle in ("- date: ", "CPU cores", "torch threads", "OMP_WAIT_POLICY=", "`python -m benchmarks.t`",
                   "- git commit: ", "## Targets", "| x | ≤ 1 | 2 | no | because |", "## tab"):
        assert needle in text, needle
    assert rep.table("tab").equals(pd.DataFrame({"a": [1]}))
    with pytest.raises(ValueError, match="caption"):
        rep.table("nope")


def test_median_time_calls_warmup_plus_repeats():
    calls = []
    t = common.median_time(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and t >= 0
    with pytest.raises(ValueError, match="repeats"):
        common.median_time(lambda: None, repeats=0)


# ------------------------------------------------------------------------------------------ alignment
@pytest.mark.parametrize("n", [1, 10, 200])
def test_repair_pair_is_a_local_edit(n):
    from ibpo_lab.diff import edit_masks

    rng = np.random.default_rng(n)
    a, b = alignment.repair_pair(n, rng, edit_rate=0.05, blocks=3)
    assert len(a) == n
    changed, inserted = edit_masks(a, b)
    # at most 3 blocks of round(0.05 n / 3) (>= 1) tokens each are touched
    per_block = max(1, round(0.05 * n / 3))
    assert changed.sum() <= 3 * per_block and inserted.sum() <= 3 * per_block
    assert changed.sum() + inserted.sum() > 0  # something was edited


def test_repair_pair_rejects_empty():
    with pytest.raises(ValueError, match="n must"):
        alignment.repair_pair(0, np.random.default_rng(0))


# ------------------------------------------------------------------------------------------ speed
def test_diff_timer_times_correct_calls_and_restores_the_functions():
    import ibpo_lab.correct as correct

    before = correct.edit_masks
    with speed.diff_timer() as acc:
        assert correct.edit_masks is not before
        correct.edit_masks([1, 2, 3], [1, 5, 3])
        correct.edit_distance([1, 2], [2, 1])
    assert correct.edit_masks is before
    assert acc["calls"] == 2 and acc["seconds"] > 0


def test_split_table_shares():
    steps = pd.DataFrame({
        "estimator": ["grpo", "grpo", "ibpo", "ibpo"], "time_sample": [1.0, 1.0, 1.0, 1.0],
        "time_reward": [0.0] * 4, "time_correct": [0.0, 0.0, 1.0, 1.0], "time_advantage": [0.1, 0.1, 0.2, 0.2],
        "time_update": [1.0] * 4, "time_step": [2.1, 2.1, 3.2, 3.2], "response_len": [10.0] * 4,
    })
    t = speed.split_table(steps, {"grpo": {"seconds": 0.0, "steps": 2}, "ibpo": {"seconds": 0.4, "steps": 2}}).set_index("estimator")
    assert t.loc["ibpo", "diff s"] == pytest.approx(0.2)
    assert t.loc["ibpo", "diff+adv share %"] == pytest.approx(100 * 0.4 / 3.2)
    assert t.loc["grpo", "sample share %"] == pytest.approx(100 / 2.1)


# ------------------------------------------------------------------------------------------ learning
def test_tokens_per_step_attributes_repairs_and_drops_evaluation():
    # (prompts, n, tokens): step 1 (attempts + repairs), step 2 (attempts + repairs), then evaluation
    calls = [(4, 8, 100), (6, 1, 30), (4, 8, 90), (3, 1, 10), (16, 2, 500)]
    assert learning.tokens_per_step(calls, 4, 8, 2, eval_shape=(16, 2)) == [130, 100]
    with pytest.raises(ValueError, match="expected 3"):
        learning.tokens_per_step(calls, 4, 8, 3)


def test_counting_sampler_records_calls():
    class Fake:
        tokenizer = "tok"

        def sample(self, prompts, n=1, **kw):
            from ibpo_lab.rollout import RolloutBatch

            B = len(prompts) * n
            return RolloutBatch(prompt_ids=[[1]] * B, response_ids=[[1, 2, 3]] * B, rewards=[0.0] * B,
                                group_ids=[i // n for i in range(B)])

    s = learning.CountingSampler(Fake())
    s.sample(["a", "b"], n=3)
    s.sample(["a"], 2)
    assert s.calls == [(2, 3, 18), (1, 2, 6)]
    assert s.tokenizer == "tok"  # everything else is the wrapped sampler's


def test_steps_to_reach_and_summary():
    curve = pd.Series([0.1, 0.3, 0.5], index=[1, 2, 3])
    assert learning.steps_to_reach(curve, 0.3) == 2
    assert math.isnan(learning.steps_to_reach(curve, 0.6))
    # ibpo climbs twice as fast as grpo: it reaches grpo's final accuracy in half the steps
    rows = []
    for est, slope in (("grpo", 0.1), ("ibpo", 0.2)):
        for seed in (0, 1):
            for step in range(1, 9):
                acc = min(slope * step, 0.8)
                rows.append({"estimator": est, "seed": seed, "step": step, "accuracy": acc, "entropy": 1.0,
                             "grad_norm": 0.5, "time_step": 1.0, "tokens": 100, "cum_tokens": 100 * step})
    finals = pd.DataFrame({"estimator": ["grpo", "grpo", "ibpo", "ibpo"], "seed": [0, 1, 0, 1],
                           "eval_avg@k": [0.5] * 4})
    table, grpo_final = learning.summary(pd.DataFrame(rows), finals, window=1)
    t = table.set_index("estimator")
    assert grpo_final == pytest.approx(0.8)
    assert t.loc["grpo", "steps to GRPO final"] == 8
    assert t.loc["ibpo", "steps to GRPO final"] == 4
    assert t.loc["ibpo", "× GRPO steps"] == pytest.approx(0.5)
    assert t.loc["ibpo", "run-to-run std (final acc)"] == 0


def test_pair_table_compares_each_method_with_its_baseline():
    # gspo climbs at 0.1/step to 0.8; ibpo_gspo at 0.4/step reaches 0.8 at step 2: ratio 2/8.
    # grpo and ibpo climb alike (ratio 1); a pair whose baseline did not run is left out
    rows = []
    for est, slope in (("grpo", 0.1), ("ibpo", 0.1), ("gspo", 0.1), ("ibpo_gspo", 0.4)):
        for step in range(1, 9):
            rows.append({"estimator": est, "seed": 0, "step": step, "accuracy": min(slope * step, 0.8)})
    t = learning.pair_table(pd.DataFrame(rows), window=1).set_index("method")
    assert set(t.index) == {"ibpo", "ibpo_gspo"}
    assert (t.loc["ibpo_gspo", "baseline"], t.loc["ibpo_gspo", "method steps"], t.loc["ibpo_gspo", "baseline steps"]) \
        == ("gspo", 2, 8)
    assert t.loc["ibpo_gspo", "steps ratio"] == pytest.approx(0.25)
    assert t.loc["ibpo", "steps ratio"] == 1 and t.loc["ibpo", "baseline final acc"] == pytest.approx(0.8)


def test_learning_merge_reports_runs_saved_by_separate_processes(tmp_path):
    def part(seed):
        m = pd.DataFrame([{"estimator": e, "seed": seed, "step": k, "accuracy": 0.1 * k, "reward_mean": 0.1 * k,
                           "entropy": 1.0, "grad_norm": 0.5, "clip_frac": 0.0, "time_step": 1.0, "tokens": 10,
                           "cum_tokens": 10 * k} for e in ("grpo", "ibpo") for k in (1, 2, 3)])
        f = pd.DataFrame([{"estimator": e, "seed": seed, "wall_s": 2.0, "eval_avg@k": 0.5, "eval_n": 2, "eval_k": 2}
                          for e in ("grpo", "ibpo")])
        path = tmp_path / f"s{seed}.pkl"
        pd.to_pickle((m, f), path)
        return str(path)

    a, b = part(0), part(1)
    rep = learning.run(merge=[a, b])
    assert rep.setup["seeds"] == 2 and rep.setup["steps"] == 3
    assert list(rep.tables[0][1]["estimator"]) == ["grpo", "ibpo"]
    assert any("8 s of training wall time in total, in 2 processes" in n for n in rep.notes)
    with pytest.raises(ValueError, match="same"):
        learning.run(merge=[a, a])


# ------------------------------------------------------------------------------------------ run_all
def test_update_readme_replaces_only_the_marked_block(tmp_path):
    (tmp_path / "alignment.md").write_text("# Alignment\n\n![x](alignment.png)\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run_all.START}\nold\n{run_all.END}\noutro\n")
    run_all.update_readme(tmp_path, readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert "old" not in text and "### Alignment" in text and "(results/alignment.png)" in text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        run_all.update_readme(tmp_path, readme)


def test_readme_glance_table_collects_every_target(tmp_path):
    rep = common.Report(name="speed", title="S", targets=[common.Target("a", "≤ 1", 0.5, True),
                                                          common.Target("b", "≥ 2", 1.0, False, "why")])
    common.write_report(rep, tmp_path, command="x")
    common.write_report(common.Report(name="alignment", title="A"), tmp_path, command="x")
    block = run_all.readme_section(tmp_path, list(run_all.BENCHMARKS))
    assert "| speed | a | ≤ 1 | 0.5 | yes |" in block and "| speed | b | ≥ 2 | 1 | no | why |" in block
    assert block.index("Targets at a glance") < block.index("### A") < block.index("### S")


def test_run_all_rejects_unknown_names(tmp_path):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        run_all.main(["--only", "credit", "--seeds", "0", "--out", str(tmp_path)])


@pytest.mark.slow
def test_run_all_quick_writes_every_report(tmp_path):
    readme_before = run_all.README.read_text()
    reports = {r.name: r for r in run_all.main(["--quick", "--out", str(tmp_path)])}
    assert set(reports) == set(run_all.BENCHMARKS)
    assert run_all.README.read_text() == readme_before  # a quick pass never touches the committed README
    for name in run_all.BENCHMARKS:
        text = (tmp_path / f"{name}.md").read_text()
        assert "- git commit: " in text and "- command: `" in text and "OMP_WAIT_POLICY=" in text
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every estimator is in the credit table, the oracle ceiling too; the learning table has all five
    credit = reports["credit"].tables[0][1]
    assert set(credit["estimator"]) >= {"grpo", "dr_grpo", "rloo", "prefix_tree", "vineppo", "ibpo", "ibpo (oracle repairs)"}
    learn = reports["learning"].tables[0][1]
    assert list(learn["estimator"]) == list(learning.ESTIMATORS)
    assert (learn["tokens per run (k)"] > 0).all()
    # speed: both estimators, phase times add up to no more than the step
    split = reports["speed"].tables[0][1].set_index("estimator")
    assert set(split.index) == {"grpo", "ibpo"}
    for est in split.index:
        phases = sum(split.loc[est, f"{p} s"] for p in speed.PHASES)
        assert 0 < phases <= split.loc[est, "step s (median)"] * 1.05
    assert split.loc["ibpo", "diff s"] > 0  # the oracle corrector of the quick pass aligns every failure
    trl = reports["trl_step"].tables[0][1]
    assert len(trl) == 2 and (trl["TRL s/step"] > 0).all() and (trl["ibpo_lab s/step"] > 0).all()
    assert all(len(r.targets) >= 1 for n, r in reports.items() if n != "alignment")


# ------------------------------------------------------------------------------------------ credit
def test_credit_policy_option_loads_a_runs_trained_policy(tmp_path):
    """``--policy RUN_DIR`` scores the run's checkpointed weights (not the committed tiny policy) under
    the run's model name; a run without a checkpoint is refused before anything is measured."""
    import torch

    from benchmarks import credit
    from ibpo_lab.config import RANDOM_TINY, presets
    from ibpo_lab.runs import CONFIG_FILE, save_checkpoint
    from ibpo_lab.models import build_tiny_policy
    from ibpo_lab.tasks.synthetic import VOCAB

    cfg = presets("smoke", model=RANDOM_TINY, label="trained")
    trained = build_tiny_policy(VOCAB, seed=7)
    with torch.no_grad():  # weights no fresh policy has
        for p in trained.model.parameters():
            p.add_(0.5)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg.to_yaml(run_dir / CONFIG_FILE)
    save_checkpoint(run_dir, 3, tensors={}, meta={}, model=trained.model, tokenizer=trained.tokenizer)

    name, policy, desc = credit.resolve_policy(str(run_dir))
    assert name == RANDOM_TINY and "trained" in desc and str(run_dir) in desc
    want, got = trained.model.state_dict(), policy.model.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)

    bare = tmp_path / "bare"
    bare.mkdir()
    cfg.replace(save_checkpoints=False).to_yaml(bare / CONFIG_FILE)
    with pytest.raises(ValueError, match="no checkpoint"):
        credit.resolve_policy(str(bare))
    # no spec: the benchmark's own policy (random-init for --quick), as before
    assert credit.resolve_policy(None, quick=True)[0] == RANDOM_TINY
