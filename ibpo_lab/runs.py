"""The run folder: what ``train`` writes and everything reads back, in one place.

    run_dir/
      config.yaml                  the exact config (``config.TrainConfig.from_yaml``)
      metrics.jsonl                one row per step, columns :data:`METRIC_HELP`
      eval.jsonl                   one row per held-out evaluation, columns :data:`EVAL_HELP`
      trajectories/step_000001.parquet   one row per trajectory of a step, columns :data:`TRAJECTORY_HELP`
      checkpoint/                  the last checkpoint (absent with ``save_checkpoints=False``):
        model/                     the policy in Hugging Face layout (``save_pretrained``: config.json,
                                   model.safetensors, generation_config.json, the tokenizer, a model
                                   card README.md with YAML metadata): ``from_pretrained(run/checkpoint/model)``
        trainer_state.pt           optimiser and scheduler state, torch/CUDA RNG states: tensors and plain
                                   values only, read with ``torch.load(..., weights_only=True)``
        trainer_state.json         step, skipped-step counters, python/numpy RNG states, the config
        COMPLETE                   written last: the checkpoint's step (a folder without it is partial)
      .lock                        held (``fcntl.flock``) by the one process writing the folder; holds
                                   its pid, host and start time

Writers are atomic (write then rename; a JSONL row is one appended line; NaN/inf are written as
null, strict JSON). Only a truncated LAST line is tolerated (dropped with a warning); any other bad
line, a missing step row or a missing trajectory file is an error naming the file and line/step.
A checkpoint is written into ``.checkpoint.tmp-PID`` and renamed into place; on start the newest
complete one (``COMPLETE`` marker) is put back in place and stale temporaries are removed
(:func:`recover_checkpoint`). Readers: :func:`load_run`, :func:`load_runs`,
:class:`RunRecord`; tables over runs: :func:`summarise_runs`, :func:`final_table`,
:func:`stability_table`, all with one interval, :func:`mean_ci`.

The trained policy leaves a run as a plain Hugging Face folder::

    python -m ibpo_lab.runs export RUN_DIR OUT_DIR          # runs.export: checkpoint/model -> OUT_DIR
    python -m ibpo_lab.runs push RUN_DIR me/my-policy       # runs.push_to_hub (private repo by default)
    AutoModelForCausalLM.from_pretrained("RUN_DIR/checkpoint/model")   # or RunRecord.load_policy()
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
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
    "load_checkpoint_model",
    "recover_checkpoint",
    "find_checkpoint",
    "check_records",
    "RunLock",
    "RunLockedError",
    "CheckpointWriteError",
    "TRAJECTORY_SCHEMA",
    "model_card",
    "export",
    "push_to_hub",
    "rng_state",
    "set_rng_state",
    "mean_ci",
    "finite_or_null",
    "proportion_ci",
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
    "active_tokens": "share of response tokens with a non-zero advantage (credited tokens; IOP's active-token "
                     "ratio, advantages.active_token_ratio; NaN without a trained token)",
    "failed_positive_share": "share of failed trajectories' credited tokens with a positive advantage "
                             "(advantages.failed_positive_share): 0 under IBPO's default sign_rule 'safe', "
                             "> 0 means the step reinforces tokens of failed attempts; NaN when no failed "
                             "trajectory has a credited token",
    "correct_phi_mean": "mean over failed trajectories of φ = ρ·1[a revision verified] (the published rule, the "
                        "estimator's default phi); correct_phi_share_mean: the same with φ = ρ·share",
    "correct_phi_share_mean": "see correct_phi_mean",
    "correct_audit_rejection_share": "share of verified revisions the IOP audit rejected (copy of a reference or "
                                     "over the edit budget); NaN without a verified revision",
    "loss_gate_frac": "GSPO: share of trained tokens the sequence ratio is taken over (1 with gate 'mask'; "
                      "with gate 'credited', the tokens with a non-zero advantage)",
    "loss_seq_ratio_mean": "GSPO: mean sequence ratio w_i over sequences with a gated token",
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
#: unless said otherwise). Every file has every column with the types of :data:`TRAJECTORY_SCHEMA`, in
#: this order; "(optional)" columns are null where the run had nothing to put there (so
#: ``datasets.load_dataset("parquet", data_files=run/"trajectories/*.parquet")`` reads a whole run).
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

def _trajectory_schema():
    import pyarrow as pa

    i64, f64, s, b = pa.int64(), pa.float64(), pa.string(), pa.bool_()
    types = {
        "step": i64, "kind": s, "example_id": s, "traj": i64, "group": i64, "reward": f64, "prompt_len": i64,
        "response_len": i64, "prompt_ids": pa.list_(i64), "response_ids": pa.list_(i64), "prompt": s, "response": s,
        "logprob_sum": f64, "n_steps": i64, "step_spans": pa.list_(pa.list_(i64)), "repair_success": f64,
        "n_edited": i64, "source_traj": i64, "reference_traj": i64, "finish_reason": s,
        "engine_logprobs": pa.list_(f64), "step_labels": pa.list_(b), "advantages": pa.list_(f64),
        "response_mask": pa.list_(b), "edit_mask": pa.list_(b), "step_values": pa.list_(f64),
        "is_weights": pa.list_(f64), "repair": s, "trained": b,
    }
    assert list(types) == list(TRAJECTORY_HELP), "TRAJECTORY_HELP and the schema name the same columns in order"
    return pa.schema([pa.field(k, t, nullable=True) for k, t in types.items()])


#: the pyarrow schema of every trajectories/step_*.parquet file (columns and order of :data:`TRAJECTORY_HELP`)
TRAJECTORY_SCHEMA = _trajectory_schema()


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
        """The trained policy from the run's checkpoint: ``checkpoint/model``, a Hugging Face folder
        (``models.load_policy`` reads it with ``from_pretrained``; no pickle, no base model needed)."""
        ckpt = find_checkpoint(self.path)
        if ckpt is None:
            raise ValueError(f"run {self.path} has no checkpoint"
                             + (" (trained with save_checkpoints=False)" if not self.config.save_checkpoints else ""))
        from ibpo_lab.models import load_policy

        return load_policy(ckpt / MODEL_DIR, dtype=self.config.dtype, device=device)

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


def _jsonl_rows(path: Path) -> tuple[list[dict], list[str], bool]:
    """(rows, their lines, whether a truncated last line was dropped). Only the LAST line may be
    partial (a run killed mid-write); any other bad line is a ValueError naming the file and line."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    rows, kept, torn = [], [], False
    for i, bline in enumerate(lines):
        last = i == len(lines) - 1
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError:
            if last and not raw.endswith(b"\n"):
                torn = True
                continue
            raise ValueError(f"{path}: line {i + 1} is not UTF-8 text (the file is corrupt)") from None
        if not line.strip():
            if last:
                continue
            raise ValueError(f"{path}: line {i + 1} is empty (the file is corrupt)")
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError
        except ValueError:
            # a run killed mid-write leaves a partial last line (no newline after it); anything else is corruption
            if last and not raw.endswith(b"\n"):
                torn = True
                continue
            raise ValueError(f"{path}: line {i + 1} is not a JSON object (the file is corrupt): {line[:80]!r}") from None
        rows.append(row)
        kept.append(line)
    return rows, kept, torn


