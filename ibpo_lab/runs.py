"""The run folder: what ``train`` writes and everything reads back, in one place.

    run_dir/
      config.yaml                  the exact config (``config.TrainConfig.from_yaml``)
      metrics.jsonl                one row per step, columns :data:`METRIC_HELP`
      eval.jsonl                   one row per held-out evaluation, columns :data:`EVAL_HELP`
      trajectories/step_000001.parquet   one row per trajectory of a step, columns :data:`TRAJECTORY_HELP`
      checkpoint/state.pt          model, optimiser, scheduler, RNG states, step counter (resume);
                                   absent with ``save_checkpoints=False``

Writers are atomic (write then rename; a JSONL row is one appended line, a truncated last line is
tolerated on read and dropped on resume). Readers: :func:`load_run`, :func:`load_runs`,
:class:`RunRecord`; tables over runs: :func:`summarise_runs`, :func:`final_table`,
:func:`stability_table`, all with one interval, :func:`mean_ci`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import math
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from ibpo_lab.config import TrainConfig
from ibpo_lab.rollout import RolloutBatch

__all__ = [
    "METRIC_HELP",
    "EVAL_HELP",
    "TRAJECTORY_HELP",
    "RunRecord",
    "load_run",
    "load_runs",
    "trajectory_files",
    "has_records",
    "CONFIG_FILE",
    "METRICS_FILE",
    "EVAL_FILE",
    "prepare_run_dir",
    "append_jsonl",
    "read_jsonl",
    "atomic_write_bytes",
    "atomic_write_text",
    "trajectory_frame",
    "write_trajectories",
    "safe_step_labels",
    "truncate_records",
    "save_checkpoint",
    "load_checkpoint_state",
    "rng_state",
    "set_rng_state",
    "mean_ci",
    "summarise_runs",
    "final_table",
    "stability_table",
]

#: the files of a run folder
CONFIG_FILE, METRICS_FILE, EVAL_FILE, TRAJECTORY_DIR, CHECKPOINT_DIR = (
    "config.yaml", "metrics.jsonl", "eval.jsonl", "trajectories", "checkpoint")

#: the columns of metrics.jsonl (one row per step); loss_* columns carry the loss's own metrics and
#: correct_* columns the corrector's stats (counts, success rates, φ mean, edited tokens)
METRIC_HELP: dict[str, str] = {
    "step": "training step, from 1",
    "reward_mean": "mean terminal reward of the sampled trajectories",
    "accuracy": "share of sampled trajectories with reward >= 1",
    "zero_var_groups": "share of groups whose rewards are all equal (no group-relative signal)",
    "active_tokens": "share of response tokens with a non-zero advantage (credited tokens)",
    "response_len": "mean response length in tokens",
    "repair_success": "mean share of verified repairs over failed trajectories (NaN without a corrector)",
    "entropy": "mean token entropy of the policy on the sampled responses",
    "approx_kl": "k3 estimate of KL(behaviour || current) during the update",
    "clip_frac": "share of tokens whose ratio was clipped",
    "kl_ref": "k3 KL to the frozen reference policy (only with kl_coef > 0)",
    "loss": "mean policy loss over micro-batches",
    "grad_norm": "mean gradient norm before clipping over the step's optimiser steps",
    "updates": "optimiser steps taken this step",
    "skipped": "optimiser steps skipped this step (non-finite loss or gradient)",
    "skipped_total": "optimiser steps skipped so far in the run",
    "lr": "learning rate used this step",
    "n_repaired": "verified repairs this step (trained off-policy only in bilateral mode)",
    "loss_repair": "IOP's joint repair objective J_rep: mean loss over minibatches of the revisions under their "
                   "repair prompt (before the weight λ_rep; missing when J_rep trained nothing this step)",
    "repair_loss_weight": "λ_rep applied to J_rep this step (0 when it trained nothing: off, or no revision with a "
                          "non-zero advantage)",
    "n_repair_trained": "revisions trained by J_rep this step (non-zero advantage)",
    "time_sample": "seconds sampling the groups",
    "time_reward": "seconds scoring rewards and splitting steps",
    "time_correct": "seconds in compare-and-correct (IBPO) or Monte-Carlo step values (VinePPO)",
    "time_advantage": "seconds computing advantages (and importance weights of repairs)",
    "time_update": "seconds in the PPO/GSPO update and the sampler weight sync",
    "time_step": "seconds for the whole step (evaluation and checkpoint excluded)",
}


#: the columns of eval.jsonl (one row per held-out evaluation; ``train.evaluate``)
EVAL_HELP: dict[str, str] = {
    "step": "training step after which the evaluation ran",
    "n": "held-out prompts", "k": "samples per prompt (1 at temperature 0)", "temperature": "sampling temperature",
    "avg@k": "mean over prompts of the share of correct samples (= unbiased pass@1)",
    "pass@1": "same number as avg@k", "pass@k": "share of prompts with at least one correct sample",
    "avg@k_lo": "95% t-interval bounds over prompts (also *_lo/*_hi of pass@1 and pass@k)", "avg@k_hi": "see avg@k_lo",
    "pass@1_lo": "see avg@k_lo", "pass@1_hi": "see avg@k_lo", "pass@k_lo": "see avg@k_lo", "pass@k_hi": "see avg@k_lo",
}

#: the columns of trajectories/step_*.parquet (one row per trajectory; lists are per response token
#: unless said otherwise). Optional columns are absent when the run had nothing to put there.
TRAJECTORY_HELP: dict[str, str] = {
    "step": "training step", "kind": "'policy' (sampled, trained) or 'repaired' (a verified repair)",
    "example_id": "id of the task example the group was sampled from",
    "traj": "row index within its kind in the step", "group": "group id (one prompt per group)",
    "reward": "terminal reward", "prompt_len": "prompt length in tokens", "response_len": "response length in tokens",
    "prompt_ids": "prompt token ids", "response_ids": "response token ids", "prompt": "prompt text",
    "response": "response text", "logprob_sum": "sum of the behaviour log-probs of the response",
    "n_steps": "number of reasoning steps", "step_spans": "[start, end) token span of every step",
    "repair_success": "share of verified repairs of this failed trajectory (optional)",
    "n_edited": "number of tokens the selected repair edited (optional)",
    "source_traj": "repaired rows: the failed trajectory this repairs (optional)",
    "reference_traj": "repaired rows: the sibling used as the reference (-1: none) (optional)",
    "finish_reason": "why sampling stopped: 'eos', 'stop' or 'length' (from the sampler)",
    "engine_logprobs": "vllm: the engine's own log-probs of the response (optional)",
    "step_labels": "ground-truth correctness of every step (None where the task cannot tell)",
    "advantages": "per-token advantage used for training", "response_mask": "per-token: trained (bool)",
    "edit_mask": "per-token: edited by the repair (policy rows) / inserted (repaired rows) (optional)",
    "step_values": "VinePPO Monte-Carlo value at every step boundary (optional)",
    "is_weights": "repaired rows: per-token truncated importance weight (optional)",
    "repair": "policy rows: text of the selected verified repair, None if none (optional)",
    "trained": "whether the row was part of the policy update",
}

@dataclass
class RunRecord:
    """A run folder, read back: ``config``, ``metrics`` (one row per step), ``eval`` (one row per
    evaluation) and ``trajectories(step)`` (one row per trajectory)."""

    path: Path
    config: TrainConfig
    metrics: pd.DataFrame
    eval: pd.DataFrame
    experiment: str = ""  #: the folder below the runs root it was found in (``load_runs``), or set by ``train_many``

    @property
    def label(self) -> str:
        return self.config.name

    def steps_with_trajectories(self) -> list[int]:
        return sorted(trajectory_files(self.path))

    def trajectories(self, step: int | None = None) -> pd.DataFrame:
        """Trajectories of one step, or of every step (``step=None``), as a DataFrame."""
        tdir = self.path / TRAJECTORY_DIR
        if step is None:
            files = [tdir / f"step_{s:06d}.parquet" for s in self.steps_with_trajectories()]
            if not files:
                raise ValueError(f"run {self.path} has no trajectory files")
            return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        f = tdir / f"step_{int(step):06d}.parquet"
        if not f.is_file():
            raise ValueError(f"step: run {self.path} has no trajectories for step {step} "
                             f"(available: {self.steps_with_trajectories()})")
        return pd.read_parquet(f)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_DIR

    def load_policy(self, device: str = "cpu"):
        """The trained policy from the run's checkpoint."""
        state = load_checkpoint_state(self.path, map_location="cpu")
        if state is None:
            raise ValueError(f"run {self.path} has no checkpoint"
                             + (" (trained with save_checkpoints=False)" if not self.config.save_checkpoints else ""))
        from ibpo_lab.step import build_policy, build_task

        task = build_task(self.config)
        policy = build_policy(self.config, task, torch.device(device))
        policy.model.load_state_dict(state["model"])
        return policy

    def tokenizer(self):
        """The tokenizer of the run's policy (``models.tokenizer_for``), None when unavailable offline."""
        from ibpo_lab.models import tokenizer_for

        return tokenizer_for(self.config.model)

    def step_labeler(self) -> Callable[[str, str], list[bool] | None] | None:
        """``labeler(prompt, response) -> step labels`` for the run's task: the logged solve prompt is
        matched back to its example, then ``task.step_labels``. None when the task cannot be built
        offline; the labeler returns None for an unknown prompt or an unlabelled task."""
        try:
            from ibpo_lab.tasks import get_task

            task = get_task(self.config.task, **self.config.task_kwargs)
            index = {}
            for split in dict.fromkeys([self.config.train_split, self.config.eval_split]):
                index.update({task.solve_prompt(e): e for e in task.examples(split)})
        except Exception:  # display only: no labels rather than a broken explorer
            return None

        def labeler(prompt: str, response: str) -> list[bool] | None:
            ex = index.get(prompt)
            return None if ex is None else task.step_labels(ex, response)

        return labeler

    def __repr__(self) -> str:
        return f"RunRecord({self.label!r}, seed={self.config.seed}, steps={len(self.metrics)}, path='{self.path}')"


