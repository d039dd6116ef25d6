"""Benchmark 1 — credit quality and gradient variance of every advantage estimator, on the synthetic
task from the committed tiny policy.

Credit quality: per seed, one step of the fixed prompts (G samples each) is taken with the step
training takes (``ibpo_lab.step.take_step``: sample → score + step spans → compare-and-correct →
Monte-Carlo step values), then every estimator's advantages are scored against the task's exact step labels with
``diagnostics.batch_credit_quality`` (AUC of step advantage separating correct from wrong steps, and
first-error localisation on failed trajectories). IBPO with oracle repairs is added as the ceiling
of edit-masked credit (perfect minimal repairs).

Gradient variance: per seed, ``diagnostics.gradient_variance`` over R independent resamples of the
same prompts, every estimator's policy gradient on the same samples: relative variance
tr Cov(g) / ‖E g‖² and mean cosine to the mean gradient. Spread = std over seeds.

    python -m benchmarks.credit               # writes benchmarks/results/credit.{md,png}
    python -m benchmarks.credit --policy runs/ibpo_jrep --out /tmp/credit   # a trained run's policy
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from benchmarks.common import (
    Report,
    Target,
    cli_main,
    fmt_spread,
    mean_std,
    tiny_policy_or_random,
)

NAME = "credit"
#: IBPO's rule changes of issue 12, as committed configs: ``ibpo_legacy`` = the old rules (sign_rule
#: shaped, φ share), ``ibpo_phi_share`` = the sign-safe rule with the old φ, ``ibpo`` = sign-safe with the
#: published indicator φ (the default); ``ibpo_shaped_sign`` = the old sign rule with the indicator φ
IBPO_VARIANTS = ("ibpo_legacy", "ibpo_phi_share", "ibpo_shaped_sign")
ESTIMATORS = ("grpo", "dr_grpo", "rloo", "prefix_tree", "vineppo", "ibpo", *IBPO_VARIANTS)
ORACLE = "ibpo (oracle repairs)"
#: what each IBPO row is (estimator_kwargs that differ from the default ibpo config)
IBPO_RULES = {
    "ibpo_legacy": "sign_rule shaped, φ share (before issue 12)",
    "ibpo_phi_share": "sign_rule safe, φ share (after the sign rule)",
    "ibpo": "sign_rule safe, φ indicator (after both: the default)",
    "ibpo_shaped_sign": "sign_rule shaped, φ indicator",
}


def estimator_config(name: str, base: dict[str, Any]):
    """The committed config of an estimator (``ibpo_lab.config.load_config``: its estimator_kwargs,
    corrector, K for VinePPO...) with the benchmark's shared sizes ``base``."""
    from ibpo_lab.config import load_config

    return load_config(name).replace(**base)


def prepared_step(lab, examples, seed: int):
    """One ``step.take_step`` with everything any estimator reads: rewards, step spans, policy repairs
    (IBPO) and Monte-Carlo step values (VinePPO), plus the same batch re-corrected by the oracle.
    -> (step, oracle_step)."""
    from ibpo_lab.step import take_step

    st = take_step(lab, examples, seed=seed, correct=True, values=True, correct_seed=seed + 2, values_seed=seed + 1)
    return st, st.recorrect(correct={"operator": "oracle"}, seed=seed + 3)


def _lab(policy, task, cfg):
    from ibpo_lab.step import build_lab

    return build_lab(cfg, policy=policy, task=task)


