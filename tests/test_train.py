"""Trainer: the loop's run records, checkpoints/resume, NaN handling, the update, train_many, CLI
(config: tests/test_config.py; the run folder: tests/test_runs.py; the step: tests/test_step.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import ibpo_lab.train as T
from ibpo_lab import runs as R
from ibpo_lab import step as S
from ibpo_lab.config import TrainConfig
from ibpo_lab.losses import LOSSES, get_loss, register_loss
from ibpo_lab.rollout import RolloutBatch


def small(**kw) -> TrainConfig:
    """A run small enough for a unit test (a second or two per step on 2 CPU cores): the committed
    tiny policy (solves about half the synthetic problems, so groups have mixed rewards)."""
    base = dict(task="synthetic", model="tiny", device="cpu", steps=2, prompts_per_step=2, group_size=4,
                max_new_tokens=40, lr=1e-4, eval_n=2, eval_k=2, estimator="grpo")
    base.update(kw)
    return TrainConfig(**base)


METRIC_COLUMNS = [
    "step", "reward_mean", "accuracy", "entropy", "approx_kl", "clip_frac", "grad_norm", "zero_var_groups",
    "active_tokens", "repair_success", "skipped", "skipped_total", "lr",
    "time_sample", "time_reward", "time_correct", "time_advantage", "time_update", "time_step",
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_fails_before_loading(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was built before the device check")

    monkeypatch.setattr(T, "build_policy", boom)
    with pytest.raises(ValueError, match="device.*'cuda'.*no CUDA.*Why: torch .* sees no CUDA device: "):
        T.train(small(device="cuda"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_train_cli_full_without_gpu_says_why(monkeypatch, capsys):
    # presets("full") asks for device 'cuda' (vLLM cannot run on a CPU), so the CLI refuses before any model
    # loads, with gpu_check.cuda_diagnosis()'s reason, instead of silently falling back to the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(T, "train", lambda *a, **k: pytest.fail("train() ran without a GPU"))
    with pytest.raises(SystemExit) as e:
        T.main(["full"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "device: 'cuda' was requested but torch sees no CUDA GPU" in err and "sees no CUDA device: " in err


def test_unwritable_out_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="out_dir: cannot write the run folder"):
        T.train(small(), blocker / "run", progress=False)


def test_existing_run_needs_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="already holds a run"):
        T.train(small(), tmp_path, progress=False)


def _lrs(**kw):
    """The learning rate each of 10 training steps uses (scheduler read before its step, as the loop does)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sch = T.make_scheduler(opt, TrainConfig(steps=10, **kw))
    out = []
    for _ in range(10):
        out.append(sch.get_last_lr()[0])
        opt.step()
        sch.step()
    return out


def test_lr_schedules_are_transformers_get_scheduler():
    # hand-derived from the HF definitions: warm-up i/W from 0; linear (T-i)/(T-W); cosine ½(1+cos(π(i-W)/(T-W)))
    assert _lrs() == [1.0] * 10
    assert _lrs(warmup_steps=4) == pytest.approx([0.0, 0.25, 0.5, 0.75] + [1.0] * 6)  # constant -> with warm-up
    assert _lrs(lr_schedule="linear") == pytest.approx([(10 - i) / 10 for i in range(10)])
    assert _lrs(lr_schedule="linear", warmup_steps=2) == pytest.approx([0, 0.5] + [(10 - i) / 8 for i in range(2, 10)])
    cos = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (i - 2) / 8)) for i in range(2, 10)]
    assert _lrs(lr_schedule="cosine", warmup_steps=2) == pytest.approx(cos)
    assert _lrs(lr_schedule="cosine")[5] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine_with_min_lr")  # needs arguments the config does not carry


