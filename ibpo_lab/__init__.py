"""ibpo_lab: a Jupyter-first lab for IBPO (Implicit Behavior Policy Optimization).

Submodules load lazily, so ``import ibpo_lab`` is cheap and ``ibpo_lab.viz`` just works.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "rollout", "steps", "diff", "tasks", "models", "sampling", "correct", "advantages", "losses",
    "train", "diagnostics", "viz", "reproduce", "warmup", "integrations", "demo", "presets",
}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"ibpo_lab.{name}")
    raise AttributeError(f"module 'ibpo_lab' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
