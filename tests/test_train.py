"""Trainer: the loop's run records, checkpoints/resume, NaN handling, the update, train_many, CLI
(config: tests/test_config.py; the run folder: tests/test_runs.py; the step: tests/test_step.py)."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match="device.*'cuda'.*no CUDA"):
        T.train(small(device="cuda"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_unwritable_out_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="out_dir: cannot write the run folder"):
        T.train(small(), blocker / "run", progress=False)


def test_existing_run_needs_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="already holds a run"):
        T.train(small(), tmp_path, progress=False)


def test_lr_schedules():
    def lrs(**kw):
        f = T._lr_lambda(TrainConfig(steps=10, **kw))
        return [f(i) for i in range(10)]

    assert lrs() == [1.0] * 10
    assert lrs(warmup_steps=4)[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    lin, cos = lrs(lr_schedule="linear"), lrs(lr_schedule="cosine")
    assert lin[0] == 1.0 and lin[5] == pytest.approx(0.5) and all(a > b for a, b in zip(lin, lin[1:]))
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5) and all(a > b for a, b in zip(cos, cos[1:]))


# ------------------------------------------------------------------------------------------ training runs
@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "ibpo"])
def test_two_step_run_writes_every_record(tmp_path, estimator):
    rec = T.train(small(estimator=estimator, correct={"num_references": 2}), tmp_path / estimator, progress=False)
    p = rec.path
    for name in ("config.yaml", "metrics.jsonl", "eval.jsonl", "checkpoint/state.pt",
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
    with pytest.raises(ValueError, match="save_checkpoints=False"):
        T.train(small(steps=2, save_checkpoints=False), p, progress=False, resume=True)
    with pytest.raises(ValueError, match="no checkpoint.*save_checkpoints=False"):
        rec.load_policy()


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
    a = R.load_checkpoint_state(straight.path)["model"]
    b = R.load_checkpoint_state(resumed.path)["model"]
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
    assert all(torch.equal(init[k], state["model"][k]) for k in init)


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


def _toy_update(micro: int, agg: str):
    """One SGD step of policy_update on a fixed random batch; returns the updated parameters."""
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
    obj = T.repair_objective_batch(policy.model, rv, small(recompute_logprobs=True, is_cap=1.5, repair_advantage="group"), torch.device("cpu"))
    m = rv.padded().response_mask.bool()
    assert torch.allclose(obj.is_weights[0, :3], torch.full((3,), float(np.exp(-0.3))), atol=1e-5)
    assert torch.allclose(obj.is_weights[1, :4], torch.full((4,), 1.5))
    assert torch.all(obj.is_weights[~m] == 0)
    assert torch.allclose(obj.old[m], lp[m], atol=1e-6)
    # without recomputation μ is π_old: weight 1
    obj = T.repair_objective_batch(policy.model, rv, small(repair_advantage="group"), torch.device("cpu"))
    assert torch.equal(obj.is_weights, m.float()) and torch.allclose(obj.old[m], torch.tensor(sum(mu, [])))


@pytest.mark.slow
def test_ibpo_run_logs_the_repair_objective(tmp_path):
    rec = T.train(small(estimator="ibpo", correct={"num_references": 2}, eval_n=0, steps=2, prompts_per_step=3),
                  tmp_path / "jrep", progress=False)
    m = rec.metrics
    assert (m["n_repair_trained"] > 0).any()
    trained = m[m["n_repair_trained"] > 0]
    assert trained["repair_loss_weight"].eq(1.0).all() and trained["loss_repair"].notna().all()
    assert m["repair_success"].between(0, 1).all()
