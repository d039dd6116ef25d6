"""Code sandbox: hostile programs get passed=False, leave no process behind, and the runner survives."""

from __future__ import annotations

import os
import pwd
import socket
import threading
import time
import uuid

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
    r = _run("while True:\n    pass\n")
    assert not r.passed and r.timed_out and r.reason.startswith("timeout")


def test_sleeping_program_is_killed_by_the_wall_clock_timer():
    # it uses almost no CPU, so the CPU rlimit never fires: only the wall-clock deadline can stop it
    r = _run("import time\nwhile True:\n    time.sleep(0.01)\n")
    assert not r.passed and r.timed_out and r.reason.startswith("timeout")


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
    if cfg is NO_GUARD and not (REPORT["runs_as"] == "nobody" or REPORT.get("uid_per_run")):
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
    if REPORT.get("private_tmp"):
        assert workdir == "/tmp"  # the private tmpfs; the host's /tmp never sees scratch.txt
        assert not os.path.exists("/tmp/scratch.txt")
    else:
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


# ---------------------------------------------------------------- issue 14, items 7-9
# Whether this machine can give a run its own mount namespace and uids is probed here, not read from
# the module under test, so that these tests also run (and fail) against a sandbox without those layers.
def _machine_can(cmd: list[str]) -> bool:
    import shutil
    import subprocess

    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


ROOT = os.geteuid() == 0
CAN_MOUNT_NS = _machine_can(["unshare", "-m", "true"] if ROOT else ["unshare", "-r", "-m", "true"])
needs_mount_ns = pytest.mark.skipif(not CAN_MOUNT_NS, reason="no mount namespace on this machine")
needs_uids = pytest.mark.skipif(not (ROOT and CAN_MOUNT_NS), reason="distinct uids per run need root")
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def _host_leftovers(name: str) -> list[str]:
    return [os.path.join(d, name) for d in TMP_DIRS if os.path.lexists(os.path.join(d, name))]


def _remove(paths):
    for p in paths:
        try:
            os.remove(p)
        except OSError:
            pass


@needs_mount_ns
def test_temp_writes_vanish_and_nothing_else_is_writable():
    name = f"ibpo-leftover-{uuid.uuid4().hex}"
    others = ["/", "/run/lock", "/root", os.getcwd(), os.path.dirname(os.__file__), "/usr/local", "/etc"]
    prog = (
        "import os\n"
        f"for d in {TMP_DIRS!r}:\n"
        f"    with open(os.path.join(d, {name!r}), 'w') as f:\n"
        "        f.write('x' * 1000)\n"
        "    print('TEMP-OK', d)\n"
        f"for d in {others!r}:\n"
        "    try:\n"
        f"        with open(os.path.join(d, {name!r}), 'w') as f:\n"
        "            f.write('x')\n"
        "        print('WROTE', d)\n"
        "    except OSError as e:\n"
        "        print('REFUSED', d, e.errno)\n"
    )
    try:
        r = _run(prog, NO_GUARD)
        out = r.stdout.decode()
        assert r.passed, r
        assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("TEMP-OK")] == list(TMP_DIRS)
        assert "WROTE" not in out, out  # nothing but the private temp is writable
        assert _host_leftovers(name) == []  # and what was written there is gone
        assert not any(os.path.lexists(os.path.join(d, name)) for d in others)
    finally:
        _remove(_host_leftovers(name) + [os.path.join(d, name) for d in others])


@needs_mount_ns
@pytest.mark.parametrize("where", TMP_DIRS)
def test_writing_more_than_the_temp_cap_fails_and_the_host_is_fine(where):
    name = f"ibpo-big-{uuid.uuid4().hex}"
    cfg = SandboxConfig(timeout_s=5.0, python_guard=False, tmp_bytes=1 << 20, max_file_bytes=64 << 20)
    # 4 MiB in 64 KiB writes: under the file-size limit, over the 1 MiB temp cap
    prog = f"with open({os.path.join(where, name)!r}, 'wb') as f:\n    for _ in range(64):\n        f.write(b'x' * 65536)\n"
    try:
        r = _run(prog, cfg)
        assert not r.passed and "No space left" in r.reason, r
        assert _host_leftovers(name) == []
        assert _run("assert sum(range(10)) == 45\n", cfg).passed
    finally:
        _remove(_host_leftovers(name))


@needs_mount_ns
def test_the_three_temp_dirs_share_one_cap():
    # 600 KiB in each: each fits alone in 1 MiB, the three together do not
    cfg = SandboxConfig(timeout_s=5.0, python_guard=False, tmp_bytes=1 << 20)
    prog = "".join(f"open({os.path.join(d, 'part')!r}, 'wb').write(b'x' * (600 << 10))\n" for d in TMP_DIRS)
    r = _run(prog, cfg)
    assert not r.passed and "No space left" in r.reason, r
    assert _run(prog.splitlines()[0] + "\n", cfg).passed


