"""The paper's claims as measured differences with an interval and a plain verdict.

A notebook measures a claim (IBPO's credit AUC is higher than GRPO's; its gradient variance is lower;
...) as a difference between two arms with a 95% interval, and :func:`verdict` reads the interval:

* ``resolved``: the interval excludes "no effect" on the side the paper claims;
* ``opposite at this size``: it excludes "no effect" on the other side;
* ``not resolved at this size``: it contains "no effect", or there is no interval (fewer than 3
  seeds: a t-interval on two values is not shown as a CI).

Intervals (one home each):

* :func:`paired_difference`: mean of per-seed differences b − a with a Student-t interval over the
  seeds (``runs.mean_ci``) — the seeds are the unit, each is a fresh batch or training run;
* :func:`ratio_interval`: geometric mean of per-seed ratios with the t-interval of the log ratios
  (variance ratios are positive and skewed);
* :func:`bootstrap_difference`: percentile bootstrap over units (groups of one large batch) of a
  statistic computed on the resampled units, for the batch studies that have one batch;
* accuracies themselves: ``runs.proportion_ci`` (Wilson) on the pooled counts (inside [0, 1]).

Each notebook writes its rows with :func:`write_claims` to ``claims.json`` in its ``out_dir``;
``reproduce`` collects every notebook's file into the report's "What this run shows" section.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "CLAIMS_FILE",
    "VERDICTS",
    "verdict",
    "paired_difference",
    "ratio_interval",
    "bootstrap_difference",
    "claim",
    "write_claims",
    "read_claims",
    "claims_frame",
    "size",
    "heldout_accuracy",
    "accuracy_table",
    "compare_runs",
]

CLAIMS_FILE = "claims.json"
VERDICTS = ("resolved", "not resolved at this size", "opposite at this size")
#: the minimum number of paired units (seeds) for a t-interval to be shown
MIN_UNITS = 3


def _finite(*xs: float) -> bool:
    return all(x is not None and not (isinstance(x, float) and math.isnan(x)) for x in xs)


def verdict(lo: float, hi: float, expect: str, null: float = 0.0) -> str:
    """``resolved`` when [lo, hi] lies on the ``expect`` side of ``null`` (``"higher"``: lo > null;
    ``"lower"``: hi < null), ``opposite at this size`` when it lies on the other side, else (or
    without an interval) ``not resolved at this size``."""
    if expect not in ("higher", "lower"):
        raise ValueError(f"expect must be 'higher' or 'lower', got {expect!r}")
    if not _finite(lo, hi):
        return VERDICTS[1]
    above, below = lo > null, hi < null
    if (above and expect == "higher") or (below and expect == "lower"):
        return VERDICTS[0]
    if above or below:
        return VERDICTS[2]
    return VERDICTS[1]


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """(mean of b − a, low, high): per-unit differences (units paired by position, e.g. seeds) with a
    95% Student-t interval; NaN bounds with fewer than :data:`MIN_UNITS` pairs. NaN pairs are dropped."""
    from ibpo_lab.runs import mean_ci

    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} values of a but {len(b)} of b")
    d = [float(y) - float(x) for x, y in zip(a, b) if _finite(float(x), float(y))]
    m, lo, hi = mean_ci(d)
    if len(d) < MIN_UNITS:
        return m, math.nan, math.nan
    return m, lo, hi


def ratio_interval(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """(geometric mean of b / a, low, high): per-unit ratios of positive values, 95% t-interval of the
    log ratios exponentiated; NaN bounds with fewer than :data:`MIN_UNITS` pairs."""
    if len(a) != len(b):
        raise ValueError(f"ratio_interval: {len(a)} values of a but {len(b)} of b")
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if _finite(float(x), float(y))]
    if any(x <= 0 or y <= 0 for x, y in pairs):
        raise ValueError("ratio_interval: values must be > 0")
    m, lo, hi = paired_difference([math.log(x) for x, _ in pairs], [math.log(y) for _, y in pairs])
    return math.exp(m), (math.exp(lo) if _finite(lo) else math.nan), (math.exp(hi) if _finite(hi) else math.nan)


def bootstrap_difference(units: pd.DataFrame, stat: Callable[[pd.DataFrame], float], *, n_boot: int = 2000,
                         seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(stat(units), low, high): percentile bootstrap interval of ``stat`` over the rows of ``units``
    (resampled with replacement, ``n_boot`` times, fixed ``seed``). Use it for one batch whose units
    (groups) are independent; NaN bounds with fewer than 10 units (too few to resample)."""
    est = float(stat(units))
    if len(units) < 10:
        return est, math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(units), size=(n_boot, len(units)))
    vals = np.array([stat(units.iloc[i]) for i in idx], dtype=float)
    vals = vals[np.isfinite(vals)]
    if len(vals) < n_boot // 2:
        return est, math.nan, math.nan
    q = (1 - level) / 2
    return est, float(np.quantile(vals, q)), float(np.quantile(vals, 1 - q))


