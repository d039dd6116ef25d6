"""experiments: the helpers behind the notebooks, on hand-made batches (fast) and on a random tiny
policy with the oracle corrector (slow: it samples and trains)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from ibpo_lab import experiments as ex
from ibpo_lab.rollout import RolloutBatch


def _batch():
    # two groups of 4: group 0 mixed (two failures, one repaired twice out of two), group 1 all failed
    return RolloutBatch(
        prompt_ids=[[1]] * 8,
        response_ids=[[5, 6, 7, 8], [5, 6, 9], [5, 10], [11, 12, 13], [5, 6], [5, 7], [14], [15, 16]],
        rewards=[1, 0, 0, 1, 0, 0, 0, 0], group_ids=[0, 0, 0, 0, 1, 1, 1, 1],
        step_spans=[[(0, 2), (2, 4)], [(0, 2), (2, 3)], [(0, 1), (1, 2)], [(0, 3)], [(0, 2)], [(0, 2)], [(0, 1)],
                    [(0, 1), (1, 2)]],
        repair_success=[0, 1.0, 0.5, 0, 0.5, 0, 0, 0],
        edit_masks=[[0, 0, 0, 0], [0, 0, 1], [0, 1], [0, 0, 0], [0, 1], [0, 0], [0], [0, 0]],
    )


def _sample(batch=None, labels=None):
    b = batch or _batch()
    cfg = SimpleNamespace(lam=0.6, rho=0.5, max_new_tokens=8, temperature=1.0, mc_rollouts=2)
    labels = labels if labels is not None else [[True, True], [True, False], [False, False], [True], [True],
                                                [False], [False], [True, False]]
    return ex.GroupSample(lab=SimpleNamespace(cfg=cfg, policy=SimpleNamespace(tokenizer=None)), batch=b,
                          examples=[None, None], step_labels=labels)


def test_shaping_moments_decompose_and_covariance_is_negative():
    s = _sample()
    m = ex.shaping_moments(s, lam=0.6, rho=0.5)
    assert list(m.group) == [0, 1, -1]
    np.testing.assert_allclose(m.var_shaped, m.var_decomposed, atol=1e-12)
    g0 = m.iloc[0]
    r = np.array([1, 0, 0, 1.0])
    phi = 0.5 * np.array([0, 1.0, 0.5, 0])
    assert np.isclose(g0.var_R, r.var(ddof=1)) and np.isclose(g0.var_phi, phi.var(ddof=1))
    assert np.isclose(g0.cov_R_phi, np.cov(r, phi)[0, 1]) and g0.cov_R_phi < 0
    assert np.isclose(g0.var_shaped, (r + 0.6 * phi).var(ddof=1))
    assert bool(m.iloc[1].all_failed) and not bool(m.iloc[0].all_failed)
    # pooled = weighted by degrees of freedom (3 each here: a plain mean)
    assert np.isclose(m.iloc[2].var_R, m.iloc[:2].var_R.mean())
    with pytest.raises(ValueError, match="lam"):
        ex.shaping_moments(s, lam=-1)
    with pytest.raises(ValueError, match="repair_success"):
        ex.shaping_moments(s.batch.replace(repair_success=None))


def test_shaping_variance_curve_is_the_quadratic_in_lambda():
    c = ex.shaping_variance_curve(_sample(), [0.0, 0.5, 1.0, 2.0])
    assert np.isclose(c.var_shaped.iloc[0], c.var_R.iloc[0])
    lam = c.lam.to_numpy()
    np.testing.assert_allclose(c.var_shaped, c.var_R + lam**2 * c.var_phi + 2 * lam * c.cov_R_phi, atol=1e-12)


def test_estimator_advantages_sequence_and_credit_tables():
    s = _sample()
    adv = ex.estimator_advantages(s, {"grpo": None, "ibpo": None, "ibpo (no mask)": {"estimator": "ibpo",
                                                                                      "token_mask": False}})
    assert set(adv) == {"grpo", "ibpo", "ibpo (no mask)"}
    # IBPO credits only edited tokens of a repaired failure: trajectory 1's last token
    assert adv["ibpo"][1, :2].abs().sum() == 0 and adv["ibpo"][1, 2] != 0
    assert (adv["ibpo (no mask)"][1, :3] == adv["ibpo (no mask)"][1, 0]).all()
    seq = ex.sequence_advantages(s, adv)
    assert list(seq.columns[-3:]) == ["grpo", "ibpo", "ibpo (no mask)"]
    assert np.isclose(seq.loc[0, "grpo"], float(adv["grpo"][0, 0]))
    steps = ex.step_credit_frame(s, adv)
    one = steps[(steps.estimator == "ibpo") & (steps.traj == 1)]
    assert one.correct.tolist() == [True, False] and one.first_error.tolist() == [False, True]
    assert one.advantage.iloc[1] < one.advantage.iloc[0] == 0
    q = ex.credit_summary(s, adv).set_index("estimator")
    assert q.loc["grpo", "auc_within_failed"] == 0.5  # sequence-level credit cannot rank steps within a trajectory
    # trajectory 1 (repaired, blame on its wrong step) ranks perfectly; trajectory 7 has no repair and
    # gets sequence-level credit (0.5): the mean is 0.75
    assert np.isclose(q.loc["ibpo", "auc_within_failed"], 0.75)
    assert q.loc["ibpo", "live_group_share"] > q.loc["grpo", "live_group_share"]  # shaping revives group 1
    with pytest.raises(ValueError, match="empty"):
        ex.estimator_advantages(s, [])


def test_step_credit_frame_skips_unlabelled_and_mismatched():
    labels = [None, [True], [False, False], [True], [True], [False], [False], [True, False]]
    s = _sample(labels=labels)
    steps = ex.step_credit_frame(s, {"grpo": torch.zeros(8, 4)})
    assert 0 not in set(steps.traj) and 1 not in set(steps.traj)  # unlabelled / 1 label for 2 steps
    assert len(steps) == sum(len(x) for i, x in enumerate(labels) if x is not None and i != 1)


def test_group_views_and_divergence_summary():
    v = ex.group_views(_sample(), 0)
    assert v["members"] == [0, 1, 2, 3]
    assert v["token_divergence"][0, 1] == 2 and v["token_divergence"][0, 0] == 4
    assert v["step_divergence"][0, 1] == 1
    d = ex.divergence_summary(v, 0)
    assert d["G"] == 4 and d["trie_nodes"] == v["trie"].n_nodes
    off = v["token_divergence"][~np.eye(4, dtype=bool)]
    assert np.isclose(d["shared_tokens"], off.mean())
    with pytest.raises(ValueError, match="group 7"):
        ex.group_views(_sample(), 7)


def test_pick_trajectory():
    s = _sample()
    assert ex.pick_trajectory(s, "repaired") == 1
    assert ex.pick_trajectory(s, "correct") == 0
    assert ex.pick_trajectory(s, "failed") == 1
    with pytest.raises(ValueError, match="prefer"):
        ex.pick_trajectory(s, "best")


def test_method_variants_read_the_committed_configs():
    v = ex.method_variants(["grpo", "ibpo_k1", "ibpo_no_mask", "gspo"])
    assert v["ibpo_k1"]["repair_k"] == 1 and v["ibpo_k1"]["estimator"] == "ibpo"
    assert v["ibpo_no_mask"]["edit_mask"] is False
    assert v["gspo"]["loss"] == "gspo"
    assert all(set(d) <= set(ex.METHOD_FIELDS) for d in v.values())
    with pytest.raises(ValueError, match="known: "):
        ex.method_variants(["nope"])


def test_grid_configs_and_profiles(monkeypatch):
    cfgs = ex.grid_configs("smoke", {"a": {"estimator": "grpo"}, "b": {"estimator": "ibpo", "lam": 0.0}}, [0, 3])
    assert [(c.label, c.seed) for c in cfgs] == [("a", 0), ("a", 3), ("b", 0), ("b", 3)]
    assert cfgs[2].lam == 0.0 and cfgs[0].task == "synthetic" and cfgs[0].steps == ex.SYNTHETIC_SIZES["smoke"]["steps"]
    with pytest.raises(ValueError, match="variants"):
        ex.grid_configs("smoke", {}, [0])
    won = ex.grid_configs("smoke", {"k2": {"estimator": "ibpo", "repair_k": 2}}, [0], repair_k=3, fixed={"repair_k": 1})
    assert won[0].repair_k == 1  # fixed wins over the variant, the variant over common
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        ex.profile_value("full", 1, 2)
    assert ex.profile_value("smoke", 1, 2) == 1
    with pytest.raises(ValueError, match="profile"):
        ex.require_gpu_for_full("medium")


def test_gsm8k_kwargs_and_cached_model_passthrough(monkeypatch, tmp_path):
    monkeypatch.delenv("IBPO_DATA_DIR", raising=False)
    kw = ex.gsm8k_task_kwargs()
    assert kw["path"].endswith("gsm8k_mini.jsonl")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text("")
    monkeypatch.setenv("IBPO_DATA_DIR", str(tmp_path))
    assert ex.gsm8k_task_kwargs() == {}
    assert ex.gsm8k_task_kwargs("x.jsonl") == {"path": "x.jsonl"}
    assert ex.cached_model("tiny") == "tiny" and ex.cached_model("Qwen/Qwen2.5-1.5B-Instruct").startswith("Qwen")


def _record(label, seed, rewards, experiment="e"):
    from pathlib import Path

    from ibpo_lab.train import RunRecord, presets

    m = pd.DataFrame({"step": range(1, len(rewards) + 1), "reward_mean": rewards, "accuracy": rewards,
                      "entropy": np.linspace(2, 1, len(rewards)), "grad_norm": np.arange(len(rewards), dtype=float),
                      "skipped": 0})
    r = RunRecord(path=Path("/nonexistent"), config=presets("smoke", label=label, seed=seed), metrics=m,
                  eval=pd.DataFrame())
    r.experiment = experiment
    return r


def test_stability_and_final_tables():
    recs = [_record("grpo", 0, [0.1, 0.3, 0.2]), _record("grpo", 1, [0.1, 0.2, 0.4]), _record("ibpo", 0, [0.2, 0.5])]
    st = ex.stability_table(recs).set_index("label")
    assert st.loc["grpo", "n_seeds"] == 2
    assert np.isclose(st.loc["grpo", "final_reward"], 0.3)
    assert np.isclose(st.loc["grpo", "run_to_run_std"], np.std([0.2, 0.4], ddof=1))
    assert np.isclose(st.loc["grpo", "step_jitter"], np.mean([np.mean([0.2, 0.1]), np.mean([0.1, 0.2])]))
    assert np.isnan(st.loc["ibpo", "run_to_run_std"]) and st.loc["ibpo", "grad_norm_max"] == 1.0
    fin = ex.final_table(recs)
    assert set(fin.experiment) == {"e"} and set(fin.label) == {"grpo", "ibpo"}
    with pytest.raises(ValueError, match="empty"):
        ex.stability_table([])


@pytest.mark.slow
def test_one_step_taken_apart_and_a_tiny_grid(tmp_path):
    """Random tiny policy, oracle corrector (needs no correct sibling): the notebooks' whole path."""
    cfg = ex.synthetic_preset("smoke", model="tiny-random", corrector="oracle", group_size=4, prompts_per_step=2,
                              max_new_tokens=16, steps=1, eval_n=2)
    s = ex.sample_groups(cfg, seed=0)
    b = s.batch
    assert len(b) == 8 and b.repair_success is not None and b.edit_masks is not None
    assert len(s.step_labels) == 8 and len(s.repairs) > 0
    i = ex.pick_trajectory(s, "repaired")
    pair = ex.repair_of(s, i)
    assert pair is not None and pair[0] == b.response_ids[i]
    adv = ex.estimator_advantages(s, ["grpo", "ibpo", "prefix_tree"])
    assert all(a.shape == b.response_mask.shape for a in adv.values())
    r = ex.rewrite_comparison(s)
    assert r.credit.tolist() == ["local repair", "full rewrite", "no mask"]
    recs = ex.run_grid([cfg], tmp_path, "exp")
    assert recs[0].experiment == "exp" and not (recs[0].path / "checkpoint").exists()
    assert recs[0].config.save_checkpoints is False  # not written at all, rather than deleted afterwards
    again = ex.load_runs(tmp_path)
    assert [(x.experiment, x.label) for x in again] == [("exp", cfg.name)]