def has_records(run_dir: str | os.PathLike) -> bool:
    """Whether a folder already holds a run's records (metrics or a checkpoint)."""
    return any((Path(run_dir) / n).exists() for n in (METRICS_FILE, CHECKPOINT_DIR))


def trajectory_files(run_dir: str | os.PathLike) -> dict[int, Path]:
    """step -> its ``trajectories/step_*.parquet`` file in a run folder."""
    files = {}
    for p in sorted((Path(run_dir) / TRAJECTORY_DIR).glob("step_*.parquet")):
        with contextlib.suppress(ValueError, IndexError):
            files[int(p.stem.split("_")[1])] = p
    return files


def read_jsonl(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame()
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # a run killed mid-write leaves a partial last line; anything else is real corruption
            if i == len(lines) - 1:
                warnings.warn(f"{path}: ignoring a truncated last line (run interrupted while writing)")
                continue
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return pd.DataFrame(rows)


def load_run(path: str | os.PathLike, experiment: str = "") -> RunRecord:
    """Read a run folder written by ``train.train``."""
    p = Path(path)
    if not (p / CONFIG_FILE).is_file():
        raise ValueError(f"path: {p} is not a run folder (no config.yaml)")
    return RunRecord(
        path=p,
        config=TrainConfig.from_yaml(p / CONFIG_FILE),
        metrics=read_jsonl(p / METRICS_FILE),
        eval=read_jsonl(p / EVAL_FILE),
        experiment=experiment,
    )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write then rename, so a crash or a full disk never leaves a half-written file in place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(e.errno, f"could not write {path} ({e.strerror or e}); nothing partial was left there") from e


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_jsonl(path: Path, row: dict) -> None:
    line = json.dumps(row, default=_json_default) + "\n"
    try:
        with open(path, "a") as fh:
            fh.write(line)
    except OSError as e:  # a partial last line is tolerated by read_jsonl and dropped on resume
        raise OSError(e.errno, f"could not append a row to {path} ({e.strerror or e})") from e


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)


