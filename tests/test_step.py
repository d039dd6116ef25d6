"""step: the one RL step and its Step object (advantages of several methods on one batch, the
notebooks' credit tables in ``diagnostics``), on hand-made batches (fast) and on a random tiny
policy with the oracle corrector (slow: it samples and trains)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ibpo_lab import config, diagnostics, runs
from ibpo_lab import step as S
from ibpo_lab.config import load_config, presets
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


def _sample(batch=None, labels=None, cfg=None):
    b = batch or _batch()
    cfg = cfg or presets("smoke", estimator="ibpo", estimator_kwargs={"lam": 0.6, "rho": 0.5}, group_size=4)
    labels = labels if labels is not None else [[True, True], [True, False], [False, False], [True], [True],
                                                [False], [False], [True, False]]
    s = S.Step(lab=S.Lab(cfg=cfg, task=None, policy=SimpleNamespace(tokenizer=None), sampler=None), batch=b,
               examples=[None, None])
    s.__dict__["step_labels"] = labels  # the task's labels, without a task
    return s


def test_shaping_moments_decompose_and_covariance_is_negative():
    s = _sample()
    m = diagnostics.shaping_moments(s, lam=0.6, rho=0.5)
    assert list(m.group) == [0, 1, -1]
    np.testing.assert_allclose(m.var_shaped, m.var_decomposed, atol=1e-12)
    g0 = m.iloc[0]
    r = np.array([1, 0, 0, 1.0])
    phi = 0.5 * np.array([0, 1.0, 1.0, 0])  # φ = ρ·1[a revision verified] on failures (the published indicator)
    assert np.isclose(g0.var_R, r.var(ddof=1)) and np.isclose(g0.var_phi, phi.var(ddof=1))
    assert np.isclose(g0.cov_R_phi, np.cov(r, phi)[0, 1]) and g0.cov_R_phi < 0
    assert np.isclose(g0.var_shaped, (r + 0.6 * phi).var(ddof=1))
    assert bool(m.iloc[1].all_failed) and not bool(m.iloc[0].all_failed)
    # pooled = weighted by degrees of freedom (3 each here: a plain mean)
    assert np.isclose(m.iloc[2].var_R, m.iloc[:2].var_R.mean())
    with pytest.raises(ValueError, match="lam"):
        diagnostics.shaping_moments(s, lam=-1)
    with pytest.raises(ValueError, match="repair_success"):
        diagnostics.shaping_moments(s.batch.replace(repair_success=None))


def test_shaping_variance_curve_is_the_quadratic_in_lambda():
    c = diagnostics.shaping_variance_curve(_sample(), [0.0, 0.5, 1.0, 2.0])
    assert np.isclose(c.var_shaped.iloc[0], c.var_R.iloc[0])
    lam = c.lam.to_numpy()
    np.testing.assert_allclose(c.var_shaped, c.var_R + lam**2 * c.var_phi + 2 * lam * c.cov_R_phi, atol=1e-12)


def test_advantages_for_sequence_and_credit_tables():
    s = _sample()
    adv = s.advantages_for({"grpo": None, "ibpo": None,
                            "ibpo (no mask)": {"estimator_kwargs": {"token_mask": False}}})
    assert set(adv) == {"grpo", "ibpo", "ibpo (no mask)"}
    # IBPO credits only edited tokens of a repaired failure: trajectory 1's last token
    assert adv["ibpo"][1, :2].abs().sum() == 0 and adv["ibpo"][1, 2] != 0
    assert (adv["ibpo (no mask)"][1, :3] == adv["ibpo (no mask)"][1, 0]).all()
    seq = diagnostics.sequence_advantages(s, adv)
    assert list(seq.columns[-3:]) == ["grpo", "ibpo", "ibpo (no mask)"]
    assert np.isclose(seq.loc[0, "grpo"], float(adv["grpo"][0, 0]))
    steps = diagnostics.step_credit_frame(s, adv)
    one = steps[(steps.estimator == "ibpo") & (steps.traj == 1)]
    assert one.correct.tolist() == [True, False] and one.first_error.tolist() == [False, True]
    assert one.advantage.iloc[1] < one.advantage.iloc[0] == 0
    q = diagnostics.credit_summary(s, adv).set_index("estimator")
    assert q.loc["grpo", "auc_within_failed"] == 0.5  # sequence-level credit cannot rank steps within a trajectory
    # trajectory 1 (repaired, blame on its wrong step) ranks perfectly; trajectory 7 has no repair and
    # gets sequence-level credit (0.5): the mean is 0.75
    assert np.isclose(q.loc["ibpo", "auc_within_failed"], 0.75)
    assert q.loc["ibpo", "live_group_share"] > q.loc["grpo", "live_group_share"]  # shaping revives group 1
    with pytest.raises(ValueError, match="empty"):
        s.advantages_for([])


def test_step_credit_frame_skips_unlabelled_and_mismatched():
    labels = [None, [True], [False, False], [True], [True], [False], [False], [True, False]]
    s = _sample(labels=labels)
    steps = diagnostics.step_credit_frame(s, {"grpo": torch.zeros(8, 4)})
    assert 0 not in set(steps.traj) and 1 not in set(steps.traj)  # unlabelled / 1 label for 2 steps
    assert len(steps) == sum(len(x) for i, x in enumerate(labels) if x is not None and i != 1)


def test_group_views_and_divergence_summary():
    v = diagnostics.group_views(_sample(), 0)
    assert v["members"] == [0, 1, 2, 3]
    assert v["token_divergence"][0, 1] == 2 and v["token_divergence"][0, 0] == 4
    assert v["step_divergence"][0, 1] == 1
    d = diagnostics.divergence_summary(v, 0)
    assert d["G"] == 4 and d["trie_nodes"] == v["trie"].n_nodes
    off = v["token_divergence"][~np.eye(4, dtype=bool)]
    assert np.isclose(d["shared_tokens"], off.mean())
    with pytest.raises(ValueError, match="group 7"):
        diagnostics.group_views(_sample(), 7)


def test_pick_trajectory():
    s = _sample()
    assert s.pick_trajectory("repaired") == 1
    assert s.pick_trajectory("correct") == 0
    assert s.pick_trajectory("failed") == 1
    with pytest.raises(ValueError, match="prefer"):
        s.pick_trajectory("best")


@pytest.mark.slow
def test_one_step_taken_apart_and_a_tiny_grid(tmp_path):
    """Random tiny policy, oracle corrector (needs no correct sibling): the notebooks' whole path."""
    from ibpo_lab.train import train_many

    cfg = config.synthetic_preset("smoke", model="tiny-random", correct={"operator": "oracle"}, group_size=4,
                                  prompts_per_step=2, max_new_tokens=16, steps=1, eval_n=2)
    s = S.sample(cfg, seed=0)
    b = s.batch
    assert len(b) == 8 and b.repair_success is not None and b.edit_masks is not None
    assert len(s.step_labels) == 8 and len(s.repairs) > 0
    i = s.pick_trajectory("repaired")
    pair = s.repair_of(i)
    assert pair is not None and pair[0] == b.response_ids[i]
    adv = s.advantages_for(["grpo", "ibpo", "prefix_tree"])
    assert all(a.shape == b.response_mask.shape for a in adv.values())
    r = diagnostics.rewrite_comparison(s)
    assert r.credit.tolist() == ["local repair", "full rewrite", "no mask"]
    recs = train_many([cfg], tmp_path, progress=False, experiment="exp", keep_checkpoints=False)
    assert recs[0].experiment == "exp" and not (recs[0].path / "checkpoint").exists()
    assert recs[0].config.save_checkpoints is False  # not written at all, rather than deleted afterwards
    again = runs.load_runs(tmp_path)
    assert [(x.experiment, x.label) for x in again] == [("exp", cfg.name)]