@needs_uids
def test_parallel_sandboxes_each_get_their_own_process_limit():
    # each correct program needs 7 of its 8 processes at once; on one shared uid, runs in parallel
    # exhaust the limit together and some fail with "Resource temporarily unavailable"
    cfg = SandboxConfig(timeout_s=20.0, python_guard=False, max_processes=8)
    prog = (
        "import os, time\n"
        "kids = []\n"
        "for _ in range(6):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(1.0)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "for pid in kids:\n"
        "    assert os.waitpid(pid, 0)[1] == 0\n"
        "print(os.getuid())\n"
    )
    results = [None] * 6

    def one(i):
        results[i] = run_python(prog, cfg)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [r.passed for r in results] == [True] * 6, [r.reason for r in results]
    assert all(live_processes(r.sandbox_id) == [] for r in results)


@needs_uids
def test_parallel_correct_programs_all_score_one():
    from ibpo_lab.tasks.humaneval import HumanEvalTask

    task = HumanEvalTask(sandbox=SandboxConfig(timeout_s=10.0), workers=4)
    sample = task.examples()[:8]
    assert task.rewards(sample, [task.gold_response(e) for e in sample]) == [1.0] * 8


@needs_mount_ns
def test_a_module_planted_by_one_run_cannot_be_imported_by_another():
    name = f"ibpo_planted_{uuid.uuid4().hex}"
    planter = (
        "import glob, os, sys, time\n"
        f"dirs = {TMP_DIRS!r} + (os.getcwd(),) + tuple(glob.glob('/tmp/ibpo-sandbox-*'))\n"
        "for d in dirs:\n"
        "    try:\n"
        f"        open(os.path.join(d, {name!r} + '.py'), 'w').write('PLANTED = True\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        f"sys.path[:0] = list(dirs)\n"
        f"import {name}\n"  # the planter itself can import it
        "time.sleep(2.0)\n"
    )
    victim = (
        "import glob, importlib, os, sys, time\n"
        "end = time.time() + 2.0\n"
        "while time.time() < end:\n"
        f"    sys.path[:0] = list({TMP_DIRS!r}) + [os.getcwd()] + glob.glob('/tmp/ibpo-sandbox-*') + glob.glob('/proc/*/cwd')\n"
        "    importlib.invalidate_caches()\n"
        "    try:\n"
        f"        importlib.import_module({name!r})\n"
        "        print('IMPORTED')\n"
        "        break\n"
        "    except ImportError:\n"
        "        time.sleep(0.05)\n"
    )
    cfg = SandboxConfig(timeout_s=10.0, python_guard=False)
    got = {}
    th = threading.Thread(target=lambda: got.update(planter=run_python(planter, cfg)))
    th.start()
    try:
        time.sleep(0.3)
        got["victim"] = _run(victim, cfg)
        th.join()
        assert got["planter"].passed, got["planter"]
        assert got["victim"].passed and b"IMPORTED" not in got["victim"].stdout, got["victim"]
    finally:
        th.join()
        _remove([os.path.join(d, name + ".py") for d in TMP_DIRS])