# ------------------------------------------------------------------------------------------ training runs
@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "ibpo"])
def test_two_step_run_writes_every_record(tmp_path, estimator):
    rec = T.train(small(estimator=estimator, correct={"num_references": 2}), tmp_path / estimator, progress=False)
    p = rec.path
    for name in ("config.yaml", "metrics.jsonl", "eval.jsonl", "checkpoint/model/model.safetensors",
                 "checkpoint/model/config.json", "checkpoint/model/README.md", "checkpoint/trainer_state.pt",
                 "checkpoint/trainer_state.json", "checkpoint/COMPLETE",
                 "trajectories/step_000001.parquet", "trajectories/step_000002.parquet"):
        assert (p / name).is_file(), name
    assert TrainConfig.from_yaml(p / "config.yaml") == rec.config
    m = rec.metrics
    assert m["step"].tolist() == [1, 2]
    assert not set(METRIC_COLUMNS) - set(m.columns), set(METRIC_COLUMNS) - set(m.columns)
    documented = {c for c in m.columns if not c.startswith(("loss_", "correct_"))}
    assert documented <= set(R.METRIC_HELP), documented - set(R.METRIC_HELP)
    assert m["updates"].eq(1).all()
    # a step learns something exactly when some group has mixed rewards (or IBPO's shaping varies)
    has_signal = m["active_tokens"] > 0
    assert has_signal.any() and ((m["grad_norm"] > 0) == has_signal).all()
    assert {"avg@k", "pass@1", "pass@k", "avg@k_lo", "avg@k_hi"} <= set(rec.eval.columns)
    t = rec.trajectories(2)
    assert len(t[t["kind"] == "policy"]) == 8 and set(t["group"]) == {0, 1}
    assert [len(a) for a in t["advantages"]] == t["response_len"].tolist()
    assert rec.trajectories()["step"].tolist().count(1) >= 8
    task = S.build_task(rec.config)
    picked = T.pick_examples(task.examples(rec.config.train_split), rec.config, 2)
    by_id = {e.id: e for e in picked}
    assert t["example_id"].tolist() == [picked[g].id for g in t["group"]]  # repairs keep their source's example
    for _, row in t.iterrows():
        assert row["step_labels"] is None and task.step_labels(by_id[row["example_id"]], row["response"]) is None \
            or list(row["step_labels"]) == task.step_labels(by_id[row["example_id"]], row["response"])
    if estimator == "ibpo":
        assert {"edit_mask", "repair", "repair_success"} <= set(t.columns)
        assert m["correct_n_attempted"].sum() > 0
        everything = rec.trajectories()
        failed = everything[(everything["kind"] == "policy") & (everything["reward"] < 1)]
        has_repair = failed["repair"].notna()
        assert has_repair.any()
        assert (failed.loc[has_repair, "repair_success"] > 0).all()
        # credit sits on the edited tokens only (where a repair exists)
        for _, row in failed[has_repair].iterrows():
            adv, edited = np.array(row["advantages"]), np.array(row["edit_mask"])
            assert np.all(adv[~edited] == 0)


@pytest.mark.slow
def test_run_without_checkpoints_writes_other_records_and_refuses_resume(tmp_path):
    rec = T.train(small(steps=1, save_checkpoints=False), tmp_path / "run", progress=False)
    p = rec.path
    for name in ("config.yaml", "metrics.jsonl", "eval.jsonl", "trajectories/step_000001.parquet"):
        assert (p / name).is_file(), name
    assert not (p / "checkpoint").exists() and not list(p.glob(".checkpoint*"))
    assert rec.metrics["step"].tolist() == [1] and len(rec.trajectories(1)) >= 8
    with pytest.raises(ValueError, match="no checkpoint.*save_checkpoints=False"):
        rec.load_policy()
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        T.train(small(steps=2, save_checkpoints=False), p, progress=False)
    # without a checkpoint a resumed run starts again from step 1, its old records dropped
    with pytest.warns(UserWarning, match="no checkpoint.*save_checkpoints=False.*step 1"):
        again = T.train(small(steps=2, save_checkpoints=False), p, progress=False, resume=True)
    assert again.metrics["step"].tolist() == [1, 2] and again.eval["step"].tolist() == [2]
    pd.testing.assert_frame_equal(_strip_times(rec.metrics), _strip_times(again.metrics.iloc[:1]))


def _strip_times(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in df.columns if not c.startswith("time_")]].reset_index(drop=True)


@pytest.mark.slow
def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    cfg = small(steps=4, checkpoint_every=2, eval_every=2, estimator="rloo")
    straight = T.train(cfg, tmp_path / "straight", progress=False)

    real_write, calls = T.write_trajectories, []

    def killed_in_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            # the run dies after writing step 3's metrics row, before its checkpoint (at step 4)
            raise KeyboardInterrupt
        return real_write(*a, **k)

    monkeypatch.setattr(T, "write_trajectories", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, tmp_path / "resumed", progress=False)
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "rew')  # and a torn half-written line, as a kill mid-write leaves
    assert R.load_checkpoint_state(tmp_path / "resumed")["step"] == 2
    monkeypatch.setattr(T, "write_trajectories", real_write)

    real_update, after = T.policy_update, []

    def counted(*a, **k):
        after.append(1)
        return real_update(*a, **k)

    monkeypatch.setattr(T, "policy_update", counted)
    resumed = T.train(cfg, tmp_path / "resumed", progress=False, resume=True)
    assert len(after) == 2  # it continued from the step-2 checkpoint, it did not start over
    assert (straight.metrics["grad_norm"].iloc[2:] > 0).all()  # the resumed steps really train
    pd.testing.assert_frame_equal(_strip_times(straight.metrics), _strip_times(resumed.metrics))
    pd.testing.assert_frame_equal(straight.eval, resumed.eval)
    pd.testing.assert_frame_equal(straight.trajectories(4), resumed.trajectories(4))
    a, b = straight.load_policy().model.state_dict(), resumed.load_policy().model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_nonfinite_loss_is_skipped_counted_and_stops_after_three(tmp_path):
    ppo = get_loss("ppo")
    calls = []

    def nan_first_then_ppo(*a, **k):
        calls.append(1)
        loss, m = ppo(*a, **k)
        return (loss * float("nan") if len(calls) == 1 else loss), m

    def always_nan(*a, **k):
        loss, m = ppo(*a, **k)
        return loss * float("nan"), m

    for name, fn in (("nan-once-test", nan_first_then_ppo), ("nan-always-test", always_nan)):
        if name not in LOSSES:
            register_loss(name)(fn)

    rec = T.train(small(loss="nan-once-test", eval_n=0), tmp_path / "once", progress=False)
    assert rec.metrics["skipped"].tolist() == [1, 0] and rec.metrics["skipped_total"].tolist() == [1, 1]
    assert rec.metrics["updates"].tolist() == [0, 1]

    cfg = small(loss="nan-always-test", steps=5, eval_n=0)
    with pytest.raises(T.NonFiniteLossError, match="3 optimiser steps in a row"):
        T.train(cfg, tmp_path / "always", progress=False)
    rec = R.load_run(tmp_path / "always")
    assert rec.metrics["skipped_total"].tolist() == [1, 2, 3]
    state = R.load_checkpoint_state(rec.path)
    assert state["step"] == 3
    # nothing was applied: the checkpointed weights are the initial ones
    init = S.build_policy(cfg, None, torch.device("cpu")).model.state_dict()
    saved = rec.load_policy().model.state_dict()
    assert all(torch.equal(init[k], saved[k]) for k in init)


