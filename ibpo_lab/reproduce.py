"""Reproduction pipeline: runs the lab's notebooks with papermill and writes a report.

``python -m ibpo_lab.reproduce --profile smoke|cpu|full [--only 01 04 ...] [-p key value ...]``

Profiles are the rows of ``ibpo_lab.config.PROFILES``: ``smoke`` (CI, minutes), ``cpu`` (the main job:
the paper's claims measured on a 2-core CPU in <= 15 min, two notebooks at a time), ``full`` (one GPU).
A profile row may skip notebooks (``skip``, with the reason, listed in the report) and run several
at once (``jobs``, each kernel on ``threads`` torch threads; ``09_results`` waits for the others).

Every notebook in ``notebooks/`` named ``NN_name.ipynb`` runs in reading order into a
timestamped folder::

    runs/<stamp>-<profile>[-<overrides>]/   e.g. 20261130-0500-smoke-steps=3_seeds=0,1
        notebooks/NN_name.ipynb      executed copies (outputs included)
        figures/NN_name/*.png        what each notebook saved with ``viz.save_fig``
        figures/NN_name/*.csv        tables saved with ``viz.save_table``
        figures/NN_name/*.html       HTML views saved with ``viz.save_html`` (token colouring, diffs)
        records/                     training run records (``runs_dir`` of the notebooks)
        figures/NN_name/claims.json  the notebook's claim rows (``ibpo_lab.claims``)
        status.json                  the -p overrides; per notebook: ok/failed/skipped, wall and CPU time,
                                     error; load
        report.md, report.html       "what this run shows" (every claim: measured difference, interval,
                                     verdict), key figures, results tables, failures with their error

Every notebook receives ``profile`` and ``out_dir`` (its figures folder) and, when it declares
it, ``runs_dir`` (the shared records folder). A failed notebook is marked failed with its error
and the run goes on; the exit status is 1 if any notebook failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import ast
import html
import json
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "PROFILES",
    "NotebookResult",
    "find_notebooks",
    "notebooks_dir",
    "select_notebooks",
    "notebook_parameters",
    "kernel_manager_class",
    "parse_overrides",
    "check_profile",
    "check_kernel",
    "run_notebook",
    "reproduce",
    "write_report",
    "overrides_text",
    "overrides_slug",
    "collect_claims",
    "update_wall_times",
    "main",
]

from ibpo_lab.config import PROFILES  # noqa: E402  (one table: reproduce reads the same rows)

#: parameters reproduce.py passes itself; ``-p`` may not override them
RESERVED = ("profile", "out_dir", "runs_dir")
KERNEL = "python3"
REPO_ROOT = Path(__file__).resolve().parents[1]


def notebooks_dir() -> Path:
    """Where the ``NN_name.ipynb`` notebooks are: the checkout's ``notebooks/`` (a clone or an editable
    install), else the copies an installed wheel carries (``ibpo_lab/notebooks``, pyproject's
    package-dir); the checkout's path when neither has notebooks."""
    repo = REPO_ROOT / "notebooks"
    for d in (repo, Path(__file__).resolve().parent / "notebooks"):
        if any(d.glob("[0-9][0-9]_*.ipynb")):
            return d
    return repo


DEFAULT_NOTEBOOKS = notebooks_dir()
#: the figures a newcomer should see first: shown at the top of the report when their notebook ran
KEY_FIGURES = (
    "figures/03_advantages_and_credit/credit_quality_bars.png",
    "figures/03_advantages_and_credit/gradient_variance.png",
    "figures/04_training_synthetic/curves_estimators.png",
    "figures/07_variance/variance_decomposition.png",
    "figures/01_quickstart/advantages_by_estimator.png",
)
_NB_NAME = re.compile(r"^(\d{2})_[A-Za-z0-9_]+\.ipynb$")


class UsageError(ValueError):
    """Bad command-line input (unknown parameter, unknown notebook, full without a GPU)."""


@dataclass
class NotebookResult:
    """Outcome of one notebook run."""

    name: str = field(metadata={"help": "notebook stem, e.g. 01_quickstart"})
    status: str = field(default="pending", metadata={"help": "ok, failed or skipped"})
    seconds: float = field(default=0.0, metadata={"help": "wall time of the execution"})
    figures: list[str] = field(default_factory=list, metadata={"help": "PNG paths relative to the run folder"})
    tables: list[str] = field(default_factory=list, metadata={"help": "CSV paths relative to the run folder"})
    views: list[str] = field(default_factory=list, metadata={"help": "HTML views (viz.save_html) relative to the run folder"})
    error: str | None = field(default=None, metadata={"help": "exception name and message when failed"})
    error_cell: str | None = field(default=None, metadata={"help": "source of the failing cell"})
    cpu_seconds: float = field(default=0.0, metadata={"help": "CPU time of the notebook's kernel (user + system)"})
    note: str | None = field(default=None, metadata={"help": "why a notebook was skipped in this profile"})
    parameters: dict[str, Any] = field(default_factory=dict, metadata={"help": "parameters injected"})


