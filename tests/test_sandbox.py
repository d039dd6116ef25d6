"""Code sandbox: hostile programs get passed=False, leave no process behind, and the runner survives."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from ibpo_lab.tasks.sandbox import SandboxConfig, isolation_report, live_processes, run_python

FAST = SandboxConfig(timeout_s=1.5)
NO_GUARD = SandboxConfig(timeout_s=1.5, python_guard=False)  # exercises the OS-level layers alone
REPORT = isolation_report(FAST)


def _run(program: str, cfg: SandboxConfig = FAST):
    r = run_python(program, cfg)
    # the process tree is gone whatever the program did
    assert live_processes(r.sandbox_id) == [], r
    return r


def test_passing_and_failing_programs():
    ok = _run("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('hello')\n")
    assert ok.passed and ok.reason == "ok" and ok.returncode == 0
    assert ok.stdout == b"hello\n"
    bad = _run("assert 1 == 2, 'nope'\n")
    assert not bad.passed and bad.reason == "failed: AssertionError: nope"
    syntax = _run("def (:\n")
    assert not syntax.passed and "SyntaxError" in syntax.reason


def test_infinite_loop_is_killed_at_the_deadline():
    start = time.monotonic()
    r = _run("while True:\n    pass\n")
    assert not r.passed and r.timed_out and r.reason.startswith("timeout")
    assert time.monotonic() - start < FAST.timeout_s + 5


def test_fork_bomb_is_stopped():
    r = _run("import os\nwhile True:\n    os.fork()\n")
    assert not r.passed


@pytest.mark.skipif(not (REPORT["nproc_limit_enforced"] and REPORT["pid_namespace"]), reason=f"no NPROC/pid namespace here: {REPORT}")
def test_fork_bomb_without_python_guard_is_contained_by_rlimit_and_namespace():
    r = _run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n", NO_GUARD)
    assert not r.passed and r.timed_out


def test_daemonised_child_is_killed():
    # a grandchild that leaves the process group with setsid() and outlives the program
    prog = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\nprint('parent done')\n"
    r = _run(prog, NO_GUARD)
    assert r.passed  # the program itself finished; its straggler is still gone (checked in _run)


@pytest.mark.parametrize("program", ["x = b' ' * (1 << 40)\n", "x = []\nwhile True:\n    x.append(bytearray(1 << 26))\n"])
def test_unbounded_allocation_fails(program):
    r = _run(program)
    assert not r.passed
    assert "MemoryError" in r.reason or r.timed_out or r.reason.startswith("killed")


def test_printing_gigabytes_is_capped():
    cfg = SandboxConfig(timeout_s=3.0, max_output_bytes=1 << 16)
    r = _run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", cfg)
    assert not r.passed and "output exceeded" in r.reason
    assert len(r.stdout) + len(r.stderr) <= 2 * cfg.max_output_bytes


@pytest.mark.parametrize(
    "program", ["import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\n", "exit(0)\n", "raise SystemExit\n"]
)
def test_early_exit_does_not_pass(program):
    r = _run(program + "assert False\n")
    assert not r.passed, r


def test_big_files_are_refused():
    r = _run("with open('big', 'wb') as f:\n    f.write(b'x' * (64 << 20))\n")
    assert not r.passed


@pytest.mark.parametrize("cfg", [FAST, NO_GUARD], ids=["guard", "no-guard"])
def test_deleting_files_outside_the_temp_dir_fails(tmp_path, cfg):
    if cfg is NO_GUARD and REPORT["runs_as"] != "nobody":
        pytest.skip(f"without the Python guard only a different user protects our files: {REPORT}")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    prog = f"import os, shutil\ntry:\n    os.remove({str(victim)!r})\nfinally:\n    shutil.rmtree({str(tmp_path)!r})\n"
    r = _run(prog, cfg)
    assert not r.passed
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("cfg", [FAST, NO_GUARD], ids=["guard", "no-guard"])
def test_sockets_do_not_reach_the_host(cfg):
    if cfg is NO_GUARD and not REPORT["network_namespace"]:
        pytest.skip(f"no network namespace here: {REPORT}")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.05)
    port = server.getsockname()[1]
    got, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(1.0)
            got.append(conn.recv(100))
            conn.close()

    th = threading.Thread(target=accept)
    th.start()
    prog = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'leak')\n"
    r = _run(prog, cfg)
    stop.set()
    th.join()
    server.close()
    assert not r.passed and got == [], (r, got)


def test_temp_dir_is_private_and_removed():
    r = _run("import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('x')\n")
    assert r.passed
    workdir = r.stdout.decode().strip()
    assert os.path.basename(workdir).startswith("ibpo-sandbox-")
    assert not os.path.exists(workdir)


def test_program_must_be_text():
    r = _run("print('\udcff')\n")
    assert not r.passed and "UTF-8" in r.reason
    with pytest.raises(ValueError, match="program"):
        run_python(b"print(1)")


def test_config_validation():
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="max_output_bytes"):
        SandboxConfig(max_output_bytes=-1)


def test_runner_survives_and_still_works():
    # after every hostile case above, this process still runs programs normally
    assert _run("assert sum(range(10)) == 45\n").passed
