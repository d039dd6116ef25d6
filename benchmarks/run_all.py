"""Run every benchmark (or some), write each one's Markdown table + PNG into ``benchmarks/results/``
and refresh the "Latest results" section of ``benchmarks/README.md``.

    python -m benchmarks.run_all                       # everything (under 30 minutes on 2 CPU cores)
    python -m benchmarks.run_all --only speed trl_step # some of them
    python -m benchmarks.run_all --quick --out /tmp/b  # seconds-long sanity pass with tiny sizes (the test)

The README is only rewritten by a full (not ``--quick``) run into the default results folder, and
then only the sections of the benchmarks that ran are replaced.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import time
from pathlib import Path
from typing import Sequence

from benchmarks.common import RESULTS_DIR, Report, command_line, setup_env, write_report

#: benchmark name -> module (each has ``run(quick=...) -> Report``), in the order they run
BENCHMARKS: dict[str, str] = {
    "alignment": "benchmarks.alignment",
    "trl_step": "benchmarks.trl_step",
    "speed": "benchmarks.speed",
    "credit": "benchmarks.credit",
    "learning": "benchmarks.learning",
}
README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def run_benchmarks(names: Sequence[str], quick: bool, out: str | Path, command: str | None = None,
                   seeds: int | None = None) -> list[Report]:
    """Run ``names`` in the order of :data:`BENCHMARKS`; write each report as soon as it is done.
    ``seeds``: the first N seeds for the benchmarks that take ``seeds`` (None: each one's default)."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"--only: unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    reports = []
    for name in BENCHMARKS:
        if name not in names:
            continue
        t0 = time.perf_counter()
        print(f"[run_all] {name} ...", flush=True)
        mod = importlib.import_module(BENCHMARKS[name])
        kw = {}
        if seeds is not None and "seeds" in inspect.signature(mod.run).parameters:
            kw["seeds"] = tuple(range(seeds))
        rep = mod.run(quick=quick, **kw)
        path = write_report(rep, out, command)
        print(f"[run_all] {name} done in {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
        reports.append(rep)
    return reports


def target_rows(text: str) -> list[str]:
    """The data rows of the "## Targets" table of a results file (none if it has no targets)."""
    m = re.search(r"^## Targets\n\n(\|.*\n)(\|---.*\n)((?:\|.*\n)*)", text, flags=re.M)
    return m.group(3).splitlines() if m else []


def readme_section(results_dir: Path, names: Sequence[str]) -> str:
    """The generated README block: every target at a glance, then each benchmark's results file,
    headings nested one level down."""
    parts, glance = [], []
    for name in BENCHMARKS:
        if name not in names:
            continue
        md = results_dir / f"{name}.md"
        if not md.is_file():
            continue
        text = md.read_text()
        glance += [f"| {name} {row}" for row in target_rows(text)]
        # nest: '# X' -> '### X'; images point into results/
        text = re.sub(r"^(#+) ", lambda m: "##" + m.group(1) + " ", text, flags=re.M)
        text = re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", r"![\1](results/\2)", text)
        parts.append(text.strip())
    if glance:
        head = "### Targets at a glance\n\n| benchmark | target | goal | measured | met | what limits it |\n|---|---|---|---|---|---|\n"
        parts.insert(0, head + "\n".join(glance))
    return "\n\n".join(parts)


def update_readme(results_dir: Path, readme: Path = README) -> None:
    """Replace the text between the results markers of ``readme`` with every results file present."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} markers to put the results between")
    block = readme_section(results_dir, list(BENCHMARKS))
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n\n{block}\n\n{END}{tail}")


def main(argv: Sequence[str] | None = None) -> list[Report]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seconds-long sanity pass with tiny sizes (numbers mean nothing)")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME", help=f"run only these: {', '.join(BENCHMARKS)}")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="results folder (default benchmarks/results)")
    ap.add_argument("--seeds", type=int, default=None, metavar="N",
                    help="run the first N seeds (0..N-1) of the benchmarks that have seeds (default: their own, 4); "
                         "the results files record the seed count")
    a = ap.parse_args(argv)
    setup_env()
    names = a.only or list(BENCHMARKS)
    t0 = time.perf_counter()
    try:
        if a.seeds is not None and a.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {a.seeds}")
        reports = run_benchmarks(names, a.quick, a.out, command_line(), seeds=a.seeds)
    except ValueError as e:
        ap.error(str(e))
    out = Path(a.out).resolve()
    if not a.quick and out == RESULTS_DIR.resolve():
        update_readme(out)
        print(f"[run_all] updated {README}")
    print(f"[run_all] all done in {time.perf_counter() - t0:.0f} s")
    for rep in reports:
        for t in rep.targets:
            print(f"  {rep.name:10s} {t.name}: {t.value:.3g} (goal {t.goal}) {'met' if t.met else 'MISSED'}")
    return reports


if __name__ == "__main__":
    main(sys.argv[1:])