def size(seeds: int | None = None, prompts: int | None = None, samples: int | None = None, **more: int) -> str:
    """The sample size in words, e.g. ``"4 seeds × 8 prompts × 8 samples"``."""
    parts = [(seeds, "seed"), (prompts, "prompt"), (samples, "sample")] + [(v, k) for k, v in more.items()]
    return " × ".join(f"{int(v)} {k}{'' if int(v) == 1 else 's'}" for v, k in parts if v is not None)


def claim(notebook: str, claim_text: str, measure: str, a: str, b: str, value_a: float, value_b: float,
          estimate: float, lo: float, hi: float, *, expect: str, n: str, interval: str, null: float = 0.0,
          note: str = "") -> dict[str, Any]:
    """One claim row: the paper's ``claim_text``, the ``measure`` compared between arm ``a`` (the
    baseline) and arm ``b``, their values, the ``estimate`` (b − a, or b / a with ``null=1``) with its
    interval [lo, hi] (``interval`` says how it was taken), ``n`` (the sample size in words) and the
    :func:`verdict`."""
    f = lambda x: None if not _finite(x) else float(x)  # noqa: E731  (JSON has no NaN)
    return {"notebook": notebook, "claim": claim_text, "measure": measure, "a": a, "b": b,
            "value_a": f(value_a), "value_b": f(value_b), "estimate": f(estimate), "lo": f(lo), "hi": f(hi),
            "null": float(null), "expect": expect, "n": n, "interval": interval,
            "verdict": verdict(lo, hi, expect, null), "note": note}


def write_claims(rows: Sequence[dict[str, Any]], out_dir: str | Path | None) -> Path | None:
    """Write ``rows`` (:func:`claim`) to ``out_dir/claims.json`` atomically; nothing when ``out_dir`` is None."""
    from ibpo_lab.runs import atomic_write_text

    if out_dir is None:
        return None
    for r in rows:
        if r.get("verdict") not in VERDICTS:
            raise ValueError(f"claim row without a verdict: {r!r}")
    path = Path(out_dir) / CLAIMS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(list(rows), indent=1))
    return path


def read_claims(path: str | Path) -> list[dict[str, Any]]:
    """The rows of one ``claims.json``; a file that is not a list of claim rows → ValueError naming it."""
    p = Path(path)
    try:
        rows = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not JSON ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "verdict" in r for r in rows):
        raise ValueError(f"{p}: expected a list of claim rows with a 'verdict'")
    return rows