def read_jsonl(path: Path) -> pd.DataFrame:
    """A JSONL file as a DataFrame; null becomes NaN in numeric columns (``append_jsonl`` writes NaN/inf
    as null). A truncated last line is dropped with a warning; any other bad line raises ValueError."""
    if not path.is_file():
        return pd.DataFrame()
    rows, _, torn = _jsonl_rows(path)
    if torn:
        warnings.warn(f"{path}: ignoring a truncated last line (run interrupted while writing)")
    df = pd.DataFrame(rows)
    for c in df.columns:
        if df[c].dtype == object and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                                         for v in df[c]):
            df[c] = df[c].astype(float)
    return df


def load_run(path: str | os.PathLike, experiment: str = "") -> RunRecord:
    """Read a run folder written by ``train.train``. The metrics must hold one row per step 1..n
    (a gap, a duplicate or a bad line is a ValueError naming the file)."""
    p = Path(path)
    if not (p / CONFIG_FILE).is_file():
        raise ValueError(f"path: {p} is not a run folder (no config.yaml)")
    metrics = read_jsonl(p / METRICS_FILE)
    _check_steps(p / METRICS_FILE, metrics["step"].tolist() if "step" in metrics.columns else [] if metrics.empty
                 else None)
    return RunRecord(
        path=p,
        config=TrainConfig.from_yaml(p / CONFIG_FILE),
        metrics=metrics,
        eval=read_jsonl(p / EVAL_FILE),
        experiment=experiment,
    )


