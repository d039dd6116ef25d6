"""Committed configs (ibpo_lab/configs/*.yaml): one per estimator on the synthetic task, plus the IBPO ablations."""

from __future__ import annotations

import pytest
import yaml

from ibpo_lab.advantages import list_estimators
from ibpo_lab.config import CONFIG_DIR, TrainConfig, read_yaml

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
EXPECTED = {
    "grpo", "dr_grpo", "rloo", "prefix_tree", "vineppo", "ibpo", "gspo",
    "ibpo_no_shaping", "ibpo_no_mask", "ibpo_k1", "ibpo_bilateral", "ibpo_splice",
    "ibpo_gspo", "ibpo_legacy", "ibpo_shaped_sign", "ibpo_phi_share", "ibpo_anchors", "ibpo_joint", "ibpo_audit", "ibpo_jrep",
}


def load(name: str) -> TrainConfig:
    return TrainConfig.from_yaml(CONFIG_DIR / f"{name}.yaml")


def test_every_expected_config_is_committed():
    assert {p.stem for p in CONFIGS} == EXPECTED


def test_every_estimator_has_a_config():
    assert set(list_estimators()) <= {load(n).estimator for n in EXPECTED}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_validates_and_round_trips(path):
    raw = read_yaml(path)  # base: followed
    cfg = TrainConfig.from_yaml(path)
    assert cfg.task == "synthetic" and cfg.label == path.stem
    # every key written in the file (or its base) is a real field, kept as written
    d = cfg.to_dict()
    for k, v in raw.items():
        if isinstance(v, dict) and k == "correct":
            assert {kk: d[k][kk] for kk in v} == v, k
        else:
            assert d[k] == pytest.approx(v) if isinstance(v, float) else d[k] == v, k
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    assert cfg.batch_size % (cfg.minibatch_size or cfg.batch_size) == 0


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_ablations_differ_from_ibpo_in_one_knob():
    base = _flat(load("ibpo").to_dict())

    def diff(name):
        d = _flat(load(name).to_dict())
        return {k: d.get(k) for k in set(d) | set(base) if d.get(k) != base.get(k) and k != "label"}

    assert diff("ibpo_no_shaping") == {"estimator_kwargs.lam": 0.0}
    assert diff("ibpo_no_mask") == {"estimator_kwargs.token_mask": False}
    assert diff("ibpo_k1") == {"correct.num_references": 1}
    assert diff("ibpo_bilateral") == {"bilateral": True}
    assert diff("ibpo_splice") == {"correct.operator": "splice"}
    assert diff("ibpo_shaped_sign") == {"estimator_kwargs.sign_rule": "shaped"}
    assert diff("ibpo_phi_share") == {"estimator_kwargs.phi": "share"}
    assert diff("ibpo_legacy") == {"estimator_kwargs.sign_rule": "shaped", "estimator_kwargs.phi": "share"}
    assert diff("ibpo_anchors") == {"estimator_kwargs.anchors_only": True}
    assert diff("ibpo_joint") == {"correct.reference_mode": "joint"}
    assert diff("ibpo_audit") == {"correct.audit_copy": True, "correct.edit_budget": 0.5}  # edit_penalty 1.0 = default
    assert diff("ibpo_jrep") == {"repair_loss_weight": 1.0}


def test_ibpo_gspo_is_ibpo_with_gspos_loss_and_the_gated_ratio():
    i, g, ig = load("ibpo"), load("gspo"), load("ibpo_gspo")
    # the estimator and corrector are IBPO's, the loss settings GSPO's, plus IOP's gate over credited tokens
    assert (ig.estimator, ig.estimator_kwargs, ig.correct) == (i.estimator, i.estimator_kwargs, i.correct)
    assert (ig.loss, ig.clip_low, ig.clip_high, ig.agg) == (g.loss, g.clip_low, g.clip_high, g.agg)
    assert (ig.loss_kwargs, g.loss_kwargs) == ({"gate": "credited"}, {})


def test_configs_inherit_instead_of_repeating():
    # every committed config but the root states only what differs from its base
    for p in CONFIGS:
        raw = yaml.safe_load(p.read_text())
        if p.stem == "grpo":
            assert "base" not in raw
            continue
        assert raw["base"] in ("grpo.yaml", "ibpo.yaml"), p.stem
        # ibpo_gspo: base, label, and GSPO's loss, clips, agg plus the gate
        assert len(raw) <= (7 if p.stem == "ibpo_gspo" else 6), (p.stem, sorted(raw))
    assert load("ibpo").bilateral is False  # IOP bilateral training is off by default for IBPO


def test_gspo_is_grpo_advantages_with_the_gspo_loss():
    g, s = load("grpo"), load("gspo")
    assert (s.estimator, s.loss, g.loss) == ("grpo", "gspo", "ppo")