def credit_rows(policy, task, examples, base: dict[str, Any], seeds: Sequence[int],
                estimators: Sequence[str] = ESTIMATORS) -> pd.DataFrame:
    """One row per (seed, estimator): the ``batch_credit_quality`` numbers and the batch accuracy. Every
    estimator's advantages come from ``Step.advantages_for`` (the code training runs) on one step."""
    from ibpo_lab.advantages import failed_positive_share
    from ibpo_lab.diagnostics import batch_credit_quality
    from ibpo_lab.step import step_seed

    lab = _lab(policy, task, estimator_config("ibpo", {**base, "mc_rollouts": estimator_config("vineppo", base).mc_rollouts}))
    rows = []
    for s in seeds:
        st, oracle = prepared_step(lab, examples, seed=step_seed(s, 0, 7))
        advs = {**st.advantages_for(list(estimators)), ORACLE: oracle.advantage}
        exs = dict(enumerate(examples))
        for name, adv in advs.items():
            b = oracle.batch if name == ORACLE else st.batch
            q = batch_credit_quality(b, adv, task, exs)
            rows.append({"seed": s, "estimator": name, **q, "accuracy": float((b.rewards >= 1).float().mean()),
                         "failed_positive_share": failed_positive_share(adv, b.rewards, b.response_mask),
                         "repair_success": float(b.repair_success[b.rewards < 1].mean())
                         if b.repair_success is not None and bool((b.rewards < 1).any()) else math.nan})
    return pd.DataFrame(rows)


def variance_rows(policy, task, examples, base: dict[str, Any], seeds: Sequence[int], resamples: int,
                  estimators: Sequence[str] = ESTIMATORS) -> pd.DataFrame:
    """One row per (seed, estimator): ``diagnostics.gradient_variance`` over ``resamples`` resamples."""
    from ibpo_lab.diagnostics import gradient_variance
    from ibpo_lab.step import step_seed

    lab = _lab(policy, task, estimator_config("ibpo", {**base, "mc_rollouts": estimator_config("vineppo", base).mc_rollouts}))
    out = []
    for s in seeds:
        df = gradient_variance(lab, examples, estimators=list(estimators), resamples=resamples,
                               seed=step_seed(s, 0, 8) % 2**31, progress=False)
        df.insert(0, "seed", s)
        out.append(df)
    return pd.concat(out, ignore_index=True)


def summarise(credit: pd.DataFrame, var: pd.DataFrame) -> pd.DataFrame:
    """One row per estimator: mean ± std over seeds of each measure."""
    rows = []
    names = list(dict.fromkeys(list(credit["estimator"]) + list(var["estimator"])))
    for name in names:
        c = credit[credit["estimator"] == name]
        v = var[var["estimator"] == name]
        rows.append({
            "estimator": name,
            "credit AUC": fmt_spread(c["auc"]),
            "AUC within failed": fmt_spread(c["auc_within_failed"]),
            "first-error localisation": fmt_spread(c["first_error_localisation"]),
            "blame on wrong steps": fmt_spread(c["wrong_step_credit_share"]),
            "grad rel. variance": fmt_spread(v["rel_var"]) if len(v) else "–",
            "cos to mean grad": fmt_spread(v["mean_cos"]) if len(v) else "–",
            "active tokens": fmt_spread(v["token_share"]) if len(v) else "–",
            "failed tokens credited +": fmt_spread(c["failed_positive_share"].dropna()),
        })
    return pd.DataFrame(rows)


def rule_table(credit: pd.DataFrame, var: pd.DataFrame) -> pd.DataFrame:
    """One row per IBPO rule variant (:data:`IBPO_RULES`): credit AUC, first-error localisation, the
    share of failed trajectories' credited tokens with positive advantage, and the gradient relative
    variance over GRPO's (ratio of the seed means, as the target)."""
    g = mean_std(var.loc[var["estimator"] == "grpo", "rel_var"])[0]
    rows = []
    for name, rule in IBPO_RULES.items():
        c = credit[credit["estimator"] == name]
        v = var[var["estimator"] == name]
        if not len(c):
            continue
        rows.append({"estimator": name, "rules": rule, "credit AUC": fmt_spread(c["auc"]),
                     "first-error localisation": fmt_spread(c["first_error_localisation"]),
                     "failed tokens credited +": fmt_spread(c["failed_positive_share"].dropna()),
                     "grad rel. variance / GRPO": mean_std(v["rel_var"])[0] / g if len(v) else math.nan})
    return pd.DataFrame(rows)


