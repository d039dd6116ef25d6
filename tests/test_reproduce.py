"""reproduce: notebook discovery, -p validation, the full-without-GPU guard, the papermill run
(continues past a failure, marks it, exits non-zero) and the report, on tiny throwaway notebooks."""

from __future__ import annotations

import json

import jupytext
import pytest

from ibpo_lab import reproduce as rp

OK_NB = '''# %% tags=["parameters"]
profile = "smoke"  # smoke or full
out_dir = None  # where figures go
n = 2  # how many points

# %%
import matplotlib.pyplot as plt
import pandas as pd
from ibpo_lab import viz
fig, ax = plt.subplots()
ax.plot(range(n))
viz.save_fig(fig, out_dir, "line")
viz.save_table(pd.DataFrame({"profile": [profile], "n": [n]}), out_dir, "numbers")
viz.save_html(viz.token_html(["a", "b"], [1.0, -1.0]), out_dir, "tokens")
'''

BAD_NB = '''# %% tags=["parameters"]
profile = "smoke"
out_dir = None

# %%
raise RuntimeError("this notebook is broken on purpose")
'''

RESULTS_NB = '''# %% tags=["parameters"]
profile = "smoke"
out_dir = None
runs_dir = None

# %%
import os
import pandas as pd
from ibpo_lab import viz
viz.save_table(pd.DataFrame({"runs_dir_exists": [os.path.isdir(runs_dir)]}), out_dir, "summary")
'''


def _write(folder, name, text):
    nb = jupytext.reads(text, fmt="py:percent")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, folder / f"{name}.ipynb")


@pytest.fixture
def nbdir(tmp_path):
    d = tmp_path / "notebooks"
    d.mkdir()
    _write(d, "01_first", OK_NB)
    _write(d, "02_broken", BAD_NB)
    _write(d, "03_results", RESULTS_NB)
    _write(d, "not_numbered", OK_NB)  # ignored: not NN_name
    return d


def test_find_and_select(nbdir):
    nbs = rp.find_notebooks(nbdir)
    assert [p.stem for p in nbs] == ["01_first", "02_broken", "03_results"]
    assert [p.stem for p in rp.select_notebooks(nbs, ["3", "first"])] == ["01_first", "03_results"]
    assert [p.stem for p in rp.select_notebooks(nbs, ["02"])] == ["02_broken"]
    assert rp.select_notebooks(nbs, None) == nbs
    with pytest.raises(rp.UsageError, match="available: 01_first, 02_broken, 03_results"):
        rp.select_notebooks(nbs, ["quickstart"])


def test_parameters_and_overrides(nbdir):
    ps = rp.notebook_parameters(nbdir / "01_first.ipynb")
    assert list(ps) == ["profile", "out_dir", "n"]
    assert ps["n"]["default"] == "2" and "how many" in ps["n"]["help"]
    nbs = rp.find_notebooks(nbdir)
    assert rp.parse_overrides([["n", "5"]], nbs) == {"n": 5}
    assert rp.parse_overrides([["n", "[1, 'a']"]], nbs) == {"n": [1, "a"]}
    with pytest.raises(rp.UsageError) as e:
        rp.parse_overrides([["lr", "0.1"]], nbs)
    msg = str(e.value)
    assert "'lr'" in msg and "01_first: n" in msg and "02_broken: " in msg
    with pytest.raises(rp.UsageError, match="--profile"):
        rp.parse_overrides([["profile", "full"]], nbs)


def test_parse_value():
    assert rp.parse_value("3") == 3 and rp.parse_value("0.5") == 0.5
    assert rp.parse_value("True") is True and rp.parse_value("None") is None
    assert rp.parse_value("grpo") == "grpo" and rp.parse_value("['a', 'b']") == ["a", "b"]