# ---------------------------------------------------------------------------------------- notebooks
def find_notebooks(notebooks_dir: str | Path = DEFAULT_NOTEBOOKS) -> list[Path]:
    """The ``NN_name.ipynb`` notebooks of ``notebooks_dir`` in reading order."""
    d = Path(notebooks_dir)
    if not d.is_dir():
        raise UsageError(f"notebooks_dir: {d} is not a directory")
    return sorted(p for p in d.glob("*.ipynb") if _NB_NAME.match(p.name))


def select_notebooks(notebooks: Sequence[Path], only: Sequence[str] | None) -> list[Path]:
    """Keep the notebooks matching ``only`` (a number like ``4``/``04``, a full stem, or a
    substring of the stem such as ``quickstart``), in reading order. Unknown → UsageError."""
    if not only:
        return list(notebooks)
    keep: set[Path] = set()
    for sel in only:
        s = str(sel).strip()
        if s.isdigit():
            hit = [p for p in notebooks if p.name[:2] == f"{int(s):02d}"]
        else:
            hit = [p for p in notebooks if s == p.stem or s in p.stem]
        if not hit:
            names = ", ".join(p.stem for p in notebooks)
            raise UsageError(f"--only: no notebook matches {s!r}; available: {names}")
        keep.update(hit)
    return [p for p in notebooks if p in keep]


def notebook_parameters(path: str | Path) -> dict[str, dict[str, Any]]:
    """The parameters of a notebook's ``parameters``-tagged cell, as papermill reads them:
    name → {"default": source text, "type": inferred type name, "help": comment}."""
    import papermill

    params = papermill.inspect_notebook(str(path))
    return {
        k: {"default": v.get("default"), "type": v.get("inferred_type_name"), "help": v.get("help", "")}
        for k, v in params.items()
    }


def parse_value(text: str) -> Any:
    """A ``-p`` value: a Python literal (``3``, ``0.5``, ``True``, ``None``, ``['grpo', 'ibpo']``)
    or, failing that, the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _container(spec: dict[str, Any]) -> str | None:
    """``"list"`` or ``"dict"`` when a declared parameter takes one: its default is such a literal
    (``estimators = ["grpo", "ibpo"]``) or its annotation names one (``seeds: list = None``)."""
    try:
        default = ast.literal_eval(spec.get("default") or "None")
    except (ValueError, SyntaxError):
        default = None
    if isinstance(default, (list, tuple)):
        return "list"
    if isinstance(default, dict):
        return "dict"
    m = re.match(r"\s*(?:typing\.)?(?:optional\[)?\s*(list|tuple|sequence|dict|mapping)\b", str(spec.get("type") or ""), re.I)
    if m:
        return "dict" if m.group(1).lower() in ("dict", "mapping") else "list"
    return None


def _check_kind(key: str, value: Any, declared: dict[str, dict[str, dict[str, Any]]]) -> None:
    """A parameter that takes a list (or dict) must get one: ``-p estimators grpo,ibpo`` is the
    string 'grpo,ibpo', which a notebook would iterate character by character."""
    specs = {nb: ps[key] for nb, ps in declared.items() if key in ps}
    kinds = {nb: k for nb, sp in specs.items() if (k := _container(sp))}
    if not kinds:
        return
    kind = next(iter(kinds.values()))
    ok = (list, tuple) if kind == "list" else (dict,)
    if isinstance(value, ok):
        return
    if value is None and any(str(sp.get("default")).strip() == "None" for sp in specs.values()):
        return
    nb = next(iter(kinds))
    got = f"the string {value!r}" if isinstance(value, str) else f"{type(value).__name__} {value!r}"
    hint = ""
    if kind == "list" and isinstance(value, str) and "," in value:
        items = [v.strip() for v in value.split(",") if v.strip()]
        hint = f"; write it as a Python list: -p {key} \"{[parse_value(v) for v in items]!r}\""
    raise UsageError(f"-p {key}: expected a {kind} ({nb} declares {key} = {specs[nb]['default']}), got {got}{hint}")


def parse_overrides(pairs: Sequence[Sequence[str]] | None, notebooks: Sequence[Path]) -> dict[str, Any]:
    """Validate ``-p key value`` pairs against the parameters the selected notebooks declare.

    A key no selected notebook declares → UsageError listing each notebook's parameters; a value
    of the wrong kind for a parameter that takes a list or dict (see :func:`_container`) →
    UsageError "expected a list", before any notebook runs.
    """
    overrides: dict[str, Any] = {}
    if not pairs:
        return overrides
    declared = {p.stem: notebook_parameters(p) for p in notebooks}
    known = set().union(*[set(v) for v in declared.values()]) if declared else set()
    for key, value in pairs:
        if key in RESERVED:
            raise UsageError(
                f"-p {key}: {key!r} is set by reproduce itself"
                + (" (use --profile)" if key == "profile" else " (use --out)")
            )
        if key not in known:
            listing = "\n".join(
                f"  {nb}: " + ", ".join(k for k in ps if k not in RESERVED) for nb, ps in declared.items()
            )
            raise UsageError(f"-p {key}: no selected notebook has a parameter {key!r}. Parameters:\n{listing}")
        overrides[key] = parse_value(value)
        _check_kind(key, overrides[key], declared)
    return overrides


def check_profile(profile: str) -> None:
    """A profile is a row of ``config.PROFILES``; a GPU row (``full``) needs a CUDA GPU: say so here,
    before any notebook loads a model, and why torch sees none (``gpu_check.cuda_diagnosis``)."""
    if profile not in PROFILES:
        raise UsageError(f"--profile: unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if PROFILES[profile].get("gpu"):
        import torch

        if not torch.cuda.is_available():
            from ibpo_lab.gpu_check import cuda_diagnosis

            raise UsageError(
                "--profile full needs a CUDA GPU (it trains 1.5B-parameter models with vLLM sampling) "
                "and torch.cuda.is_available() is False on this machine. "
                "Use --profile cpu (or smoke) on a CPU, or run on a machine with one 80 GB GPU. "
                f"Why: {cuda_diagnosis()}"
            )


def check_kernel(log=print) -> None:
    """The notebooks run in the Jupyter kernel named ``python3``; say how to install it if missing,
    and warn when it is another interpreter than this one (it may lack ibpo_lab)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        raise UsageError(
            f"no Jupyter kernel named {KERNEL!r}: install this environment's with "
            f"`{sys.executable} -m ipykernel install --sys-prefix --name {KERNEL}` (scripts/run.sh does)"
        ) from None
    exe = spec.argv[0] if spec.argv else ""
    if os.path.isabs(exe) and Path(exe).resolve() != Path(sys.executable).resolve():
        log(f"[reproduce] note: kernel {KERNEL!r} runs {exe}, not this interpreter ({sys.executable})")


