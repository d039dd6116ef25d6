"""Benchmark 3a — where a training step's time goes: sample / reward / correct / advantage / update for
GRPO and IBPO, and IBPO's own bookkeeping (Levenshtein diff + advantage) as a share of its step.

Runs ``ibpo_lab.train.train`` on the committed GRPO and IBPO configs (synthetic task, committed tiny
policy), alternating GRPO and IBPO runs so both see the same machine load, and reads the phase
timings the trainer writes to ``metrics.jsonl``. The diff time is measured by wrapping the
``ibpo_lab.diff`` functions compare-and-correct calls (``edit_masks``, ``edit_distance``,
``opcodes``...) with a timer for the duration of the runs.

    python -m benchmarks.speed                # writes benchmarks/results/speed.{md,png}
    python -c "from benchmarks.speed import repair_pass_times; print(repair_pass_times().to_string())"

``repair_pass_times`` (issue 13): the repair pass alone, plain vs copy-draft decoding, in CPU process
time (median of 3; the machine is shared, so wall time is not meaningful), with the sampler's model
calls and tokens per forward, and the update's CPU time with and without J_rep.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from benchmarks.common import Report, Target, cli_main, tiny_policy_or_random

NAME = "speed"
PHASES = ("sample", "reward", "correct", "advantage", "update")
#: the diff functions compare-and-correct calls, by the names it imported them under
DIFF_FUNCTIONS = ("edit_masks", "edit_distance", "opcodes", "apply_opcodes", "first_divergence")


@contextlib.contextmanager
def diff_timer() -> Iterator[dict[str, float]]:
    """Time spent in ``ibpo_lab.diff`` functions called by ``ibpo_lab.correct`` while the block runs.

    Yields a dict whose ``seconds`` and ``calls`` grow as the wrapped functions run. The wrappers
    replace the names in ``ibpo_lab.correct``'s namespace (where compare-and-correct looks them up)
    and are removed on exit; a nested call is timed once."""
    import ibpo_lab.correct as correct

    acc = {"seconds": 0.0, "calls": 0}
    depth = [0]
    originals = {name: getattr(correct, name) for name in DIFF_FUNCTIONS if hasattr(correct, name)}

    def wrap(fn):
        @functools.wraps(fn)
        def timed(*a, **kw):
            if depth[0]:
                return fn(*a, **kw)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                acc["seconds"] += time.perf_counter() - t0
                acc["calls"] += 1
                depth[0] -= 1

        return timed

    try:
        for name, fn in originals.items():
            setattr(correct, name, wrap(fn))
        yield acc
    finally:
        for name, fn in originals.items():
            setattr(correct, name, fn)


def speed_config(estimator: str, model: str, steps: int, seed: int, quick: bool):
    """The committed config of ``estimator`` (``ibpo_lab/configs/<estimator>.yaml``) on the CPU with
    evaluation, checkpoints between steps and trajectory files off (they are not part of a step)."""
    from ibpo_lab.config import load_config

    cfg = load_config(estimator)
    kw = dict(model=model, device="cpu", steps=steps, seed=seed, eval_n=0, eval_every=0, checkpoint_every=0,
              save_trajectories=False)
    if quick:
        # the oracle corrector repairs every failure, so the diff path runs even on a random-init policy
        kw.update(prompts_per_step=2, group_size=4, max_new_tokens=12, minibatch_size=0,
                  correct={"max_new_tokens": 12, "num_references": 1, "operator": "oracle"})
    return cfg.replace(**kw)


def measure_steps(estimators: Sequence[str], model: str, runs: int, steps: int, quick: bool = False,
                  out_root: str | Path | None = None) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """Train ``runs`` short runs of each estimator, alternating estimators run by run (after one
    untimed warm-up step of each). -> (one row per measured step: estimator, run, step, the
    ``time_*`` columns, response length, accuracy; per estimator the diff seconds and calls)."""
    if out_root is None:
        with tempfile.TemporaryDirectory(prefix="bench-speed-") as tmp:
            return measure_steps(estimators, model, runs, steps, quick, tmp)
    from ibpo_lab.train import train

    root = Path(out_root)
    for est in estimators:  # warm-up: first-call costs (allocator, kernels, lazy imports) stay out of the numbers
        train(speed_config(est, model, 1, 999, quick), root / f"warmup-{est}", progress=False)
    rows, diff = [], {est: {"seconds": 0.0, "calls": 0, "steps": 0} for est in estimators}
    for r in range(runs):
        for est in estimators:
            with diff_timer() as acc:
                rec = train(speed_config(est, model, steps, r, quick), root / f"{est}-{r}", progress=False)
            diff[est]["seconds"] += acc["seconds"]
            diff[est]["calls"] += acc["calls"]
            diff[est]["steps"] += len(rec.metrics)
            m = rec.metrics.copy()
            m.insert(0, "run", r)
            m.insert(0, "estimator", est)
            rows.append(m)
    return pd.concat(rows, ignore_index=True), diff


def split_table(steps: pd.DataFrame, diff: dict[str, dict[str, float]]) -> pd.DataFrame:
    """Median seconds per phase and per step, each phase's share of the step, and diff + advantage."""
    out = []
    for est, g in steps.groupby("estimator", sort=False):
        row = {"estimator": est, "steps": len(g)}
        step = float(g["time_step"].median())
        for ph in PHASES:
            col = f"time_{ph}"
            row[f"{ph} s"] = float(g[col].median()) if col in g else 0.0
        row["step s (median)"] = step
        row["step s (IQR)"] = float(g["time_step"].quantile(0.75) - g["time_step"].quantile(0.25))
        d = diff[est]
        diff_per_step = d["seconds"] / d["steps"] if d["steps"] else 0.0
        row["diff s"] = diff_per_step
        row["diff+adv share %"] = 100 * (diff_per_step + float(g["time_advantage"].mean())) / float(g["time_step"].mean())
        row["sample share %"] = 100 * float(g["time_sample"].sum() / g["time_step"].sum())
        row["tokens/traj"] = float(g["response_len"].mean())
        out.append(row)
    return pd.DataFrame(out)


