"""MATH task (name ``math``): competition problems scored by math-verify, with a hard deadline that works in any thread.

Data: any MATH-format jsonl — rows with ``problem``, ``solution`` (containing ``\\boxed{answer}``),
optional ``level``/``type`` — from ``path=`` (one file, or ``{split: file}``) or
``$IBPO_DATA_DIR/math/<split>.jsonl``. The gold answer is the last ``\\boxed{}`` of the solution.

Reward: 1 iff ``math_verify.verify(parse(gold), parse(response))`` (gold first, as math-verify asks).

Why a worker process: math-verify's own timeouts use ``signal.alarm``, which raises outside the main
thread, and even in the main thread cannot stop sympy inside C code (``\\boxed{9^{9^{9^9}}}`` never
returns). So parse/verify run with their timeouts disabled (``parsing_timeout=None``,
``timeout_seconds=None``) in one long-lived child process (``SafeMathVerifier``); the caller waits
at most ``timeout_s`` per response, then kills and later restarts the child, and the response gets
reward 0 with reason ``"verifier timeout"``. Any thread may call it (calls are serialised by a lock).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from ibpo_lab.tasks.answers import (
    MAX_RESPONSE_CHARS,
    cached_split,
    check_max_response_chars,
    data_dir_file,
    guarded_score,
    last_boxed,
    read_jsonl,
    resolve_split_path,
)
from ibpo_lab.tasks.base import Example, Score, Task, register_task

__all__ = ["MathTask", "MATH_TEMPLATES", "SafeMathVerifier", "math_verify_safe", "FIXTURE"]

#: a few MATH-format problems written for this project (tests use them)
FIXTURE = Path(__file__).parent / "fixtures" / "math_mini.jsonl"

MATH_TEMPLATES: dict[str, str] = {
    "solve": "Problem: {question}\nSolve step by step, one step per line, and put the final answer in \\boxed{{}}.\n",
    "repair": (
        "Problem: {question}\n"
        "A failed attempt:\n{failed}\n"
        "A reference attempt:\n{reference}\n"
        "Rewrite the failed attempt so it is correct, changing as little as possible. "
        "Put the final answer in \\boxed{{}}.\n"
    ),
    "repair_joint": (
        "Problem: {question}\n"
        "A failed attempt:\n{failed}\n"
        "{n_references} reference attempts:\n{references}"
        "Rewrite the failed attempt so it is correct, changing as little as possible. "
        "Put the final answer in \\boxed{{}}.\n"
    ),
    "repair_joint_item": "Reference attempt {k}:\n{reference}\n",
}

# runs in the child: one JSON request per line in, one JSON reply per line out
_WORKER_CODE = r"""
import json, logging, resource, sys
# memory cap set here rather than in a preexec_fn, which is unsafe when the caller has threads
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
logging.disable(logging.WARNING)  # the "timeout is disabled" warning: we time out from outside
from math_verify import parse, verify
gold_cache = {}
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    try:
        req = json.loads(line)
        gold = gold_cache.get(req["gold"])
        if gold is None:
            gold = parse(req["gold"], parsing_timeout=None)
            if len(gold_cache) > 10000:
                gold_cache.clear()
            gold_cache[req["gold"]] = gold
        pred = parse(req["pred"], parsing_timeout=None)
        if not gold:
            out = {"ok": False, "reason": "gold answer does not parse"}
        elif not pred:
            out = {"ok": False, "reason": "no final answer"}
        else:
            ok = bool(verify(gold, pred, timeout_seconds=None))
            out = {"ok": ok, "reason": "ok" if ok else "wrong answer (%s)" % str(pred[-1])[:60]}
    except BaseException as e:  # MemoryError, RecursionError, sympy errors: the answer gets 0
        out = {"ok": False, "reason": "verifier error: %s: %s" % (type(e).__name__, str(e)[:120])}
    print(json.dumps(out), flush=True)