def figure(credit: pd.DataFrame, var: pd.DataFrame):
    import matplotlib.pyplot as plt

    panels = [(credit, "auc", "credit AUC (steps)"), (credit, "first_error_localisation", "first-error localisation"),
              (var, "rel_var", "gradient relative variance"), (var, "mean_cos", "cosine to mean gradient")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (df, col, title) in zip(axes, panels):
        names = list(dict.fromkeys(df["estimator"]))
        stats = [mean_std(df.loc[df["estimator"] == n, col]) for n in names]
        means = [m for m, _ in stats]
        errs = [0 if math.isnan(s) else s for _, s in stats]
        ax.bar(range(len(names)), means, yerr=errs, capsize=3,
               color=["tab:red" if n.startswith("ibpo") else "tab:gray" for n in names])
        ax.set_xticks(range(len(names)), [n.replace(" (oracle repairs)", "\n(oracle)") for n in names],
                      rotation=45, ha="right", fontsize=8)
        ax.set_title(title)
    fig.suptitle("Credit quality and gradient variance (mean ± std over seeds)")
    fig.tight_layout()
    return fig


def resolve_policy(spec: str | None, quick: bool = False):
    """The policy a credit measurement scores -> (config model name, policy, description).

    ``spec`` None: the committed tiny policy (a random-init one of its shape for ``quick``).
    A run folder (holds ``config.yaml``): the run's trained policy from its checkpoint
    (``runs.RunRecord.load_policy``), with the run's ``model`` as the config's model name (its
    tokenizer and chat template). Anything else: a model ``models.load_policy`` reads (an alias or a
    ``save_pretrained`` folder), used under its own name. A run without a checkpoint is the
    ValueError ``load_policy`` raises, before anything is measured."""
    from ibpo_lab.models import build_tiny_policy, load_policy
    from ibpo_lab.runs import CONFIG_FILE, load_run
    from ibpo_lab.tasks.synthetic import VOCAB

    if spec is None:
        model_name, model_desc = tiny_policy_or_random(quick)
        policy = load_policy("tiny") if model_name == "tiny" else build_tiny_policy(VOCAB, seed=0)
        return model_name, policy, model_desc
    if (Path(spec) / CONFIG_FILE).is_file():
        rec = load_run(spec)
        step = int(rec.metrics["step"].max()) if not rec.metrics.empty else 0
        return (rec.config.model, rec.load_policy(),
                f"trained policy of run {spec} ({rec.config.label or rec.config.estimator}, {step} steps, from {rec.config.model})")
    return str(spec), load_policy(spec), f"policy {spec}"


def run(quick: bool = False, seeds: Sequence[int] = (0, 1, 2, 3), prompts: int | None = None,
        group_size: int | None = None, max_new_tokens: int | None = None, resamples: int | None = None,
        policy: str | None = None) -> Report:
    """The benchmark. ``policy``: a run folder or model to score instead of the committed tiny policy
    (:func:`resolve_policy`)."""
    from ibpo_lab.tasks import get_task

    t0 = time.perf_counter()
    model_name, policy, model_desc = resolve_policy(policy, quick)
    if quick:
        seeds = tuple(seeds)[:2]
    P = prompts or (2 if quick else 4)
    G = group_size or (4 if quick else 8)
    T_max = max_new_tokens or (12 if quick else 48)
    R = resamples or (2 if quick else 8)
    # credit quality is cheap per batch, so it scores twice the prompts the gradient resamples use
    P_credit = P if quick else 2 * P
    base = dict(model=model_name, device="cpu", prompts_per_step=P, group_size=G, max_new_tokens=T_max, minibatch_size=0,
                correct={"num_references": min(2, G - 1)}, mc_rollouts=2 if quick else 4)
    task = get_task("synthetic")
    # "same prompts": the first held-out problems, for every seed and estimator
    examples = task.examples("test", max(P, P_credit))
    credit = credit_rows(policy, task, examples[:P_credit], {**base, "prompts_per_step": P_credit}, seeds)
    var = variance_rows(policy, task, examples[:P], base, seeds, R)
    table = summarise(credit, var)
    rep = Report(name=NAME, title="Credit quality and gradient variance per estimator",
                 setup={"policy": model_desc, "prompts (credit)": P_credit, "prompts (gradients)": P, "group size": G,
                        "max new tokens": T_max,
                        "seeds": len(seeds), "gradient resamples per seed": R,
                        "VinePPO K": base["mc_rollouts"], "IBPO repairs per failure": base["correct"]["num_references"]})
    rep.tables.append(("Per estimator, mean ± std over seeds", table))
    acc = credit[credit["estimator"] == "grpo"][["seed", "accuracy"]].copy()
    ib = credit[credit["estimator"] == "ibpo"].set_index("seed")
    acc["IBPO repair success (failed)"] = acc["seed"].map(ib["repair_success"])
    acc["steps labelled"] = acc["seed"].map(ib["n_steps"])
    acc["failed with a wrong step"] = acc["seed"].map(ib["n_localisable"])
    rep.tables.append(("Batches scored (one per seed)", acc.rename(columns={"accuracy": "batch accuracy"})))
    rep.tables.append(("IBPO rule changes (issue 12): each change alone, same batches", rule_table(credit, var)))
    ibpo_auc, _ = mean_std(credit.loc[credit["estimator"] == "ibpo", "auc"])
    g = var.pivot(index="seed", columns="estimator", values="rel_var")
    per_seed_ratio = (g["ibpo"] / g["grpo"]).tolist() if {"ibpo", "grpo"} <= set(g.columns) else []
    ratio = mean_std(var.loc[var["estimator"] == "ibpo", "rel_var"])[0] / mean_std(
        var.loc[var["estimator"] == "grpo", "rel_var"])[0]
    oracle_auc, _ = mean_std(credit.loc[credit["estimator"] == ORACLE, "auc"])
    rep.targets += [
        Target("IBPO credit AUC", "≥ 0.90", ibpo_auc, ibpo_auc >= 0.90,
               f"edit-masked credit is only as good as the repairs: with oracle repairs the AUC is {oracle_auc:.2f}; "
               "the policy's own repairs fail or edit more than the wrong step on part of the failures, and "
               "unrepaired failures keep sequence-level credit"),
        Target("gradient rel. variance IBPO / GRPO", "≤ 0.5", ratio, ratio <= 0.5,
               "per-seed ratios " + ", ".join(f"{r:.2f}" for r in per_seed_ratio) + f"; {R} resamples of {P} prompts "
               "per seed, so each estimate is itself noisy"),
    ]
    rep.notes += [
        "credit AUC: all labelled steps of the batch, score = the step's mean token advantage, positive = a "
        "correct step; 'AUC within failed' ranks the steps of each failed trajectory alone (sequence-level credit "
        "scores exactly 0.5 there)",
        "first-error localisation: share of failed trajectories whose most negative step is the first wrong "
        "one (ties split the hit)",
        "IBPO variants: " + "; ".join(f"{k} = {v}" for k, v in IBPO_RULES.items()) + ". 'failed tokens "
        "credited +' = share of failed trajectories' credited tokens with a positive advantage "
        "(advantages.failed_positive_share; the sign-safe rule makes it 0 by construction)",
        "relative variance = tr Cov(g) / ‖mean g‖² over the resamples (scale-free, so estimators with different "
        "advantage scales compare); active tokens = share of response tokens with a non-zero advantage",
    ]
    rep.figure = figure(credit, var)
    rep.seconds = time.perf_counter() - t0
    return rep


def main(argv: Sequence[str] | None = None) -> Report:
    def extra(ap):
        ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="seeds (default 0 1 2 3)")
        ap.add_argument("--policy", default=None,
                        help="a run folder (its checkpoint's trained policy) or a model path/alias to score "
                             "instead of the committed tiny policy")

    return cli_main(run, "credit", __doc__, argv, extra)


if __name__ == "__main__":
    main()
