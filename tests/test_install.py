"""A built wheel works outside the checkout: `load_policy("tiny")` finds the packaged tiny policy and
`ibpo-reproduce --only 01` finds and runs the packaged smoke notebook.

How it stays offline and quick: the wheel is built with `pip wheel --no-deps --no-build-isolation`
(the running interpreter's setuptools, no download), installed with `--no-deps` into a fresh venv,
and that venv sees the test interpreter's site-packages through a `.pth` file holding the path. The
dependencies (torch, transformers, papermill...) are therefore the ones already installed — no
multi-GB download — while `ibpo_lab` itself can only come from the wheel: a `.pth` path line adds
the folder to sys.path but does not run the `.pth` files inside it, so the checkout's editable-install
hook in that folder stays inactive, and the venv's own site-packages (holding the wheel) comes first.
The commands run in a temporary folder outside the checkout without PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.notebooks]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    pytest.importorskip("papermill")
    tmp = tmp_path_factory.mktemp("install")
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IBPO_TINY_POLICY", "JUPYTER_PATH")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", MPLBACKEND="Agg")
    # build from a copy (the in-tree build leaves build/ and *.egg-info behind, and an egg-info on
    # PYTHONPATH would make pip think ibpo_lab is installed already)
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "runs", "__pycache__",
                                                              ".pytest_cache", ".hypothesis", ".ipynb_checkpoints"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src],
         env=env, cwd=tmp)
    wheels = list((tmp / "dist").glob("ibpo_lab-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheels[0]], env=env,
         cwd=tmp)
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    assert (purelib / "ibpo_lab" / "tiny_policy" / "config.json").is_file()
    (purelib / "_shared_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # the notebook kernel must be this venv's python (not a kernelspec of the checkout's environment)
    _run([py, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], env=env)
    work = tmp / "elsewhere"
    work.mkdir()
    print(f"\n[test_install] wheel {wheels[0].stat().st_size / 1e6:.1f} MB built and installed in "
          f"{time.perf_counter() - t0:.1f} s")
    return dict(py=py, venv=venv, env=env, cwd=work, wheel=wheels[0])


def test_wheel_has_the_tiny_policy_and_the_notebooks(installed):
    import zipfile

    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert {"ibpo_lab/tiny_policy/config.json", "ibpo_lab/tiny_policy/model.safetensors",
            "ibpo_lab/notebooks/01_quickstart.ipynb", "ibpo_lab/configs/ibpo.yaml",
            "ibpo_lab/tasks/fixtures/gsm8k_mini.jsonl"} <= names
    assert {f"ibpo_lab/notebooks/{p.name}" for p in (ROOT / "notebooks").glob("*.ipynb")} <= names


def test_load_policy_tiny_outside_the_checkout(installed):
    code = ("import ibpo_lab, ibpo_lab.models as m, ibpo_lab.reproduce as r\n"
            "p = m.load_policy('tiny')\n"
            "print(ibpo_lab.__file__); print(m.tiny_policy_dir()); print(r.notebooks_dir()); print(p.num_parameters())")
    out = _run([installed["py"], "-c", code], env=installed["env"], cwd=installed["cwd"]).stdout.split()
    pkg, tiny, nbs, n = Path(out[0]).parent, Path(out[1]), Path(out[2]), int(out[3])
    assert pkg.is_relative_to(installed["venv"]) and not pkg.is_relative_to(ROOT), pkg
    assert tiny == pkg / "tiny_policy" and nbs == pkg / "notebooks"
    assert n > 0


def test_console_scripts_and_one_smoke_notebook_outside_the_checkout(installed):
    bin_ = installed["venv"] / "bin"
    r = _run([bin_ / "ibpo-train", "ibpo", "--lr", "1e-6", "--print-config"], env=installed["env"], cwd=installed["cwd"])
    assert "lr: 1.0e-06" in r.stdout
    t0 = time.perf_counter()
    _run([bin_ / "ibpo-reproduce", "--only", "01", "--out", installed["cwd"] / "out"], env=installed["env"],
         cwd=installed["cwd"], timeout=900)
    print(f"\n[test_install] ibpo-reproduce --only 01 (smoke) outside the checkout: {time.perf_counter() - t0:.1f} s")
    (run,) = list((installed["cwd"] / "out").iterdir())
    status = json.loads((run / "status.json").read_text())
    assert [(n["name"], n["status"]) for n in status["notebooks"]] == [("01_quickstart", "ok")]
    assert (run / "report.md").is_file() and (run / "notebooks" / "01_quickstart.ipynb").is_file()