"""


class SafeMathVerifier:
    """math-verify in a child process with a per-call deadline; thread-safe, restarts after a kill.

    ``check(gold_latex, response) -> (correct: bool, reason: str)``; never raises on a response.
    """

    def __init__(self, timeout_s: float = 5.0, max_memory_bytes: int = 4 << 30, startup_timeout_s: float = 120.0):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.max_memory_bytes = int(max_memory_bytes)
        self.startup_timeout_s = float(startup_timeout_s)
        self._proc: subprocess.Popen | None = None
        self._pid_owner = 0  # a forked copy of this object must start its own child
        self._buf = b""
        self._lock = threading.Lock()
        self.restarts = 0

    def _start(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _WORKER_CODE, str(self.max_memory_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a notebook should not hit the worker mid-reply
        )
        self._pid_owner = os.getpid()
        self._buf = b""
        reply = self._read_line(self.startup_timeout_s)
        if reply is None or not reply.get("ready"):
            self._kill()
            raise RuntimeError("math-verify worker did not start (is math-verify installed in this interpreter?)")

    def _kill(self) -> None:
        if self._proc is not None:
            try:
                self._proc.kill()
                self._proc.wait(timeout=5)
            except Exception:
                pass
            for f in (self._proc.stdin, self._proc.stdout):
                try:
                    f.close()
                except Exception:
                    pass
        self._proc = None

    def _read_line(self, timeout: float) -> dict | None:
        # select + os.read instead of readline so a hung worker cannot block us past the deadline
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the worker died (memory limit, crash)
                return {"ok": False, "reason": "verifier crashed", "_dead": True}
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def check(self, gold: str, response: str) -> tuple[bool, str]:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None or self._pid_owner != os.getpid():
                if self._proc is not None and self._pid_owner == os.getpid():
                    self._kill()
                self._proc = None
                self._start()
            try:
                self._proc.stdin.write((json.dumps({"gold": gold, "pred": response}) + "\n").encode())
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._kill()
                return False, "verifier crashed"
            reply = self._read_line(self.timeout_s)
            if reply is None:
                self._kill()
                self.restarts += 1
                return False, f"verifier timeout after {self.timeout_s:g}s"
            if reply.get("_dead"):
                self._kill()
                self.restarts += 1
            return bool(reply.get("ok")), str(reply.get("reason", ""))

    def close(self) -> None:
        with self._lock:
            self._kill()


_SHARED: dict[float, SafeMathVerifier] = {}
_SHARED_LOCK = threading.Lock()


def _shared_verifier(timeout_s: float) -> SafeMathVerifier:
    with _SHARED_LOCK:
        if timeout_s not in _SHARED:
            _SHARED[timeout_s] = SafeMathVerifier(timeout_s)
        return _SHARED[timeout_s]


@atexit.register
def _close_shared() -> None:
    for v in _SHARED.values():
        v.close()


def math_verify_safe(gold: str, response: str, timeout_s: float = 5.0) -> tuple[bool, str]:
    """``verify(parse(gold), parse(response))`` with a deadline, from any thread. ``gold`` is LaTeX
    such as ``"\\boxed{\\frac{5}{6}}"``."""
    return _shared_verifier(float(timeout_s)).check(gold, response)


class MathTask(Task):
    """MATH-format problems. ``path``: jsonl file (or ``{split: file}``); else ``data_dir`` /
    ``$IBPO_DATA_DIR/math/<split>.jsonl``. ``timeout_s``: math-verify deadline per response."""

    name = "math"
    step_delimiter = "newline"

    def __init__(
        self,
        path: str | os.PathLike | Mapping[str, Any] | None = None,
        data_dir: str | os.PathLike | None = None,
        templates: dict[str, str] | None = None,
        timeout_s: float = 5.0,
        max_response_chars: int = MAX_RESPONSE_CHARS,
    ) -> None:
        super().__init__({**MATH_TEMPLATES, **(templates or {})})
        if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
        self.max_response_chars = check_max_response_chars(max_response_chars)
        self.path, self.data_dir = path, data_dir
        self.timeout_s = float(timeout_s)
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str = "train", n: int | None = None) -> list[Example]:
        return cached_split(self._cache, split, n, self._load)

    def _load(self, split: str) -> list[Example]:
        file = resolve_split_path(self.path, split) or data_dir_file("math", split, self.data_dir)
        if file is None:
            raise ValueError(
                f"math: no file for split {split!r}. Pass path='.../{split}.jsonl' (MATH-format rows with "
                f"'problem' and 'solution' containing \\boxed{{}}) or set IBPO_DATA_DIR so that "
                f"$IBPO_DATA_DIR/math/{split}.jsonl exists."
            )
        out = []
        for i, (line, row) in enumerate(read_jsonl(file, required=("problem", "solution"))):
            answer = last_boxed(row["solution"])
            if answer is None or not answer.strip():
                raise ValueError(f"{file}:{line}: solution has no \\boxed{{...}} answer")
            meta = {"solution": row["solution"], "source": f"{file}:{line}"}
            meta.update({k: row[k] for k in ("level", "type") if k in row})
            out.append(Example(id=f"math-{split}-{i}", prompt=row["problem"], answer=answer.strip(), meta=meta))
        return out

    def gold_response(self, example: Example) -> str:
        """The reference solution, as a response (scores 1.0)."""
        return example.meta["solution"]

    def score(self, example: Example, response: str) -> Score:
        return guarded_score(response, self.max_response_chars, lambda text: self._score_text(example, text))

    def _score_text(self, example: Example, text: str) -> Score:
        ok, reason = math_verify_safe("\\boxed{" + example.answer + "}", text, self.timeout_s)
        return Score(1.0 if ok else 0.0, reason)


register_task("math")(MathTask)