# ---------------------------------------------------------------------------------------- running
def _kernel_env(profile: str) -> None:
    """The environment the kernels inherit (see the comment below); a profile with ``threads`` pins
    each kernel's torch/OpenMP threads (two kernels on two cores: one thread each)."""
    # The kernel inherits our environment. MPLBACKEND=Agg (set by scripts/run.sh for scripts)
    # would stop figures from showing in the executed notebooks, so the kernel gets the inline
    # backend; threads must not busy-wait on a small shared CPU. smoke never downloads; full may
    # fetch its hub model unless the caller set HF_HUB_OFFLINE.
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not PROFILES[profile].get("gpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = PROFILES[profile].get("threads")
    if threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(int(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


_KERNEL_MANAGER: list[type] = []


def kernel_manager_class() -> type:
    """The kernel manager papermill starts each notebook's kernel with: jupyter_client's
    ``AsyncKernelManager`` with two changes that keep the log to what matters.

    * Transport: IPC (Unix sockets, one private path per kernel under the temp folder) on POSIX, so the
      kernel opens no TCP port and does not warn "Kernel is running over TCP without encryption", and
      kernels started at the same time never share a socket; Windows keeps TCP.
    * Shutdown: jupyter_client interrupts (SIGINT) a kernel before asking it to shut down. After the
      last cell there is nothing to interrupt, and the signal can land while the kernel finishes its
      last message, which prints a spurious "KeyboardInterrupt caught in kernel". The interrupt is
      skipped while shutting down; interrupts at other times (a cell timeout) still go through."""
    if _KERNEL_MANAGER:
        return _KERNEL_MANAGER[0]
    from jupyter_client.manager import AsyncKernelManager

    class QuietKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            if os.name == "posix":
                self.transport = "ipc"
                # jupyter_client's default socket path is ``kernel-ipc-<n>`` in the working folder, n the
                # first free number: two kernels started at once (``jobs`` > 1) can take the same n and
                # read each other's messages ("Invalid Signature"). One private path per kernel instead.
                import tempfile
                import uuid

                d = Path(tempfile.gettempdir()) / f"ibpo-kernels-{os.getuid()}"
                d.mkdir(mode=0o700, exist_ok=True)
                self.ip = str(d / f"{os.getpid()}-{uuid.uuid4().hex[:8]}")

        async def _async_interrupt_kernel(self) -> None:
            if self.shutting_down:
                return
            await super()._async_interrupt_kernel()

    _KERNEL_MANAGER.append(QuietKernelManager)
    return QuietKernelManager


def _collect(folder: Path, run_dir: Path, ext: str) -> list[str]:
    if not folder.is_dir():
        return []
    return [str(p.relative_to(run_dir)) for p in sorted(folder.rglob(f"*.{ext}"))]


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the kernels, once shut down)."""
    try:
        import resource

        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime
    except (ImportError, OSError):  # Windows: no resource module
        return 0.0


def _load() -> str:
    try:
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"
    except (AttributeError, OSError):
        return "load average unknown"


def run_notebook(
    path: Path,
    run_dir: Path,
    profile: str,
    overrides: dict[str, Any] | None = None,
    *,
    cell_timeout: int | None = None,
    progress_bar: bool = False,
) -> NotebookResult:
    """Execute one notebook into ``run_dir`` and return its result (never raises on notebook errors)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    name = path.stem
    fig_dir = run_dir / "figures" / name
    fig_dir.mkdir(parents=True, exist_ok=True)
    records = run_dir / "records"
    records.mkdir(parents=True, exist_ok=True)
    declared = notebook_parameters(path)
    params: dict[str, Any] = {"profile": profile, "out_dir": str(fig_dir.resolve())}
    if "runs_dir" in declared:
        params["runs_dir"] = str(records.resolve())
    params.update({k: v for k, v in (overrides or {}).items() if k in declared})
    res = NotebookResult(name=name, parameters=params)
    out_nb = run_dir / "notebooks" / path.name
    out_nb.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ru0 = _children_cpu()
    try:
        papermill.execute_notebook(
            str(path),
            str(out_nb),
            parameters=params,
            kernel_name=KERNEL,
            kernel_manager_class=kernel_manager_class(),
            cwd=str(path.parent),
            progress_bar=progress_bar,
            execution_timeout=cell_timeout,
        )
        res.status = "ok"
    except PapermillExecutionError as e:
        res.status = "failed"
        res.error = f"{e.ename}: {e.evalue}"
        res.error_cell = e.source
    except Exception as e:  # kernel died, timeout, bad notebook file: still a failed notebook
        res.status = "failed"
        res.error = f"{type(e).__name__}: {e}"
        res.error_cell = traceback.format_exc(limit=3)
    res.seconds = time.perf_counter() - t0
    res.cpu_seconds = _children_cpu() - ru0
    res.figures = _collect(fig_dir, run_dir, "png")
    res.tables = _collect(fig_dir, run_dir, "csv")
    res.views = _collect(fig_dir, run_dir, "html")
    return res


def reproduce(
    profile: str = "smoke",
    *,
    only: Sequence[str] | None = None,
    overrides: Sequence[Sequence[str]] | None = None,
    out: str | Path = "runs",
    notebooks_dir: str | Path = DEFAULT_NOTEBOOKS,
    cell_timeout: int | None = None,
    stamp: str | None = None,
    log=print,
    progress_bar: bool = False,
) -> tuple[Path, list[NotebookResult]]:
    """Run the selected notebooks in order into ``out/<stamp>-<profile>/`` and write the report.

    Returns (run folder, results). Raises UsageError on bad input before anything runs.
    """
    check_profile(profile)
    notebooks = select_notebooks(find_notebooks(notebooks_dir), only)
    if not notebooks:
        raise UsageError(f"notebooks_dir: no NN_name.ipynb notebooks in {notebooks_dir}")
    params = parse_overrides(overrides, notebooks)
    check_kernel(log)
    stamp = stamp or datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{profile}" + (f"-{overrides_slug(params)}" if params else "")
    run_dir = Path(out) / base
    n = 1
    while run_dir.exists():  # two runs started in the same second: never mix their records
        n += 1
        run_dir = Path(out) / f"{base}-{n}"
    run_dir.mkdir(parents=True)
    _kernel_env(profile)
    prof = PROFILES[profile]
    named = {str(x).strip().zfill(2) for x in (only or []) if str(x).strip().isdigit()}
    skipped = [nb for nb in notebooks if nb.name[:2] in prof.get("skip", {}) and nb.name[:2] not in named]
    todo = [nb for nb in notebooks if nb not in skipped]
    jobs = max(1, int(prof.get("jobs") or 1))
    load_start = _load()
    commit = _commit()
    log(f"[reproduce] profile={profile}{' ' + overrides_text(params) if params else ''}: {len(todo)} notebooks "
        f"({jobs} at a time) -> {run_dir}; {load_start}")
    results: dict[Path, NotebookResult] = {
        nb: NotebookResult(name=nb.stem, status="skipped", note=prof["skip"][nb.name[:2]]) for nb in skipped}
    for nb in skipped:
        log(f"[skip] {nb.stem}: {prof['skip'][nb.name[:2]]}")
    t_start = time.perf_counter()
    ordered = lambda: [results[nb] for nb in notebooks if nb in results]  # noqa: E731

    def done(nb: Path, res: NotebookResult) -> None:
        results[nb] = res
        msg = f"[{len(results) - len(skipped)}/{len(todo)}] {nb.stem}: {res.status} ({res.seconds:.1f} s wall, " \
              f"{res.cpu_seconds:.1f} s CPU, {len(res.figures)} figures; elapsed {time.perf_counter() - t_start:.0f} s)"
        if res.error:
            msg += f"\n      {res.error.splitlines()[0][:300]}"
        log(msg)
        # status after each notebook, so an interrupted run still says how far it got
        _write_status(run_dir, profile, ordered(), time.perf_counter() - t_start, commit=commit, overrides=params)

    # the results notebook reads every other notebook's records: it runs last, alone
    last = [nb for nb in todo if "results" in nb.stem]
    first = [nb for nb in todo if nb not in last]
    if jobs > 1 and len(first) > 1:
        # the longest notebooks (the profile's ``first``) start first so the two queues end together
        lead = [nb for k in prof.get("first", []) for nb in first if nb.name[:2] == k]
        first = lead + [nb for nb in first if nb not in lead]
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futs = {}
            for nb in first:
                log(f"[queued] {nb.stem}")
                futs[pool.submit(run_notebook, nb, run_dir, profile, params, cell_timeout=cell_timeout)] = nb
            for fut in as_completed(futs):
                nb = futs[fut]
                try:
                    res = fut.result()
                except Exception as e:  # the worker process died: still a failed notebook
                    res = NotebookResult(name=nb.stem, status="failed", error=f"{type(e).__name__}: {e}")
                done(nb, res)
        first = []
    for nb in first + last:
        log(f"[start] {nb.stem} (elapsed {time.perf_counter() - t_start:.0f} s)")
        done(nb, run_notebook(nb, run_dir, profile, params, cell_timeout=cell_timeout, progress_bar=progress_bar))
    results = ordered()
    total = time.perf_counter() - t_start
    load = {"start": load_start, "end": _load()}
    write_report(run_dir, profile, results, total, load=load, commit=commit, overrides=params)
    n_bad = sum(r.status == "failed" for r in results)
    n_run = sum(r.status != "skipped" for r in results)
    log(
        f"[reproduce] {n_run - n_bad}/{n_run} notebooks ok in {total:.0f} s "
        f"(CPU {sum(r.cpu_seconds for r in results):.0f} s; {load['end']}); report: {run_dir / 'report.md'}"
    )
    return run_dir, results


# ---------------------------------------------------------------------------------------- report
def _value_text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_value_text(x) for x in v)
    return str(v)


def overrides_text(overrides: dict[str, Any] | None) -> str:
    """The ``-p`` overrides as people read them: ``steps=3, seeds=0,1`` (``none`` without any)."""
    if not overrides:
        return "none"
    return ", ".join(f"{k}={_value_text(v)}" for k, v in overrides.items())


def overrides_slug(overrides: dict[str, Any], max_len: int = 60) -> str:
    """The overrides as a folder-name part: ``steps=3_seeds=0,1`` (characters other than letters,
    digits and ``=,.-`` become ``-``); longer than ``max_len``: cut, plus 8 hex digits of a hash of
    the full text, so two different override sets never share a folder name."""
    import hashlib

    full = "_".join(f"{k}={_value_text(v)}" for k, v in overrides.items())
    slug = re.sub(r"[^A-Za-z0-9=,._-]+", "-", full).strip("-.")
    if len(slug) > max_len:
        slug = slug[: max_len - 9].rstrip("-_.,=") + "-" + hashlib.sha1(full.encode()).hexdigest()[:8]
    return slug


def _write_status(run_dir: Path, profile: str, results: list[NotebookResult], seconds: float,
                  load: dict[str, str] | None = None, commit: str | None = None,
                  overrides: dict[str, Any] | None = None) -> None:
    data = {"profile": profile, "overrides": dict(overrides or {}), "seconds": round(seconds, 1),
            "commit": commit or _commit(), "cpu_seconds": round(sum(r.cpu_seconds for r in results), 1),
            "load": load or {},
            "notebooks": [asdict(r) for r in results]}
    (run_dir / "status.json").write_text(json.dumps(data, indent=1, default=str))


def _commit() -> str:
    """The repository commit the notebooks ran at (``+dirty`` with uncommitted changes), or ``unknown``."""
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def _machine() -> str:
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # the report must not fail because torch is unhappy
        pass
    return f"{platform.node()} · {os.cpu_count()} CPU cores · {gpu} · Python {platform.python_version()}"


def _read_table(run_dir: Path, rel: str, max_rows: int = 40):
    import pandas as pd

    df = pd.read_csv(run_dir / rel)
    # tabulate prints booleans as 1/0; show them as words
    df = df.astype({c: str for c in df.columns if df[c].dtype == bool})
    note = f" (first {max_rows} of {len(df)} rows)" if len(df) > max_rows else ""
    return df.head(max_rows), note


#: most columns one Markdown table shows; wider tables are split into column blocks (the key columns
#: repeated in each) so that no table runs off a 1400 px page
MD_MAX_COLUMNS = 8


def _key_columns(df) -> list[str]:
    """The leading text columns that name a row (experiment, label, ...), repeated in every block."""
    import pandas as pd

    keys = []
    for c in df.columns:
        if pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c]) or len(keys) >= 3:
            break
        keys.append(c)
    return keys


