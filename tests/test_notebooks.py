"""Notebooks: every one is a thin, parameterised, jupytext-paired notebook committed without outputs,
and (marked ``notebooks``) the smoke reproduction runs all of them green with their figures."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import jupytext
import nbformat
import pytest

from ibpo_lab import reproduce as rp

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
IPYNBS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
PYS = sorted(NB_DIR.glob("[0-9][0-9]_*.py"))


def _cells(nb):
    return [(c.cell_type, c.source.strip(), tuple(sorted(c.metadata.get("tags", [])))) for c in nb.cells]


def test_there_are_notebooks_numbered_in_reading_order():
    assert len(IPYNBS) >= 8
    numbers = [int(p.name[:2]) for p in IPYNBS]
    assert numbers == list(range(1, len(IPYNBS) + 1)), "notebooks must be numbered 01, 02, ... without gaps"
    assert "results" in IPYNBS[-1].stem, "the results notebook comes last (it reads the others' run records)"
    assert rp.find_notebooks(NB_DIR) == IPYNBS


def test_every_notebook_has_its_jupytext_pair_and_they_match():
    assert [p.stem for p in PYS] == [p.stem for p in IPYNBS]
    for ipynb, py in zip(IPYNBS, PYS):
        a, b = jupytext.read(ipynb), jupytext.read(py)
        assert _cells(a) == _cells(b), f"{ipynb.name} differs from {py.name}: run bash scripts/sync_notebooks.sh"
        formats = a.metadata.get("jupytext", {}).get("formats", "")
        assert set(formats.split(",")) == {"ipynb", "py:percent"}, f"{ipynb.name}: not paired as ipynb,py:percent"
        assert "# %%" in py.read_text()


def test_notebooks_are_committed_without_outputs_and_use_python3():
    for p in IPYNBS:
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == "python3", p.name
        for c in nb.cells:
            if c.cell_type == "code":
                assert c.outputs == [] and c.execution_count is None, f"{p.name} has outputs: strip them"


def test_each_notebook_has_a_documented_parameters_cell_first():
    for p in IPYNBS:
        nb = nbformat.read(p, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and tagged[0] is code[0], f"{p.name}: the first code cell must be the parameters cell"
        params = rp.notebook_parameters(p)
        assert params["profile"]["default"] == '"smoke"', p.name
        assert "out_dir" in params, p.name
        undocumented = [k for k, v in params.items() if not v["help"]]
        assert not undocumented, f"{p.name}: parameters without a comment: {undocumented}"
        # the parameters cell only assigns literals (papermill replaces it; logic belongs below), and
        # papermill must read every one of them (it cannot parse some comments, e.g. with "=" in them)
        names = []
        for node in ast.parse(tagged[0].source).body:
            assert isinstance(node, ast.Assign), f"{p.name}: parameters cell has a non-assignment"
            ast.literal_eval(node.value)
            names += [t.id for t in node.targets]
        assert list(params) == names, f"{p.name}: papermill reads {list(params)}, the cell assigns {names}"


def test_notebooks_are_thin():
    """No functions or classes in notebooks: logic lives in ibpo_lab where tests reach it."""
    for p in IPYNBS:
        nb = nbformat.read(p, as_version=4)
        for c in nb.cells:
            if c.cell_type != "code":
                continue
            tree = ast.parse(c.source)
            defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
            assert not defs, f"{p.name}: defines {[d.name for d in defs]}; move it into ibpo_lab"
            imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            for n in imports:
                assert not n.module or not n.module.startswith("ibpo_lab.") or not any(
                    a.name.startswith("_") for a in n.names), f"{p.name}: imports a private name from {n.module}"


def test_every_notebook_points_to_its_measured_wall_times():
    """Wall times are not hand-written estimates: each notebook points to the measured table of
    docs/notebooks.md (written by ``reproduce --record-times``), and quotes no "≈ N s/min" itself."""
    for p in IPYNBS:
        md = "\n".join(c.source for c in nbformat.read(p, as_version=4).cells if c.cell_type == "markdown")
        flat = re.sub(r"\s+", " ", md)
        assert "Wall time per profile: measured, in docs/notebooks.md" in flat, p.name
        assert not re.search(r"≈\s*[\d.-]+\s*(s|min|h)\b", flat), f"{p.name}: a hand-written wall-time estimate"


def test_cpu_profile_knobs_resolve_in_every_notebook():
    """Every ``profile_value(...)`` call of a notebook gives a value for ``cpu`` (its own or smoke's)."""
    from ibpo_lab import config

    for p in IPYNBS:
        src = "\n".join(c.source for c in nbformat.read(p, as_version=4).cells if c.cell_type == "code")
        for call in re.findall(r"profile_value\(profile, .*?\)", src):
            assert "cpu=None" not in call, p.name
    assert config.profile_value("cpu", 1, 2, cpu=3) == 3 and config.profile_value("cpu", 1, 2) == 1


@pytest.mark.notebooks
def test_smoke_reproduction_runs_every_notebook_green(tmp_path):
    """The README's main job, once: every notebook executes in the smoke profile and saves its figures."""
    code = rp.main(["--profile", "smoke", "--out", str(tmp_path)])
    (run,) = list(tmp_path.iterdir())
    status = json.loads((run / "status.json").read_text())
    failed = {nb["name"]: nb["error"] for nb in status["notebooks"] if nb["status"] != "ok"}
    assert not failed, f"notebooks failed: {failed} (see {run / 'report.md'})"
    assert code == 0
    assert [nb["name"] for nb in status["notebooks"]] == [p.stem for p in IPYNBS]
    for nb in status["notebooks"]:
        assert nb["figures"], f"{nb['name']} saved no figure"
        for f in nb["figures"]:
            assert (run / f).read_bytes()[:4] == b"\x89PNG"
        executed = nbformat.read(run / "notebooks" / f"{nb['name']}.ipynb", as_version=4)
        shown = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {})]
        assert shown, f"{nb['name']}: no figure is shown in the executed notebook"
    report = (run / "report.md").read_text()
    assert "— failed (" not in report and report.count("![") >= len(IPYNBS)  # statuses are words now