# ----------------------------------------------------------------------------- one code path
@pytest.mark.parametrize("method", ["grpo", "rloo", "dr_grpo", "prefix_tree", "ibpo", "ibpo_no_mask",
                                    "ibpo_no_shaping", "ibpo_k1"])
def test_notebook_advantages_equal_what_train_computes(method):
    """A notebook's per-method advantages on a step are what training computes for that method's
    committed config on the same batch: both go through step.compute_advantages of the config."""
    s = _sample()
    trained = S.compute_advantages(s.batch, load_config(method))  # what train's take_step computes
    shown = s.advantages_for([method])[method]
    torch.testing.assert_close(shown, trained, rtol=0, atol=0)


def test_ablations_change_what_they_say():
    s = _sample()
    adv = s.advantages_for(["ibpo", "ibpo_no_mask", "ibpo_no_shaping"])
    # no mask: a repaired failure's sequence-level advantage on every token; with the mask only on edited ones
    assert (adv["ibpo_no_mask"][1, :3] == adv["ibpo_no_mask"][1, 0]).all() and adv["ibpo_no_mask"][1, 0] != 0
    assert adv["ibpo"][1, :2].abs().sum() == 0
    # no shaping (λ = 0): group 1 is all failed, so nothing is left to centre; with shaping φ revives it
    assert adv["ibpo_no_shaping"][4:].abs().sum() == 0 and adv["ibpo"][4:].abs().sum() > 0


