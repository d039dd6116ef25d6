"""runs: the run folder (schema, atomic writers, checkpoints, RunRecord, load_run(s)) and the tables over runs."""

from __future__ import annotations

import errno
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from ibpo_lab import runs as R
from ibpo_lab.config import TrainConfig, presets
from ibpo_lab.rollout import RolloutBatch
from ibpo_lab.runs import RunRecord


def test_checkpoint_write_failure_keeps_previous(tmp_path, monkeypatch):
    R.save_checkpoint(tmp_path, {"step": 1, "x": torch.ones(2)})
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="could not write the checkpoint.*previous checkpoint.*kept"):
        R.save_checkpoint(tmp_path, {"step": 2, "x": torch.zeros(2)})
    monkeypatch.setattr(torch, "save", real_save)
    state = R.load_checkpoint_state(tmp_path)
    assert state["step"] == 1 and torch.equal(state["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temp folders left behind


def test_load_run_tolerates_a_truncated_last_line(tmp_path):
    TrainConfig().to_yaml(tmp_path / "config.yaml")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "accuracy": 0.5}) + "\n{\"step\": 2, \"acc")
    with pytest.warns(UserWarning, match="truncated last line"):
        rec = R.load_run(tmp_path)
    assert rec.metrics["step"].tolist() == [1]
    with pytest.raises(ValueError, match="not a run folder"):
        R.load_run(tmp_path / "nope")


def test_trajectory_frame_records_example_id_and_step_labels():
    from ibpo_lab.tasks import get_task
    from ibpo_lab.tasks.synthetic import SyntheticTask

    task = get_task("synthetic")
    exs = task.examples("train", n=2)
    rng = np.random.default_rng(0)
    good = task.solutions(exs[1], 1, rng)[0]
    bad = str(task.inject_error(exs[1], good, rng))
    texts = [good, "", good, bad]  # group 0 gets ex 1's solution: a wrong answer to ex 0
    batch = RolloutBatch(prompt_ids=[[1, 2]] * 4, response_ids=[[3, 4, 5]] * 4, rewards=[0.0, 1.0, 0.0, 1.0],
                         group_ids=[0, 0, 1, 1], responses=texts)
    df = R.trajectory_frame(batch, torch.zeros(4, 3), step=1, examples=exs, task=task)
    assert df["example_id"].tolist() == [exs[0].id, exs[0].id, exs[1].id, exs[1].id]
    want = [task.step_labels(exs[g], t) for g, t in zip([0, 0, 1, 1], texts)]
    assert df["step_labels"].tolist() == want
    assert all(want[2]) and want[3] is not None and not all(want[3])

    class Broken(SyntheticTask):
        def step_labels(self, example, response):
            raise RuntimeError("labeller bug")

    df = R.trajectory_frame(batch, torch.zeros(4, 3), step=1, examples=exs, task=Broken())
    assert df["step_labels"].tolist() == [None] * 4  # a failing labeller costs the labels, not the run
    assert "example_id" not in R.trajectory_frame(batch, torch.zeros(4, 3), step=1).columns


def test_summarise_runs_ci_over_seeds():
    def rec(label, seed, acc):
        return RunRecord(path=None, config=TrainConfig(label=label, seed=seed),
                         metrics=pd.DataFrame({"accuracy": [0.0, acc], "reward_mean": [0.0, acc]}),
                         eval=pd.DataFrame({"step": [2], "avg@k": [acc]}))

    vals = [0.2, 0.4, 0.6]
    df = R.summarise_runs([rec("a", s, v) for s, v in enumerate(vals)] + [rec("b", 0, 0.9)]).set_index("label")
    m, sd = np.mean(vals), np.std(vals, ddof=1)
    assert df.loc["a", "mean"] == pytest.approx(m)
    assert df.loc["a", "ci_hi"] - m == pytest.approx(4.303 * sd / math.sqrt(3), rel=1e-3)  # t(0.975, df=2)
    assert df.loc["a", "n_seeds"] == 3 and df.loc["b", "n_seeds"] == 1 and math.isnan(df.loc["b", "ci_lo"])