def _check_steps(path: Path, steps: list | None) -> None:
    """The metrics rows are steps 1, 2, ..., n in order, one each."""
    if steps is None:
        raise ValueError(f"{path}: rows have no 'step' column (the file is corrupt)")
    for i, st in enumerate(steps):
        if st != i + 1:
            raise ValueError(f"{path}: row {i + 1} is step {st}, expected step {i + 1} "
                             f"({'a step row is missing' if isinstance(st, (int, float)) and st > i + 1 else 'a duplicate or out-of-order row'}; "
                             f"the records are corrupt)")


def check_records(run_dir: Path, step: int, trajectories: bool) -> None:
    """Before resuming at ``step``: metrics.jsonl holds exactly steps 1..``step`` (rows after it are
    allowed; ``truncate_records`` drops them) and, with ``trajectories``, every step 1..``step`` has its
    parquet file. Raises ValueError naming the file and step otherwise (records are never dropped silently)."""
    mpath = run_dir / METRICS_FILE
    steps = []
    if mpath.is_file():
        rows, _, _ = _jsonl_rows(mpath)
        steps = [r.get("step") for r in rows]
        if any(not isinstance(x, int) for x in steps):
            bad = next(i for i, x in enumerate(steps) if not isinstance(x, int))
            raise ValueError(f"{mpath}: row {bad + 1} has no integer 'step' (the file is corrupt)")
    _check_steps(mpath, [x for x in steps if x <= step])
    if len([x for x in steps if x <= step]) < step:
        raise ValueError(f"{mpath}: the checkpoint is at step {step} but the metrics stop at step "
                         f"{len([x for x in steps if x <= step])} (rows are missing; the records are corrupt)")
    if trajectories:
        have = trajectory_files(run_dir)
        missing = [s for s in range(1, step + 1) if s not in have]
        if missing:
            raise ValueError(f"{run_dir / TRAJECTORY_DIR}: no trajectory file for step(s) {missing[:10]} although "
                             f"metrics.jsonl has their rows (the records are corrupt)")


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


def finite_or_null(x):
    """``x`` with every NaN/±inf float (nested in dicts, lists, numpy scalars) replaced by None: strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_null(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return finite_or_null(x.item())
    return x


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row as a line of strict JSON (NaN and ±inf become null; ``read_jsonl`` reads them as NaN)."""
    line = json.dumps(finite_or_null(row), default=_json_default, allow_nan=False) + "\n"
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
#: the parts of a checkpoint folder
MODEL_DIR, TRAINER_STATE_PT, TRAINER_STATE_JSON, COMPLETE_FILE = (
    "model", "trainer_state.pt", "trainer_state.json", "COMPLETE")
