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


def _save(run_dir, step, x):
    return R.save_checkpoint(run_dir, step, tensors={"x": x}, meta={"note": f"step {step}"})


def _torch_disk_full(real_save):
    """torch.save as it behaves on a full disk: part of the file is written, then its zip writer
    raises RuntimeError (not OSError)."""
    def save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")
    return save


def test_checkpoint_on_a_full_disk_is_one_clear_error_and_keeps_the_previous(tmp_path, monkeypatch):
    """issue 14.2: torch.save raises RuntimeError on a full disk; the temp folder is removed, the
    previous checkpoint stays, and a later save (space freed) works."""
    _save(tmp_path, 1, torch.ones(2))
    real_save = torch.save
    monkeypatch.setattr(torch, "save", _torch_disk_full(real_save))
    with pytest.raises(R.CheckpointWriteError,
                       match="could not write the checkpoint of step 2 .*: disk full; the previous checkpoint is kept"):
        _save(tmp_path, 2, torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no partial temp folder left
    state = R.load_checkpoint_state(tmp_path)
    assert state["step"] == 1 and torch.equal(state["x"], torch.ones(2)) and state["note"] == "step 1"
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    _save(tmp_path, 2, torch.zeros(2))
    assert R.load_checkpoint_state(tmp_path)["step"] == 2


def test_checkpoint_on_a_real_full_tmpfs(tmp_path):
    """issue 14.2 on a real 1 MB tmpfs (root only): the second, larger checkpoint does not fit."""
    import os
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts")
    try:
        _save(mnt, 1, torch.ones(1000))  # 4 kB
        with pytest.raises(R.CheckpointWriteError, match="disk full; the previous checkpoint is kept"):
            _save(mnt, 2, torch.ones(400_000))  # 1.6 MB
        assert sorted(p.name for p in mnt.iterdir()) == ["checkpoint"]
        assert R.load_checkpoint_state(mnt)["step"] == 1
        _save(mnt, 2, torch.ones(1000))  # fits: writing works again
        assert R.load_checkpoint_state(mnt)["step"] == 2
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_kill_between_the_renames_keeps_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    """issue 14.3: a kill after checkpoint/ was moved to .checkpoint.old and before the temp folder was
    renamed leaves no checkpoint/; the newest complete one (COMPLETE written last) is found and put back,
    partial and stale temporaries are removed."""
    _save(tmp_path, 1, torch.ones(2))
    real_replace = R.os.replace

    def killed(src, dst):
        if R._TMP_PREFIX in str(src):
            raise KeyboardInterrupt  # the process dies between the two renames
        return real_replace(src, dst)

    monkeypatch.setattr(R.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, torch.full((2,), 2.0))
    monkeypatch.setattr(R.os, "replace", real_replace)
    partial = tmp_path / ".checkpoint.tmp-99999"  # another killed writer, mid-write (no COMPLETE)
    partial.mkdir()
    (partial / "trainer_state.pt").write_bytes(b"PK\x03\x04 half")
    assert not (tmp_path / "checkpoint").exists() and (tmp_path / ".checkpoint.old").exists()
    assert R.find_checkpoint(tmp_path).name.startswith(".checkpoint.tmp-")
    assert R.load_checkpoint_state(tmp_path)["step"] == 2
    assert R.recover_checkpoint(tmp_path) == tmp_path / "checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # stale temporaries removed
    state = R.load_checkpoint_state(tmp_path)
    assert state["step"] == 2 and torch.equal(state["x"], torch.full((2,), 2.0))


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/ibpo_evil_marker_test",))


def test_checkpoint_state_is_read_with_weights_only_and_bad_files_are_clear_errors(tmp_path):
    """issue 14.5/14.6: a crafted pickle in trainer_state.pt is refused (its code never runs); truncated
    or garbage state files are one error naming the file."""
    import os

    _save(tmp_path, 1, torch.ones(2))
    f = tmp_path / "checkpoint" / "trainer_state.pt"
    good = f.read_bytes()
    marker = "/tmp/ibpo_evil_marker_test"
    if os.path.exists(marker):
        os.unlink(marker)
    torch.save({"x": _Evil()}, f)
    with pytest.raises(ValueError, match=r"trainer_state.pt: unreadable checkpoint state"):
        R.load_checkpoint_state(tmp_path)
    assert not os.path.exists(marker)
    for data in (good[: len(good) // 2], b"garbage"):
        f.write_bytes(data)
        with pytest.raises(ValueError, match=r"trainer_state.pt: unreadable checkpoint state.*corrupt"):
            R.load_checkpoint_state(tmp_path)
    f.write_bytes(good)
    j = tmp_path / "checkpoint" / "trainer_state.json"
    j.write_bytes(j.read_bytes()[:10])
    with pytest.raises(ValueError, match=r"trainer_state.json: unreadable checkpoint state"):
        R.load_checkpoint_state(tmp_path)


def test_old_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    torch.save({"step": 1}, tmp_path / "checkpoint" / "state.pt")
    with pytest.raises(ValueError, match="old pickle format"):
        R.recover_checkpoint(tmp_path)


def test_rng_state_round_trips_through_json_and_tensors():
    import random

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.standard_normal()  # numpy keeps a cached gaussian
    js, tens = R._rng_split(R.rng_state())
    js = json.loads(json.dumps(js))
    want = (random.random(), np.random.standard_normal(), torch.rand(1).item())
    R.set_rng_state(R._rng_join(js, tens))
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == want


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
        # issue 18.5: the run's trajectories load with `datasets`, every documented column present
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(rec.path / "trajectories" / "*.parquet"), split="train")
        assert ds.column_names == list(R.TRAJECTORY_HELP) and len(ds) == len(rec.trajectories())
        assert set(rec.metrics.columns) - {c for c in rec.metrics.columns if c.startswith(("loss_", "correct_"))} \
            <= set(R.METRIC_HELP)


# ------------------------------------------------------------------------------------------ records
def _metrics(tmp_path, text: bytes):
    TrainConfig().to_yaml(tmp_path / "config.yaml")
    (tmp_path / "metrics.jsonl").write_bytes(text)


def _row(step):
    return (json.dumps({"step": step, "reward_mean": 0.5}) + "\n").encode()


@pytest.mark.parametrize("body, match", [
    (_row(1) + b"{garbage\n" + _row(2), r"metrics.jsonl: line 2 is not a JSON object"),
    (_row(1) + b"\xff\xfe\n" + _row(2), r"metrics.jsonl: line 2 is not UTF-8"),
    (_row(1) + _row(3), r"metrics.jsonl: row 2 is step 3, expected step 2 \(a step row is missing"),
    (_row(1) + _row(1), r"metrics.jsonl: row 2 is step 1, expected step 2"),
    (_row(1) + b"\n" + _row(2), r"metrics.jsonl: line 2 is empty"),
])
def test_corrupt_records_are_errors_naming_file_and_line(tmp_path, body, match):
    """issue 14.5: only a partial LAST line may be repaired; anything else is an error."""
    _metrics(tmp_path, body)
    with pytest.raises(ValueError, match=match):
        R.load_run(tmp_path)


def test_resume_checks_refuse_missing_rows_and_trajectory_files(tmp_path):
    (tmp_path / "trajectories").mkdir()
    _metrics(tmp_path, _row(1) + _row(2) + _row(3))
    for s in (1, 3):
        (tmp_path / "trajectories" / f"step_{s:06d}.parquet").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"trajectories: no trajectory file for step\(s\) \[2\]"):
        R.check_records(tmp_path, 3, trajectories=True)
    R.check_records(tmp_path, 3, trajectories=False)
    R.check_records(tmp_path, 1, trajectories=True)
    with pytest.raises(ValueError, match="checkpoint is at step 4 but the metrics stop at step 3"):
        R.check_records(tmp_path, 4, trajectories=False)
    _metrics(tmp_path, _row(1) + b"nope\n" + _row(2))
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        R.truncate_records(tmp_path, 1)


def test_truncate_records_keeps_rows_up_to_the_step_and_repairs_only_a_torn_last_line(tmp_path):
    (tmp_path / "trajectories").mkdir()
    _metrics(tmp_path, _row(1) + _row(2) + _row(3) + b'{"step": 4, "rew')
    for s in (1, 2, 3):
        (tmp_path / "trajectories" / f"step_{s:06d}.parquet").write_bytes(b"x")
    with pytest.warns(UserWarning, match="truncated last line"):
        R.truncate_records(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_bytes() == _row(1) + _row(2)
    assert sorted(R.trajectory_files(tmp_path)) == [1, 2]
    R.truncate_records(tmp_path, 0)  # a run without a checkpoint starts over
    assert (tmp_path / "metrics.jsonl").read_bytes() == b"" and R.trajectory_files(tmp_path) == {}


def test_nan_and_inf_are_written_as_null_and_read_back_as_nan(tmp_path):
    """issue 18.1: metrics.jsonl is strict JSON (no bare NaN)."""
    p = tmp_path / "m.jsonl"
    R.append_jsonl(p, {"step": 1, "a": float("nan"), "b": np.float32("inf"), "c": 0.5, "d": [1.0, float("-inf")]})
    R.append_jsonl(p, {"step": 2, "a": float("nan"), "b": 2.0, "c": float("nan"), "d": []})

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    rows = [json.loads(line, parse_constant=refuse) for line in p.read_text().splitlines()]
    assert rows[0] == {"step": 1, "a": None, "b": None, "c": 0.5, "d": [1.0, None]}
    df = R.read_jsonl(p)
    assert df["a"].dtype == float and df["a"].isna().all()
    assert df["b"].isna().tolist() == [True, False] and df["c"].tolist()[0] == 0.5 and np.isnan(df["c"].iloc[1])


def _batch(n, with_text=True):
    return RolloutBatch(prompt_ids=[[1, 2]] * n, response_ids=[[3, 4, 5]] * n, rewards=[0.0, 1.0] * (n // 2),
                        group_ids=[i // 2 for i in range(n)], logprobs=[[-1.0, -1.0, -1.0]] * n,
                        responses=["a", "b"] * (n // 2) if with_text else None)


def test_every_step_has_the_same_trajectory_schema_and_datasets_loads_a_run(tmp_path):
    """issue 18.5: a step with repairs and a step without them write the same columns and types."""
    import datasets
    import pyarrow.parquet as pq

    (tmp_path / "trajectories").mkdir()
    plain = _batch(4)
    R.write_trajectories(tmp_path, 1, plain, torch.zeros(4, 3), None, None, None, None, None, None)
    table = pd.DataFrame({"selected": [True], "traj": [0], "revision": ["a fixed"]})
    repaired = RolloutBatch(prompt_ids=[[1, 2]], response_ids=[[3, 6]], rewards=[1.0], group_ids=[0],
                            edit_masks=[[False, True]], meta={"source_traj": [0], "reference_traj": [1]})
    R.write_trajectories(tmp_path, 2, _batch(4).replace(edit_masks=[[False, True, False]] * 4), torch.ones(4, 3),
                         table, repaired, None, None, None, None)
    files = sorted(str(f) for f in (tmp_path / "trajectories").glob("*.parquet"))
    for f in files:
        assert pq.read_schema(f).remove_metadata() == R.TRAJECTORY_SCHEMA
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.column_names == list(R.TRAJECTORY_HELP)
    assert ds["step"] == [1] * 4 + [2] * 5
    assert ds["repair"] == [None] * 4 + ["a fixed", None, None, None, None]
    assert ds["source_traj"] == [None] * 8 + [0] and ds["kind"][-1] == "repaired"
    with pytest.raises(ValueError, match=r"\['surprise'\] are not in runs.TRAJECTORY_HELP"):
        R._parquet_bytes(pd.DataFrame({"step": [1], "surprise": [2]}))


# ------------------------------------------------------------------------------------------ the run lock
_HOLD = """
import sys
from ibpo_lab.runs import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_one_writer_per_run_folder_and_a_dead_holder_does_not_block(tmp_path):
    """issue 14.4: two real processes on one folder: the second is refused naming the folder and the
    holder; once the holder is killed (-9), its lock is gone."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(R.__file__).parent.parent)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(R.RunLockedError, match=rf"{tmp_path} is being written by another process "
                                                   rf"\(pid {holder.pid} on .*since .*UTC\)"):
            R.RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with R.RunLock(tmp_path) as lock:  # the killed holder's lock died with it
        assert f"pid {os.getpid()}" in lock.path.read_text()
    R.RunLock(tmp_path).acquire().release()  # and released on exit


def test_model_card_metadata():
    from huggingface_hub import ModelCard

    card = ModelCard(R.model_card(presets("smoke", model="Qwen/Qwen2.5-1.5B-Instruct", estimator="ibpo"), 7))
    d = card.data.to_dict()
    assert (d["library_name"], d["license"], d["base_model"]) == ("transformers", "mit", "Qwen/Qwen2.5-1.5B-Instruct")
    assert {"ibpo_lab", "reinforcement-learning", "ibpo", "synthetic"} <= set(d["tags"])
    assert "base_model" not in ModelCard(R.model_card(presets("smoke"), 1)).data.to_dict()  # 'tiny' is no Hub id


def test_committed_tiny_policy_card_has_metadata():
    from huggingface_hub import ModelCard

    from ibpo_lab.models import tiny_policy_dir

    d = ModelCard.load(tiny_policy_dir() / "README.md").data.to_dict()
    assert d["library_name"] == "transformers" and d["license"] == "mit" and "ibpo_lab" in d["tags"]
