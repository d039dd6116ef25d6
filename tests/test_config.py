"""config: TrainConfig validation and YAML (with ``base:``), the nested CorrectConfig, estimator_kwargs
checked against the estimator's signature, presets/profiles, method variants and grids."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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
        (dict(seed=1e23), "seed"),  # an integer float, but beyond torch.manual_seed's range
        (dict(sampler_kwargs={"max_batchsize": 2}), "sampler_kwargs"),
        (dict(task="gsm8k", task_kwargs={"pth": "x.jsonl"}), "task_kwargs"),
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
    # never a silent CPU fallback; bf16 mixed precision; old log-probs from the trainer's own autocast pass
    assert (f.device, f.dtype, f.recompute_logprobs) == ("cuda", "bfloat16", True)
    assert f.sampler_kwargs["recompute_logprobs"] is False
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
    with pytest.raises(RuntimeError, match="CUDA GPU.*Why: torch .* sees no CUDA device: "):
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


@pytest.mark.parametrize("text, match", [
    ("steps: 2\nlr: 1e-4\nsteps: 3\n", r"c.yaml: invalid YAML: .*duplicate key 'steps' \(first at line 1\)"),
    ("estimator_kwargs: {lam: 0.1, lam: 0.2}\n", r"c.yaml: invalid YAML: .*duplicate key 'lam'"),
    ("steps: [2\nlr: 3\n", r"c.yaml: invalid YAML: .*line 1"),
    ("seed: 1.0e+23\n", r"invalid TrainConfig: seed: must be < 2\*\*63"),
])
def test_bad_yaml_files_are_one_error_naming_the_file(tmp_path, text, match):
    """issue 14.5: YAML syntax errors, duplicate keys (PyYAML would keep the last silently), seed=1e23."""
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(tmp_path / "c.yaml")


def test_non_utf8_config_file_is_a_clear_error(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"label: caf\xe9\n")
    with pytest.raises(ValueError, match=r"c.yaml: not UTF-8"):
        load_config(tmp_path / "c.yaml")


def test_task_kwargs_and_splits_are_checked_by_building_the_task():
    """issue 14.1: eval_split, train_split and task_kwargs of a **kwargs task factory (synthetic) are
    checked by building the task (cheap, before any model)."""
    assert config.build_checked_task(TrainConfig(eval_split="test")).name == "synthetic"
    for kw, field in ((dict(eval_split="bogus"), "eval_split"), (dict(train_split="bogus"), "train_split"),
                      (dict(task_kwargs={"n_stepz": 3}), "task_kwargs")):
        with pytest.raises(ValueError, match=rf"invalid TrainConfig: {field}: ") as e:
            config.build_checked_task(TrainConfig(**kw))
        assert list(kw.values())[0].__repr__().strip("{}").split(":")[0].strip("'") in str(e.value)
    config.build_checked_task(TrainConfig(eval_split="bogus", eval_n=0))  # no evaluation: the split is unused


# ======================================================================================== controlled experiments
class _Stop(Exception):
    """Raised by the stand-ins for sampling and training: the notebook's configs are resolved, nothing runs."""


def notebook_configs(name: str, profile: str, monkeypatch) -> list:
    """Every TrainConfig notebook ``name`` builds under ``profile``, read by running its code cells that
    build configs (those calling ``config.``) after its parameters cell, with ``step.sample`` and
    ``train.train_many`` replaced by stand-ins that record their configs and stop the cell."""
    import re

    import ibpo_lab.step
    import ibpo_lab.train

    seen: list = []

    def record_sample(cfg, *a, **k):
        seen.append(cfg)
        raise _Stop

    def record_train(cfgs, *a, **k):
        seen.extend([cfgs] if isinstance(cfgs, TrainConfig) else cfgs)
        raise _Stop

    monkeypatch.setattr(ibpo_lab.step, "sample", record_sample)
    monkeypatch.setattr(ibpo_lab.train, "train_many", record_train)
    src = (Path(__file__).resolve().parent.parent / "notebooks" / f"{name}.py").read_text()
    cells = re.split(r"^# %%.*$", src, flags=re.M)[1:]
    ns: dict = {}
    params = next(c for c in cells if "profile = " in c)
    exec(compile(params, name, "exec"), ns)
    ns["profile"] = profile
    for c in cells:
        if c is params or "config." not in c:
            continue
        try:
            exec(compile(c, name, "exec"), ns)
        except _Stop:
            pass
    return seen


@pytest.mark.parametrize("name, n_runs", [("04_training_synthetic", 65), ("06_siblings_and_repair", 30),
                                                 ("08_sensitivity", 21)])
def test_full_profile_runs_the_controlled_experiments_on_the_real_model(name, n_runs, monkeypatch):
    import re

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    full = notebook_configs(name, "full", monkeypatch)
    assert full, f"{name} built no config under profile=full"
    for cfg in full:  # the real model on a real benchmark, on the GPU path
        assert (cfg.model, cfg.task, cfg.backend, cfg.dtype, cfg.device) == (
            "Qwen/Qwen2.5-1.5B-Instruct", "gsm8k", "vllm", "bfloat16", "cuda"), (name, cfg.label)
    trained = [c for c in full if c.label]  # the fixed-batch study's config has no label
    assert len(trained) == n_runs
    # the notebook states its GPU budget; the cost model's estimate of the runs it trains must fit in it
    stated = float(re.search(r"GPU budget: ≤ (\d+) GPU-hours",
                             (Path(__file__).resolve().parent.parent / "notebooks" / f"{name}.py").read_text()).group(1))
    assert config.gpu_hours(trained) <= stated
    # MATH-format data is the other real benchmark
    assert config.experiment_preset("full", "math").task == "math"
    # the synthetic task stays the CPU testbed
    smoke = notebook_configs(name, "smoke", monkeypatch)
    assert smoke and all((c.model, c.task) == ("tiny", "synthetic") for c in smoke)


def test_experiment_presets_and_the_gpu_hour_arithmetic(monkeypatch):
    with pytest.raises(ValueError, match="task: profile 'smoke' runs the controlled experiments on synthetic"):
        config.experiment_preset("smoke", "gsm8k")
    assert not config.uses_real_model("smoke") and config.uses_real_model("full")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = config.experiment_preset("full", estimator="grpo", eval_n=0)
    # hand-derived: B = 16·8 = 128, T = 512, prompt 200; per step 128·512/20000 + 128·712/30000 + 128·712/90000 + 2
    per_step = 128 * 512 / 20000 + 128 * 712 / 30000 + 128 * 712 / 90000 + 2.0
    assert cfg.steps == 100 and cfg.batch_size == 128
    assert config.gpu_hours([cfg]) == pytest.approx(100 * per_step / 3600)
    # IBPO adds the K = 2 repairs of the failed half, 640 tokens each
    ibpo = cfg.replace(estimator="ibpo")
    assert config.gpu_hours([ibpo]) == pytest.approx(100 * (per_step + 0.5 * 128 * 2 * 640 / 20000) / 3600)
