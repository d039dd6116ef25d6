"""Benchmark 2 — sample efficiency and stability: learning curves of GRPO, Dr. GRPO, RLOO, prefix-tree,
IBPO (and IBPO under its earlier rules), GSPO and IBPO-on-GSPO at equal budget (same prompts per step, group size, length limit, learning rate and steps),
several seeds each.

Each run is ``ibpo_lab.train.train`` on the estimator's committed config (``ibpo_lab/configs/``) with the
smoke-sized budget of ``presets("smoke")`` and ``steps`` steps, the committed tiny policy, on the CPU.
Runs alternate estimators within a seed. Every token any sampler call generates is counted (the
policy's attempts, and for IBPO also its repairs), so accuracy is plotted against generated tokens as
well as steps. From the records: training accuracy per step (smoothed over a trailing window),
held-out accuracy after the last step, steps to reach GRPO's final accuracy, run-to-run spread,
and entropy and gradient-norm traces.

    python -m benchmarks.learning             # writes benchmarks/results/learning.{md,png}
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from benchmarks.common import (
    Report,
    Target,
    cli_main,
    fmt_spread,
    mean_std,
    tiny_policy_or_random,
)

NAME = "learning"
#: committed configs trained; besides the estimators: IBPO before issue 12's rule changes (``ibpo_legacy``:
#: sign_rule shaped, φ share), after the sign rule only (``ibpo_phi_share``), and the published backbone
#: (``ibpo_gspo``: IBPO on GSPO with the gated ratio) against its baseline ``gspo``
ESTIMATORS = ("grpo", "dr_grpo", "rloo", "prefix_tree", "ibpo", "ibpo_legacy", "ibpo_phi_share", "gspo", "ibpo_gspo")
#: (method, its baseline) pairs whose steps-to-the-baseline's-final-accuracy ratio is reported
PAIRS = (("ibpo", "grpo"), ("ibpo_legacy", "grpo"), ("ibpo_phi_share", "grpo"), ("ibpo_gspo", "gspo"))
#: the budget fields taken from presets("smoke"); everything else comes from the estimator's own config
BUDGET_FIELDS = ("task", "device", "backend", "prompts_per_step", "group_size", "max_new_tokens", "lr",
                 "max_grad_norm", "ppo_epochs", "minibatch_size", "eval_every", "eval_n", "eval_k", "checkpoint_every")
SMOOTH = 3  # trailing window (steps) of the accuracy curves


class CountingSampler:
    """Wraps a sampler and records every ``sample`` call: (number of prompts, n, tokens generated)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.calls: list[tuple[int, int, int]] = []

    def sample(self, prompts, *args, **kw):
        out = self.inner.sample(prompts, *args, **kw)
        n = kw.get("n", args[0] if args else 1)
        self.calls.append((len(prompts), int(n), int(sum(len(r) for r in out.response_ids))))
        return out

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@contextlib.contextmanager
def counting_samplers() -> Iterator[list[CountingSampler]]:
    """While active, every sampler ``get_sampler`` builds is a :class:`CountingSampler`; yields the
    list of them. The name is replaced where ``ibpo_lab.sampling`` defines it and where
    ``ibpo_lab.step`` (which builds the lab's sampler) imported it."""
    import ibpo_lab.sampling as S
    import ibpo_lab.step as T

    made: list[CountingSampler] = []
    orig = S.get_sampler

    def counting(*a, **kw):
        made.append(CountingSampler(orig(*a, **kw)))
        return made[-1]

    holders = [m for m in (S, T) if getattr(m, "get_sampler", None) is orig]
    for m in holders:
        m.get_sampler = counting
    try:
        yield made
    finally:
        for m in holders:
            m.get_sampler = orig