# Reward forgery. Each thief is a wrong HumanEval/0 completion (it returns the wrong answer) that tries one
# way to make the harness report success; run on the task itself, the way rewards are computed.
_FIND_AND_FORGE = (
    "    import os, re, sys\n"
    "    HEX = r'[0-9a-f]{32}'\n"
    "    def forge(found):\n"
    "        # the first thing that looks like a token (32 hex digits, not this run's id), to every fd\n"
    "        texts = [t.decode('latin-1') if isinstance(t, bytes) else t for t in found if isinstance(t, (str, bytes))]\n"
    "        own = os.environ.get('IBPO_SANDBOX_ID')\n"
    "        tokens = [t for t in texts if re.fullmatch(HEX, t) and t != own]\n"
    "        for fd in range(3, 64):\n"
    "            try:\n"
    "                os.write(fd, tokens[0].encode())\n"
    "            except (OSError, IndexError):\n"
    "                pass\n"
    "        os._exit(0)\n"
    "    hexes = lambda text: re.findall(r'(?<![0-9a-f])' + HEX + r'(?![0-9a-f])', text)\n"
)
THIEVES = {
    # the known path: the runner's token in its module's globals
    "main-module": "    found = [v for v in vars(sys.modules['__main__']).values() if isinstance(v, (str, bytes))]\n    forge(found)\n",
    "frames": (
        "    found, f = [], sys._getframe()\n"
        "    while f is not None:\n"
        "        for ns in (f.f_locals, f.f_globals):\n"
        "            found += [v for v in ns.values() if isinstance(v, (str, bytes))]\n"
        "        f = f.f_back\n"
        "    forge(found)\n"
    ),
    "gc": (
        "    import gc\n"
        "    found = [o for o in gc.get_objects() if isinstance(o, (str, bytes))]\n"
        "    for o in gc.get_objects():\n"
        "        if isinstance(o, dict):\n"
        "            found += [v for v in o.values() if isinstance(v, (str, bytes))]\n"
        "    forge(found)\n"
    ),
    "env-argv-files": (
        "    text = repr(dict(os.environ)) + repr(sys.argv)\n"
        "    for p in ['/proc/self/cmdline', '/proc/self/environ', '/proc/1/cmdline', '/proc/1/environ', '/proc/self/fd/0']:\n"
        "        try:\n"
        "            text += open(p, 'rb').read().decode('latin-1')\n"
        "        except OSError:\n"
        "            pass\n"
        "    forge(hexes(text))\n"
    ),
    "inherited-fds": (
        "    found = []\n"
        "    for fd in range(0, 64):\n"
        "        try:\n"
        "            os.set_blocking(fd, False)\n"
        "            found.append(os.read(fd, 4096))\n"
        "        except OSError:\n"
        "            pass\n"
        "    forge([t for b in found for t in hexes(b.decode('latin-1'))] + found)\n"
    ),
    "process-memory": (
        "    found = []\n"
        "    for pid in ('self', '1', str(os.getppid())):\n"
        "        try:\n"
        "            maps = open(f'/proc/{pid}/maps').read().splitlines()\n"
        "            mem = open(f'/proc/{pid}/mem', 'rb')\n"
        "        except OSError:\n"
        "            continue\n"
        "        for line in maps:\n"
        "            lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
        "            if 'r' not in line.split()[1] or hi - lo > 64 << 20:\n"
        "                continue\n"
        "            try:\n"
        "                mem.seek(lo)\n"
        "                found += hexes(mem.read(hi - lo).decode('latin-1'))\n"
        "            except (OSError, ValueError, OverflowError):\n"
        "                pass\n"
        "    forge(found)\n"
    ),
    "always-equal": (
        "    class Anything:\n"
        "        def __eq__(self, other):\n"
        "            return True\n"
        "        __ne__ = lambda self, other: False\n"
        "        __bool__ = lambda self: True\n"
        "    return Anything()\n"
    ),
    "patch-the-check": (
        "    import builtins\n"
        "    builtins.AssertionError = type('Nothing', (Exception,), {})\n"
        "    for m in list(sys.modules.values()):\n"
        "        if getattr(m, 'check', None) is not None:\n"
        "            m.check = lambda candidate: None\n"
        "    f = sys._getframe()\n"
        "    while f is not None:\n"
        "        if 'check' in f.f_globals:\n"
        "            f.f_globals['check'] = lambda candidate: None\n"
        "        f = f.f_back\n"
        "    return False\n"
    ),
    "kill-the-checker": (
        "    import signal\n"
        "    for pid in (1, os.getppid()):\n"
        "        try:\n"
        "            os.kill(pid, signal.SIGKILL)\n"
        "        except OSError:\n"
        "            pass\n"
        "    os._exit(0)\n"
    ),
    "exit-early": "    os._exit(0)\n",
}


@pytest.mark.parametrize("how", sorted(THIEVES))
def test_a_wrong_program_cannot_forge_its_reward(how):
    from ibpo_lab.tasks.humaneval import HumanEvalTask

    task = HumanEvalTask(sandbox=SandboxConfig(timeout_s=10.0, python_guard=False))  # no guard: the OS layers alone
    ex = task.examples()[0]
    completion = _FIND_AND_FORGE + THIEVES[how]
    s = task.score(ex, completion)
    assert s.reward == 0.0, s
    # the same completion after a correct body is not needed to fail: a right answer still scores 1
    assert task.reward(ex, task.gold_response(ex)) == 1.0


@pytest.mark.parametrize("how", ["main-module", "frames", "gc", "env-argv-files", "exit-early"])
def test_run_python_token_is_not_in_the_programs_reach_by_introspection(how):
    # run_python (one process) keeps the token out of the runner's globals, frames, objects, argv, env and
    # files; reading it from its fd remains possible there (the module docstring says so; rewards use run_check)
    prog = "def thief():\n" + _FIND_AND_FORGE + THIEVES[how] + "thief()\nassert False, 'wrong program'\n"
    r = _run(prog, NO_GUARD)
    assert not r.passed, r