@pytest.mark.slow
def test_bilateral_trains_repairs_off_policy(tmp_path):
    rec = T.train(small(estimator="ibpo", bilateral=True, correct={"num_references": 2}, is_cap=1.5, eval_n=0, steps=1,
                        prompts_per_step=3), tmp_path / "bi", progress=False)
    t = rec.trajectories(1)
    rep = t[t["kind"] == "repaired"]
    assert len(rep) == rec.metrics["n_repaired"].iloc[0] > 0
    for _, row in rep.iterrows():
        w, mask = np.array(row["is_weights"]), np.array(row["response_mask"])
        assert np.all(w[~mask] == 0) and np.all((w[mask] > 0) & (w[mask] <= 1.5 + 1e-6))
        assert np.array_equal(mask, np.array(row["edit_mask"]))  # trained on inserted tokens only


@pytest.mark.slow
def test_vineppo_step(tmp_path):
    rec = T.train(small(estimator="vineppo", mc_rollouts=1, steps=1, prompts_per_step=1, eval_n=0),
                  tmp_path / "v", progress=False)
    t = rec.trajectories(1)
    assert all(len(v) == n + 1 for v, n in zip(t["step_values"], t["n_steps"]))
    assert all(v[-1] == r for v, r in zip(t["step_values"], t["reward"]))