_TMP_PREFIX, _OLD = ".checkpoint.tmp-", ".checkpoint.old"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, I/O error); the previous checkpoint is kept."""


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


def _rng_split(st: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An ``rng_state()`` as (JSON-able python/numpy part, tensors-only torch/CUDA part)."""
    ver, internal, gauss = st["python"]
    name, keys, pos, has_gauss, cached = st["numpy"]
    js = {"python": [ver, list(internal), gauss],
          "numpy": [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}
    tens = {"torch": st["torch"]}
    if "cuda" in st:
        tens["cuda"] = list(st["cuda"])
    return js, tens


def _rng_join(js: dict[str, Any], tens: dict[str, Any]) -> dict[str, Any]:
    ver, internal, gauss = js["python"]
    name, keys, pos, has_gauss, cached = js["numpy"]
    st = {"python": (ver, tuple(internal), gauss),
          "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached), "torch": tens["torch"]}
    if "cuda" in tens:
        st["cuda"] = tens["cuda"]
    return st


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _disk_full(e: BaseException, where: Path) -> bool:
    """Whether a failed write looks like a full disk: ENOSPC, torch's RuntimeError from its zip writer
    (``file write failed`` / ``unexpected pos``), safetensors' StorageFull, or no free space left."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    msg = str(e)
    if any(t in msg for t in ("No space left", "file write failed", "unexpected pos", "StorageFull", "os error 28")):
        return True
    with contextlib.suppress(OSError):
        st = os.statvfs(where)
        return st.f_bavail * st.f_frsize < (1 << 20)
    return False


def model_card(cfg: TrainConfig, step: int, license: str = "mit") -> str:
    """A model card (README.md) for a policy trained by ``train``: YAML metadata (library_name,
    license, base_model, tags, via ``huggingface_hub.ModelCardData``) and a short description.
    ``license`` defaults to the project's (MIT); the base model's own licence still applies to its weights."""
    from huggingface_hub import ModelCardData

    base = cfg.model
    # base_model names a Hub model; local aliases ('tiny', a folder) are named in the text only
    hub_id = "/" in base and not Path(base).exists() and not base.endswith(".gguf")
    data = ModelCardData(library_name="transformers", license=license, base_model=base if hub_id else None,
                         tags=["ibpo_lab", "reinforcement-learning", cfg.estimator, cfg.task.split(":")[0]])
    return (f"---\n{data.to_yaml()}\n---\n\n# {cfg.name} (seed {cfg.seed}), step {step}\n\n"
            f"Policy trained by ibpo_lab (`python -m ibpo_lab.train`) from `{base}` with the `{cfg.estimator}` "
            f"estimator and the `{cfg.loss}` loss on the `{cfg.task}` task, {step} of {cfg.steps} steps "
            f"({cfg.prompts_per_step} prompts x {cfg.group_size} samples per step, lr {cfg.lr:g}).\n\n"
            "Load it with `transformers.AutoModelForCausalLM.from_pretrained(<this folder>)` or "
            "`ibpo_lab.models.load_policy(<this folder>)`. The run's config is in `trainer_state.json` "
            "next to this folder inside the run's checkpoint.\n")


def _drop_gguf_quantizer(model) -> None:
    """A policy loaded from a GGUF file keeps transformers' (dequantising) GGUF quantizer attached,
    which blocks ``save_pretrained``; its weights are plain tensors by then (as in ``models.cached_model``)."""
    q = getattr(model, "hf_quantizer", None)
    if q is not None and "gguf" in type(q).__name__.lower():
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")


def save_checkpoint(run_dir: Path, step: int, *, tensors: dict[str, Any], meta: dict[str, Any],
                    model=None, tokenizer=None, card: str | None = None) -> Path:
    """Write ``run_dir/checkpoint/``: ``model/`` (``model.save_pretrained`` as safetensors, the
    tokenizer, ``card`` as README.md), ``trainer_state.pt`` (``tensors``: tensors and plain values,
    loadable with ``weights_only=True``), ``trainer_state.json`` (``meta`` and the step) and, last,
    ``COMPLETE``. Written into ``.checkpoint.tmp-PID`` and renamed into place, so the previous
    checkpoint survives a crash or a full disk. Any failure (torch.save raises RuntimeError on a full
    disk, not OSError) removes the temporary folder and raises :class:`CheckpointWriteError`."""
    run_dir = Path(run_dir)
    final, old = run_dir / CHECKPOINT_DIR, run_dir / _OLD
    tmp = run_dir / f"{_TMP_PREFIX}{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if model is not None:
            _drop_gguf_quantizer(model)
            model.save_pretrained(tmp / MODEL_DIR, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / MODEL_DIR)
            if card is not None:
                _fsync_write(tmp / MODEL_DIR / "README.md", card.encode())
        with open(tmp / TRAINER_STATE_PT, "wb") as fh:
            torch.save(tensors, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_write(tmp / TRAINER_STATE_JSON,
                     json.dumps(finite_or_null({"step": int(step), **meta}), allow_nan=False, indent=1).encode())
        _fsync_write(tmp / COMPLETE_FILE, str(int(step)).encode())  # last: marks the folder complete
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        why = "disk full" if _disk_full(e, run_dir) else f"{type(e).__name__}: {e}"
        raise CheckpointWriteError(errno.ENOSPC if why == "disk full" else errno.EIO,
                                   f"could not write the checkpoint of step {step} in {run_dir}: {why}; "
                                   f"the previous checkpoint is kept") from e
    # a directory cannot be renamed onto a non-empty one: move the old one aside first. A kill between
    # the renames leaves complete checkpoints in .checkpoint.old / the temp folder: recover_checkpoint finds them
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _complete_step(d: Path) -> int | None:
    try:
        return int((d / COMPLETE_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _candidates(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    return [run_dir / CHECKPOINT_DIR, run_dir / _OLD] + sorted(run_dir.glob(f"{_TMP_PREFIX}*"))


def find_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder of a run (``checkpoint/``, or one a kill left as
    ``.checkpoint.old`` / ``.checkpoint.tmp-*``), None if there is none. Read-only."""
    best, best_step = None, -1
    for d in _candidates(Path(run_dir)):
        s = _complete_step(d)
        if s is not None and s > best_step:
            best, best_step = d, s
    return best


def recover_checkpoint(run_dir: Path) -> Path | None:
    """On start (holding the run's lock): put the newest complete checkpoint in place as
    ``checkpoint/`` and remove every other checkpoint folder (stale ``.checkpoint.tmp-*`` of killed
    runs, ``.checkpoint.old``, partial ones). Returns ``checkpoint/`` or None when none is complete.
    A checkpoint of the old pickle format (``state.pt``) is refused: loading it could run code."""
    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT_DIR
    if (final / "state.pt").is_file() and _complete_step(final) is None:
        raise ValueError(f"{final}: a checkpoint in the old pickle format (state.pt), which is not loaded because "
                         f"unpickling can run code; train again in a new folder")
    best = find_checkpoint(run_dir)
    for d in _candidates(run_dir):
        if d != best and d.exists():
            shutil.rmtree(d, ignore_errors=True)
    if best is None:
        return None
    if best != final:
        os.replace(best, final)
    return final


def load_checkpoint_state(run_dir: Path, map_location="cpu") -> dict[str, Any] | None:
    """The trainer state of the run's newest complete checkpoint: ``step``, the ``meta`` given to
    :func:`save_checkpoint` (config, counters, ``rng`` joined back into an ``rng_state()``), the
    tensors (``optimizer``, ``scheduler``...) read with ``weights_only=True``, and ``path``. None
    without a checkpoint; a truncated or garbage file is a ValueError naming it."""
    d = find_checkpoint(run_dir)
    if d is None:
        return None
    fj, fp = d / TRAINER_STATE_JSON, d / TRAINER_STATE_PT
    try:
        meta = json.loads(fj.read_bytes().decode("utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            raise ValueError("not a trainer state object with an integer step")
    except (OSError, ValueError) as e:
        raise ValueError(f"{fj}: unreadable checkpoint state ({e}); the checkpoint is corrupt") from None
    try:
        tens = torch.load(fp, map_location=map_location, weights_only=True)
        if not isinstance(tens, dict):
            raise ValueError("not a dict of tensors")
    except Exception as e:  # noqa: BLE001 — truncated zip, garbage, or a pickle weights_only refuses
        raise ValueError(f"{fp}: unreadable checkpoint state ({type(e).__name__}: {str(e)[:200]}); "
                         f"the checkpoint is corrupt") from None
    out = {**meta, **{k: v for k, v in tens.items() if k != "rng"}, "path": d}
    if "rng" in meta and "rng" in tens:
        out["rng"] = _rng_join(meta["rng"], tens["rng"])
    return out


def load_checkpoint_model(ckpt: Path, model) -> None:
    """Load ``ckpt/model``'s safetensors weights into ``model`` in place (exact values; tied weights
    are re-tied). Missing or unexpected weights are a ValueError naming the folder."""
    from safetensors.torch import load_file

    mdir = Path(ckpt) / MODEL_DIR
    index = mdir / "model.safetensors.index.json"
    try:
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                 else ["model.safetensors"])
        sd = {}
        for f in files:
            sd.update(load_file(str(mdir / f)))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{mdir}: unreadable model weights ({type(e).__name__}: {str(e)[:200]}); "
                         f"the checkpoint is corrupt") from None
    res = model.load_state_dict(sd, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in res.missing_keys if k not in tied and not (model.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or res.unexpected_keys:
        raise ValueError(f"{mdir}: weights do not match the model (missing {missing[:5]}, "
                         f"unexpected {res.unexpected_keys[:5]})")
    model.tie_weights()


def export(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy a run's trained policy (``checkpoint/model``: weights, tokenizer, model card) to ``out_dir``,
    a folder ``from_pretrained`` and ``models.load_policy`` read. ``out_dir`` must not exist or be empty.
    CLI: ``python -m ibpo_lab.runs export RUN_DIR OUT_DIR``."""
    ckpt = find_checkpoint(run_dir)
    if ckpt is None or not (ckpt / MODEL_DIR / "config.json").is_file():
        raise ValueError(f"run_dir: {run_dir} has no checkpoint with a model to export")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir: {out} exists and is not empty")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(ckpt / MODEL_DIR, tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"could not export to {out} ({e.strerror or e}); nothing partial was left") from e
    return out


def push_to_hub(run_dir: str | os.PathLike, repo_id: str, *, private: bool = True, token: str | None = None,
                commit_message: str | None = None):
    """Upload a run's trained policy (``checkpoint/model``, with its model card) to the Hugging Face Hub
    as ``repo_id`` (created if missing, private by default) with ``huggingface_hub.HfApi``. Returns the
    commit info. Refused with ``HF_HUB_OFFLINE=1``."""
    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ValueError("push_to_hub: HF_HUB_OFFLINE is set; unset it on a machine with internet to upload")
    ckpt = find_checkpoint(run_dir)
    if ckpt is None or not (ckpt / MODEL_DIR / "config.json").is_file():
        raise ValueError(f"run_dir: {run_dir} has no checkpoint with a model to push")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    step = _complete_step(ckpt)
    return api.upload_folder(folder_path=str(ckpt / MODEL_DIR), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message or f"ibpo_lab run {Path(run_dir).name}, step {step}")


# ======================================================================================== the run lock
class RunLockedError(ValueError):
    """Another live process is writing the run folder."""


class RunLock:
    """One writer per run folder: an exclusive ``fcntl.flock`` on ``run_dir/.lock``, which holds the
    holder's pid, host and start time. The kernel drops the lock when its process dies, so a lock
    left by a killed run never blocks. Use as a context manager or ``acquire()``/``release()``."""

    FILE = ".lock"

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / self.FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl
        import socket

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise RunLockedError(f"out_dir: {self.path.parent} is being written by another process "
                                 f"({holder or 'holder unknown'}); wait for it to finish or choose another --out") from None
        info = (f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


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
    """The frame as parquet with :data:`TRAJECTORY_SCHEMA`: every column present (null where the step
    had nothing for it), in one order, with one type. An undocumented column is a ValueError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    extra = [c for c in df.columns if c not in TRAJECTORY_HELP]
    if extra:
        raise ValueError(f"trajectory columns {extra} are not in runs.TRAJECTORY_HELP / TRAJECTORY_SCHEMA: "
                         f"document them there (the record has one fixed schema)")
    cols = {}
    for f in TRAJECTORY_SCHEMA:
        v = df[f.name] if f.name in df.columns else pd.Series([None] * len(df), dtype=object)
        cols[f.name] = pa.array(v.tolist() if v.dtype == object else v, type=f.type, from_pandas=True)
    table = pa.Table.from_pydict(cols, schema=TRAJECTORY_SCHEMA)
    b = io.BytesIO()
    pq.write_table(table, b)
    return b.getvalue()


def truncate_records(run_dir: Path, step: int) -> None:
    """Drop metric/eval rows and trajectory files written after ``step`` (the checkpoint's, or 0 when
    a killed run has none: it starts over). A half-written LAST line is dropped with a warning; any
    other bad line is a ValueError naming the file and line (nothing is dropped silently)."""
    for name in (METRICS_FILE, EVAL_FILE):
        p = run_dir / name
        if p.is_file():
            rows, lines, torn = _jsonl_rows(p)
            if torn:
                warnings.warn(f"{p}: dropping a truncated last line (run interrupted while writing)")
            for i, r in enumerate(rows):
                if not isinstance(r.get("step"), int):
                    raise ValueError(f"{p}: row {i + 1} has no integer 'step' (the file is corrupt)")
            keep = [ln + "\n" for r, ln in zip(rows, lines) if r["step"] <= step]
            if len(keep) != len(rows) or torn:
                atomic_write_text(p, "".join(keep))
    for s_, f in trajectory_files(run_dir).items():
        if s_ > step:
            f.unlink()



# ======================================================================================== tables
def mean_ci(x: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t interval for the mean of ``x`` (``scipy.stats.t``; NaN values
    dropped; NaN bounds with fewer than 2 values). THE interval of the lab's tables
    (:func:`summarise_runs`, :func:`final_table`, ...) and of the figures' ``band="ci"``
    (``viz.learning_curves``), so a table and a figure of the same runs agree. For a share of
    successes (an accuracy over independent 0/1 outcomes) use :func:`proportion_ci`, which stays in [0, 1]."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    a = np.asarray([v for v in x if not (isinstance(v, float) and math.isnan(v))], dtype=float)
    if len(a) == 0:
        return math.nan, math.nan, math.nan
    m = float(a.mean())
    if len(a) < 2:
        return m, math.nan, math.nan
    h = _t_quantile(confidence, len(a) - 1) * float(a.std(ddof=1)) / math.sqrt(len(a))
    return m, m - h, m + h


def _t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student-t critical value t with P(|T_df| <= t) = confidence: ``scipy.stats.t.ppf``
    when scipy is importable; without it (the borrowed GPU machine has no scipy, and ``train.evaluate``
    calls :func:`mean_ci` every evaluation) the exact integer-df CDF of Abramowitz & Stegun 26.7.3-4,
    A(t|df) = P(|T| <= t) as a finite series in theta = atan(t / sqrt(df)), inverted by bisection on
    theta (tests/test_intervals.py checks it equals scipy's to 1e-9)."""
    try:
        from scipy import stats
    except ImportError:
        pass
    else:
        return float(stats.t.ppf(0.5 + confidence / 2, df=df))
    df = int(df)

    def a_of(theta: float) -> float:  # A(t|df), t = sqrt(df)·tan(theta)
        c2, sn = math.cos(theta) ** 2, math.sin(theta)
        if df % 2:  # odd: (2/pi)(theta + sin cos (1 + 2/3 cos^2 + 2·4/(3·5) cos^4 + ... up to cos^(df-3)))
            term, total = 1.0, 0.0
            if df > 1:
                total = term
                for k in range(1, (df - 3) // 2 + 1):
                    term *= c2 * (2 * k) / (2 * k + 1)
                    total += term
            return 2 / math.pi * (theta + sn * math.cos(theta) * total)
        term = total = 1.0  # even: sin (1 + 1/2 cos^2 + 1·3/(2·4) cos^4 + ... up to cos^(df-2))
        for k in range(1, (df - 2) // 2 + 1):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return sn * total

    lo, hi = 0.0, math.pi / 2
    for _ in range(200):  # A is increasing in theta; 200 halvings reach float resolution
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if a_of(mid) < confidence else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def proportion_ci(successes: float, n: float, confidence: float = 0.95) -> tuple[float, float, float]:
    """(share, low, high): the Wilson score interval of a proportion ``successes / n``.

    Unlike a t or normal interval it stays inside [0, 1] and is not zero-width at 0/n or n/n: the
    interval for accuracies over independent 0/1 outcomes (pass@k over prompts; avg@k pooled over
    seeds, prompts and samples, so ``successes`` may be fractional). Written out (centre
    (k + z²/2)/(n + z²), half-width z/(n + z²)·sqrt(k(n−k)/n + z²/4)) rather than
    ``scipy.stats.binomtest(...).proportion_ci(method="wilson")``, which takes integer counts only;
    z comes from the standard library's ``statistics.NormalDist``, so no scipy is needed. NaNs when
    ``n == 0``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    k, n = float(successes), float(n)
    if n < 0 or not 0 <= k <= max(n, 0):
        raise ValueError(f"proportion_ci needs 0 <= successes <= n, got successes={successes!r}, n={n!r}")
    if n == 0:
        return math.nan, math.nan, math.nan
    import statistics

    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    z2 = z * z
    centre = (k + z2 / 2) / (n + z2)
    half = z / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4)
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the ends (the formula leaves float dust there)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return k / n, lo, hi


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


# ======================================================================================== CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ibpo_lab.runs export RUN_DIR OUT_DIR`` (the trained policy as a from_pretrained
    folder) and ``python -m ibpo_lab.runs push RUN_DIR REPO_ID [--public]`` (upload it to the Hub)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ibpo_lab.runs", description="Export or upload a run's trained policy.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="copy RUN_DIR/checkpoint/model (HF layout + model card) to OUT_DIR")
    e.add_argument("run_dir")
    e.add_argument("out_dir")
    h = sub.add_parser("push", help="upload RUN_DIR/checkpoint/model to the Hugging Face Hub as REPO_ID")
    h.add_argument("run_dir")
    h.add_argument("repo_id")
    h.add_argument("--public", action="store_true", help="create a public repo (default private)")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "export":
            print(export(a.run_dir, a.out_dir))
        else:
            print(push_to_hub(a.run_dir, a.repo_id, private=not a.public))
    except ValueError as err:
        ap.error(str(err))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
