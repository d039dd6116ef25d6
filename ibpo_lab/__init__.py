"""ibpo_lab: a Jupyter-first lab for IBPO (Implicit Behavior Policy Optimization).

Submodules and the everyday functions load lazily, so ``import ibpo_lab`` is cheap and
``ibpo_lab.viz`` / ``ibpo_lab.presets("smoke")`` just work.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "rollout", "steps", "diff", "tasks", "models", "sampling", "correct", "advantages", "losses",
    "config", "step", "runs", "train", "diagnostics", "viz", "reproduce", "warmup", "integrations", "mc_values",
    "registry", "gpu_check",
}

# the functions a notebook reaches for, re-exported from the module that owns each
_EXPORTS = {
    "RolloutBatch": "rollout",
    "get_task": "tasks",
    "list_tasks": "tasks",
    "load_policy": "models",
    "sample": "sampling",
    "get_sampler": "sampling",
    "edit_masks": "diff",
    "split_steps": "steps",
    "compare_and_correct": "correct",
    "CorrectConfig": "correct",
    "get_estimator": "advantages",
    "list_estimators": "advantages",
    "get_loss": "losses",
    "list_losses": "losses",
    "TrainConfig": "config",
    "presets": "config",
    "load_config": "config",
    "build_lab": "step",
    "take_step": "step",
    "train_many": "train",
    "load_run": "runs",
    "load_runs": "runs",
    "evaluate": "train",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"ibpo_lab.{name}")
    if name in _EXPORTS:
        mod = importlib.import_module(f"ibpo_lab.{_EXPORTS[name]}")
        return getattr(mod, name)
    raise AttributeError(f"module 'ibpo_lab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES | set(_EXPORTS))