def tokens_per_step(calls: Sequence[tuple[int, int, int]], prompts_per_step: int, group_size: int,
                    steps: int, eval_shape: tuple[int, int] | None = None) -> list[int]:
    """Generated tokens of each training step from a run's sampler calls, in order.

    calls: (prompts, n, tokens) per call. A call of ``prompts_per_step`` prompts × ``group_size`` starts
    a step; the calls after it (repairs, Monte-Carlo continuations) belong to it, except held-out
    evaluation calls, recognised by their (prompts, n) ``eval_shape``. Calls before the first step
    are left out."""
    starts = [i for i, (p, n, _) in enumerate(calls) if (p, n) == (prompts_per_step, group_size)]
    if len(starts) != steps:
        raise ValueError(f"calls: found {len(starts)} step-sized sampler calls, expected {steps}")
    out = []
    for k, i in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(calls)
        out.append(int(sum(c[2] for c in calls[i:end] if eval_shape is None or (c[0], c[1]) != tuple(eval_shape))))
    return out


def learning_config(estimator: str, model: str, steps: int, seed: int, quick: bool):
    """The estimator's committed config with the smoke budget and ``steps`` steps."""
    from ibpo_lab.config import load_config, presets

    smoke = presets("smoke").to_dict()
    kw = {k: smoke[k] for k in BUDGET_FIELDS}
    kw["correct"] = {"max_new_tokens": smoke["correct"]["max_new_tokens"]}
    # a larger held-out evaluation than the smoke preset's, once per run: the final accuracy is a headline number
    kw.update(model=model, steps=steps, seed=seed, save_trajectories=False, eval_every=0, eval_n=32, eval_k=4)
    if quick:
        kw.update(prompts_per_step=2, group_size=4, max_new_tokens=12, correct={"max_new_tokens": 12, "num_references": 1},
                  minibatch_size=0, eval_n=2, eval_k=2)
    return load_config(estimator).replace(**kw)


