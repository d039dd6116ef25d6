"""config: TrainConfig validation and YAML (with ``base:``), the nested CorrectConfig, estimator_kwargs
checked against the estimator's signature, presets/profiles, method variants and grids."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ibpo_lab import config
from ibpo_lab.config import CONFIG_DIR, TrainConfig, load_config, presets, read_yaml
from ibpo_lab.correct import CorrectConfig


def test_yaml_round_trip(tmp_path):
    cfg = TrainConfig(label="x", estimator="ibpo", estimator_kwargs={"lam": 0.3}, task_kwargs={"n_steps": 3},
                      stop=["\n\n"], adam_betas=[0.8, 0.9], lr=2e-5, minibatch_size=8,
                      correct={"operator": "splice", "num_references": 3, "truncate_k": 4})
    text = cfg.to_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == cfg
    assert TrainConfig.from_yaml(text) == cfg
    assert isinstance(cfg.correct, CorrectConfig) and cfg.correct.truncate_k == 4
    # YAML 1.1 reads 1e-5 as a string: the config coerces it to the field's type
    assert TrainConfig.from_yaml("lr: 1e-5\nsteps: '3'\n").lr == pytest.approx(1e-5)


def test_every_field_has_help_including_every_correct_field():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
    text = TrainConfig.help()
    for f in dataclasses.fields(CorrectConfig):  # a new CorrectConfig field is a config field with its help
        assert f"correct.{f.name} = " in text, f.name
        assert f.metadata["help"] in text


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(estimator="ppo2"), "estimator"),
        (dict(estimator="ibpo", correct={"num_references": 8}, group_size=8), "correct.num_references"),
        (dict(estimator="ibpo", estimator_kwargs={"lam": -0.1}), "lam"),
        (dict(estimator="grpo", estimator_kwargs={"lam": 0.5}), "estimator_kwargs"),
        (dict(correct={"operator": "magic"}), "correct.operator"),
        (dict(correct={"num_refs": 2}), "correct"),
        (dict(prompts_per_step=3, group_size=4, minibatch_size=5), "minibatch_size"),
        (dict(task=""), "task"),
        (dict(task=None), "task"),
        (dict(task="no-such-task"), "task"),
        (dict(loss="dpo"), "loss"),
        (dict(device="tpu"), "device"),
        (dict(group_size=1), "group_size"),
        (dict(seed="abc"), "seed"),
        (dict(bilateral=True, estimator="grpo"), "bilateral"),
        (dict(agg="mean"), "agg"),
        (dict(save_checkpoints=False, checkpoint_every=2), "checkpoint_every"),
        (dict(save_checkpoints="maybe"), "save_checkpoints"),
        (dict(loss="gspo", loss_kwargs={"gate": "tokens"}), "gate"),
        (dict(loss="ppo", loss_kwargs={"gate": "credited"}), "loss_kwargs"),
        (dict(loss="gspo", loss_kwargs={"clip_low": 0.1}), "loss_kwargs"),
    ],
)
def test_invalid_config_raises_one_error_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=r"invalid TrainConfig: ") as e:
        TrainConfig(**kw)
    assert field in str(e.value)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "prefix_tree", "vineppo", "ibpo"])
def test_the_probe_batch_passes_every_estimator_with_its_defaults(estimator):
    # the value check runs the estimator on a probe batch: it must not fail on good settings
    config.check_estimator_kwargs(estimator, {"const_tol": 1e-9} if estimator != "vineppo" else {"value_tol": 1e-6})


def test_estimator_kwargs_are_checked_against_the_signature():
    assert config.estimator_kwargs("ibpo", {"lam": 0.1, "token_mask": False}) == {"lam": 0.1, "token_mask": False}
    with pytest.raises(ValueError, match=r"\['lamda'\] are not arguments of estimator 'ibpo' \(accepted: lam, rho"):
        config.estimator_kwargs("ibpo", {"lamda": 0.1})


def test_loss_kwargs_are_checked_against_the_signature():
    assert config.loss_kwargs("gspo", {"gate": "credited"}) == {"gate": "credited"}
    with pytest.raises(ValueError, match=r"\['gate'\] are not arguments of loss 'ppo' \(accepted: none\)"):
        config.loss_kwargs("ppo", {"gate": "mask"})
    with pytest.raises(ValueError, match=r"accepted: gate\)"):
        config.loss_kwargs("gspo", {"gat": "mask"})
    # arguments with their own field (or the trainer's tensors) have one home only
    with pytest.raises(ValueError, match=r"\['agg', 'clip_high'\] are set by their own TrainConfig fields"):
        config.loss_kwargs("gspo", {"clip_high": 0.1, "agg": "token-mean"})


def test_unknown_and_renamed_yaml_fields_are_errors():
    with pytest.raises(ValueError, match="unknown field.*'lamda'"):
        TrainConfig.from_yaml("lamda: 0.5\nsteps: 2\n")
    with pytest.raises(ValueError, match=r"renamed: \{'repair_k': 'correct.num_references'\}"):
        TrainConfig.from_yaml("repair_k: 2\n")


def test_num_references_only_limited_for_correcting_estimators():
    TrainConfig(estimator="grpo", group_size=2, correct={"num_references": 5})  # no corrector runs: K is unused
    with pytest.raises(ValueError, match="correct.num_references"):
        TrainConfig(estimator="ibpo", group_size=2, correct={"num_references": 2})


def test_correct_rho_follows_the_estimator():
    assert TrainConfig(estimator="ibpo", estimator_kwargs={"rho": 0.25}).correct.rho == 0.25
    assert TrainConfig(estimator="ibpo").correct.rho == 0.5  # the ibpo estimator's default ρ


def test_overrides_parse_yaml_values_and_nested_keys():
    cfg = TrainConfig().with_overrides(["steps=3", "lr=1e-4", "task_kwargs.n_steps=3", "stop=['\\n\\n']",
                                        "bilateral=true", "correct.num_references=3", "estimator_kwargs.lam=0.2"])
    assert (cfg.steps, cfg.lr, cfg.task_kwargs, cfg.bilateral) == (3, 1e-4, {"n_steps": 3}, True)
    assert cfg.correct.num_references == 3 and cfg.estimator_kwargs == {"lam": 0.2}
    with pytest.raises(ValueError, match="unknown field 'stepz'"):
        TrainConfig().with_overrides(["stepz=3"])
    with pytest.raises(ValueError, match="unknown field 'num_refs' of correct"):
        TrainConfig().with_overrides(["correct.num_refs=3"])


def test_replace_merges_mappings_and_resets_kwargs_of_a_new_estimator():
    cfg = TrainConfig(estimator="ibpo", estimator_kwargs={"lam": 0.3}, correct={"num_references": 3})
    r = cfg.replace(correct={"operator": "splice"}, estimator_kwargs={"rho": 1.0})
    assert (r.correct.operator, r.correct.num_references) == ("splice", 3)
    assert r.estimator_kwargs == {"lam": 0.3, "rho": 1.0}
    assert cfg.replace(estimator="grpo").estimator_kwargs == {}
    g = TrainConfig(loss="gspo", loss_kwargs={"gate": "credited"})
    assert g.replace(loss="ppo").loss_kwargs == {}  # gspo's gate does not carry over to ppo
    assert g.replace(lr=1e-3).loss_kwargs == {"gate": "credited"}


def test_base_inheritance(tmp_path):
    (tmp_path / "a.yaml").write_text("steps: 7\nestimator: ibpo\nestimator_kwargs: {lam: 0.3, rho: 0.5}\n"
                                     "correct: {num_references: 3}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nestimator_kwargs: {lam: 0.0}\ncorrect: {operator: splice}\n")
    cfg = TrainConfig.from_yaml(tmp_path / "b.yaml")
    assert cfg.steps == 7 and cfg.estimator_kwargs == {"lam": 0.0, "rho": 0.5}
    assert (cfg.correct.operator, cfg.correct.num_references) == ("splice", 3)
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ValueError, match="loops"):
        read_yaml(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="does not exist"):
        read_yaml(tmp_path / "nope.yaml")


def test_load_config_by_name_path_or_profile():
    assert load_config("ibpo") == TrainConfig.from_yaml(CONFIG_DIR / "ibpo.yaml")
    assert load_config("smoke") == presets("smoke")


def test_presets():
    s = presets("smoke", estimator="grpo", seed=3)
    assert (s.estimator, s.seed, s.device) == ("grpo", 3, "cpu")
    assert s.steps * s.batch_size <= 6 * 4 * 8 and s.model == "tiny"
    assert s.minibatch_size == s.batch_size // 2
    assert presets("smoke", group_size=5, prompts_per_step=3).minibatch_size == 0  # 15 does not split in 2
    assert presets("smoke", minibatch_size=8).minibatch_size == 8
    f = presets("full")
    assert f.backend == "vllm" and f.task == "gsm8k" and f.minibatch_size * 4 == f.batch_size
    assert f.correct.max_new_tokens == 640 and presets("smoke", correct={"truncate_k": 2}).correct.max_new_tokens == 48
    with pytest.raises(ValueError, match="profile"):
        presets("huge")


def test_adding_a_profile_is_one_table_row(monkeypatch):
    row = {**config.PROFILES["smoke"], "preset": {**config.PROFILES["smoke"]["preset"], "steps": 2}}
    monkeypatch.setitem(config.PROFILES, "cpu", row)
    assert presets("cpu").steps == 2
    assert config.profile_value("cpu", "s", "f") == "s"
    assert config.synthetic_preset("cpu").steps == row["synthetic"]["steps"]


def test_method_variants_read_the_committed_configs():
    v = config.method_variants(["grpo", "ibpo_k1", "ibpo_no_mask", "gspo"])
    assert v["ibpo_k1"]["correct"]["num_references"] == 1 and v["ibpo_k1"]["estimator"] == "ibpo"
    assert v["ibpo_no_mask"]["estimator_kwargs"] == {"lam": 0.6, "rho": 0.5, "token_mask": False}
    assert v["gspo"]["loss"] == "gspo" and v["gspo"]["loss_kwargs"] == {}
    assert all(set(d) <= set(config.METHOD_FIELDS) for d in v.values())
    with pytest.raises(ValueError, match="known: "):
        config.method_variants(["nope"])


def test_grid_configs_and_profiles(monkeypatch):
    cfgs = config.grid_configs("smoke", {"a": {"estimator": "grpo"},
                                         "b": {"estimator": "ibpo", "estimator_kwargs": {"lam": 0.0}}}, [0, 3])
    assert [(c.label, c.seed) for c in cfgs] == [("a", 0), ("a", 3), ("b", 0), ("b", 3)]
    assert cfgs[2].estimator_kwargs == {"lam": 0.0} and cfgs[0].task == "synthetic"
    assert cfgs[0].steps == config.PROFILES["smoke"]["synthetic"]["steps"]
    with pytest.raises(ValueError, match="variants"):
        config.grid_configs("smoke", {}, [0])
    won = config.grid_configs("smoke", {"k2": {"estimator": "ibpo", "correct": {"num_references": 2}}}, [0],
                              correct={"num_references": 3, "operator": "splice"},
                              fixed={"correct": {"num_references": 1}})
    # fixed wins over the variant, the variant over common; the rest of common's correct stays
    assert (won[0].correct.num_references, won[0].correct.operator) == (1, "splice")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        config.profile_value("full", 1, 2)
    assert config.profile_value("smoke", 1, 2) == 1
    with pytest.raises(ValueError, match="profile"):
        config.require_gpu_for_full("medium")


def test_gsm8k_kwargs(monkeypatch, tmp_path):
    monkeypatch.delenv("IBPO_DATA_DIR", raising=False)
    assert config.gsm8k_task_kwargs()["path"].endswith("gsm8k_mini.jsonl")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text("")
    monkeypatch.setenv("IBPO_DATA_DIR", str(tmp_path))
    assert config.gsm8k_task_kwargs() == {}
    assert config.gsm8k_task_kwargs("x.jsonl") == {"path": "x.jsonl"}
