"""Committed configs (ibpo_lab/configs/*.yaml): one per estimator on the synthetic task, plus the IBPO ablations."""

from __future__ import annotations

import pytest
import yaml

from ibpo_lab.advantages import list_estimators
from ibpo_lab.train import CONFIG_DIR, TrainConfig

CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
EXPECTED = {
    "grpo", "dr_grpo", "rloo", "prefix_tree", "vineppo", "ibpo", "gspo",
    "ibpo_no_shaping", "ibpo_no_mask", "ibpo_k1", "ibpo_bilateral", "ibpo_splice",
}


def load(name: str) -> TrainConfig:
    return TrainConfig.from_yaml(CONFIG_DIR / f"{name}.yaml")


def test_every_expected_config_is_committed():
    assert {p.stem for p in CONFIGS} == EXPECTED


def test_every_estimator_has_a_config():
    assert set(list_estimators()) <= {load(n).estimator for n in EXPECTED}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_validates_and_round_trips(path):
    raw = yaml.safe_load(path.read_text())
    cfg = TrainConfig.from_yaml(path)
    assert cfg.task == "synthetic" and cfg.label == path.stem
    # every key written in the file is a real field, kept as written
    for k, v in raw.items():
        assert getattr(cfg, k) == pytest.approx(v) if isinstance(v, float) else getattr(cfg, k) == v, k
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    assert cfg.batch_size % (cfg.minibatch_size or cfg.batch_size) == 0


def test_ablations_differ_from_ibpo_in_one_knob():
    base = load("ibpo").to_dict()

    def diff(name):
        d = load(name).to_dict()
        return {k: d[k] for k in d if d[k] != base[k] and k != "label"}

    assert diff("ibpo_no_shaping") == {"lam": 0.0}
    assert diff("ibpo_no_mask") == {"edit_mask": False}
    assert diff("ibpo_k1") == {"repair_k": 1}
    assert diff("ibpo_bilateral") == {"bilateral": True}
    assert diff("ibpo_splice") == {"corrector": "splice"}
    assert load("ibpo").bilateral is False  # IOP bilateral training is off by default for IBPO


def test_gspo_is_grpo_advantages_with_the_gspo_loss():
    g, s = load("grpo"), load("gspo")
    assert (s.estimator, s.loss, g.loss) == ("grpo", "gspo", "ppo")