def test_run_check_verdicts_and_reasons():
    from ibpo_lab.tasks.sandbox import run_check

    test = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(x=3) == 6\n"
    ok = run_check("def double(x):\n    return 2 * x\n", test, "double", FAST)
    assert ok.passed and ok.reason == "ok", ok
    wrong = run_check("def double(x):\n    return x + 2\n", test, "double", FAST)
    assert not wrong.passed and wrong.reason == "failed: AssertionError", wrong
    raises = run_check("def double(x):\n    raise KeyError('k')\n", test, "double", FAST)
    assert not raises.passed and "CandidateError: KeyError" in raises.reason, raises
    missing = run_check("def triple(x):\n    return 3 * x\n", test, "double", FAST)
    assert not missing.passed and "defines no function 'double'" in missing.reason, missing
    broken = run_check("def double(x:\n", test, "double", FAST)
    assert not broken.passed and "SyntaxError" in broken.reason, broken
    # a return value that is not plain data never reaches the tests
    # (Fraction(4) == 4 would pass the test; a Fraction is refused before it gets there)
    obj = run_check("from fractions import Fraction\ndef double(x):\n    return Fraction(2 * x)\n", test, "double", FAST)
    assert not obj.passed and "fractions.Fraction; only plain data" in obj.reason, obj
    local = run_check("class Two:\n    pass\ndef double(x):\n    return Two()\n", test, "double", FAST)
    assert not local.passed and "cannot be sent to the tests" in local.reason, local
    # plain data of every kind crosses intact (tuples stay tuples, True stays the True singleton)
    values = "(1, 2.5, 'x', b'y', None, True, [1], {'a': (2,)}, {3}, frozenset({4}), 1 + 2j, bytearray(b'z'))"
    same = run_check(f"def f():\n    return {values}\n", f"def check(c):\n    v = c()\n    assert v == {values}\n    assert v[5] is True\n", "f", FAST)
    assert same.passed, same
    # arguments reach the candidate as copies; helpers (the prompt) are visible to the tests
    helper = run_check("def f(l):\n    l.append(9)\n    return len(l)\n", "def check(c):\n    l = [1]\n    assert c(l) == 2 and l == [1]\n    assert helper() == 7\n", "f", FAST, helpers="def helper():\n    return 7\ndef f(l):\n    '''doc'''\n")
    assert helper.passed, helper
    with pytest.raises(ValueError, match="entry_point"):
        run_check("", "", None)


@pytest.mark.parametrize("kind", ["program", "check"])
def test_without_a_private_mount_namespace_the_old_layers_still_work(kind):
    from ibpo_lab.tasks.sandbox import run_check

    cfg = SandboxConfig(timeout_s=3.0, private_tmp=False)
    assert not isolation_report(cfg)["private_tmp"]
    if kind == "program":
        assert _run("assert 1 + 1 == 2\n", cfg).passed
        assert not _run("assert 1 + 1 == 3\n", cfg).passed
        assert not _run("import os\nos._exit(0)\n", cfg).passed
    else:
        test = "def check(candidate):\n    assert candidate(2) == 4\n"
        assert run_check("def double(x):\n    return 2 * x\n", test, "double", cfg).passed
        assert not run_check("def double(x):\n    return x + 3\n", test, "double", cfg).passed


@needs_uids
@pytest.mark.skipif(not any(p.pw_name == "daemon" for p in pwd.getpwall()), reason="no 'daemon' account")
def test_without_a_free_uid_pool_runs_share_nobody_but_keep_the_private_temp():
    from ibpo_lab.tasks.sandbox import run_check

    taken = pwd.getpwnam("daemon").pw_uid  # an account owns this uid: the pool starting there is refused
    cfg = SandboxConfig(timeout_s=5.0, uid_base=taken)
    rep = isolation_report(cfg)
    assert rep["runs_as"] == "nobody" and rep["private_tmp"] and not rep["uid_per_run"], rep
    r = _run("import os, pwd\nopen('/tmp/x', 'w').write('x')\nprint(pwd.getpwuid(os.getuid()).pw_name)\n", cfg)
    assert r.passed and r.stdout == b"nobody\n", r
    assert run_check("def f():\n    return 1\n", "def check(c):\n    assert c() == 1\n", "f", cfg).passed
    # the checker shares the program's uid here, so it is not dumpable: its memory stays unreadable
    thief = "def f():\n" + _FIND_AND_FORGE + THIEVES["process-memory"]
    assert not run_check(thief, "def check(c):\n    assert c() == 2\n", "f", cfg).passed
