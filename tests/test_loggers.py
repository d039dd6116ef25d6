"""report_to: a run's scalars in TensorBoard / W&B / trackio besides metrics.jsonl (ibpo_lab.loggers).

TensorBoard is real (event files read back with tensorboard's EventAccumulator); W&B and trackio are
stand-in modules put in sys.modules (no network, no account)."""

from __future__ import annotations

import importlib.machinery
import math
import sys
import types

import pytest

import ibpo_lab.train as T
from ibpo_lab import loggers as L
from ibpo_lab.config import TrainConfig


def small(**kw) -> TrainConfig:
    base = dict(task="synthetic", model="tiny", device="cpu", steps=2, prompts_per_step=2, group_size=4,
                max_new_tokens=40, lr=1e-4, eval_n=2, eval_k=2, estimator="grpo", save_trajectories=False,
                save_checkpoints=False)
    base.update(kw)
    return TrainConfig(**base)


def test_report_to_defaults_to_none_and_takes_a_single_name():
    assert TrainConfig().report_to == ["none"]
    assert TrainConfig(report_to="tensorboard").report_to == ["tensorboard"]
    assert TrainConfig.from_dict({"report_to": ["tensorboard", "wandb"]}).report_to == ["tensorboard", "wandb"]


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ValueError, match=r"report_to: unknown tracker\(s\) \['mlflow'\]"):
        TrainConfig(report_to=["mlflow"])
    with pytest.raises(ValueError, match="report_to: 'none' and 'all' stand alone"):
        TrainConfig(report_to=["none", "tensorboard"])


def test_missing_tracker_fails_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError: "not installed"

    def boom(*a, **k):
        raise AssertionError("a model was built before the tracker check")

    monkeypatch.setattr(T, "build_policy", boom)
    cfg = small(report_to=["wandb"])  # a config naming wandb is valid (it can be read where wandb is missing)
    with pytest.raises(ValueError, match=r"report_to: \['wandb'\] requested but not installed"):
        T.train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_all_means_every_installed_tracker(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "trackio", None)
    assert L.resolve_report_to(["all"]) == ["tensorboard"]
    assert L.resolve_report_to(["none"]) == [] and L.resolve_report_to([]) == []


def _fake(name: str, calls: list):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)  # libraries probing find_spec see a module

    class Run:
        def log(self, d, step=None):
            calls.append(("log", dict(d), step))

        def finish(self):
            calls.append(("finish",))

    run = Run()

    def init(**kw):
        calls.append(("init", kw))
        return run

    m.init, m.log, m.finish = init, run.log, run.finish
    return m


@pytest.mark.slow
def test_a_run_reports_its_scalars_to_tensorboard_wandb_and_trackio(tmp_path, monkeypatch):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    wb, tk = [], []
    monkeypatch.setitem(sys.modules, "wandb", _fake("wandb", wb))
    monkeypatch.setitem(sys.modules, "trackio", _fake("trackio", tk))
    rec = T.train(small(report_to=["tensorboard", "wandb", "trackio"], eval_every=1), tmp_path / "run", progress=False)
    metrics, evals = rec.metrics, rec.eval
    assert len(metrics) == 2 and len(evals) == 2

    acc = event_accumulator.EventAccumulator(str(rec.path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    numeric = [c for c in metrics.columns if c != "step" and metrics[c].dtype.kind in "fiub"]
    assert {f"train/{c}" for c in numeric} <= tags
    assert {"eval/avg@k", "eval/pass@k", "eval/avg@k_lo"} <= tags
    for c in numeric:
        ev = acc.Scalars(f"train/{c}")
        assert [e.step for e in ev] == metrics["step"].tolist()
        for e, want in zip(ev, metrics[c].astype(float)):
            assert (math.isnan(e.value) and math.isnan(want)) or e.value == pytest.approx(want, rel=1e-6, abs=1e-7), c
    assert [e.value for e in acc.Scalars("eval/avg@k")] == pytest.approx(evals["avg@k"].tolist())
    assert acc.Scalars("train/lr")[0].value == pytest.approx(1e-4)

    # W&B and trackio: one init with the config and the run name, one log per row at the training step, one finish
    for calls in (wb, tk):
        assert calls[0][0] == "init" and calls[0][1]["name"] == "run" and calls[0][1]["config"]["report_to"] == \
            ["tensorboard", "wandb", "trackio"]
        logs = [c for c in calls if c[0] == "log"]
        train_logs = [c for c in logs if "train/reward_mean" in c[1]]
        assert [c[2] for c in train_logs] == [1, 2]
        assert [c[1]["train/reward_mean"] for c in train_logs] == pytest.approx(metrics["reward_mean"].tolist())
        assert [c[1]["eval/avg@k"] for c in logs if "eval/avg@k" in c[1]] == pytest.approx(evals["avg@k"].tolist())
        assert calls[-1] == ("finish",)