def test_unknown_parameter_cli_exits_2_before_running(nbdir, tmp_path, capsys):
    out = tmp_path / "runs"
    code = rp.main(["--notebooks-dir", str(nbdir), "--out", str(out), "-p", "nope", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope" in err and "01_first: n" in err
    assert not out.exists()


def test_full_without_gpu_is_refused_up_front(nbdir, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "runs"
    code = rp.main(["--profile", "full", "--notebooks-dir", str(nbdir), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "CUDA GPU" in err
    assert "Why: torch " in err and "sees no CUDA device: " in err  # gpu_check.cuda_diagnosis() says why
    assert not out.exists()
    with pytest.raises(rp.UsageError, match="unknown profile"):
        rp.check_profile("medium")


def test_list_prints_parameters(nbdir, capsys):
    assert rp.main(["--list", "--notebooks-dir", str(nbdir)]) == 0
    out = capsys.readouterr().out
    assert "01_first" in out and "n = 2" in out and "how many points" in out


def test_run_continues_past_failure_and_reports_it(nbdir, tmp_path, capsys):
    out = tmp_path / "runs"
    code = rp.main(["--profile", "smoke", "--notebooks-dir", str(nbdir), "--out", str(out), "-p", "n", "4"])
    assert code == 1
    (run,) = list(out.iterdir())
    assert run.name.endswith("-smoke-n=4")  # the -p override is in the folder name ...
    status = json.loads((run / "status.json").read_text())
    by = {nb["name"]: nb for nb in status["notebooks"]}
    assert [nb["name"] for nb in status["notebooks"]] == ["01_first", "02_broken", "03_results"]
    assert by["01_first"]["status"] == "ok" and by["03_results"]["status"] == "ok"
    assert by["02_broken"]["status"] == "failed"
    assert "RuntimeError: this notebook is broken on purpose" in by["02_broken"]["error"]
    # parameters reached the notebooks; runs_dir only where declared
    assert by["01_first"]["parameters"]["n"] == 4 and "runs_dir" not in by["01_first"]["parameters"]
    assert (run / by["01_first"]["figures"][0]).read_bytes()[:4] == b"\x89PNG"
    assert "n" not in by["03_results"]["parameters"]
    assert (run / "notebooks" / "02_broken.ipynb").exists()  # the failed notebook is kept with its traceback
    report = (run / "report.md").read_text()
    assert "| failed " in report and "broken on purpose" in report and "❌" not in report
    assert "overrides (-p): n=4" in report  # ... and in the report
    assert status["overrides"] == {"n": 4}
    assert "![line](figures/01_first/line.png)" in report
    assert "## Results" in report and "runs_dir_exists" in report and "True" in report
    assert "| smoke     |   4 |" in report.split("**numbers**")[1]
    assert by["01_first"]["views"] == ["figures/01_first/tokens.html"]
    assert report.count('class="ibpo-tokens"') == 1  # the HTML view is embedded in the report
    html = (run / "report.html").read_text()
    assert 'class="ibpo-tokens"' in html
    assert "<img src='figures/01_first/line.png'>" in html
    assert "overrides (-p): n=4" in html
    log = capsys.readouterr().out
    assert "[1/3] 01_first: ok" in log and "[2/3] 02_broken: failed" in log and "2/3 notebooks ok" in log


def test_missing_kernel_is_a_usage_error(nbdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rp, "KERNEL", "no-such-kernel-xyz")
    code = rp.main(["--notebooks-dir", str(nbdir), "--out", str(tmp_path / "runs")])
    assert code == 2
    assert "ipykernel install" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_report_puts_key_figures_first_and_failures_with_their_cell(tmp_path):
    key = rp.KEY_FIGURES[0]
    (tmp_path / key).parent.mkdir(parents=True)
    (tmp_path / key).write_bytes(b"\x89PNG")
    ok = rp.NotebookResult(name="01_quickstart", status="ok", seconds=1.0, figures=[key])
    bad = rp.NotebookResult(name="02_x", status="failed", seconds=0.5, error="ValueError: boom",
                            error_cell="x = 1\nraise ValueError('boom')")
    md = rp.write_report(tmp_path, "smoke", [ok, bad], 1.5).read_text()
    assert md.index("## Key figures") < md.index(f"![{key.split('/')[1]}")  < md.index("## 01_quickstart")
    assert "1/2 notebooks ok" in md and "ValueError: boom" in md and "raise ValueError('boom')" in md
    status = json.loads((tmp_path / "status.json").read_text())
    assert [n["status"] for n in status["notebooks"]] == ["ok", "failed"]


# ------------------------------------------------------------------------------------ item 10 of issue 17
def test_a_list_parameter_given_a_string_fails_at_once(nbdir, tmp_path, capsys):
    _write(nbdir, "04_lists", '''# %% tags=["parameters"]
profile = "smoke"
out_dir = None
estimators = ["grpo", "ibpo"]  # compared
seeds: list = None  # None: the profile's
weights = {"a": 1}  # a dict

# %%
pass
''')
    nbs = rp.find_notebooks(nbdir)
    out = tmp_path / "runs"
    code = rp.main(["--notebooks-dir", str(nbdir), "--out", str(out), "-p", "estimators", "grpo,ibpo"])
    assert code == 2 and not out.exists()  # nothing ran
    err = capsys.readouterr().err
    assert "expected a list" in err and "'grpo,ibpo'" in err and "\"['grpo', 'ibpo']\"" in err
    with pytest.raises(rp.UsageError, match="expected a list"):
        rp.parse_overrides([["estimators", "grpo"]], nbs)
    with pytest.raises(rp.UsageError, match="expected a list"):
        rp.parse_overrides([["seeds", "3"]], nbs)  # declared None, annotated list
    with pytest.raises(rp.UsageError, match="expected a dict"):
        rp.parse_overrides([["weights", "[1]"]], nbs)
    assert rp.parse_overrides([["estimators", "['grpo']"], ["seeds", "None"], ["weights", "{}"]], nbs) == {
        "estimators": ["grpo"], "seeds": None, "weights": {}}
    assert rp.parse_overrides([["seeds", "1, 2"]], nbs) == {"seeds": (1, 2)}  # a tuple is a list here
    with pytest.raises(rp.UsageError, match="expected a list"):
        rp.parse_overrides([["estimators", "None"]], nbs)  # its default is a list, never None
    assert rp.parse_overrides([["n", "grpo,ibpo"]], nbs) == {"n": "grpo,ibpo"}  # scalars: as before


def test_notebook_kernels_log_no_tcp_warning(nbdir, tmp_path, capfd):
    res = rp.run_notebook(nbdir / "01_first.ipynb", tmp_path / "run", "smoke", {"n": 3})
    assert res.status == "ok", res.error
    err = capfd.readouterr().err  # the kernel writes its log to this process's stderr
    assert "without encryption" not in err and "KeyboardInterrupt" not in err


@pytest.mark.parametrize("quiet", [True, False])
def test_kernel_is_not_interrupted_when_shut_down(quiet):
    """jupyter_client sends SIGINT before a shutdown; after the last cell that only prints a spurious
    "KeyboardInterrupt caught in kernel". The plain manager (quiet=False) shows the test can fail."""
    import asyncio
    import signal

    from jupyter_client.manager import AsyncKernelManager

    cls = rp.kernel_manager_class() if quiet else AsyncKernelManager

    async def run():
        km = cls(kernel_name=rp.KERNEL)
        await km.start_kernel()
        sent = []
        orig = km.provisioner.send_signal

        async def record(signum):
            sent.append(signum)
            await orig(signum)

        km.provisioner.send_signal = record
        await km.shutdown_kernel()
        return km, sent

    km, sent = asyncio.run(run())
    assert (signal.SIGINT in sent) is (not quiet)
    if quiet:
        assert km.transport == ("ipc" if __import__("os").name == "posix" else "tcp")


# ------------------------------------------------------------------------------------ item 9 of issue 17
def _emoji(text: str) -> list[str]:
    # pictographs, dingbats (✅ ❌ ✔ ✖ ⚠) and variation selectors: all need an emoji font
    return [c for c in text if ord(c) >= 0x1F000 or 0x2600 <= ord(c) <= 0x27BF or c in "\ufe0f\ufe0e"]


def test_report_states_overrides_and_uses_words_not_emoji_for_status(tmp_path):
    ok = rp.NotebookResult(name="01_a", status="ok", seconds=1.0)
    bad = rp.NotebookResult(name="02_b", status="failed", seconds=0.5, error="ValueError: boom")
    md = rp.write_report(tmp_path, "smoke", [ok, bad], 1.5, overrides={"steps": 3, "seeds": [0, 1]}).read_text()
    html = (tmp_path / "report.html").read_text()
    for text in (md, html):
        assert "overrides (-p): steps=3, seeds=0,1" in text
        assert not _emoji(text)
    rows = [line for line in md.splitlines() if line.startswith("| 01_a") or line.startswith("| 02_b")]
    assert [r.split("|")[2].strip() for r in rows] == ["ok", "failed"]
    assert "overrides (-p): none" in rp.write_report(tmp_path, "smoke", [ok], 1.0).read_text()


def test_overrides_slug_is_a_safe_bounded_folder_name():
    assert rp.overrides_slug({"steps": 3, "seeds": [0, 1]}) == "steps=3_seeds=0,1"
    assert rp.overrides_slug({"model": "Qwen/Qwen2.5 1.5B"}) == "model=Qwen-Qwen2.5-1.5B"
    long_a = rp.overrides_slug({"estimators": ["grpo", "rloo", "prefix_tree", "ibpo", "vineppo", "dr_grpo", "a"]})
    long_b = rp.overrides_slug({"estimators": ["grpo", "rloo", "prefix_tree", "ibpo", "vineppo", "dr_grpo", "b"]})
    assert len(long_a) <= 60 and long_a != long_b  # cut, but two override sets never share a name


def test_wide_tables_are_split_in_markdown_and_scroll_in_html(tmp_path):
    import pandas as pd

    cols = {f"metric_{i}": [float(i), float(i) + 0.5] for i in range(13)}
    wide = pd.DataFrame({"experiment": ["04_synthetic"] * 2, "label": ["grpo", "ibpo"], **cols})
    fig_dir = tmp_path / "figures" / "04_x"
    fig_dir.mkdir(parents=True)
    wide.to_csv(fig_dir / "stability.csv", index=False)
    res = rp.NotebookResult(name="04_x", status="ok", seconds=1.0, tables=["figures/04_x/stability.csv"])
    md = rp.write_report(tmp_path, "smoke", [res], 1.0).read_text()
    headers = [line for line in md.splitlines() if line.lstrip("| ").startswith("experiment")]
    assert len(headers) == 3  # 2 key columns + 13 metrics in blocks of <= 8 columns
    for h in headers:
        assert h.count("|") - 1 <= rp.MD_MAX_COLUMNS and "label" in h
    shown = {c for h in headers for c in (x.strip() for x in h.split("|")) if c}
    assert shown == set(wide.columns)  # nothing dropped
    html = (tmp_path / "report.html").read_text()
    assert "<div class='table-wrap'><table" in html and ".table-wrap{max-width:100%;overflow-x:auto" in html


# ------------------------------------------------------------------------------------ issue 16: cpu profile
CLAIM_NB = '''# %% tags=["parameters"]
profile = "smoke"
out_dir = None

# %%
import os
from ibpo_lab import claims
d, lo, hi = claims.paired_difference([0.0, 0.1, 0.2], [0.5, 0.5, 0.6])
claims.write_claims([claims.claim("02_claim", "b beats a", "accuracy", "a", "b", 0.1, 0.53, d, lo, hi,
                                  expect="higher", n=claims.size(3, 4, 8), interval="t over 3 seeds (paired)"),
                     claims.claim("02_claim", "b is lower", "variance", "a", "b", 1.0, 1.0, 1.0, float("nan"),
                                  float("nan"), expect="lower", n=claims.size(1), interval="none", null=1.0)], out_dir)
print(os.environ.get("OMP_NUM_THREADS"))
'''


def test_profiles_are_config_rows_and_a_new_row_is_accepted(monkeypatch):
    from ibpo_lab import config

    assert rp.PROFILES is config.PROFILES and {"smoke", "cpu", "full"} <= set(rp.PROFILES)
    rp.check_profile("cpu")  # a CPU profile: no GPU asked
    monkeypatch.setitem(config.PROFILES, "tiny2", {**config.PROFILES["smoke"], "gpu": True})
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(rp.UsageError, match="needs a CUDA GPU"):
        rp.check_profile("tiny2")
    with pytest.raises(rp.UsageError, match="smoke, cpu, full"):
        rp.check_profile("nope")


def test_two_at_a_time_skips_reports_claims_and_runs_results_last(tmp_path, monkeypatch, capsys):
    from ibpo_lab import config

    d = tmp_path / "notebooks"
    d.mkdir()
    _write(d, "01_first", OK_NB)
    _write(d, "02_claim", CLAIM_NB)
    _write(d, "03_results", RESULTS_NB)
    _write(d, "04_skipped", BAD_NB)
    row = {**config.PROFILES["smoke"], "jobs": 2, "threads": 1, "first": ["02"], "skip": {"04": "too slow here"}}
    monkeypatch.setitem(config.PROFILES, "two", row)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    run, results = rp.reproduce("two", notebooks_dir=d, out=tmp_path / "runs", log=print)
    assert [r.name for r in results] == ["01_first", "02_claim", "03_results", "04_skipped"]
    assert [r.status for r in results] == ["ok", "ok", "ok", "skipped"]
    assert results[3].note == "too slow here" and not (run / "notebooks" / "04_skipped.ipynb").exists()
    log = capsys.readouterr().out
    # the results notebook starts only after both others finished
    assert log.index("[start] 03_results") > max(log.index("01_first: ok"), log.index("02_claim: ok"))
    assert log.index("[queued] 02_claim") < log.index("[queued] 01_first")  # the profile's ``first``
    executed = (run / "notebooks" / "02_claim.ipynb").read_text()
    assert '"1\\n"' in executed  # the kernel ran on the profile's one thread
    md = (run / "report.md").read_text()
    assert md.index("## What this run shows") < md.index("## Notebooks")
    shows = md.split("## What this run shows")[1].split("## Notebooks")[0]
    # mean of the differences 0.5, 0.4, 0.4 = 0.4333; t(2) = 4.303, sd = 0.05774 -> half-width 0.1434
    assert "b − a = 0.433" in shows and "[0.29, 0.577]" in shows and "| resolved " in shows
    assert "3 seeds × 4 prompts × 8 samples" in shows and "not resolved at this size" in shows
    assert "Not run in this profile: 04_skipped (too slow here)." in shows
    status = json.loads((run / "status.json").read_text())
    assert status["load"]["start"].startswith("load average") and "cpu_seconds" in status["notebooks"][0]
    assert status["notebooks"][1]["cpu_seconds"] > 0


def test_a_skipped_notebook_named_in_only_runs(tmp_path, monkeypatch):
    from ibpo_lab import config

    d = tmp_path / "notebooks"
    d.mkdir()
    _write(d, "01_first", OK_NB)
    monkeypatch.setitem(config.PROFILES, "skip1", {**config.PROFILES["smoke"], "skip": {"01": "slow"}})
    _, res = rp.reproduce("skip1", notebooks_dir=d, out=tmp_path / "a", log=lambda m: None)
    assert [r.status for r in res] == ["skipped"]
    _, res = rp.reproduce("skip1", only=["1"], notebooks_dir=d, out=tmp_path / "b", log=lambda m: None)
    assert [r.status for r in res] == ["ok"]


def test_unreadable_claims_file_is_a_row_not_a_gap(tmp_path):
    (tmp_path / "figures" / "03_x").mkdir(parents=True)
    (tmp_path / "figures" / "03_x" / "claims.json").write_text("{not json")
    rows = rp.collect_claims(tmp_path)
    assert len(rows) == 1 and "unreadable" in rows[0]["claim"] and rows[0]["verdict"] == "not resolved at this size"


def test_record_times_writes_the_measured_table(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({
        "profile": "cpu", "seconds": 600.4, "cpu_seconds": 900.0, "commit": "abc1234",
        "load": {"start": "load average 1.00, 1.00, 1.00 (1, 5, 15 min)", "end": "load average 2.00"},
        "notebooks": [{"name": "01_a", "status": "ok", "seconds": 12.4, "cpu_seconds": 20.0},
                      {"name": "05_b", "status": "skipped", "seconds": 0.0, "cpu_seconds": 0.0}]}))
    docs = tmp_path / "notebooks.md"
    docs.write_text(f"intro\n{rp._BEGIN}\nold table\n{rp._END}\noutro\n")
    store = tmp_path / "wall_times.json"
    rp.update_wall_times(run, docs, store)
    text = docs.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| 01_a | 12 s (20 s) |" in text and "| 05_b | skipped |" in text
    assert "**600 s** (900 s)" in text and "commit abc1234" in text and "load average 1.00" in text
    assert json.loads(store.read_text())["cpu"]["notebooks"]["01_a"] == ["ok", 12.4, 20.0]
    docs.write_text("no markers")
    with pytest.raises(rp.UsageError, match="markers"):
        rp.update_wall_times(run, docs, store)
    with pytest.raises(rp.UsageError, match="status.json"):
        rp.update_wall_times(tmp_path, docs, store)


def test_docs_carry_the_wall_time_markers():
    text = rp.DOCS.read_text()
    assert rp._BEGIN in text and rp._END in text
