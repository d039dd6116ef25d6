"""Benchmarks, shared part: the machine stamp, reports (Markdown table + PNG) and small statistics.

Every benchmark returns a :class:`Report` (tables, figure, target checks, notes); :func:`write_report`
writes ``<out>/<name>.md`` and ``<out>/<name>.png`` with a header that says the date, the machine
(nproc, torch threads, ``OMP_WAIT_POLICY``), the command and the git commit, so a table read on its
own says where its numbers came from.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "RESULTS_DIR",
    "REPO_ROOT",
    "Report",
    "Target",
    "setup_env",
    "machine_info",
    "git_commit",
    "command_line",
    "markdown_table",
    "write_report",
    "mean_std",
    "fmt_spread",
    "median_time",
    "tiny_policy_or_random",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def setup_env(threads: int = 2) -> None:
    """The measurement setting the issue's reference figures use: torch on ``threads`` threads, OpenMP
    threads that sleep instead of spinning (on a small shared CPU a spinning pool steals the cores the
    next op needs), no hub access, a non-interactive matplotlib. Call before torch does any work."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, torch threads, OMP_WAIT_POLICY, memory, python/torch/transformers versions, load."""
    import torch
    import transformers

    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        nproc = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = math.nan
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = math.nan
    return {
        "nproc": nproc,
        "cpu": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "memory_gb": round(mem_gb, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_1min_at_start": round(load, 2),
    }


def git_commit() -> str:
    """Short HEAD commit, with ``+dirty`` when tracked files under ``ibpo_lab/`` or ``benchmarks/`` differ
    from it (the code measured is then not exactly the commit named)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "ibpo_lab", "benchmarks")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def command_line() -> str:
    """The command that is running, as a user would type it (``python -m benchmarks.x ...``)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    if spec is not None and spec.name:
        return f"python -m {spec.name} {args}".strip()
    return f"python {' '.join(shlex.quote(a) for a in sys.argv)}".strip()


# ------------------------------------------------------------------------------------------ reports
@dataclass
class Target:
    """One target of the issue: what it says, the measured value and whether it is met."""

    name: str
    goal: str
    value: float
    met: bool
    limit: str = ""  # what limits the number when the target is missed

    def row(self) -> dict[str, Any]:
        return {"target": self.name, "goal": self.goal, "measured": _fmt(self.value),
                "met": "yes" if self.met else ("n/a" if isinstance(self.value, float) and math.isnan(self.value) else "no"),
                "what limits it": self.limit if not self.met else ""}


@dataclass
class Report:
    """What one benchmark found: named tables, one figure, target checks, notes and raw numbers."""

    name: str
    title: str
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    figure: Any = None  # a matplotlib Figure
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)  # sizes and settings of this run
    seconds: float = math.nan

    def table(self, caption: str) -> pd.DataFrame:
        for c, df in self.tables:
            if c == caption:
                return df
        raise ValueError(f"caption: report {self.name!r} has no table {caption!r} (has {[c for c, _ in self.tables]})")


def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        a = abs(v)
        if a != 0 and (a < 1e-3 or a >= 1e6):
            return f"{v:.3g}"
        if a >= 100:
            return f"{v:.0f}"
        return f"{v:.3g}" if a < 1 else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table of ``df`` (index dropped), numbers to 3 significant digits.

    Written here (a dozen lines) rather than ``DataFrame.to_markdown``, which needs ``tabulate``, a
    package ibpo_lab does not otherwise depend on."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def header_lines(report: Report, command: str, machine: dict[str, Any], commit: str, date: str) -> list[str]:
    m = machine
    return [
        f"# {report.title}",
        "",
        f"- date: {date}",
        f"- machine: {m['nproc']} CPU cores ({m['cpu']}), torch threads {m['torch_threads']}, "
        f"OMP_WAIT_POLICY={m['OMP_WAIT_POLICY']}, {m['memory_gb']} GB RAM, 1-min load at start {m['load_1min_at_start']}",
        f"- software: python {m['python']}, torch {m['torch']}, transformers {m['transformers']}",
        f"- command: `{command}`",
        f"- git commit: {commit}",
        f"- wall time: {report.seconds:.0f} s",
    ]


