"""Command lines: `ibpo-train` / `python -m ibpo_lab.train` take HF-style `--field value` (and keep
`--set k=v`), bare config names resolve to ibpo_lab/configs/, HfArgumentParser reads TrainConfig,
and the console scripts of pyproject.toml point at functions that exist."""

from __future__ import annotations

import importlib

import pytest
import yaml

import ibpo_lab.train as T
from ibpo_lab.config import CONFIG_DIR, TrainConfig, read_yaml

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _printed(capsys, argv) -> dict:
    assert T.main([*argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_field_options_hf_style(capsys):
    d = _printed(capsys, ["ibpo", "--lr", "1e-6", "--estimator_kwargs.lam", "0.3", "--correct.num_references", "3",
                          "--max-new-tokens=40", "--report_to", "tensorboard", "--stop", "A", "B", "--no_save_trajectories",
                          "--bilateral", "--adam_betas", "0.9", "0.95", "--seed", "7"])
    base = read_yaml(CONFIG_DIR / "ibpo.yaml")  # the bare name is the committed config
    assert d["lr"] == 1e-6 and d["correct"]["num_references"] == 3 and d["max_new_tokens"] == 40
    assert d["estimator_kwargs"] == {**base.get("estimator_kwargs", {}), "lam": 0.3}
    assert d["report_to"] == ["tensorboard"] and d["stop"] == ["A", "B"] and d["adam_betas"] == [0.9, 0.95]
    assert d["save_trajectories"] is False and d["bilateral"] is True and d["seed"] == 7
    assert d["estimator"] == base["estimator"]


def test_set_and_field_options_combine_field_options_last(capsys):
    d = _printed(capsys, ["grpo", "--set", "seed=3", "lr=0.5", "--lr", "2e-5", "--stop", "[x, y]"])
    assert d["seed"] == 3 and d["lr"] == 2e-5 and d["stop"] == ["x", "y"] and d["estimator"] == "grpo"


def test_field_option_errors_name_the_field(capsys):
    with pytest.raises(SystemExit):
        T.main(["ibpo", "--nope", "1", "--print-config"])
    assert "unknown field 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main(["ibpo", "--lr", "1", "2", "--print-config"])
    assert "--lr takes one value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main(["ibpo", "--report_to", "mlflow", "--print-config"])
    assert "report_to: unknown tracker" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        T.main(["ibpo", "--correct.nope", "1", "--print-config"])
    assert "unknown field 'nope' of correct" in capsys.readouterr().err


def test_field_overrides_translation():
    assert T.field_overrides(["--lr=1e-6", "--bilateral", "--no_save_checkpoints", "--stop", "a"]) == \
        ["lr=1e-6", "bilateral=true", "save_checkpoints=false", 'stop=["a"]']


def test_help_config_lists_fields(capsys):
    assert T.main(["--help-config"]) == 0
    out = capsys.readouterr().out
    assert "report_to = ['none']" in out and "correct.num_references = 2" in out


def test_hf_argument_parser_reads_the_flat_fields():
    # the nested `correct` and the dict fields are not HfArgumentParser command-line material (it cannot
    # parse a dict from one string); parse_dict/parse_yaml_file take them, and ibpo-train takes
    # --correct.num_references 3 / --estimator_kwargs.lam 0.3
    from transformers import HfArgumentParser

    p = HfArgumentParser(TrainConfig)
    (cfg,) = p.parse_args_into_dataclasses(["--lr", "1e-6", "--estimator", "grpo", "--stop", "a", "b", "--report_to",
                                            "tensorboard", "--adam_betas", "0.9", "0.95", "--no_save_trajectories"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.lr, cfg.estimator, cfg.stop, cfg.report_to, cfg.adam_betas, cfg.save_trajectories) == \
        (1e-6, "grpo", ["a", "b"], ["tensorboard"], [0.9, 0.95], False)
    (cfg,) = p.parse_dict({"lr": 1e-6, "correct": {"num_references": 3}, "estimator_kwargs": {"lam": 0.3}})
    assert cfg.correct.num_references == 3 and cfg.estimator_kwargs == {"lam": 0.3}


def test_console_scripts_point_at_callables():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"ibpo-train", "ibpo-reproduce", "ibpo-gpu-check", "ibpo-warmup", "ibpo-trl", "ibpo-verl"} <= set(scripts)
    for name, target in scripts.items():
        mod, _, fn = target.partition(":")
        assert callable(getattr(importlib.import_module(mod), fn)), name