def _md_table(df, max_cols: int = MD_MAX_COLUMNS) -> str:
    """``df`` as Markdown, split into blocks of at most ``max_cols`` columns (key columns repeated)."""
    if len(df.columns) <= max_cols:
        return df.to_markdown(index=False, floatfmt=".4g")
    keys = _key_columns(df)
    rest = [c for c in df.columns if c not in keys]
    width = max(max_cols - len(keys), 1)
    blocks = [df[keys + rest[i:i + width]].to_markdown(index=False, floatfmt=".4g")
              for i in range(0, len(rest), width)]
    return f"({len(df.columns)} columns, in {len(blocks)} blocks; {', '.join(keys) or 'no key column'} repeated)\n\n" + "\n\n".join(blocks)


def _html_table(df) -> str:
    """``df`` as HTML in a box that scrolls sideways when the table is wider than the page."""
    return f"<div class='table-wrap'>{df.to_html(index=False, float_format='%.4g')}</div>"


def _results_tables(run_dir: Path, results: list[NotebookResult]) -> list[tuple[str, str]]:
    # the results notebook's summary tables go to the top of the report
    out = []
    for r in results:
        if "results" in r.name:
            out += [(r.name, t) for t in r.tables]
    return out


def collect_claims(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every notebook's claim rows (``figures/<notebook>/claims.json``), in notebook order. An unreadable
    file becomes one row saying so (verdict "not resolved at this size"), never a silent gap."""
    from ibpo_lab.claims import CLAIMS_FILE, read_claims

    rows = []
    for f in sorted(Path(run_dir).glob(f"figures/*/{CLAIMS_FILE}")):
        try:
            rows += read_claims(f)
        except ValueError as e:
            rows.append({"notebook": f.parent.name, "claim": f"(claims file unreadable: {e})", "measure": "", "a": "",
                         "b": "", "value_a": None, "value_b": None, "estimate": None, "lo": None, "hi": None,
                         "null": 0.0, "expect": "higher", "n": "", "interval": "", "note": "",
                         "verdict": "not resolved at this size"})
    return rows


def _shows(rows: list[dict[str, Any]], results: list[NotebookResult], profile: str):
    """The "what this run shows" section: (markdown lines, html lines)."""
    from ibpo_lab.claims import claims_frame

    n_res = sum(r["verdict"] == "resolved" for r in rows)
    intro = (f"{len(rows)} claims of the paper measured in this run; {n_res} resolved at this size (the 95% interval "
             "excludes no effect on the side the paper claims). Each row: the two arms, the measured difference "
             "(or ratio), its interval, the sample size n and the verdict.")
    md = ["## What this run shows", ""]
    hl = ["<h2>What this run shows</h2>"]
    if not rows:
        md += ["No notebook wrote claim rows in this run.", ""]
        hl += ["<p>No notebook wrote claim rows in this run.</p>"]
    else:
        df = claims_frame(rows)
        md += [intro, "", df.to_markdown(index=False), ""]
        hl += [f"<p>{html.escape(intro)}</p>", _html_table(df)]
        notes = [f"{r['notebook']}: {r['note']}" for r in rows if r.get("note")]
        if notes:
            md += [f"- {n}" for n in notes] + [""]
            hl += ["<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]
    skipped = [r for r in results if r.status == "skipped"]
    if skipped:
        line = "Not run in this profile: " + "; ".join(f"{r.name} ({r.note})" for r in skipped) + "."
        md += [line, ""]
        hl += [f"<p>{html.escape(line)}</p>"]
    return md, hl


def write_report(run_dir: Path, profile: str, results: list[NotebookResult], seconds: float,
                 load: dict[str, str] | None = None, commit: str | None = None,
                 overrides: dict[str, Any] | None = None) -> Path:
    """Write ``status.json``, ``report.md`` and ``report.html`` into ``run_dir``; returns report.md.

    The report opens with "what this run shows" (:func:`collect_claims`), then the key figures. The
    ``-p`` overrides are stated under the title; statuses are words ("ok", "failed", "skipped"), not
    emoji (which render as empty boxes without an emoji font); wide tables are split into column
    blocks in Markdown and scroll sideways in HTML."""
    import pandas as pd

    commit = commit or _commit()  # reproduce passes the commit the notebooks started at
    _write_status(run_dir, profile, results, seconds, load, commit, overrides)
    n_ok = sum(r.status == "ok" for r in results)
    n_run = sum(r.status != "skipped" for r in results)
    overview = pd.DataFrame(
        [
            {
                "notebook": r.name,
                "status": r.status,
                "wall time (s)": round(r.seconds, 1),
                "CPU time (s)": round(r.cpu_seconds, 1),
                "figures": len(r.figures),
                "tables": len(r.tables),
            }
            for r in results
        ]
    )
    head = (
        f"profile **{profile}** · {n_ok}/{n_run} notebooks ok · total {seconds:.0f} s wall, "
        f"{sum(r.cpu_seconds for r in results):.0f} s CPU · {datetime.now():%Y-%m-%d %H:%M} · commit {commit} · "
        f"{_machine()}" + (f" · at start {load['start']}, at end {load['end']}" if load else "")
    )
    given = f"overrides (-p): {overrides_text(overrides)}"
    shows_md, shows_hl = _shows(collect_claims(run_dir), results, profile)
    md = [f"# ibpo_lab reproduction report ({profile})", "", head, "", given, ""] + shows_md
    hl = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>ibpo_lab report ({html.escape(profile)})</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
        "pre{background:#fee;padding:6px;overflow-x:auto}"
        ".table-wrap{max-width:100%;overflow-x:auto;font-size:90%}</style></head><body>",
        f"<h1>ibpo_lab reproduction report ({html.escape(profile)})</h1>",
        f"<p>{html.escape(head.replace('**', ''))}</p>",
        f"<p>{html.escape(given)}</p>",
        *shows_hl,
    ]
    key = [f for f in KEY_FIGURES if any(f in r.figures for r in results)]
    if key:
        md += ["## Key figures", ""] + [f"![{Path(f).parent.name}: {Path(f).stem.replace('_', ' ')}]({f})\n" for f in key]
        hl += ["<h2>Key figures</h2>"] + [f"<figure><img src='{html.escape(f)}'><figcaption>"
                                          f"{html.escape(Path(f).parent.name)}</figcaption></figure>" for f in key]
    md += ["## Notebooks", "", _md_table(overview), ""]
    hl += ["<h2>Notebooks</h2>", _html_table(overview)]
    summary = _results_tables(run_dir, results)
    if summary:
        md += ["## Results", ""]
        hl += ["<h2>Results</h2>"]
        for _, rel in summary:
            df, note = _read_table(run_dir, rel)
            title = Path(rel).stem.replace("_", " ")
            md += [f"### {title}{note}", "", _md_table(df), ""]
            hl += [f"<h3>{html.escape(title + note)}</h3>", _html_table(df)]
    for r in results:
        md += [f"## {r.name} — {r.status} ({r.seconds:.1f} s)", "", f"executed notebook: `notebooks/{r.name}.ipynb`", ""]
        hl += [f"<h2>{html.escape(r.name)} — {r.status} ({r.seconds:.1f} s)</h2>"]
        if r.note:
            md += [f"Not run: {r.note}", ""]
            hl += [f"<p>Not run: {html.escape(r.note)}</p>"]
        if r.error:
            md += ["**Error:**", "", "```", r.error, "```", ""]
            hl += [f"<p><b>Error:</b></p><pre>{html.escape(r.error)}</pre>"]
            if r.error_cell:
                md += ["in the cell:", "", "```python", r.error_cell.strip()[:2000], "```", ""]
                hl += [f"<p>in the cell:</p><pre>{html.escape(r.error_cell.strip()[:2000])}</pre>"]
        for fig in r.figures:
            cap = Path(fig).stem.replace("_", " ")
            md += [f"![{cap}]({fig})", ""]
            hl += [f"<figure><img src='{html.escape(fig)}'><figcaption>{html.escape(cap)}</figcaption></figure>"]
        for view in r.views:
            frag = (run_dir / view).read_text(encoding="utf-8")
            cap = Path(view).stem.replace("_", " ")
            # raw HTML: rendered by the HTML report and by Markdown viewers that allow inline HTML
            md += [f"**{cap}**", "", frag, ""]
            hl += [f"<h4>{html.escape(cap)}</h4>", frag]
        for tab in r.tables:
            if (r.name, tab) in summary:
                continue
            df, note = _read_table(run_dir, tab)
            title = Path(tab).stem.replace("_", " ")
            md += [f"**{title}**{note}", "", _md_table(df), ""]
            hl += [f"<h4>{html.escape(title + note)}</h4>", _html_table(df)]
    hl += ["</body></html>"]
    (run_dir / "report.html").write_text("\n".join(hl))
    path = run_dir / "report.md"
    path.write_text("\n".join(md))
    return path


# ---------------------------------------------------------------------------------------- wall times
DOCS = REPO_ROOT / "docs" / "notebooks.md"
WALL_TIMES = REPO_ROOT / "docs" / "wall_times.json"
_BEGIN, _END = "<!-- wall-times:begin (written by python -m ibpo_lab.reproduce --record-times RUN) -->", \
    "<!-- wall-times:end -->"


def wall_time_table(times: dict[str, Any]) -> str:
    """The markdown table of measured wall times: one row per notebook, one column per recorded
    profile (``times``: profile -> {"notebooks": {name: [status, wall s, CPU s]}, "total", "cpu", "load",
    "date", "commit"}), then the total and the machine's load."""
    profiles = [p for p in PROFILES if p in times]
    names = sorted({n for p in profiles for n in times[p]["notebooks"]})
    lines = ["| notebook | " + " | ".join(f"`{p}` wall (CPU)" for p in profiles) + " |",
             "|---|" + "---|" * len(profiles)]

    def cell(p, n):
        v = times[p]["notebooks"].get(n)
        if v is None:
            return "not run"
        status, wall, cpu = v
        return "skipped" if status == "skipped" else f"{wall:.0f} s ({cpu:.0f} s)" + ("" if status == "ok" else " FAILED")

    for n in names:
        lines.append(f"| {n} | " + " | ".join(cell(p, n) for p in profiles) + " |")
    lines.append("| **all notebooks** | " + " | ".join(
        f"**{times[p]['total']:.0f} s** ({times[p]['cpu']:.0f} s)" for p in profiles) + " |")
    notes = [f"- `{p}`: measured {times[p]['date']} at commit {times[p]['commit']}, {times[p].get('jobs', 1)} "
             f"notebook(s) at a time; {times[p]['load']}" for p in profiles]
    return "\n".join(lines + [""] + notes)


def update_wall_times(run_dir: str | Path, docs: str | Path = DOCS, store: str | Path = WALL_TIMES) -> Path:
    """Record a finished run's measured times (its ``status.json``) for its profile in ``store`` and
    rewrite the table between the wall-time markers of ``docs`` — the docs' and notebooks' wall-time
    statements come from measured runs, never estimates. Missing markers or status → UsageError."""
    st_path = Path(run_dir) / "status.json"
    if not st_path.is_file():
        raise UsageError(f"--record-times: {st_path} does not exist (not a reproduce run folder?)")
    st = json.loads(st_path.read_text())
    store, docs = Path(store), Path(docs)
    text = docs.read_text()
    if _BEGIN not in text or _END not in text:
        raise UsageError(f"--record-times: {docs} has no wall-time markers ({_BEGIN} ... {_END})")
    times = json.loads(store.read_text()) if store.is_file() else {}
    load = st.get("load") or {}
    times[st["profile"]] = {
        "notebooks": {nb["name"]: [nb["status"], nb["seconds"], nb.get("cpu_seconds", 0.0)] for nb in st["notebooks"]},
        "total": st["seconds"], "cpu": st.get("cpu_seconds", 0.0), "jobs": PROFILES[st["profile"]].get("jobs", 1),
        "load": f"at start {load.get('start', 'load unknown')}, at end {load.get('end', 'load unknown')}",
        "date": datetime.fromtimestamp(st_path.stat().st_mtime).strftime("%Y-%m-%d %H:%M"),
        "commit": st.get("commit", "unknown"),
    }
    from ibpo_lab.runs import atomic_write_text

    atomic_write_text(store, json.dumps(times, indent=1) + "\n")
    head, rest = text.split(_BEGIN, 1)
    _, tail = rest.split(_END, 1)
    atomic_write_text(docs, head + _BEGIN + "\n" + wall_time_table(times) + "\n" + _END + tail)
    return docs


# ---------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ibpo_lab.reproduce",
        description="Run the ibpo_lab notebooks with papermill into runs/<stamp>-<profile>/ and write a report.",
    )
    p.add_argument("--profile", default="smoke", choices=list(PROFILES),
                   help="; ".join(f"{k}: {v.get('help', '')}" for k, v in PROFILES.items()))
    p.add_argument("--only", nargs="+", metavar="NB", help="notebooks to run: numbers (4, 04), stems or substrings")
    p.add_argument(
        "-p", "--parameter", nargs=2, action="append", metavar=("KEY", "VALUE"), dest="parameters",
        help="override a notebook parameter (Python literal or string); repeatable",
    )
    p.add_argument("--out", default="runs", help="parent folder of the timestamped run folder (default: runs)")
    p.add_argument("--notebooks-dir", default=str(DEFAULT_NOTEBOOKS), help="where the NN_name.ipynb notebooks are")
    p.add_argument("--cell-timeout", type=int, default=None, help="seconds one cell may run (default: no limit)")
    p.add_argument("--list", action="store_true", help="list the notebooks and their parameters, then exit")
    p.add_argument("--record-times", metavar="RUN", help="write a finished run's measured wall times into "
                   "docs/notebooks.md (and docs/wall_times.json), then exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.record_times:
            print(f"wall times of {args.record_times} written to {update_wall_times(args.record_times)}")
            return 0
        if args.list:
            for nb in select_notebooks(find_notebooks(args.notebooks_dir), args.only):
                ps = notebook_parameters(nb)
                print(nb.stem)
                for k, v in ps.items():
                    print(f"    {k} = {v['default']}" + (f"    # {v['help']}" if v["help"] else ""))
            return 0
        _, results = reproduce(
            args.profile,
            only=args.only,
            overrides=args.parameters,
            out=args.out,
            notebooks_dir=args.notebooks_dir,
            cell_timeout=args.cell_timeout,
            log=lambda m: print(m, flush=True),
            progress_bar=sys.stderr.isatty(),  # per-cell bar for people, plain lines for CI logs
        )
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if all(r.status != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