def render_report(report: Report, command: str, machine: dict[str, Any], commit: str, date: str,
                  heading_level: int = 1) -> str:
    """The Markdown text of a report (``heading_level=2`` nests it under a README section)."""
    h = "#" * heading_level
    out = header_lines(report, command, machine, commit, date)
    out[0] = f"{h} {report.title}"
    if report.setup:
        out.append("- setup: " + ", ".join(f"{k}={v}" for k, v in report.setup.items()))
    if report.targets:
        out += ["", f"{h}# Targets", "", markdown_table(pd.DataFrame([t.row() for t in report.targets]))]
    for caption, df in report.tables:
        out += ["", f"{h}# {caption}", "", markdown_table(df)]
    if report.notes:
        out += ["", f"{h}# Notes", ""] + [f"- {n}" for n in report.notes]
    if report.figure is not None:
        out += ["", f"![{report.title}]({report.name}.png)"]
    return "\n".join(out) + "\n"


def write_report(report: Report, out_dir: str | os.PathLike, command: str | None = None) -> Path:
    """Write ``<out_dir>/<name>.md`` (and ``<name>.png`` when the report has a figure); return the .md path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = render_report(report, command or command_line(), machine_info(), git_commit(), date)
    md = out / f"{report.name}.md"
    md.write_text(text)
    if report.figure is not None:
        import matplotlib.pyplot as plt

        report.figure.savefig(out / f"{report.name}.png", dpi=110, bbox_inches="tight")
        plt.close(report.figure)
    return md


# ------------------------------------------------------------------------------------------ statistics
def mean_std(x: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN with fewer than 2 finite values), NaNs ignored."""
    a = np.asarray([v for v in x if v is not None and not (isinstance(v, float) and math.isnan(v))], dtype=float)
    if len(a) == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan


def fmt_spread(x: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` over seeds (``±`` part dropped when there is one value)."""
    m, s = mean_std(x)
    if math.isnan(m):
        return "–"
    if math.isnan(s):
        return f"{m:.{digits}g}"
    return f"{m:.{digits}g} ± {s:.2g}"


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def tiny_policy_or_random(quick: bool) -> tuple[str, str]:
    """(TrainConfig model name, description): the committed tiny checkpoint for real measurements,
    a randomly initialised policy of the same shape for ``--quick`` (and when the checkpoint is missing,
    which the report then says)."""
    from ibpo_lab.models import tiny_policy_dir
    from ibpo_lab.config import RANDOM_TINY

    if quick:
        return RANDOM_TINY, "random-init tiny policy (--quick)"
    if (tiny_policy_dir() / "config.json").is_file():
        return "tiny", f"committed tiny policy ({tiny_policy_dir().relative_to(REPO_ROOT) if tiny_policy_dir().is_relative_to(REPO_ROOT) else tiny_policy_dir()})"
    return RANDOM_TINY, "random-init tiny policy (the committed checkpoint data/tiny-policy/ is missing)"


def cli_main(run: Callable[..., Report], name: str, doc: str, argv: Sequence[str] | None = None,
             extra: Callable[[argparse.ArgumentParser], None] | None = None) -> Report:
    """The command line every benchmark shares: ``python -m benchmarks.NAME [--quick] [--out DIR]``
    (plus ``extra`` options, passed to ``run`` as keywords); writes the report and returns it."""
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long sanity pass with tiny sizes")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    if extra is not None:
        extra(ap)
    kw = vars(ap.parse_args(argv))
    out = kw.pop("out")
    setup_env()
    rep = run(**kw)
    print(write_report(rep, out))
    return rep
