"""Integrations: IBPO's compare-and-correct and edit-masked advantages inside TRL and verl.

Neither engine is a dependency of ibpo_lab; each adapter is a submodule that imports its engine:

* ``ibpo_lab.integrations.trl`` — :class:`IBPOTrainer` (a TRL ``GRPOTrainer``) and
  :class:`IBPOConfig`; needs ``pip install 'ibpo_lab[trl]'``. Multi-GPU with
  ``accelerate launch -m ibpo_lab.integrations.trl --config ...``.
* ``ibpo_lab.integrations.verl`` — registers an ``ibpo`` advantage estimator in verl's registry
  (when verl is importable) and provides the driver-side hook that attaches repair info to a
  verl batch; works without verl for testing.

Both call the same functions as ibpo_lab's own trainer (``correct.compare_and_correct`` and
``advantages.get_estimator("ibpo")``): there is no second implementation of the method.
Recipes (configs + launch scripts) live in ``ibpo_lab/integrations/recipes/``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RECIPES_DIR"]

#: folder of the shipped recipes (TRL/accelerate configs, verl config + launch script)
RECIPES_DIR: Path = Path(__file__).resolve().parent / "recipes"
