"""The explorer as a researcher sees it: JupyterLab with the project kernel, driven in headless Chromium.

Two real two-step runs (grpo, ibpo) are trained here; a notebook calls ``viz.explorer`` on their
folder; Playwright runs the cell and changes run -> step -> prompt -> trajectory, and after every
change the panels must show the selected trajectory's tokens, reward and colour scale, read here
straight from the runs' parquet files. The page must log no errors (no "Exception opening new
comm", no widget shown as ``VBox(children=...)`` text).

Needs Debian's ``chromium`` (``.ci/run`` installs it; Playwright's own browser download needs the
internet and is not used), python ``playwright`` (the ``dev`` extra) and JupyterLab with
``jupyterlab_widgets`` (the ``lab`` extra). Without them the test skips and says which is missing;
with ``IBPO_REQUIRE_BROWSER=1`` (set by ``.ci/run`` once chromium is installed) it fails instead.
``IBPO_CHROMIUM`` points at another Chromium binary; ``IBPO_BROWSER_SCREENSHOT=file.png`` saves the
final page.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    # nothing outside 127.0.0.1: no update checks, sync, field trials or component downloads
    "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
    "--disable-sync", "--disable-extensions", "--no-first-run", "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
]
TIMEOUT_MS = 60_000  # one step in the page (kernel start + torch import is the slowest)


def _missing(what: str) -> None:
    if os.environ.get("IBPO_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{what} (IBPO_REQUIRE_BROWSER=1: chromium is installed, so the rest must be too)")
    print(f"\n[browser test] skipped: {what}", file=sys.stderr)
    pytest.skip(what)


def _chromium() -> str:
    exe = os.environ.get("IBPO_CHROMIUM")
    if exe:
        if not os.access(exe, os.X_OK):
            _missing(f"IBPO_CHROMIUM={exe} is not an executable")
        return exe
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        _missing("no chromium on PATH (Debian: apt-get install chromium; .ci/run does this)")
    return exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tools():
    exe = _chromium()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("python playwright is not installed (pip install -e '.[dev]')")
    try:
        import jupyterlab  # noqa: F401
        import jupyterlab_widgets  # noqa: F401
    except ImportError:
        _missing("JupyterLab is not installed (bash scripts/run.sh lab-setup, or pip install -e '.[lab]')")
    return exe


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tools):
    """Two real runs, two logged steps each: the smoke preset, shrunk (2 prompts x 4 trajectories)."""
    import ibpo_lab
    from ibpo_lab.train import train

    root = tmp_path_factory.mktemp("runs")
    for est in ("grpo", "ibpo"):
        cfg = ibpo_lab.presets("smoke", steps=2, eval_n=0, estimator=est, seed=0, prompts_per_step=2,
                               group_size=4, max_new_tokens=32, correct={"max_new_tokens": 32}, save_checkpoints=False)
        train(cfg, root / f"{est}-seed0", progress=False)
    return root


@pytest.fixture(scope="module")
def lab(tmp_path_factory, runs):
    """JupyterLab on 127.0.0.1 (free port, token auth, its own root, config and runtime folders)."""
    home = tmp_path_factory.mktemp("lab")
    nb_root = home / "root"
    nb_root.mkdir()
    nb = {
        "cells": [{"cell_type": "code", "execution_count": None, "id": "explorer", "metadata": {}, "outputs": [],
                   "source": f"from ibpo_lab import viz\nviz.explorer(r\"{runs}\")"}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
                     "language_info": {"name": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }
    (nb_root / "explorer.ipynb").write_text(json.dumps(nb))
    # no "get notified about Jupyter news?" toast over the page (it would fetch from the internet)
    notif = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    token, port = uuid.uuid4().hex, _free_port()
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # the kernel's figures use the notebook backend, as in a real session
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        JUPYTER_DATA_DIR=str(home / "data"), IPYTHONDIR=str(home / "ipython"), JUPYTER_PLATFORM_DIRS="1",
    )
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={nb_root}", f"--LabApp.user_settings_dir={home / 'settings'}",
         f"--LabApp.workspaces_dir={home / 'workspaces'}", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),  # CI containers run as root
        cwd=nb_root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                req = urllib.request.Request(f"{base}/api/status", headers={"Authorization": f"token {token}"})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("JupyterLab did not start:\n" + (home / "server.log").read_text()[-3000:])
            time.sleep(0.3)
        # the notebook's kernel (python3) is this environment's interpreter: the project kernel
        req = urllib.request.Request(f"{base}/api/kernelspecs", headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            argv0 = json.load(r)["kernelspecs"]["python3"]["spec"]["argv"][0]
        assert Path(shutil.which(argv0) or argv0).resolve() == Path(sys.executable).resolve(), argv0
        yield {"url": f"{base}/lab/tree/explorer.ipynb?token={token}", "log": home / "server.log"}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernel it started (its own session)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


# ------------------------------------------------------------------------------------ expectations
def _policy(run: Path, step: int) -> pd.DataFrame:
    df = pd.read_parquet(run / "trajectories" / f"step_{step:06d}.parquet")
    return df[df["kind"] == "policy"]


def _first_repaired(run: Path) -> tuple[int, int, int]:
    """(step, group, traj) of the first policy trajectory with a verified repair in ``run``."""
    for f in sorted((run / "trajectories").glob("step_*.parquet")):
        step = int(f.stem.split("_")[1])
        df = _policy(run, step)
        hit = df[df["repair"].apply(lambda x: isinstance(x, str))]
        if len(hit):
            return step, int(hit["group"].iloc[0]), int(hit["traj"].iloc[0])
    raise AssertionError(f"{run}: no trajectory has a repair, so the diff panel cannot be checked")


def _expected(run: Path, step: int, traj: int) -> dict:
    """What the panels must show for one selection, from the parquet file and the vocabulary."""
    from transformers import AutoTokenizer

    from ibpo_lab.models import tiny_policy_dir

    df = _policy(run, step)
    row = df[df["traj"] == traj].iloc[0]
    vocab = AutoTokenizer.from_pretrained(tiny_policy_dir())  # the smoke policy's character vocabulary
    tokens = [t.replace("\n", "↵") for t in vocab.convert_ids_to_tokens([int(i) for i in row["response_ids"]])]
    trained = [np.abs(np.asarray(a, float))[np.asarray(m, bool)] for a, m in zip(df["advantages"], df["response_mask"])]
    scale = max(float(x.max(initial=0.0)) for x in trained)
    group = df[df["group"] == row["group"]]
    return {
        "tokens": tokens, "reward": float(row["reward"]), "scale": scale, "group": int(row["group"]),
        "advantages": np.asarray(row["advantages"], float), "mask": np.asarray(row["response_mask"], bool),
        "traj_labels": [f"{t} (R={r:g})" for t, r in zip(group["traj"], group["reward"])],
        "repair": row.get("repair") if isinstance(row.get("repair"), str) else None,
    }


def _rdbu(x: float) -> str:
    import matplotlib

    r, g, b = (int(round(255 * float(c))) for c in matplotlib.colormaps["RdBu"](x)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


CHECKED: list[dict] = []  # every selection _check_panels saw


def _check_panels(page, run_name: str, step: int, prompt: int, traj: int, want: dict) -> None:
    from playwright.sync_api import expect

    CHECKED.append(want)
    head = page.locator(".ibpo-explorer-header")
    expect(head).to_contain_text(f"{run_name} · step {step} · prompt {prompt} · trajectory {traj} · "
                                 f"reward {want['reward']:g}", timeout=TIMEOUT_MS)
    shown_scale = float(page.locator(".ibpo-explorer-header .ibpo-scale").inner_text())
    assert shown_scale == pytest.approx(want["scale"], rel=5e-3, abs=1e-9), (run_name, step, traj)
    tokens = page.locator(".ibpo-explorer-tokens")
    expect(tokens).to_contain_text(f"traj {traj} · group {want['group']} · reward {want['reward']:g}")
    expect(tokens).to_contain_text(f"colour scale ±{want['scale']:.3g}")
    spans = tokens.locator("span.tok")
    assert spans.all_text_contents() == want["tokens"]
    # every trained token's colour is RdBu at its advantage on the step's symmetric scale
    styles = spans.evaluate_all("els => els.map(e => e.getAttribute('style'))")
    for i, (style, a, m) in enumerate(zip(styles, want["advantages"], want["mask"])):
        if m:
            x = 0.5 if want["scale"] == 0 else 0.5 + 0.5 * float(np.clip(a / want["scale"], -1, 1))
            assert f"background-color:{_rdbu(x)}" in style, (run_name, step, traj, i, a, style)
        else:
            assert "background-color" not in style
    labels = _options(page, "trajectory")
    assert labels == want["traj_labels"], (run_name, step, prompt)
    diff = page.locator(".ibpo-explorer-diff")
    if want["repair"] is None:
        expect(diff).to_contain_text("no repair")
    else:
        assert diff.locator("del, ins").count() > 0
    img = page.locator("img.ibpo-explorer-heatmap")
    expect(img).to_be_visible()
    assert img.evaluate("e => e.complete && e.naturalWidth > 100")


def _options(page, control: str) -> list[str]:
    # ipywidgets writes option labels with non-breaking spaces
    texts = page.locator(f".ibpo-explorer-{control} select option").all_text_contents()
    return [t.replace("\xa0", " ") for t in texts]


def _select(page, control: str, label: str) -> None:
    page.locator(f".ibpo-explorer-{control} select").select_option(index=_options(page, control).index(label))


def _wait_until_offered(page, control: str, ok, what: str = "the expected options") -> None:
    """Poll until ``ok(options)`` holds (a choice upstream refreshes the options asynchronously)."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not ok(_options(page, control)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{control}: {what} never offered; options {_options(page, control)}")
        page.wait_for_timeout(100)