def figure(split: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    left = np.zeros(len(split))
    colors = plt.get_cmap("tab10")
    for k, ph in enumerate(PHASES):
        vals = split[f"{ph} s"].to_numpy()
        ax.barh(split["estimator"], vals, left=left, label=ph, color=colors(k))
        left += vals
    ax.set(xlabel="median seconds per phase", title="Training step time split")
    ax.legend(ncol=5, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.12))
    fig.tight_layout()
    return fig


def run(quick: bool = False, runs: int | None = None, steps: int | None = None) -> Report:
    t0 = time.perf_counter()
    model, model_desc = tiny_policy_or_random(quick)
    runs = runs or (1 if quick else 3)
    steps = steps or (1 if quick else 4)
    per_step, diff = measure_steps(("grpo", "ibpo"), model, runs, steps, quick)
    split = split_table(per_step, diff)
    cfg = speed_config("ibpo", model, steps, 0, quick)
    rep = Report(name=NAME, title="Training step time split: GRPO vs IBPO",
                 setup={"policy": model_desc, "prompts/step": cfg.prompts_per_step, "group size": cfg.group_size,
                        "max new tokens": cfg.max_new_tokens, "minibatch": cfg.minibatch_size or cfg.batch_size,
                        "repairs per failure": cfg.correct.num_references, "runs × steps per estimator": f"{runs} × {steps}"})
    rep.tables.append(("Median seconds per phase (steps of alternating GRPO / IBPO runs)", split))
    g = split.set_index("estimator")
    ratio = float(g.loc["ibpo", "step s (median)"] / g.loc["grpo", "step s (median)"])
    share = float(g.loc["ibpo", "diff+adv share %"])
    extra = float(g.loc["ibpo", "correct s"])
    upd_ibpo, upd_grpo = float(g.loc["ibpo", "update s"]), float(g.loc["grpo", "update s"])
    rep.targets += [
        Target("IBPO step / GRPO step", "≤ 1.3", ratio, ratio <= 1.3,
               f"compare-and-correct generates the repairs ({extra:.2f} s/step, a second sampling pass over the "
               "failed trajectories with longer prompts; copy-draft decoding saves forward passes, not the prefill "
               "of the repair prompts), "
               + (f"and J_rep trains the revisions under those prompts (update {upd_ibpo:.2f} s vs GRPO's {upd_grpo:.2f} s)"
                  if cfg.repair_loss_weight else f"update {upd_ibpo:.2f} s vs GRPO's {upd_grpo:.2f} s (J_rep off)")
               + "; generation dominates a CPU step"),
        Target("diff + advantage share of the IBPO step (%)", "≤ 5", share, share <= 5,
               "the diff and advantage are pure python/numpy on few tokens; a miss would mean tiny steps"),
    ]
    rep.notes += [
        f"diff = time inside ibpo_lab.diff functions called by compare-and-correct ({diff['ibpo']['calls']} calls over "
        f"{diff['ibpo']['steps']} IBPO steps); it is part of the 'correct' phase, the rest of which is repair generation "
        "and verification",
        "shares use means over steps; the seconds columns are medians",
    ]
    rep.figure = figure(split)
    rep.seconds = time.perf_counter() - t0
    return rep


