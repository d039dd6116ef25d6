"""Where a run's scalars go besides ``metrics.jsonl``: ``TrainConfig.report_to`` (TensorBoard, W&B,
trackio), the names and semantics of HF ``TrainingArguments.report_to``.

The JSONL files stay the run's record (``runs.load_run`` reads them); the trackers are a view for
the tools researchers already watch. ``train`` makes one :class:`RunLogger` per run and calls
:meth:`RunLogger.log` once per training step (tags ``train/<metric>``) and once per held-out
evaluation (``eval/<metric>``), with the training step as the global step. Only finite-or-NaN
numbers are sent (strings and lists stay in the JSONL).

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` writing ``<run>/tensorboard/``
  (needs the ``tensorboard`` package); ``tensorboard --logdir runs/`` shows every run.
- ``wandb``: ``wandb.init(project=$WANDB_PROJECT or "ibpo_lab", name=<run folder name>,
  config=<the TrainConfig>, dir=<run>)``; offline unless W&B is configured (``WANDB_MODE``).
- ``trackio``: ``trackio.init(project=$TRACKIO_PROJECT or "ibpo_lab", name=..., config=...)``, local.

The packages are imported only when a run asks for them. :func:`check_report_to` says, before
any model loads, which requested tracker is unknown or not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["REPORTERS", "available_reporters", "check_report_to", "resolve_report_to", "RunLogger"]

#: tracker name -> the module it needs (``none`` and ``all`` are the HF keywords)
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def _installed(module: str) -> bool:
    import sys

    if module in sys.modules:  # also a test's stand-in module
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_reporters() -> list[str]:
    """The trackers whose package is importable here."""
    return [n for n, m in REPORTERS.items() if _installed(m)]


def check_report_to(names: Sequence[str], installed: bool = True) -> None:
    """Raise ValueError naming the field when ``names`` holds an unknown tracker, mixes ``none`` with
    others, or (``installed=True``) asks for a tracker whose package is missing."""
    names = list(names)
    allowed = ["none", "all", *REPORTERS]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"report_to: unknown tracker(s) {unknown} (allowed: {', '.join(allowed)})")
    if ("none" in names or "all" in names) and len(names) > 1:
        raise ValueError(f"report_to: 'none' and 'all' stand alone, got {names}")
    if installed:
        missing = [n for n in names if n in REPORTERS and not _installed(REPORTERS[n])]
        if missing:
            raise ValueError(f"report_to: {missing} requested but not installed (pip install {' '.join(missing)}); "
                             f"installed here: {', '.join(available_reporters()) or 'none'}")


def resolve_report_to(names: Sequence[str]) -> list[str]:
    """The trackers a run writes to: ``[]`` for ``none``/empty, every installed one for ``all``."""
    check_report_to(names)
    names = list(names)
    if not names or names == ["none"]:
        return []
    if names == ["all"]:
        return available_reporters()
    return list(dict.fromkeys(names))


def _scalars(row: Mapping[str, Any], prefix: str) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, str) or v is None:
            continue
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)) or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0):
            out[f"{prefix}/{k}"] = float(v)
    return out


class RunLogger:
    """Sends a run's scalar rows to the ``report_to`` trackers; a no-op with ``none``.

    ``log(row, step, prefix)``: one call per metrics (``prefix="train"``) or eval (``"eval"``) row.
    ``close()`` flushes and ends the trackers' runs (also on ``with`` exit)."""

    def __init__(self, report_to: Sequence[str], run_dir: str | os.PathLike, config: Mapping[str, Any] | None = None,
                 name: str | None = None):
        self.run_dir = Path(run_dir)
        self.names = resolve_report_to(report_to)
        self._tb = self._wandb = self._trackio = None
        # closed at close(), or when the logger is collected / the interpreter exits (a run that raised)
        self._closers: list = []
        self._finalizer = weakref.finalize(self, RunLogger._close_all, self._closers)
        run_name = name or self.run_dir.name
        cfg = dict(config or {})
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            self._closers.append(self._tb.close)
        if "wandb" in self.names:
            wandb = importlib.import_module("wandb")
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "ibpo_lab"), name=run_name, config=cfg,
                                     dir=str(self.run_dir))
            self._closers.append(self._wandb.finish)
        if "trackio" in self.names:
            self._trackio = importlib.import_module("trackio")
            self._trackio.init(project=os.environ.get("TRACKIO_PROJECT", "ibpo_lab"), name=run_name, config=cfg)
            self._closers.append(self._trackio.finish)

    def log(self, row: Mapping[str, Any], step: int, prefix: str = "train") -> None:
        if not self.names:
            return
        vals = _scalars(row, prefix)
        if self._tb is not None:
            for k, v in vals.items():
                self._tb.add_scalar(k, v, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log(vals, step=int(step))
        if self._trackio is not None:
            self._trackio.log({k: (None if math.isnan(v) else v) for k, v in vals.items()}, step=int(step))

    @staticmethod
    def _close_all(handles: list) -> None:
        while handles:
            handles.pop()()

    def close(self) -> None:
        """Flush and end every tracker run (idempotent)."""
        self._finalizer()
        self._tb = self._wandb = self._trackio = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