def prepare_run_dir(out_dir: str | os.PathLike | None, cfg: TrainConfig) -> Path:
    if out_dir is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path("runs") / f"{stamp}-{cfg.name}-seed{cfg.seed}"
    p = Path(out_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        (p / TRAJECTORY_DIR).mkdir(exist_ok=True)
        probe = p / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"out_dir: cannot write the run folder {str(p)!r}: {e.strerror or e}") from e
    return p


# ======================================================================================== checkpoints
def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Write ``run_dir/checkpoint/state.pt`` via a temporary folder and renames, so the previous
    checkpoint survives a crash or a full disk. Raises OSError with a clear message on failure."""
    final = run_dir / CHECKPOINT_DIR
    tmp = run_dir / f".checkpoint.tmp-{os.getpid()}"
    old = run_dir / ".checkpoint.old"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / "state.pt", "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        atomic_write_text(tmp / "step.txt", str(state["step"]))
        # a directory cannot be renamed onto a non-empty one: move the old one aside first
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists() and old.exists():
            os.replace(old, final)
        raise OSError(e.errno, f"could not write the checkpoint in {run_dir} ({e.strerror or e}); "
                               f"the previous checkpoint, if any, is kept") from e
    return final


def load_checkpoint_state(run_dir: Path, map_location="cpu") -> dict[str, Any] | None:
    for d in (run_dir / CHECKPOINT_DIR, run_dir / ".checkpoint.old"):
        f = d / "state.pt"
        if f.is_file():
            return torch.load(f, map_location=map_location, weights_only=False)
    return None



# ======================================================================================== trajectories
def safe_step_labels(task, example, response: str | None) -> list[bool] | None:
    """``task.step_labels(example, response)`` for the record, or None when it is unknown: no response
    text, a task that cannot tell, or a labeller that raised (a record must never stop a run)."""
    if response is None:
        return None
    try:
        labels = task.step_labels(example, response)
    except Exception:  # noqa: BLE001 — any labeller bug costs the labels, never the run
        return None
    return None if labels is None else [bool(x) for x in labels]


def trajectory_frame(batch: RolloutBatch, advantages: torch.Tensor, step: int, kind: str = "policy",
                     repairs: dict[int, str] | None = None, is_weights: torch.Tensor | None = None,
                     examples: Sequence | None = None, task=None) -> pd.DataFrame:
    """One row per trajectory with its per-token advantages and masks (lists), for the parquet record.

    ``examples``: the step's examples, indexed by group id (group i was sampled from ``examples[i]``);
    given, the frame gets ``example_id`` and, with ``task``, ``step_labels`` (list of bools per
    non-empty text step of the response, or None where the task cannot tell)."""
    df = batch.to_dataframe()
    df.insert(0, "step", step)
    df.insert(1, "kind", kind)
    if examples is not None:
        exs = [examples[g] for g in batch.group_ids.tolist()]
        df.insert(2, "example_id", [str(e.id) for e in exs])
        if task is not None:
            texts = batch.responses if batch.responses is not None else [None] * len(batch)
            df["step_labels"] = [safe_step_labels(task, e, t) for e, t in zip(exs, texts)]
    lens = [len(x) for x in batch.response_ids]
    mask = batch.response_mask
    df["advantages"] = [advantages[i, :n].tolist() for i, n in enumerate(lens)]
    df["response_mask"] = [mask[i, :n].bool().tolist() for i, n in enumerate(lens)]
    if batch.edit_masks is not None:
        df["edit_mask"] = [m.tolist() for m in batch.edit_masks]
    if batch.step_values is not None:
        df["step_values"] = [list(map(float, v)) for v in batch.step_values]
    if is_weights is not None:
        df["is_weights"] = [is_weights[i, :n].tolist() for i, n in enumerate(lens)]
    if repairs is not None:
        df["repair"] = [repairs.get(i) for i in range(len(batch))]
    return df


def repair_texts(table: pd.DataFrame | None) -> dict[int, str]:
    """trajectory index → text of its selected (best verified) repair, from the corrector's table."""
    if table is None or len(table) == 0:
        return {}
    sel = table[table["selected"].astype(bool)]
    return {int(t): str(x) for t, x in zip(sel["traj"], sel["revision"])}