def repair_pass_times(repeats: int = 3, seed: int = 11) -> pd.DataFrame:
    """CPU process seconds (median of ``repeats``) of compare-and-correct on one step of the committed
    ``ibpo`` config (8 prompts x 8 samples, the committed tiny policy), plain decoding vs the failed
    attempt as copy-draft (same seed: same revisions), and of one ``policy_update`` with J_rep off/on."""
    import dataclasses
    import statistics

    import torch

    from ibpo_lab import train as T
    from ibpo_lab.config import load_config
    from ibpo_lab.correct import compare_and_correct
    from ibpo_lab.step import build_lab, compute_advantages, correct_config, take_step

    cfg = load_config("ibpo").replace(device="cpu", eval_n=0)
    lab = build_lab(cfg)
    exs = T.pick_examples(lab.task.examples(cfg.train_split), cfg, 1)
    batch = take_step(lab, exs, seed=seed, correct=False, advantages=False).batch
    by_group = {g: exs[g] for g in range(len(exs))}
    rows, results = [], {}
    for name, kw in (("plain", dict(copy_draft=False, repair_length_margin=None)),
                     ("plain + length cap", dict(copy_draft=False, repair_length_margin=16)),
                     ("copy-draft + length cap", dict(copy_draft=True, repair_length_margin=16))):
        c = dataclasses.replace(correct_config(cfg), **kw)
        ts = []
        for _ in range(repeats):
            t0 = time.process_time()
            res = compare_and_correct(batch, by_group, lab.task, lab.sampler, c, tokenizer=lab.policy.tokenizer, seed=5)
            ts.append(time.process_time() - t0)
        st = lab.sampler.last_stats
        results[name] = res
        rows.append({"phase": f"repair pass: {name}", "cpu s (median)": statistics.median(ts),
                     "model calls": st["model_calls"], "tokens/forward": st["tokens_per_forward"],
                     "revisions": len(res.table), "verified share": float(res.table.verified.mean())})
    same = results["plain + length cap"].revisions.response_ids == results["copy-draft + length cap"].revisions.response_ids
    res = results["copy-draft + length cap"]
    adv = compute_advantages(res.batch, cfg)
    model = lab.policy.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for w in (0.0, 1.0):
        c2, ts = cfg.replace(repair_loss_weight=w), []
        for _ in range(repeats):
            model.load_state_dict(state)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
            t0 = time.process_time()
            obj = T.repair_objective_batch(model, res.revisions, c2, torch.device("cpu"))
            T.policy_update(model, None, opt, res.batch, adv, c2, torch.device("cpu"), repair=obj)
            ts.append(time.process_time() - t0)
        rows.append({"phase": f"update: repair_loss_weight={w}", "cpu s (median)": statistics.median(ts),
                     "revisions": 0 if obj is None else len(obj.adv)})
    model.load_state_dict(state)
    out = pd.DataFrame(rows)
    out.attrs["draft_identical"] = same
    return out


def main(argv: Sequence[str] | None = None) -> Report:
    return cli_main(run, "speed", __doc__, argv)


if __name__ == "__main__":
    main()