def test_batch_metrics_measure_the_sign_rule():
    """_batch by hand (λ=0.6, ρ=0.5, indicator φ): 19 trained tokens. Group 1 is all failed with one
    repaired member (traj 4, edits its token 1): the shaped rule lifts it above the group mean, so its
    edited token is positive; the safe rule gives it 0. Other failed credited tokens are negative:
    traj 1 (1 edited), traj 2 (1 edited), unrepaired 5, 6, 7 (2 + 1 + 2 tokens)."""
    b = _batch()
    safe = S.batch_metrics(b, S.compute_advantages(b, load_config("ibpo")))
    shaped = S.batch_metrics(b, S.compute_advantages(b, load_config("ibpo_shaped_sign")))
    assert safe["failed_positive_share"] == 0.0 and shaped["failed_positive_share"] == 1 / 8
    # credited: correct trajs 0 and 3 (4 + 3 tokens) + the failed ones above (7; shaped: 8)
    assert safe["active_tokens"] == 14 / 19 and shaped["active_tokens"] == 15 / 19
    # GRPO: only group 0 has signal, and there every token is credited; its failures are all negative
    grpo = S.batch_metrics(b, S.compute_advantages(b, load_config("grpo")))
    assert grpo["active_tokens"] == 12 / 19 and grpo["failed_positive_share"] == 0.0
    assert set(safe) - {k for k in safe if k.startswith(("loss_", "correct_"))} <= set(runs.METRIC_HELP)


def test_step_metrics_carry_the_correctors_stats():
    s = _sample()
    assert not any(k.startswith("correct_") for k in s.metrics())  # no correction on this step
    s.correction = SimpleNamespace(stats={"phi_mean": 0.25, "audit_rejection_share": 0.5, "note": "x",
                                          "flag": True})
    m = s.metrics()
    assert (m["correct_phi_mean"], m["correct_audit_rejection_share"]) == (0.25, 0.5)
    assert "correct_note" not in m and "correct_flag" not in m


def test_train_step_uses_take_step(monkeypatch, tmp_path):
    """train's loop has no phases of its own: every step is step.take_step, and what it trains on is
    the Step's advantage."""
    import ibpo_lab.train as T

    seen = []
    real = T.take_step

    def spy(*a, **kw):
        st = real(*a, **kw)
        seen.append(st)
        return st

    monkeypatch.setattr(T, "take_step", spy)
    cfg = presets("smoke", model="tiny-random", estimator="ibpo", steps=1, prompts_per_step=2, group_size=3,
                  max_new_tokens=6, eval_n=0, correct={"num_references": 1, "operator": "oracle"})
    rec = T.train(cfg, tmp_path / "run", progress=False)
    assert len(seen) == 1
    st = seen[0]
    logged = rec.trajectories(1)
    logged = logged[logged["kind"] == "policy"]
    for i, row in enumerate(logged.itertuples()):
        n = len(row.response_ids)
        np.testing.assert_allclose(row.advantages, st.advantage[i, :n].tolist())
    # and recomputing the ablation on that logged batch is the notebook call
    torch.testing.assert_close(st.advantages_for(["ibpo"])["ibpo"], st.advantage)


def test_variant_config_rules():
    cfg = presets("smoke", estimator="ibpo", estimator_kwargs={"lam": 0.3})
    assert S.variant_config(cfg, "ibpo") is cfg  # the step's own method keeps its settings
    assert S.variant_config(cfg, "ibpo_no_mask").estimator_kwargs == {"lam": 0.6, "rho": 0.5, "token_mask": False}
    g = S.variant_config(cfg, "grpo")
    assert g.estimator == "grpo" and g.estimator_kwargs == {} and g.group_size == cfg.group_size
    assert S.variant_config(cfg, "x", {"estimator_kwargs": {"token_mask": False}}).estimator_kwargs == {
        "lam": 0.3, "token_mask": False}
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        S.variant_config(cfg, "nope")
    # a committed method's estimator/loss settings replace the base run's, not merge into them
    legacy = presets("smoke", label="ibpo_legacy", **config.method_variants(["ibpo_legacy"])["ibpo_legacy"])
    assert legacy.estimator_kwargs.get("sign_rule") == "shaped"
    assert "sign_rule" not in S.variant_config(legacy, "ibpo").estimator_kwargs
    gated = presets("smoke", label="ibpo_gspo", **config.method_variants(["ibpo_gspo"])["ibpo_gspo"])
    assert gated.loss_kwargs == {"gate": "credited"}
    plain = S.variant_config(gated, "gspo")
    assert plain.loss == "gspo" and plain.loss_kwargs == {} and plain.estimator == "grpo"


def test_token_frame_carries_the_methods_advantage():
    s = _sample()
    tf = s.token_frame("ibpo_no_mask")
    adv = s.advantages_for(["ibpo_no_mask"])["ibpo_no_mask"]
    row = tf[(tf.traj == 1) & (tf.pos == 2)].iloc[0]
    assert row.advantage == pytest.approx(float(adv[1, 2])) and row.token_id == 9
    assert len(tf) == sum(len(r) for r in s.batch.response_ids)