def write_trajectories(run_dir, step, batch, adv, table, repaired, rep_adv, rep_w, examples, task) -> None:
    df = trajectory_frame(batch, adv, step, "policy", repairs=repair_texts(table) if table is not None else None,
                          examples=examples, task=task)
    df["trained"] = True
    if repaired is not None and len(repaired) > 0:
        # repairs are recorded for inspection; they are trained only in IOP bilateral mode
        ra = rep_adv if rep_adv is not None else torch.zeros(len(repaired), repaired.max_response_len)
        rdf = trajectory_frame(repaired, ra, step, "repaired", is_weights=rep_w, examples=examples, task=task)
        rdf["trained"] = rep_adv is not None
        df = pd.concat([df, rdf], ignore_index=True)
    buf = _parquet_bytes(df)
    atomic_write_bytes(run_dir / TRAJECTORY_DIR / f"step_{step:06d}.parquet", buf)


def _parquet_bytes(df: pd.DataFrame) -> bytes:
    b = io.BytesIO()
    df.to_parquet(b, index=False)
    return b.getvalue()


def truncate_records(run_dir: Path, step: int) -> None:
    """Drop metric/eval rows written after the checkpoint (a killed run got further than it saved)."""
    for name in (METRICS_FILE, EVAL_FILE):
        p = run_dir / name
        if p.is_file():
            keep = []
            for line in p.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):  # a half-written last line goes too
                    if json.loads(line)["step"] <= step:
                        keep.append(line + "\n")
            atomic_write_text(p, "".join(keep))
    for f in (run_dir / TRAJECTORY_DIR).glob("step_*.parquet"):
        if int(f.stem.split("_")[1]) > step:
            f.unlink()