def _num(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def claims_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The rows as a display table: claim, measure, the two arms, the estimate with its interval, n,
    verdict."""
    out = []
    for r in rows:
        ratio = r.get("null") == 1.0
        est = f"{r['b']} {'/' if ratio else '−'} {r['a']} = {_num(r['estimate'])}"
        ci = f"[{_num(r['lo'])}, {_num(r['hi'])}]" if r["lo"] is not None else "no interval"
        out.append({"claim": r["claim"], "measure": r["measure"],
                    r"arms (a → b)": f"{r['a']} {_num(r['value_a'])} → {r['b']} {_num(r['value_b'])}",
                    "estimate": est, "95% interval": ci, "interval over": r["interval"], "n": r["n"],
                    "verdict": r["verdict"]})
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------- training runs
def heldout_accuracy(record) -> tuple[float, float]:
    """(avg@k, trials) of a run's last held-out evaluation: trials = prompts × k (NaN, 0 without one)."""
    ev = record.eval
    if ev is None or not len(ev) or "avg@k" not in ev.columns:
        return math.nan, 0.0
    last = ev.iloc[-1]
    return float(last["avg@k"]), float(last.get("n", 0)) * float(last.get("k", 1))


def accuracy_table(records: Sequence) -> pd.DataFrame:
    """One row per (experiment, label): final held-out accuracy pooled over seeds (avg@k weighted by
    prompts × k) with a Wilson 95% interval (inside [0, 1]); ``n`` says seeds × prompts × samples.
    Runs without a held-out evaluation count in ``n_seeds`` but not in the accuracy."""
    from ibpo_lab.runs import proportion_ci

    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        acc, trials = heldout_accuracy(r)
        row = rows.setdefault((r.experiment, r.label), {"experiment": r.experiment, "label": r.label, "n_seeds": 0,
                                                         "succ": 0.0, "trials": 0.0, "per_seed": [], "shape": None})
        row["n_seeds"] += 1
        if trials:
            row["succ"] += acc * trials
            row["trials"] += trials
            row["per_seed"].append(round(acc, 3))
            last = r.eval.iloc[-1]
            row["shape"] = (int(last.get("n", 0)), int(last.get("k", 1)))
    out = []
    for row in rows.values():
        p, lo, hi = proportion_ci(row["succ"], row["trials"]) if row["trials"] else (math.nan,) * 3
        n = size(row["n_seeds"], *(row["shape"] or (None, None))) if row["shape"] else size(row["n_seeds"])
        out.append({"experiment": row["experiment"], "label": row["label"], "n": n, "heldout_accuracy": p,
                    "wilson_lo": lo, "wilson_hi": hi, "per_seed": row["per_seed"]})
    return pd.DataFrame(out, columns=["experiment", "label", "n", "heldout_accuracy", "wilson_lo", "wilson_hi",
                                      "per_seed"])


def compare_runs(records: Sequence, a: str, b: str, notebook: str, claim_text: str) -> list[dict[str, Any]]:
    """Two claim rows for arms ``a`` (baseline) and ``b`` of the same training grid, paired by seed:
    the final held-out accuracy (avg@k) and the mean training accuracy over all steps (the area under
    the learning curve: sample efficiency). Differences b − a with a t-interval over the seeds both
    arms ran (no interval with fewer than 3)."""
    by = {(r.label, r.config.seed): r for r in records}
    seeds = sorted(s for (lab, s) in by if lab == a and (b, s) in by)
    out = []
    if not seeds:
        return out
    ra, rb = [by[(a, s)] for s in seeds], [by[(b, s)] for s in seeds]
    ev = [heldout_accuracy(r) for r in ra + rb]
    shape = next((r.eval.iloc[-1] for r in ra if r.eval is not None and len(r.eval)), None)
    n_eval = size(len(seeds), int(shape["n"]), int(shape["k"])) if shape is not None else size(len(seeds))
    xa, xb = [v for v, _ in ev[:len(seeds)]], [v for v, _ in ev[len(seeds):]]
    d, lo, hi = paired_difference(xa, xb)
    out.append(claim(notebook, claim_text, "held-out accuracy (avg@k) at the end", a, b, float(np.nanmean(xa)),
                     float(np.nanmean(xb)), d, lo, hi, expect="higher", n=n_eval + " (held-out)",
                     interval=f"t over {len(seeds)} seeds (paired)"))
    cfg = ra[0].config
    xa = [float(r.metrics["accuracy"].mean()) for r in ra]
    xb = [float(r.metrics["accuracy"].mean()) for r in rb]
    d, lo, hi = paired_difference(xa, xb)
    out.append(claim(notebook, claim_text, f"training accuracy, mean over the {len(ra[0].metrics)} steps", a, b,
                     float(np.mean(xa)), float(np.mean(xb)), d, lo, hi, expect="higher",
                     n=size(len(seeds), cfg.prompts_per_step, cfg.group_size, step=len(ra[0].metrics)),
                     interval=f"t over {len(seeds)} seeds (paired)"))
    return out