def train_runs(estimators: Sequence[str], seeds: Sequence[int], steps: int, model: str, quick: bool,
               root: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train every (seed, estimator), estimators alternating within a seed. -> (metrics: one row per
    step with estimator, seed, step, accuracy, entropy, grad_norm, tokens, cum_tokens, time_step;
    finals: one row per run with the held-out avg@k and the run's wall time)."""
    if root is None:
        with tempfile.TemporaryDirectory(prefix="bench-learning-") as tmp:
            return train_runs(estimators, seeds, steps, model, quick, tmp)
    from ibpo_lab.train import train

    rows, finals = [], []
    for seed in seeds:
        for est in estimators:
            cfg = learning_config(est, model, steps, seed, quick)
            t0 = time.perf_counter()
            with counting_samplers() as made:
                rec = train(cfg, Path(root) / f"{est}-seed{seed}", progress=False)
            wall = time.perf_counter() - t0
            if not made:
                raise RuntimeError("train() built no sampler through get_sampler: the token count cannot be taken")
            calls = [c for s in made for c in s.calls]
            toks = tokens_per_step(calls, cfg.prompts_per_step, cfg.group_size, len(rec.metrics),
                                   eval_shape=(cfg.eval_n, cfg.eval_k))
            m = rec.metrics[["step", "accuracy", "reward_mean", "entropy", "grad_norm", "clip_frac", "time_step"]].copy()
            m["tokens"] = toks
            m["cum_tokens"] = np.cumsum(toks)
            m.insert(0, "seed", seed)
            m.insert(0, "estimator", est)
            rows.append(m)
            ev = rec.eval
            finals.append({"estimator": est, "seed": seed, "wall_s": wall,
                           "eval_avg@k": float(ev["avg@k"].iloc[-1]) if len(ev) else math.nan,
                           "eval_n": int(ev["n"].iloc[-1]) if len(ev) else 0,
                           "eval_k": int(ev["k"].iloc[-1]) if len(ev) else 0})
    return pd.concat(rows, ignore_index=True), pd.DataFrame(finals)


def smoothed(metrics: pd.DataFrame, col: str = "accuracy", window: int = SMOOTH) -> pd.DataFrame:
    """Per (estimator, seed), the trailing ``window``-step mean of ``col`` as ``<col>_smooth``."""
    m = metrics.sort_values(["estimator", "seed", "step"]).copy()
    m[f"{col}_smooth"] = m.groupby(["estimator", "seed"])[col].transform(lambda s: s.rolling(window, min_periods=1).mean())
    return m


def steps_to_reach(curve: pd.Series, level: float) -> float:
    """First step (index of ``curve``) where ``curve >= level``; NaN if never."""
    hit = curve[curve >= level - 1e-12]
    return float(hit.index[0]) if len(hit) else math.nan


def summary(metrics: pd.DataFrame, finals: pd.DataFrame, window: int = SMOOTH) -> tuple[pd.DataFrame, float]:
    """One row per estimator, and GRPO's final accuracy (the level the steps-to-reach column uses):
    final accuracy = mean training accuracy of the last ``window`` steps, per seed."""
    m = smoothed(metrics, window=window)
    last = m.groupby(["estimator", "seed"]).apply(lambda g: g.sort_values("step")["accuracy"].tail(window).mean(),
                                                  include_groups=False)
    mean_curve = m.groupby(["estimator", "step"])["accuracy_smooth"].mean()
    grpo_final = float(last.loc["grpo"].mean()) if "grpo" in last.index.get_level_values(0) else math.nan
    grpo_steps = steps_to_reach(mean_curve.loc["grpo"], grpo_final) if not math.isnan(grpo_final) else math.nan
    rows = []
    for est in dict.fromkeys(metrics["estimator"]):
        g = m[m["estimator"] == est]
        fin = last.loc[est]
        reach = steps_to_reach(mean_curve.loc[est], grpo_final)
        f = finals[finals["estimator"] == est]
        tail = g.groupby("seed").apply(lambda x: x.sort_values("step").tail(window), include_groups=False)
        rows.append({
            "estimator": est,
            "final train acc": fmt_spread(fin.tolist()),
            "held-out avg@k": fmt_spread(f["eval_avg@k"].tolist()),
            "run-to-run std (final acc)": mean_std(fin.tolist())[1],
            "steps to GRPO final": reach,
            "× GRPO steps": reach / grpo_steps if grpo_steps and not math.isnan(reach) else math.nan,
            "tokens to GRPO final (k)": _tokens_at(g, reach) / 1e3,
            "tokens per run (k)": float(g.groupby("seed")["tokens"].sum().mean()) / 1e3,
            "entropy (last steps)": float(tail["entropy"].mean()),
            "grad norm (mean)": float(g["grad_norm"].mean()),
            "grad norm (max)": float(g["grad_norm"].max()),
            "s / step": float(g["time_step"].median()),
        })
    return pd.DataFrame(rows), grpo_final


def pair_table(metrics: pd.DataFrame, window: int = SMOOTH) -> pd.DataFrame:
    """One row per (method, baseline) of :data:`PAIRS` present: the baseline's final accuracy (mean
    of its last ``window`` steps over seeds), the steps each needs to reach it on the seed-averaged
    trailing mean, and their ratio (method / baseline)."""
    m = smoothed(metrics, window=window)
    curve = m.groupby(["estimator", "step"])["accuracy_smooth"].mean()
    present = set(metrics["estimator"])
    rows = []
    for est, base in PAIRS:
        if not {est, base} <= present:
            continue
        b = m[m["estimator"] == base]
        level = float(b.groupby("seed").apply(lambda g: g.sort_values("step")["accuracy"].tail(window).mean(),
                                              include_groups=False).mean())
        s_est, s_base = steps_to_reach(curve.loc[est], level), steps_to_reach(curve.loc[base], level)
        rows.append({"method": est, "baseline": base, "baseline final acc": level, "method steps": s_est,
                     "baseline steps": s_base,
                     "steps ratio": s_est / s_base if s_base and not math.isnan(s_est) else math.nan})
    return pd.DataFrame(rows)


def _mean_of(metrics: pd.DataFrame, est: str, col: str) -> float:
    v = metrics.loc[metrics["estimator"] == est, col]
    return float(v.mean()) if len(v) else math.nan


def _tokens_at(g: pd.DataFrame, step: float) -> float:
    if math.isnan(step):
        return math.nan
    return float(g[g["step"] == int(step)]["cum_tokens"].mean())


def figure(metrics: pd.DataFrame, grpo_final: float, window: int = SMOOTH):
    import matplotlib.pyplot as plt

    m = smoothed(metrics, window=window)
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    colors = plt.get_cmap("tab10")
    for k, est in enumerate(dict.fromkeys(metrics["estimator"])):  # run order, not alphabetical
        g = m[m["estimator"] == est]
        c = colors(k)
        by_step = g.groupby("step")
        mu, sd = by_step["accuracy_smooth"].mean(), by_step["accuracy_smooth"].std().fillna(0)
        axes[0].plot(mu.index, mu, color=c, label=est, lw=2 if est == "ibpo" else 1.2)
        axes[0].fill_between(mu.index, mu - sd, mu + sd, color=c, alpha=0.12)
        tok = by_step["cum_tokens"].mean() / 1e3
        axes[1].plot(tok, mu, color=c, label=est, lw=2 if est == "ibpo" else 1.2)
        axes[2].plot(mu.index, by_step["entropy"].mean(), color=c, label=est)
        axes[3].plot(mu.index, by_step["grad_norm"].mean(), color=c, label=est)
    if not math.isnan(grpo_final):
        for ax in axes[:2]:
            ax.axhline(grpo_final, color="0.5", ls=":", lw=1)
    axes[0].set(xlabel="step", ylabel=f"train accuracy ({window}-step mean)", title="accuracy vs step (± std over seeds)")
    axes[1].set(xlabel="generated tokens (thousands, repairs included)", ylabel="train accuracy", title="accuracy vs tokens")
    axes[2].set(xlabel="step", ylabel="token entropy", title="entropy")
    axes[3].set(xlabel="step", ylabel="gradient norm (before clipping)", title="gradient norm")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def run(quick: bool = False, seeds: Sequence[int] = (0, 1, 2, 3), steps: int | None = None,
        estimators: Sequence[str] = ESTIMATORS, save_runs: str | None = None,
        merge: Sequence[str] | None = None) -> Report:
    """Train and report. ``save_runs``: also pickle the per-step and per-run tables there, so runs of
    different seeds made in separate processes can be reported together with ``merge`` (those files;
    no training then, ``seeds``/``estimators`` come from the files)."""
    t0 = time.perf_counter()
    model, model_desc = tiny_policy_or_random(quick)
    steps = steps or (2 if quick else 25)
    if quick:
        seeds = tuple(seeds)[:2]
    if merge:
        parts = [pd.read_pickle(f) for f in merge]
        metrics = pd.concat([m for m, _ in parts], ignore_index=True)
        finals = pd.concat([f for _, f in parts], ignore_index=True)
        if finals.duplicated(["estimator", "seed"]).any():
            raise ValueError(f"merge: the files {list(merge)} hold the same (estimator, seed) twice")
        seeds = sorted(set(finals["seed"]))
        estimators = list(dict.fromkeys(finals["estimator"]))
        steps = int(metrics["step"].max())
    else:
        metrics, finals = train_runs(estimators, seeds, steps, model, quick)
        if save_runs:
            pd.to_pickle((metrics, finals), save_runs)
    table, grpo_final = summary(metrics, finals)
    cfg = learning_config("ibpo", model, steps, 0, quick)
    rep = Report(name=NAME, title="Sample efficiency and stability: learning curves at equal budget",
                 setup={"policy": model_desc, "steps": steps, "seeds": len(seeds), "prompts/step": cfg.prompts_per_step,
                        "group size": cfg.group_size, "max new tokens": cfg.max_new_tokens, "lr": cfg.lr,
                        "held-out eval": f"{cfg.eval_n} prompts × {cfg.eval_k}"})
    rep.tables.append((f"Per estimator ({len(seeds)} seeds × {steps} steps each)", table))
    pairs = pair_table(metrics)
    if len(pairs):
        rep.tables.append(("Steps to the baseline's final accuracy, method vs its baseline", pairs))
    t = table.set_index("estimator")
    pi = pairs.set_index("method") if len(pairs) else pd.DataFrame()
    if "ibpo_gspo" in pi.index:
        r = float(pi.loc["ibpo_gspo", "steps ratio"])
        rep.targets.append(Target(
            "IBPO-on-GSPO steps to GSPO's final accuracy / GSPO's", "≤ 0.5", r, (not math.isnan(r)) and r <= 0.5,
            f"same budget as the GRPO comparison, GSPO's published clip range 3e-4/4e-4 at lr {cfg.lr:g}: mean clip "
            f"fraction GSPO {_mean_of(metrics, 'gspo', 'clip_frac'):.2f}, IBPO-on-GSPO "
            f"{_mean_of(metrics, 'ibpo_gspo', 'clip_frac'):.2f}; run-to-run std of final accuracy GSPO "
            f"{t.loc['gspo', 'run-to-run std (final acc)']:.2f}, IBPO-on-GSPO "
            f"{t.loc['ibpo_gspo', 'run-to-run std (final acc)']:.2f}"))
    if "ibpo" in t.index and "grpo" in t.index:
        ratio = float(t.loc["ibpo", "× GRPO steps"])
        rep.targets.append(Target(
            "IBPO steps to GRPO's final accuracy / GRPO's", "≤ 0.5", ratio, (not math.isnan(ratio)) and ratio <= 0.5,
            f"{steps} steps × {cfg.batch_size} samples per run on 2 CPU cores: the curves are short and noisy "
            f"(run-to-run std of final accuracy: GRPO {t.loc['grpo', 'run-to-run std (final acc)']:.2f}, "
            f"IBPO {t.loc['ibpo', 'run-to-run std (final acc)']:.2f}), so a step ratio this coarse is not resolved"))
    rep.notes += [
        f"GRPO's final accuracy = its mean training accuracy over the last {SMOOTH} steps, averaged over seeds "
        f"({grpo_final:.3f}); 'steps to GRPO final' is the first step where an estimator's seed-averaged "
        f"{SMOOTH}-step trailing mean reaches it (– = not within the budget)",
        "tokens count everything the sampler generated for training: attempts, plus IBPO's repairs (held-out "
        "evaluation excluded)",
        f"{len(estimators)} estimators × {len(seeds)} seeds × {steps} steps of the smoke preset: "
        f"{finals['wall_s'].sum():.0f} s of training wall time in total"
        + (f", in {len(merge)} processes run side by side and merged" if merge else ""),
    ]
    rep.figure = figure(metrics, grpo_final)
    rep.seconds = time.perf_counter() - t0
    return rep


def main(argv: Sequence[str] | None = None) -> Report:
    def extra(ap):
        ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 25)")

        ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="seeds (default 0 1 2 3)")
        ap.add_argument("--estimators", nargs="+", default=list(ESTIMATORS),
                        help=f"committed configs to train (default: {' '.join(ESTIMATORS)})")
        ap.add_argument("--save-runs", default=None, help="also pickle the run tables to this file (for --merge)")
        ap.add_argument("--merge", nargs="+", default=None, metavar="FILE",
                        help="report the runs of these --save-runs files together (no training)")

    return cli_main(run, "learning", __doc__, argv, extra)


if __name__ == "__main__":
    main()