# ======================================================================================== tables
# two-sided 95% Student-t quantiles for df = 1..30 (written out so the package needs no scipy)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def mean_ci(x: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): a 95% Student-t interval for the mean (NaN bounds with fewer than 2 values)."""
    a = np.asarray([v for v in x if not (isinstance(v, float) and math.isnan(v))], dtype=float)
    if len(a) == 0:
        return math.nan, math.nan, math.nan
    m = float(a.mean())
    if len(a) < 2:
        return m, math.nan, math.nan
    t = _T975[len(a) - 2] if len(a) - 1 <= len(_T975) else 1.96
    h = t * float(a.std(ddof=1)) / math.sqrt(len(a))
    return m, m - h, m + h



def summarise_runs(records: Sequence[RunRecord | str | os.PathLike], metric: str = "avg@k") -> pd.DataFrame:
    """One row per config label: final held-out ``metric`` (last eval row; training accuracy of the last
    step if a run has no eval) as mean and 95% t-interval over seeds. Records or run folders."""
    rows = []
    for r in records:
        r = r if isinstance(r, RunRecord) else load_run(r)
        if len(r.eval) and metric in r.eval.columns:
            v, src = float(r.eval[metric].iloc[-1]), f"eval {metric}"
        elif len(r.metrics):
            v, src = float(r.metrics["accuracy"].iloc[-1]), "train accuracy"
        else:
            v, src = math.nan, "none"
        rows.append({"label": r.label, "seed": r.config.seed, "value": v, "source": src,
                     "final_reward": float(r.metrics["reward_mean"].iloc[-1]) if len(r.metrics) else math.nan})
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["label", "n_seeds", "mean", "ci_lo", "ci_hi", "final_reward", "source"])
    out = []
    for label, g in df.groupby("label", sort=False):
        m, lo, hi = mean_ci(g["value"].tolist())
        out.append({"label": label, "n_seeds": len(g), "seeds": sorted(g["seed"].tolist()), "mean": m,
                    "ci_lo": lo, "ci_hi": hi, "final_reward": float(g["final_reward"].mean()),
                    "source": ", ".join(sorted(set(g["source"])))})
    return pd.DataFrame(out)



