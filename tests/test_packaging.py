"""The project's set-up files agree with each other (pyproject, environment.yml, README, CI)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_reqs() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = list(data["project"]["dependencies"])
    for extra in ("dev", "notebooks"):
        reqs += data["project"]["optional-dependencies"][extra]
    return {_name(r): r.replace(" ", "") for r in reqs}


def _conda_pip_reqs(path: Path) -> dict[str, str]:
    env = yaml.safe_load(path.read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, f"{path.name} must have exactly one pip: section"
    return {_name(r): r.replace(" ", "") for r in pip[0]["pip"]}


def test_environment_yml_matches_pyproject():
    py = _pyproject_reqs()
    conda = _conda_pip_reqs(ROOT / "environment.yml")
    # torch is pinned to the CPU wheel in the environment; pyproject only states the supported range
    assert conda.pop("torch") == "torch==2.13.0"
    py.pop("torch")
    assert set(conda) == set(py), f"only in environment.yml: {set(conda) - set(py)}; only in pyproject: {set(py) - set(conda)}"
    for name, req in py.items():
        assert conda[name] == req, f"{name}: pyproject says {req!r}, environment.yml says {conda[name]!r}"


def test_gpu_environment_has_vllm_and_no_cpu_torch_pin():
    gpu = _conda_pip_reqs(ROOT / "environment-gpu.yml")
    assert "vllm" in gpu
    assert "torch" not in gpu, "vLLM pins its own torch; the GPU environment must not pin the CPU wheel"
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(_name(r) == "vllm" for r in data["project"]["optional-dependencies"]["gpu"])


def test_readme_quick_start_has_exactly_the_two_commands():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## Quick start\n(.*?)\n## ", text, flags=re.S)
    assert m, "README must open with a '## Quick start' section"
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", m.group(1), flags=re.S)
    assert block, "Quick start needs a code block"
    cmds = [l for l in block.group(1).splitlines() if l.strip() and not l.strip().startswith("#")]
    assert cmds == ["bash scripts/run.sh main", "bash scripts/run.sh test"], cmds


def test_ci_runs_the_readme_test_command_offline():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/run.sh test" in ci
    assert "HF_HUB_OFFLINE=1" in ci and "OMP_WAIT_POLICY=PASSIVE" in ci
    assert "IBPO_DATA_DIR" in ci
    run = (ROOT / "scripts" / "run.sh").read_text()
    # torch pinned before the package is installed
    assert run.index('"torch==2.13.0"') < run.index('-e ".[dev,notebooks]"')


def test_core_dependencies_cover_the_imports_and_nothing_unused():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    core = {_name(r): r for r in data["project"]["dependencies"]}
    extras = data["project"]["optional-dependencies"]
    # the code passes from_pretrained(dtype=...), new in transformers 4.56
    assert core["transformers"].replace(" ", "") == "transformers>=4.56"
    assert "scipy" in core  # runs.mean_ci / runs.proportion_ci
    # accelerate is imported only by the TRL adapter: an extra, not core
    src = {p: p.read_text() for p in (ROOT / "ibpo_lab").rglob("*.py")}
    users = {p.relative_to(ROOT).as_posix() for p, t in src.items() if re.search(r"^\s*(from|import) accelerate", t, re.M)}
    assert users <= {"ibpo_lab/integrations/trl.py"}, users
    assert "accelerate" not in core and any(_name(r) == "accelerate" for r in extras["trl"])
    # report.md uses DataFrame.to_markdown, which needs tabulate; nbmake is not used
    assert any("to_markdown" in t for t in src.values()) and any(_name(r) == "tabulate" for r in extras["notebooks"])
    everything = [r for rs in extras.values() for r in rs] + list(core)
    assert not any(_name(r) == "nbmake" for r in everything)
    assert any(_name(r) == "tensorboard" for r in extras["dev"])


def test_trl_range_is_the_adapters():
    pytest.importorskip("trl")
    from ibpo_lab.integrations.trl import TRL_REQUIREMENT

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for extra in ("trl", "dev"):
        reqs = [r.replace(" ", "") for r in data["project"]["optional-dependencies"][extra] if _name(r) == "trl"]
        assert reqs == [TRL_REQUIREMENT], (extra, reqs)
    assert "<" in TRL_REQUIREMENT  # bounded above: the adapter overrides private GRPOTrainer hooks


def test_package_data_patterns_match_files_and_every_subpackage_is_listed():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {pkg: ROOT / data.get("package-dir", {}).get(pkg, pkg.replace(".", "/")) for pkg in data["package-data"]}
    for pkg, patterns in data["package-data"].items():
        for pat in patterns:
            assert list(dirs[pkg].glob(pat)), f"package-data {pkg}: {pat!r} matches nothing"
    code_pkgs = {p.parent.relative_to(ROOT).as_posix().replace("/", ".") for p in (ROOT / "ibpo_lab").rglob("__init__.py")}
    assert code_pkgs <= set(data["packages"]), code_pkgs - set(data["packages"])
    # the packaged copies of the fixed top-level folders
    assert ROOT / data["package-dir"]["ibpo_lab.tiny_policy"] == ROOT / "data" / "tiny-policy"
    assert ROOT / data["package-dir"]["ibpo_lab.notebooks"] == ROOT / "notebooks"