@pytest.mark.slow
def test_cli_prints_run_dir(tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    small().to_yaml(cfg_path)
    out = tmp_path / "cli-run"
    assert T.main([str(cfg_path), "--set", "steps=1", "label=cli", "kl_coef=0.05", "--out", str(out),
                   "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    rec = R.load_run(out)
    assert rec.config.label == "cli" and rec.metrics["step"].tolist() == [1]
    assert rec.metrics["kl_ref"].iloc[0] == 0.0  # the reference is the initial policy: no KL before any update


@pytest.mark.slow
def test_evaluate_and_train_many(tmp_path):
    recs = T.train_many([small(steps=1, seed=s, eval_n=2) for s in (0, 1)], tmp_path, progress=False)
    assert [r.path.name for r in recs] == ["grpo-seed0", "grpo-seed1"]
    df = R.summarise_runs(recs)
    assert df["n_seeds"].tolist() == [2]
    pd.testing.assert_frame_equal(R.summarise_runs([r.path for r in recs]), df)
    policy = recs[0].load_policy()
    ev = T.evaluate(policy, "synthetic", split="test", n=3, k=2, temperature=1.0, seed=0, max_new_tokens=40)
    assert ev["n"] == 3 and ev["k"] == 2 and 0 <= ev["avg@k"] <= ev["pass@k"] <= 1
    assert ev["avg@k_lo"] <= ev["avg@k"] <= ev["avg@k_hi"]


def _toy_policy_and_batch():
    """The tiny random policy and a fixed 6-trajectory batch (2 groups) with the policy's own log-probs
    -> (policy, batch, lens, lp [6, T], the generator, to draw the advantages from next)."""
    from ibpo_lab.models import build_tiny_policy, response_logprobs
    from ibpo_lab.rollout import RolloutBatch
    from ibpo_lab.tasks.synthetic import VOCAB

    policy = build_tiny_policy(VOCAB, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=0)
    g = torch.Generator().manual_seed(0)
    lens = [3, 5, 2, 6, 4, 1]
    batch = RolloutBatch(prompt_ids=[[1, 5, 6]] * 6, response_ids=[torch.randint(4, 40, (n,), generator=g) for n in lens],
                         rewards=[1, 0, 1, 0, 0, 1], group_ids=[0, 0, 0, 1, 1, 1])
    with torch.no_grad():
        lp, _ = response_logprobs(policy.model, batch.padded())
    return policy, batch, lens, lp, g


def _toy_update(micro: int, agg: str):
    """One SGD step of policy_update on a fixed random batch; returns the updated parameters."""
    policy, batch, lens, lp, g = _toy_policy_and_batch()
    batch = batch.replace(logprobs=[lp[i, :n] + 0.1 for i, n in enumerate(lens)])  # ratios != 1
    adv = torch.randn(6, max(lens), generator=g) * batch.response_mask
    cfg = small(micro_batch_size=micro, agg=agg, prompts_per_step=3, group_size=2, minibatch_size=6)
    opt = torch.optim.SGD(policy.model.parameters(), lr=0.1)
    out = T.policy_update(policy.model, None, opt, batch, adv, cfg, torch.device("cpu"))
    assert out["updates"] == 1 and out["grad_norm"] > 0
    return [p.detach().clone() for p in policy.model.parameters()]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_accumulate_to_the_minibatch_gradient(agg):
    whole = _toy_update(0, agg)
    for micro in (1, 4):
        for a, b in zip(whole, _toy_update(micro, agg)):
            assert torch.allclose(a, b, atol=1e-6)


def test_cli_resolves_names_and_nested_overrides(capsys):
    assert T.main(["ibpo", "--set", "correct.num_references=3", "estimator_kwargs.lam=0.2", "--print-config"]) == 0
    cfg = TrainConfig.from_yaml(capsys.readouterr().out)
    assert (cfg.label, cfg.correct.num_references, cfg.estimator_kwargs["lam"]) == ("ibpo", 3, 0.2)
    with pytest.raises(SystemExit):
        T.main(["ibpo", "--set", "repair_k=3", "--print-config"])


# ------------------------------------------------------------------------------------------ runs that always continue
def _kill_in_step(monkeypatch, n):
    """Make the run die (KeyboardInterrupt, as a kill) in step ``n``, after its metrics row."""
    real, calls = T.write_trajectories, []

    def killed(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "write_trajectories", killed)
    return real


@pytest.mark.slow
def test_run_killed_before_its_first_checkpoint_continues_from_step_1(tmp_path, monkeypatch):
    """issue 14.1: checkpoint only at the end, killed in step 2: --resume continues (from step 1, the
    records dropped); without --resume the error says to pass it or choose another folder."""
    cfg = small(steps=3, eval_n=0, model="tiny-random", max_new_tokens=8)
    real = _kill_in_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, tmp_path / "run", progress=False)
    first = R.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert first["step"].tolist() == [1, 2] and R.find_checkpoint(tmp_path / "run") is None
    monkeypatch.setattr(T, "write_trajectories", real)
    with pytest.raises(ValueError, match=r"already holds a run; pass resume=True \(--resume\) .* another --out"):
        T.train(cfg, tmp_path / "run", progress=False)
    with pytest.warns(UserWarning, match="no checkpoint .killed before its first one.: starting again from step 1"):
        rec = T.train(cfg, tmp_path / "run", progress=False, resume=True)
    assert rec.metrics["step"].tolist() == [1, 2, 3] and rec.steps_with_trajectories() == [1, 2, 3]
    pd.testing.assert_frame_equal(_strip_times(first), _strip_times(rec.metrics.iloc[:2]))  # same steps again
    assert R.load_checkpoint_state(rec.path)["step"] == 3


def test_bad_values_fail_before_any_model_loads(tmp_path, monkeypatch):
    """issue 14.1: eval_split and the keys of task_kwargs fail before a model (or a folder) is made;
    at 5c7e153 eval_split=bogus trained every step, then failed in the final evaluation."""
    def boom(*a, **k):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr(T, "build_policy", boom)
    for kw, field in ((dict(eval_split="bogus"), "eval_split"), (dict(task_kwargs={"n_stepz": 3}), "task_kwargs")):
        with pytest.raises(ValueError, match=f"invalid TrainConfig: {field}"):
            T.train(small(**kw), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="sampler_kwargs"):
        small(sampler_kwargs={"max_batchsize": 4})


def test_second_writer_is_refused_before_loading(tmp_path, monkeypatch):
    """issue 14.4 through train(): another live process holds the folder."""
    import subprocess
    import sys

    monkeypatch.setattr(T, "build_policy", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    hold = ("import sys; from ibpo_lab.runs import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); sys.stdin.read()")
    (tmp_path / "run").mkdir()
    import os
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(T.__file__).parent.parent)}  # this checkout's ibpo_lab
    p = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "run")], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(R.RunLockedError, match=rf"run is being written by another process \(pid {p.pid} "):
            T.train(small(), tmp_path / "run", progress=False, resume=True)
    finally:
        p.kill()
        p.wait()


@pytest.mark.slow
def test_disk_full_checkpoint_then_resume_once_space_is_freed(tmp_path, monkeypatch):
    """issue 14.2 through train(): the step-2 checkpoint hits a full disk (torch.save raises
    RuntimeError); the step-1 checkpoint is kept, nothing partial is left, --resume redoes step 2."""
    cfg = small(steps=2, checkpoint_every=1, eval_n=0, model="tiny-random", max_new_tokens=8)
    real_save, calls = torch.save, []

    def full_on_second(obj, f, *a, **k):
        calls.append(1)
        real_save(obj, f, *a, **k)
        if len(calls) == 2:
            raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")

    monkeypatch.setattr(torch, "save", full_on_second)
    with pytest.raises(R.CheckpointWriteError, match="step 2 .*: disk full; the previous checkpoint is kept"):
        T.train(cfg, tmp_path / "run", progress=False)
    assert not list((tmp_path / "run").glob(".checkpoint.*"))
    assert R.load_checkpoint_state(tmp_path / "run")["step"] == 1
    monkeypatch.setattr(torch, "save", real_save)
    rec = T.train(cfg, tmp_path / "run", progress=False, resume=True)
    assert rec.metrics["step"].tolist() == [1, 2] and R.load_checkpoint_state(rec.path)["step"] == 2