def load_runs(runs_dir: str | os.PathLike) -> list:
    """Every run folder (one holding ``config.yaml`` and ``metrics.jsonl``) under ``runs_dir``; the
    experiment (first folder below ``runs_dir``) is kept in ``record.experiment``."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise ValueError(f"runs_dir: {root} is not a directory")
    out = []
    for cfg in sorted(root.rglob(CONFIG_FILE)):
        d = cfg.parent
        if not (d / METRICS_FILE).is_file():
            continue
        rel = d.relative_to(root).parts
        out.append(load_run(d, experiment=rel[0] if len(rel) > 1 else ""))
    return out


def stability_table(records: Sequence) -> pd.DataFrame:
    """Training stability per config label, over its seeds: final and best reward, run-to-run
    jitter (std over seeds of the final reward), step-to-step jitter (mean |Δ reward|), entropy
    at start and end, mean and max gradient norm, mean approximate KL, skipped optimiser steps."""
    if not records:
        raise ValueError("records is empty")
    per_run = []
    for r in records:
        m = r.metrics
        if m is None or len(m) == 0:
            continue

        def col(name):
            return m[name].astype(float) if name in m.columns else pd.Series([math.nan] * len(m))

        rew = col("reward_mean")
        ent = col("entropy")
        gn = col("grad_norm")
        per_run.append({
            "experiment": r.experiment, "label": r.label, "seed": r.config.seed,
            "steps": len(m), "final_reward": rew.iloc[-1], "best_reward": rew.max(),
            "mean_abs_step_change": float(rew.diff().abs().mean()) if len(m) > 1 else math.nan,
            "entropy_start": ent.iloc[0], "entropy_end": ent.iloc[-1],
            "grad_norm_mean": gn.mean(), "grad_norm_max": gn.max(),
            "approx_kl_mean": col("approx_kl").mean(),
            "skipped": float(col("skipped").sum()),
            "repair_success": col("repair_success").mean(),
        })
    df = pd.DataFrame(per_run)
    if df.empty:
        raise ValueError("no record has metrics")
    agg = df.groupby(["experiment", "label"], sort=False).agg(
        n_seeds=("seed", "nunique"), steps=("steps", "max"), final_reward=("final_reward", "mean"),
        run_to_run_std=("final_reward", lambda s: float(s.std(ddof=1)) if len(s) > 1 else math.nan),
        best_reward=("best_reward", "mean"), step_jitter=("mean_abs_step_change", "mean"),
        entropy_start=("entropy_start", "mean"), entropy_end=("entropy_end", "mean"),
        grad_norm_mean=("grad_norm_mean", "mean"), grad_norm_max=("grad_norm_max", "max"),
        approx_kl_mean=("approx_kl_mean", "mean"), skipped=("skipped", "sum"),
        repair_success=("repair_success", "mean"),
    ).reset_index()
    return agg


def final_table(records: Sequence, metric: str = "avg@k") -> pd.DataFrame:
    """``train.summarise_runs`` per experiment: final held-out ``metric`` (mean, 95% CI over seeds)."""
    if not records:
        raise ValueError("records is empty")
    frames = []
    by_exp: dict[str, list] = {}
    for r in records:
        by_exp.setdefault(r.experiment, []).append(r)
    for exp, recs in by_exp.items():
        t = summarise_runs(recs, metric=metric)
        t.insert(0, "experiment", exp)
        frames.append(t)
    return pd.concat(frames, ignore_index=True)