def _select_when_offered(page, control: str, label: str) -> None:
    """Select ``label`` once the dropdown offers it."""
    _wait_until_offered(page, control, lambda opts: label in opts, repr(label))
    _select(page, control, label)


def _traj_label(run: Path, step: int, traj: int) -> str:
    r = float(_policy(run, step).set_index("traj").loc[traj, "reward"])
    return f"{traj} (R={r:g})"


def _prompt_label(page, group: int) -> str:
    opts = _options(page, "prompt")
    return next(o for o in opts if o.split(":")[0] == str(group))


# ------------------------------------------------------------------------------------ the test
def test_explorer_in_jupyterlab_follows_every_choice(tools, runs, lab):
    from playwright.sync_api import expect, sync_playwright

    t0 = time.perf_counter()
    grpo, ibpo = runs / "grpo-seed0", runs / "ibpo-seed0"
    # the scenario only tests staleness where the two runs differ at the kept selection
    assert _expected(grpo, 2, 0)["scale"] != _expected(ibpo, 2, 0)["scale"]
    messages, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=tools, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.goto(lab["url"], timeout=TIMEOUT_MS)
            editor = page.locator(".jp-Notebook .jp-Cell .jp-InputArea-editor").first
            editor.wait_for(timeout=TIMEOUT_MS)
            # the kernel is up (the status bar says so), then run the cell as a person would
            expect(page.locator("#jp-main-statusbar")).to_contain_text("Python 3 (ipykernel) | Idle",
                                                                      timeout=TIMEOUT_MS)
            editor.click()
            page.keyboard.press("Shift+Enter")
            page.locator(".ibpo-explorer").wait_for(timeout=TIMEOUT_MS)

            # 1. as opened: the first run, its last step, the first prompt and trajectory
            _check_panels(page, "grpo-seed0", 2, 0, 0, _expected(grpo, 2, 0))
            png_grpo = page.locator("img.ibpo-explorer-heatmap").get_attribute("src")
            # 2. another run: step 2, prompt 0 and trajectory 0 keep their values (no observer fires)
            _select(page, "run", "ibpo-seed0")
            _check_panels(page, "ibpo-seed0", 2, 0, 0, _expected(ibpo, 2, 0))
            # 3. another step: prompt 0 and trajectory 0 keep their values again
            _select(page, "step", "1")
            _check_panels(page, "ibpo-seed0", 1, 0, 0, _expected(ibpo, 1, 0))
            # 4. another prompt: its first trajectory
            _select(page, "prompt", _prompt_label(page, 1))
            first = int(_policy(ibpo, 1).query("group == 1")["traj"].iloc[0])
            _check_panels(page, "ibpo-seed0", 1, 1, first, _expected(ibpo, 1, first))
            page.wait_for_function(  # the heatmap image was redrawn (a new blob for the new group)
                "old => document.querySelector('img.ibpo-explorer-heatmap').src !== old", arg=png_grpo,
                timeout=TIMEOUT_MS)
            # 5. another trajectory: the last of the group
            last = int(_policy(ibpo, 1).query("group == 1")["traj"].iloc[-1])
            _select(page, "trajectory", _traj_label(ibpo, 1, last))
            _check_panels(page, "ibpo-seed0", 1, 1, last, _expected(ibpo, 1, last))
            # 6. back to the first run: step 1, prompt 1 and this trajectory stay
            _select(page, "run", "grpo-seed0")
            _check_panels(page, "grpo-seed0", 1, 1, last, _expected(grpo, 1, last))
            # 7. a repaired failure of the IBPO run (found in its parquet files), so the diff panel is checked
            step, group, traj = _first_repaired(ibpo)
            _select(page, "run", "ibpo-seed0")
            _select_when_offered(page, "step", str(step))
            # the step's prompts replace the run's: wait until the dropdown offers exactly this step's groups
            groups = {str(g) for g in _policy(ibpo, step)["group"].unique()}
            _wait_until_offered(page, "prompt", lambda opts: {o.split(":")[0] for o in opts} == groups)
            _select_when_offered(page, "prompt", _prompt_label(page, group))
            _select_when_offered(page, "trajectory", _traj_label(ibpo, step, traj))
            _check_panels(page, "ibpo-seed0", step, group, traj, _expected(ibpo, step, traj))

            body = page.locator("body").inner_text()
            if os.environ.get("IBPO_BROWSER_SCREENSHOT"):  # a picture of the last state, to look at
                page.screenshot(path=os.environ["IBPO_BROWSER_SCREENSHOT"], full_page=True)
        except Exception:
            shot = lab["log"].parent / "failure.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"\n[browser test] screenshot: {shot}\nconsole:\n" + "\n".join(messages[-40:] + errors)
                  + "\nserver log:\n" + lab["log"].read_text()[-3000:])
            raise
        finally:
            browser.close()
    seconds = time.perf_counter() - t0
    assert any(w["repair"] for w in CHECKED), "no checked trajectory had a repair: the diff panel went untested"
    print(f"\n[browser test] page work {seconds:.1f} s; console: {len(messages)} messages")
    assert "VBox(children=" not in body, "the widget is shown as text: jupyterlab_widgets is missing"
    bad = errors + [m for m in messages if m.startswith("error") or "Exception opening new comm" in m]
    assert not bad, "the page logged errors:\n" + "\n".join(bad[:20])
    log = lab["log"].read_text()
    assert "Traceback" not in log, "the server or kernel logged a traceback:\n" + log[-3000:]