def _record(label, seed, rewards, experiment="e"):
    from pathlib import Path

    m = pd.DataFrame({"step": range(1, len(rewards) + 1), "reward_mean": rewards, "accuracy": rewards,
                      "entropy": np.linspace(2, 1, len(rewards)), "grad_norm": np.arange(len(rewards), dtype=float),
                      "skipped": 0})
    return RunRecord(path=Path("/nonexistent"), config=presets("smoke", label=label, seed=seed), metrics=m,
                     eval=pd.DataFrame(), experiment=experiment)


def test_stability_and_final_tables():
    recs = [_record("grpo", 0, [0.1, 0.3, 0.2]), _record("grpo", 1, [0.1, 0.2, 0.4]), _record("ibpo", 0, [0.2, 0.5])]
    st = R.stability_table(recs).set_index("label")
    assert st.loc["grpo", "n_seeds"] == 2
    assert np.isclose(st.loc["grpo", "final_reward"], 0.3)
    assert np.isclose(st.loc["grpo", "run_to_run_std"], np.std([0.2, 0.4], ddof=1))
    assert np.isclose(st.loc["grpo", "step_jitter"], np.mean([np.mean([0.2, 0.1]), np.mean([0.1, 0.2])]))
    assert np.isnan(st.loc["ibpo", "run_to_run_std"]) and st.loc["ibpo", "grad_norm_max"] == 1.0
    fin = R.final_table(recs)
    assert set(fin.experiment) == {"e"} and set(fin.label) == {"grpo", "ibpo"}
    with pytest.raises(ValueError, match="empty"):
        R.stability_table([])




def test_mean_ci_is_the_student_t_interval():
    m, lo, hi = R.mean_ci([1.0, 2.0, 3.0, float("nan")])  # NaN dropped
    assert m == 2.0 and hi - m == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-4)
    assert math.isnan(R.mean_ci([1.0])[1]) and math.isnan(R.mean_ci([])[0])


def test_load_runs_names_the_experiment_and_the_record_reads_the_config(tmp_path):
    for exp, name in (("e1", "a-seed0"), ("e2", "b-seed0")):
        d = tmp_path / exp / name
        d.mkdir(parents=True)
        presets("smoke", label=name.split("-")[0], model="tiny-random").to_yaml(d / "config.yaml")
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n")
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "config.yaml").write_text("steps: 1\n")  # no metrics: not a run
    recs = R.load_runs(tmp_path)
    assert [(r.experiment, r.label) for r in recs] == [("e1", "a"), ("e2", "b")]
    # the tokenizer of the run's model: the random tiny policy's character tokenizer
    tok = recs[0].tokenizer()
    assert tok is not None and tok.decode(tok.encode("12+3", add_special_tokens=False)) == "12+3"
    labeler = recs[0].step_labeler()
    assert labeler is not None and labeler("not a prompt of the task", "x") is None
    with pytest.raises(ValueError, match="not a directory"):
        R.load_runs(tmp_path / "nope")


def test_every_trajectory_column_written_is_documented(tmp_path):
    """The trajectory parquet schema is TRAJECTORY_HELP: a one-step IBPO run (with repairs, bilateral)
    and a VinePPO run write only documented columns."""
    from ibpo_lab.train import train

    for est, extra in (("ibpo", dict(bilateral=True, correct={"operator": "oracle", "num_references": 1})),
                       ("vineppo", dict(mc_rollouts=1))):
        cfg = presets("smoke", model="tiny-random", estimator=est, steps=1, prompts_per_step=2, group_size=3,
                      max_new_tokens=6, eval_n=0, save_checkpoints=False, **extra)
        rec = train(cfg, tmp_path / est, progress=False)
        cols = set(rec.trajectories(1).columns)
        assert cols <= set(R.TRAJECTORY_HELP), cols - set(R.TRAJECTORY_HELP)
        assert set(rec.metrics.columns) - {c for c in rec.metrics.columns if c.startswith(("loss_", "correct_"))} \
            <= set(R.METRIC_HELP)
