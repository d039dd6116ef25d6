"""The verl patch ibpo_lab prints (``python -m ibpo_lab.integrations.verl patch``) against verl's real
``ray_trainer.py``: the line it says to change exists in ``compute_advantage`` exactly as quoted, and
the repair hook's anchor line exists in ``RayPPOTrainer.fit`` at the hook's indentation, with the
names the hook uses in scope there.

Needs verl's source: verl installed, or ``IBPO_VERL_SRC`` pointing to an unpacked verl wheel
(``.ci/run`` downloads verl==0.9.1 with ``pip download --no-deps`` and sets it); skips otherwise.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ray_trainer_source() -> str:
    src = os.environ.get("IBPO_VERL_SRC")
    if src:
        path = Path(src) / "verl" / "trainer" / "ppo" / "ray_trainer.py"
        if not path.is_file():
            pytest.skip(f"IBPO_VERL_SRC={src} holds no verl/trainer/ppo/ray_trainer.py (not an unpacked verl wheel)")
        return path.read_text()
    spec = importlib.util.find_spec("verl")  # located, not imported (verl's imports are heavy)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("verl is not installed and IBPO_VERL_SRC is not set (.ci/run sets it to an unpacked verl wheel)")
    return (Path(list(spec.submodule_search_locations)[0]) / "trainer" / "ppo" / "ray_trainer.py").read_text()


def _printed_patch() -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "ibpo_lab.integrations.verl", "patch"], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _function(tree: ast.Module, name: str, cls: str | None = None) -> ast.FunctionDef:
    body = tree.body
    if cls is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == cls).body
    found = [n for n in body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert found, f"verl's ray_trainer.py has no {cls + '.' if cls else ''}{name}"
    return found[0]


def _lines_in(source: str, fn: ast.FunctionDef) -> list[str]:
    return source.splitlines()[fn.lineno - 1 : fn.end_lineno]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def test_printed_patch_matches_verls_ray_trainer():
    source = _ray_trainer_source()
    tree = ast.parse(source)
    patch = _printed_patch()
    code = [line for line in patch.splitlines() if line.strip() and not line.lstrip().startswith("#")]

    # (1) the one-line change: the patched line minus "ibpo" is a line of compute_advantage, verbatim
    changed = [line for line in code if '"ibpo")' in line and "adv_estimator in" in line]
    assert len(changed) == 1, f"the patch should change one `adv_estimator in (...)` line:\n{patch}"
    original = changed[0].replace(', "ibpo")', ")")
    compute_advantage = _lines_in(source, _function(tree, "compute_advantage"))
    assert original in compute_advantage, f"verl's compute_advantage has no line {original!r}"

    # (2) the hook goes "just before `batch = compute_advantage(batch, ...)`" inside RayPPOTrainer.fit
    m = re.search(r"just before `([^`]*)`", patch)
    assert m, f"the patch should name the line its hook goes before:\n{patch}"
    anchor = m.group(1).split("...")[0].strip()
    fit = _lines_in(source, _function(tree, "fit", cls="RayPPOTrainer"))
    # a call may be wrapped over several lines: compare with whitespace removed
    squeeze = lambda text: re.sub(r"\s+", "", text)  # noqa: E731
    at = [line for k, line in enumerate(fit) if line.strip() and squeeze("".join(fit[k : k + 3])).startswith(squeeze(anchor))]
    assert at, f"RayPPOTrainer.fit has no line starting {anchor!r}"
    hook = [line for line in code[code.index(changed[0]) + 1 :]]
    assert hook, "the patch prints no hook code"
    # pasted as printed, the hook's first line sits at the anchor's indentation
    assert _indent(hook[0]) == _indent(at[0]), (hook[0], at[0])
    # the names the hook reads exist where it goes
    fit_text = "\n".join(fit)
    for name in re.findall(r"self\.\w+(?:\.\w+)*", "\n".join(hook)):
        head = name.split(".")[1]
        assert f"self.{head}" in source, f"the hook uses {name} but verl's trainer never sets self.{head}"
    if "metrics.update(" in "\n".join(hook):
        assert re.search(r"^\s+metrics = \{\}", fit_text, re.M), "the hook updates `metrics`, which fit does not define"