@pytest.mark.slow
def test_checkpoint_is_a_from_pretrained_folder_export_and_push(tmp_path, monkeypatch):
    """issue 18.2 / 14.6: checkpoint/model loads with from_pretrained (safetensors, tokenizer, card),
    the trainer state with weights_only=True; export copies it; push_to_hub uploads it (hub mocked)."""
    from huggingface_hub import HfApi, ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rec = T.train(small(steps=1, eval_n=0), tmp_path / "run", progress=False)
    mdir = rec.path / "checkpoint" / "model"
    assert (mdir / "model.safetensors").is_file() and not list(rec.path.rglob("*.bin"))
    hf = AutoModelForCausalLM.from_pretrained(mdir)
    tok = AutoTokenizer.from_pretrained(mdir)
    ours = rec.load_policy()
    trained = {k: v for k, v in ours.model.state_dict().items()}
    init = S.build_policy(rec.config, None, torch.device("cpu")).model.state_dict()
    assert any(not torch.equal(trained[k], init[k]) for k in init)  # the trained weights, not the base model's
    assert all(torch.equal(hf.state_dict()[k], trained[k]) for k in trained)
    assert tok.decode(tok("1+2=3", add_special_tokens=False)["input_ids"]) == "1+2=3"
    card = ModelCard.load(mdir / "README.md").data.to_dict()
    assert card["library_name"] == "transformers" and card["license"] == "mit" and "grpo" in card["tags"]
    torch.load(rec.path / "checkpoint" / "trainer_state.pt", weights_only=True)  # no pickle needed

    out = R.export(rec.path, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in mdir.iterdir())
    assert torch.equal(AutoModelForCausalLM.from_pretrained(out).lm_head.weight, hf.lm_head.weight)
    with pytest.raises(ValueError, match="exists and is not empty"):
        R.export(rec.path, out)
    assert R.main(["export", str(rec.path), str(tmp_path / "cli-export")]) == 0
    assert (tmp_path / "cli-export" / "model.safetensors").is_file()

    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        R.push_to_hub(rec.path, "me/policy")
    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: calls.append(("create", repo_id, k)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **k: calls.append(("upload", k)) or "commit")
    assert R.push_to_hub(rec.path, "me/policy") == "commit"
    assert calls[0] == ("create", "me/policy", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert calls[1][1]["folder_path"] == str(mdir) and calls[1][1]["repo_id"] == "me/policy"


@pytest.mark.slow
def test_resume_refuses_corrupt_records(tmp_path):
    """issue 14.5 through train(): a garbage line in the middle of metrics.jsonl, a deleted row or a
    deleted parquet is an error naming the file on resume (at 5c7e153 resume continued with gaps)."""
    import shutil

    cfg = small(steps=2, checkpoint_every=1, eval_n=0, model="tiny-random", max_new_tokens=8)
    run = T.train(cfg, tmp_path / "run", progress=False).path
    more = cfg.replace(steps=3)
    good = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    cases = [("metrics.jsonl", good[0] + "{garbage\n" + good[1], r"metrics.jsonl: line 2 is not a JSON object"),
             ("metrics.jsonl", good[1], r"metrics.jsonl: row 1 is step 2, expected step 1"),
             ("trajectories/step_000001.parquet", None, r"trajectories: no trajectory file for step\(s\) \[1\]")]
    for name, text, match in cases:
        backup = tmp_path / "backup"
        shutil.copytree(run, backup)
        if text is None:
            (run / name).unlink()
        else:
            (run / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            T.train(more, run, progress=False, resume=True)
        shutil.rmtree(run)
        backup.rename(run)
    assert T.train(more, run, progress=False, resume=True).metrics["step"].tolist() == [1, 2, 3]


# ======================================================================================== precision (issue 15 item 4)
def _precision_batch():
    """8 trajectories of 2 groups with random prompt/response ids of different lengths (left padding),
    and +-1 sequence advantages."""
    g = torch.Generator().manual_seed(0)
    lens = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    prompts = [torch.randint(4, 30, (lens(3, 7),), generator=g).tolist() for _ in range(8)]
    resp = [torch.randint(4, 30, (lens(5, 12),), generator=g).tolist() for _ in range(8)]
    batch = RolloutBatch(prompt_ids=prompts, response_ids=resp, rewards=torch.tensor([1.0, 0, 1, 0, 0, 1, 1, 0]),
                         group_ids=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), logprobs=[[0.0] * len(r) for r in resp])
    adv = torch.tensor([1.0, -1, 1, -1, -1, 1, 1, -1])[:, None].expand(8, max(map(len, resp))).clone()
    return batch, adv


def _update_delta(dtype: str, lr: float = 1e-6, steps: int = 2):
    """Flattened weight change (as float32) of ``steps`` policy updates of the random tiny policy in ``dtype``;
    the dtypes of the parameters and of AdamW's state; the dtypes the Linear layers computed in."""
    cfg = TrainConfig(task="synthetic", model="tiny-random", device="cpu", dtype=dtype, lr=lr, estimator="grpo",
                      prompts_per_step=2, group_size=4, recompute_logprobs=True, max_grad_norm=1e9)
    model = S.build_policy(cfg, None, torch.device("cpu")).model
    w0 = {k: v.detach().float().clone() for k, v in model.named_parameters()}
    computed: set = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: computed.add(o.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    opt = T.make_optimizer(model, cfg)
    batch, adv = _precision_batch()
    for i in range(steps):
        out = T.policy_update(model, None, opt, batch, adv, cfg, torch.device("cpu"))
        assert out["updates"] == 1 and out["skipped"] == 0
        # one minibatch: the recomputed old log-probs come from the same (autocast) forward as the update's,
        # so the ratio is exactly 1 (a float32 old pass against a bf16 update would not be)
        assert out["loss_ratio_min"] == out["loss_ratio_max"] == 1.0, (dtype, i, out)
    for h in hooks:
        h.remove()
    delta = torch.cat([(v.detach().float() - w0[k]).flatten() for k, v in model.named_parameters()])
    state = {t.dtype for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0}
    return delta, {p.dtype for p in model.parameters()}, state, computed


def test_bf16_mixed_precision_learns_like_float32_and_pure_bf16_does_not():
    # AdamW's first steps move every weight by about lr (m / sqrt(v) ~ +-1). At lr 1e-6 that is far below
    # bfloat16's spacing (2^-8..2^-7 of the weight: 8e-5 for a weight of 0.02, 0.0078 for a norm weight of 1),
    # so pure bf16 rounds almost every update away, while fp32 master weights keep them.
    d32, p32, s32, c32 = _update_delta("float32")
    dmx, pmx, smx, cmx = _update_delta("bfloat16")
    with pytest.warns(UserWarning, match="bfloat16-pure.*rounded away"):
        dpu, ppu, spu, cpu_ = _update_delta("bfloat16-pure")
    # what runs in which precision
    assert p32 == s32 == {torch.float32} and c32 == {torch.float32}
    assert pmx == smx == {torch.float32}, "mixed precision keeps float32 master weights and AdamW state"
    assert cmx == {torch.bfloat16}, "mixed precision runs the forward matmuls under bf16 autocast"
    assert ppu == spu == {torch.bfloat16}
    # fp32 and mixed move (nearly) every weight, by the same updates
    assert (d32 != 0).float().mean() > 0.99 and (dmx != 0).float().mean() > 0.99
    moved = d32 != 0
    assert (dmx.sign() == d32.sign())[moved].float().mean() > 0.95
    assert (dmx - d32).norm() / d32.norm() < 0.3
    # pure bf16 at lr 1e-6: most weights never change, and the change is nothing like fp32's
    assert (dpu != 0).float().mean() < 0.1
    assert (dpu - d32).norm() / d32.norm() > 0.8


def test_pure_bf16_at_a_large_lr_does_learn():
    # the contrast above is about the step size, not a broken code path: at lr 1e-2 the steps exceed
    # bf16's spacing and pure bf16 moves most weights too
    with pytest.warns(UserWarning, match="bfloat16-pure"):
        dpu, *_ = _update_delta("bfloat16-pure", lr=1e-2, steps=1)
    assert (dpu != 0).float().mean() > 0.9


def test_float32_dtype_refuses_low_precision_parameters():
    cfg = small(dtype="float32")
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    with pytest.raises(ValueError, match="dtype: 'float32' trains float32 master weights.*bfloat16"):
        T.make_optimizer(model, cfg)
    with pytest.raises(ValueError, match="dtype.*float16 training needs loss scaling"):
        small(dtype="float16")


def test_hf_sampler_decodes_under_the_same_autocast(monkeypatch):
    # dtype=bfloat16: build_lab wraps the hf sampler so its decode runs under bf16 autocast, and the
    # behaviour log-probs it records agree with the trainer's autocast pass up to bf16 rounding;
    # float32 keeps the plain sampler, whose log-probs equal the trainer's to float32 rounding
    from ibpo_lab.models import response_logprobs

    diffs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = small(model="tiny-random", dtype=dtype, max_new_tokens=12)
        lab = S.build_lab(cfg)
        assert isinstance(lab.sampler, S.AutocastSampler) == (dtype == "bfloat16")
        computed: set = set()
        hooks = [m.register_forward_hook(lambda mod, i, o: computed.add(o.dtype))
                 for m in lab.policy.model.modules() if isinstance(m, torch.nn.Linear)]
        b = lab.sampler.sample(["1+2=", "a longer prompt 3+4="], n=2, max_new_tokens=12, temperature=1.0, seed=0)
        for h in hooks:
            h.remove()
        assert computed == ({torch.bfloat16} if dtype == "bfloat16" else {torch.float32})
        pad = b.padded()
        with torch.no_grad(), S.precision_context(dtype, "cpu"):
            lp, _ = response_logprobs(lab.policy.model, pad, 1.0)
        m = pad.response_mask.bool()
        diffs[dtype] = float((lp - pad.old_logprobs)[m].abs().max())
        lab.sampler.sync_weights(lab.policy.model)  # delegated to the wrapped sampler
    assert diffs["float32"] < 1e-4
    assert diffs["bfloat16"] < 0.1  # KV-cache decode vs full-sequence pass round differently in bf16


def test_tf32_is_switched_on_for_cuda_only(monkeypatch):
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        S.build_policy(small(model="tiny-random"), None, torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        S.enable_tf32()  # what build_policy calls for a CUDA device
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_policy_update_passes_loss_kwargs_and_the_anchors_only_mask(monkeypatch):
    """ibpo with anchors_only + GSPO's gated ratio: the loss gets gate='credited' and a mask without the
    correct trajectories (rows 0, 2, 5); gate_frac by hand: failed rows 1, 3, 4 have 5 + 6 + 4 = 15
    trained tokens, of which row 1's first two carry no advantage, so 13 are in the gate."""
    policy, batch, lens, lp, g = _toy_policy_and_batch()
    batch = batch.replace(logprobs=[lp[i, :n] for i, n in enumerate(lens)])
    adv = (torch.rand(6, max(lens), generator=g) + 0.5) * batch.response_mask
    adv[1, :2] = 0.0
    seen = []
    real = T.get_loss

    def recording(name):
        fn = real(name)

        def loss(lp, old, a, mask, **kw):
            # rows arrive in the minibatch's random order: put them back by their (distinct) advantage rows
            order = [next(j for j in range(len(adv)) if torch.equal(a[i], adv[j])) for i in range(len(a))]
            back = torch.zeros_like(mask)
            back[order] = mask
            seen.append((back, kw))
            return fn(lp, old, a, mask, **kw)
        return loss

    monkeypatch.setattr(T, "get_loss", recording)
    cfg = small(estimator="ibpo", estimator_kwargs={"anchors_only": True}, loss="gspo", loss_kwargs={"gate": "credited"},
                correct={"num_references": 1},
                prompts_per_step=3, group_size=2, minibatch_size=6)
    opt = torch.optim.SGD(policy.model.parameters(), lr=0.1)
    out = T.policy_update(policy.model, None, opt, batch, adv, cfg, torch.device("cpu"))
    (mask, kw), = seen
    assert kw["gate"] == "credited"
    expected = batch.response_mask.float().clone()
    expected[[0, 2, 5]] = 0.0
    assert torch.equal(mask, expected)
    assert out["loss_gate_frac"] == pytest.approx(13 / 15)
    # without anchors_only every trained token is in the loss mask
    seen.clear()
    T.policy_update(policy.model, None, opt, batch, adv, cfg.replace(estimator_kwargs={"anchors_only": False}),
                    torch.device("cpu"))
    assert torch.equal(seen[0][0], batch.response_mask.float())


# ---------------------------------------------------------------------------- J_rep (IOP's joint repair objective)
def _revisions(accepted, selected, groups):
    g = torch.Generator().manual_seed(1)
    n = len(accepted)
    lens = [3, 4, 2, 5, 3, 4][:n]
    return RolloutBatch(prompt_ids=[[1, 7, 8, 9, 10]] * n,
                        response_ids=[torch.randint(4, 40, (k,), generator=g).tolist() for k in lens],
                        rewards=[float(a) for a in accepted], group_ids=groups, logprobs=[[-1.0] * k for k in lens],
                        meta={"accepted": accepted, "selected": selected, "source_traj": groups})


def test_repair_advantages_group_and_selected():
    rv = _revisions([True, False, False, True, True], [True, False, False, True, False], [5, 5, 5, 7, 7])
    # group 5: mean 1/3 -> 2/3, -1/3, -1/3; group 7: all verified -> no signal
    assert T.repair_advantages(rv, "group").tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0])
    assert T.repair_advantages(rv, "selected").tolist() == [1, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="repair_advantage"):
        T.repair_advantages(rv, "nope")
    with pytest.raises(ValueError, match="repair_advantage"):
        small(repair_advantage="nope").validate()
    with pytest.raises(ValueError, match="repair_loss_weight"):
        small(repair_loss_weight=-1.0).validate()


def _policy():
    from ibpo_lab.models import build_tiny_policy
    from ibpo_lab.tasks.synthetic import VOCAB

    return build_tiny_policy(VOCAB, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=0)


def _rep_update(weight: float, rv: RolloutBatch, **kw):
    """One SGD step of policy_update whose on-policy batch has zero advantage: only J_rep moves the weights."""
    from ibpo_lab.models import response_logprobs

    policy = _policy()
    with torch.no_grad():
        lp, _ = response_logprobs(policy.model, rv.padded())
    rv = rv.replace(logprobs=[lp[i, : len(r)].tolist() for i, r in enumerate(rv.response_ids)])
    main = RolloutBatch(prompt_ids=[[1, 5, 6]] * 2, response_ids=[[4, 5], [6, 7, 8]], rewards=[1, 0], group_ids=[0, 0],
                        logprobs=[[-1.0] * 2, [-1.0] * 3])
    cfg = small(prompts_per_step=1, group_size=2, minibatch_size=2, repair_loss_weight=weight, max_grad_norm=1e9,
                repair_advantage="group", **kw)
    before = [p.detach().clone() for p in policy.model.parameters()]
    obj = T.repair_objective_batch(policy.model, rv, cfg, torch.device("cpu"))
    opt = torch.optim.SGD(policy.model.parameters(), lr=0.5)
    out = T.policy_update(policy.model, None, opt, main, torch.zeros(2, 3), cfg, torch.device("cpu"), repair=obj)
    delta = [p.detach() - b for p, b in zip(policy.model.parameters(), before)]
    return policy, rv, obj, out, delta


def test_repair_objective_trains_the_verified_revision_under_the_repair_prompt():
    from ibpo_lab.models import response_logprobs

    rv = _revisions([True, False, True, False], [True, False, True, False], [0, 0, 1, 1])
    policy, rv, obj, out, d1 = _rep_update(1.0, rv)
    # token-mean PPO loss at ratio 1: -(0.5·(3 + 2) - 0.5·(4 + 5)) / 14 tokens
    assert obj is not None and len(obj.adv) == 4 and out["loss_repair"] == pytest.approx(2 / 14, abs=1e-6)
    # advantages +1/2 on the accepted revisions, -1/2 on the others, on every response token
    assert obj.adv[:, 0].tolist() == [0.5, -0.5, 0.5, -0.5]
    assert torch.equal(obj.adv != 0, rv.padded().response_mask)
    with torch.no_grad():
        after, _ = response_logprobs(policy.model, rv.padded())
    seq = [after[i, : len(r)].sum().item() - sum(rv.logprobs[i]) for i, r in enumerate(rv.response_ids)]
    assert seq[0] > 0 and seq[2] > 0 and seq[1] < 0 and seq[3] < 0  # verified repairs up, failed revisions down
    # the step is λ_rep-linear (SGD, no clipping: ratios are 1 at the first step) and nothing moves at λ_rep = 0
    _, _, _, _, d2 = _rep_update(2.0, _revisions([True, False, True, False], [True, False, True, False], [0, 0, 1, 1]))
    assert any(x.abs().max() > 0 for x in d1)
    for a, b in zip(d1, d2):
        assert torch.allclose(2 * a, b, atol=1e-6)
    _, _, obj0, out0, d0 = _rep_update(0.0, _revisions([True, False, True, False], [True, False, True, False], [0, 0, 1, 1]))
    assert obj0 is None and "loss_repair" not in out0 and all(x.abs().max() == 0 for x in d0)


def test_repair_objective_is_weights_are_the_bilateral_truncated_ratio():
    rv = _revisions([True, False], [True, False], [0, 0])
    policy = _policy()
    from ibpo_lab.models import response_logprobs

    with torch.no_grad():
        lp, _ = response_logprobs(policy.model, rv.padded())
    # μ = π_old + 0.3 on the first revision, π_old - 2 on the second: w = exp(-0.3) and min(exp(2), cap=1.5)
    mu = [(lp[0, :3] + 0.3).tolist(), (lp[1, :4] - 2.0).tolist()]
    rv = rv.replace(logprobs=mu)
    obj = T.repair_objective_batch(policy.model, rv, small(recompute_logprobs=True, is_cap=1.5, repair_advantage="group",
                                                          repair_loss_weight=1.0), torch.device("cpu"))
    m = rv.padded().response_mask.bool()
    assert torch.allclose(obj.is_weights[0, :3], torch.full((3,), float(np.exp(-0.3))), atol=1e-5)
    assert torch.allclose(obj.is_weights[1, :4], torch.full((4,), 1.5))
    assert torch.all(obj.is_weights[~m] == 0)
    assert torch.allclose(obj.old[m], lp[m], atol=1e-6)
    # without recomputation μ is π_old: weight 1
    obj = T.repair_objective_batch(policy.model, rv, small(repair_advantage="group", repair_loss_weight=1.0),
                                   torch.device("cpu"))
    assert T.repair_objective_batch(policy.model, rv, small(repair_advantage="group"), torch.device("cpu")) is None  # λ_rep 0
    assert torch.equal(obj.is_weights, m.float()) and torch.allclose(obj.old[m], torch.tensor(sum(mu, [])))


@pytest.mark.slow
def test_ibpo_run_logs_the_repair_objective(tmp_path):
    assert small(estimator="ibpo").repair_loss_weight == 0.0  # off by default: IBPO as published has no J_rep
    rec = T.train(small(estimator="ibpo", correct={"num_references": 2}, eval_n=0, steps=2, prompts_per_step=3,
                        repair_loss_weight=1.0), tmp_path / "jrep", progress=False)
    m = rec.metrics
    assert (m["n_repair_trained"] > 0).any()
    trained = m[m["n_repair_trained"] > 0]
    assert trained["repair_loss_weight"].eq(1.0).all() and trained["loss_repair"].notna().all()
    assert m["repair_success"].between(0, 1).all()
