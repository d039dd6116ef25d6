"""The GPU check: does the single-GPU path (trainer + hf sampler) run on this machine, and how much
memory do the `full` profile's heavy calls need? Also why torch sees no CUDA device, when it doesn't.

``python -m ibpo_lab.gpu_check [--out DIR] [--small]`` writes ``DIR/gpu_check.json`` (atomically,
after every section) with:

- ``env``: python/torch/transformers/accelerate versions, GPU and driver, the TF32 flags after
  ``step.enable_tf32()`` (what every CUDA run sets), or :func:`cuda_diagnosis` without a GPU;
- ``cli_<estimator>_<dtype>``: ``python -m ibpo_lab.train smoke --set estimator=... device=cuda
  dtype=...`` for grpo and ibpo in float32 and bfloat16 (tiny policy, hf sampler, 3 steps, 2 with ``--small``);
- ``resume_exact``: the grpo float32 run stopped one step early and resumed, against the uninterrupted one;
- ``sampler_vs_trainer_logprobs``: the hf sampler's behaviour log-probs against
  :func:`models.response_logprobs` on left-padded batches, float32 and bfloat16 weights, and
  ``bfloat16_mixed``: a ``step.build_lab(dtype=bfloat16)`` lab's sampler against the trainer's pass
  under ``step.precision_context``;
- ``mem_1p5b``: peak memory of the policy update (micro-batch 4) and of the no-grad log-prob pass
  (64 trajectories, the vllm sampler's recompute chunk) with a randomly initialised
  Qwen2.5-1.5B-shaped model built from a config in code (nothing downloaded), AdamW state resident,
  in float32, ``bfloat16_mixed`` (float32 weights, passes under ``step.precision_context("bfloat16")``:
  the full preset, README's ~41.8 GiB update peak) and pure bfloat16; fails above 60 GiB; with the
  seconds and tokens/s of each pass;
  and the bytes one such decoder layer keeps for backward per token (float32, bfloat16);
- ``hf_sampler_1p5b``: the hf sampler's tokens/s at that shape (256 trajectories);
- ``rates``: the measured train / log-prob / sample token rates next to ``config.GPU_COST``'s assumed
  ones (update GPU_COST from a GPU run's JSON);
- ``ok``: every section ran without an exception and every check in it passed.

On a borrowed GPU machine run ``bash scripts/gpu_check.sh`` (its header has the exact call).

``--small`` runs the same sections on the CPU with toy sizes (CI runs it: tests/test_gpu_check.py);
on the CPU, peaks are the live tensor bytes counted by :class:`TensorMemoryMeter`.

It needs only torch, transformers, numpy, pandas, pyarrow, pyyaml, tqdm and rapidfuzz, runs from the
source tree (``PYTHONPATH=.``) without ``pip install``, and imports nothing else at import time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import shutil
import string
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "cuda_diagnosis", "TensorMemoryMeter", "qwen_1p5b_config", "saved_activation_bytes_per_token_layer", "run_check", "main",
]

GiB = 2**30


# ---------------------------------------------------------------------------- why no CUDA
def cuda_diagnosis() -> str:
    """One paragraph saying why ``torch.cuda.is_available()`` is False here (or that it is True).

    Looks at: the torch build (``torch.version.cuda`` is None for a CPU-only wheel), the NVIDIA
    kernel driver (``/proc/driver/nvidia/version``, ``nvidia-smi``'s driver and CUDA versions),
    ``CUDA_VISIBLE_DEVICES``, and the warning or error torch itself raises when it initialises CUDA
    (e.g. "The NVIDIA driver on your system is too old"). ``reproduce --profile full`` and
    ``train.resolve_device`` append it to their "needs a CUDA GPU" message."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    messages += [str(w.message) for w in caught]
    if not available and torch.version.cuda is not None:
        try:  # the initialisation error names the cause (old driver, no device, ...)
            torch.cuda.init()
        except Exception as e:  # noqa: BLE001 - any failure is the information we want
            messages.append(f"{type(e).__name__}: {e}")
    driver, driver_cuda = _nvidia_driver()
    return _diagnose(
        available=available,
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        driver_version=driver,
        driver_cuda=driver_cuda,
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        torch_messages=messages,
    )


def _nvidia_driver() -> tuple[str | None, str | None]:
    """(kernel driver version, highest CUDA version it supports), None where unknown."""
    driver = cuda = None
    proc = Path("/proc/driver/nvidia/version")
    try:
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", proc.read_text())
        driver = m.group(1) if m else "present"
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi], capture_output=True, text=True, timeout=20).stdout
            m = re.search(r"Driver Version:\s*([\d.]+)", out)
            driver = m.group(1) if m else driver
            m = re.search(r"CUDA Version:\s*([\d.]+)", out)
            cuda = m.group(1) if m else None
        except (OSError, subprocess.SubprocessError):
            pass
    return driver, cuda


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


def _diagnose(
    *,
    available: bool,
    torch_version: str,
    torch_cuda: str | None,
    driver_version: str | None,
    driver_cuda: str | None,
    visible_devices: str | None,
    torch_messages: list[str],
) -> str:
    """The facts -> the sentence (pure, so each cause is testable)."""
    if available:
        return f"torch {torch_version} (CUDA {torch_cuda}) sees a CUDA device"
    head = f"torch {torch_version} sees no CUDA device: "
    if torch_cuda is None:
        why = (
            "this torch is a CPU-only build (torch.version.cuda is None); install a CUDA wheel of torch "
            "(environment-gpu.yml gets the one vLLM pins)"
        )
    elif visible_devices is not None and visible_devices.strip() in ("", "-1"):
        why = f"CUDA_VISIBLE_DEVICES={visible_devices!r} hides every GPU; unset it"
    elif driver_version is None:
        why = (
            f"torch is built for CUDA {torch_cuda} but no NVIDIA driver is loaded "
            "(/proc/driver/nvidia/version is missing and nvidia-smi was not found or failed)"
        )
    elif driver_cuda is not None and _version_tuple(driver_cuda) < _version_tuple(torch_cuda):
        why = (
            f"the NVIDIA driver {driver_version} supports CUDA up to {driver_cuda}, older than the CUDA "
            f"{torch_cuda} this torch is built for; update the driver or install a torch built for CUDA <= {driver_cuda}"
        )
    else:
        why = f"torch is built for CUDA {torch_cuda} and NVIDIA driver {driver_version} is loaded" + (
            f" (supports CUDA {driver_cuda})" if driver_cuda else ""
        ) + ", but CUDA did not initialise"
    text = head + why + "."
    msgs = list(dict.fromkeys(m.strip() for m in torch_messages if m and m.strip()))
    if msgs:
        text += " torch says: " + " | ".join(msgs)
    return text


# ---------------------------------------------------------------------------- memory on any device
class TensorMemoryMeter(TorchDispatchMode):
    """Peak bytes of live tensor storage created inside the ``with`` block (any device, CPU too).

    Every operator's outputs are seen through ``__torch_dispatch__``; a storage is counted from the
    op that creates it until it is freed (a weak reference to it expires). Storages that existed
    before the block (parameters, inputs) and views of them are not counted, so ``peak`` is the
    extra memory a computation needs, as ``torch.cuda.max_memory_allocated`` minus the resident
    bytes would say on a GPU (without the caching allocator's rounding)."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[Any, int]] = {}
        self.current = 0
        self.peak = 0
        self.largest = 0  # the largest single storage created

    def _prune(self) -> None:
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        self._prune()
        seen_in = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if key == 0 or key in self._live or key in seen_in:
                continue
            n = st.nbytes()
            self._live[key] = (StorageWeakRef(st), n)
            self.current += n
            self.largest = max(self.largest, n)
        self.peak = max(self.peak, self.current)
        return out


# ---------------------------------------------------------------------------- 1.5B-shaped model
def qwen_1p5b_config(vocab_size: int = 151936, small: bool = False):
    """A transformers ``Qwen2Config`` with Qwen2.5-1.5B-Instruct's shapes (28 layers, hidden 1536,
    MLP 8960, 12 query / 2 KV heads, tied embeddings); ``small``: 2 layers, hidden 64 (CPU runs)."""
    from transformers import Qwen2Config

    kw = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2)
    if small:
        kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return Qwen2Config(vocab_size=vocab_size, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6, **kw)


def _random_model(config, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model.eval()


def _padded_batch(B: int, P: int, T: int, V: int, device: torch.device, seed: int = 0):
    """Random ids, half the rows left-padded by P // 4 and right-padded by T // 4."""
    from ibpo_lab.rollout import PaddedBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, P + T), generator=g)
    attn = torch.ones(B, P + T, dtype=torch.long)
    attn[: B // 2, : P // 4] = 0
    attn[: B // 2, P + T - T // 4 :] = 0
    return PaddedBatch(
        input_ids=ids, attention_mask=attn, response_ids=ids[:, P:], response_mask=attn[:, P:].float(),
        old_logprobs=torch.zeros(B, T), rewards=torch.zeros(B), group_ids=torch.zeros(B, dtype=torch.long), prompt_len=P,
    ).to(device)


def saved_activation_bytes_per_token_layer(
    dtype: torch.dtype = torch.float32, tokens: int = 256, device: str | torch.device = "cpu", small: bool = False
) -> float:
    """Bytes one Qwen2.5-1.5B-shaped decoder layer keeps for backward per token, measured: the live
    tensor bytes after the forward of :func:`models.response_logprobs` with 2 layers minus with 1
    (vocabulary 1000, so the head does not count), divided by ``tokens`` (one unpadded row).

    On a CPU this includes the math attention's [heads, L, L] probabilities (grows with L); fused
    GPU attention keeps only O(L) statistics."""
    from ibpo_lab.models import response_logprobs

    device = torch.device(device)
    live = {}
    for layers in (1, 2):
        cfg = qwen_1p5b_config(1000, small=small)
        cfg.num_hidden_layers = layers
        model = _random_model(cfg, dtype, device)
        pb = _padded_batch(1, tokens // 4, tokens - tokens // 4, 1000, device)
        pb.attention_mask.fill_(1)
        with TensorMemoryMeter() as meter:
            lp, _ = response_logprobs(model, pb)
            live[layers] = meter.current
        del lp, model
    return (live[2] - live[1]) / tokens


def _big_char_tokenizer(vocab_size: int):
    """A character tokenizer with exactly ``vocab_size`` ids (letters first), so a model with a
    real vocabulary size samples ids the tokenizer can decode."""
    from ibpo_lab.models import SPECIAL_TOKENS, char_tokenizer

    n = vocab_size - len(SPECIAL_TOKENS)
    chars = list(string.ascii_letters + string.digits + " ")
    cp = 0x100
    while len(chars) < n:
        if not 0xD800 <= cp <= 0xDFFF:  # surrogates are not characters
            chars.append(chr(cp))
        cp += 1
    return char_tokenizer(chars, model_max_length=32768)


# ---------------------------------------------------------------------------- the check
class _Check:
    def __init__(self, out: Path, small: bool, log: Callable[[str], None]):
        self.out, self.small, self.log = out, small, log
        self.dev = torch.device("cpu" if small else "cuda")
        self.result: dict[str, Any] = {
            "small": small,
            "device": str(self.dev),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "commit": _git_commit(),
            "seconds": {},
        }

    def write(self) -> None:
        from ibpo_lab.runs import atomic_write_text, finite_or_null

        # never a half-written file; strict JSON (NaN -> null)
        atomic_write_text(self.out / "gpu_check.json", json.dumps(finite_or_null(self.result), indent=1, default=str) + "\n")

    def section(self, name: str, fn: Callable[[], dict]) -> None:
        from ibpo_lab.runs import finite_or_null

        t0 = time.perf_counter()
        try:
            self.result[name] = fn()
        except Exception as e:  # noqa: BLE001 - record it and run the next section
            self.result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
        self.result["seconds"][name] = round(time.perf_counter() - t0, 2)
        self.log(f"[{name}] {self.result['seconds'][name]} s: {json.dumps(finite_or_null(self.result[name]), default=str)[:400]}")
        self.write()

    # -- peaks -------------------------------------------------------------------------
    def measure(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """(fn(), peak GiB): CUDA max allocated (resident included) or, on CPU, live tensor bytes
        created by fn (TensorMemoryMeter; resident parameters and optimiser state not included)."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            r = fn()
            torch.cuda.synchronize()
            return r, torch.cuda.max_memory_allocated() / GiB
        with TensorMemoryMeter() as meter:
            r = fn()
        return r, meter.peak / GiB

    # -- sections ----------------------------------------------------------------------
    def env(self) -> dict:
        import transformers

        from ibpo_lab.step import enable_tf32

        d: dict[str, Any] = {"transformers": transformers.__version__, "cuda_available": torch.cuda.is_available()}
        try:  # the installed version only: the check itself never imports accelerate (an optional extra)
            d["accelerate"] = importlib.metadata.version("accelerate")
        except importlib.metadata.PackageNotFoundError:
            d["accelerate"] = None
        before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        enable_tf32()  # what step.build_policy does for every CUDA policy; the flags below are after it
        d.update(tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                 float32_matmul_precision=torch.get_float32_matmul_precision())
        if not torch.cuda.is_available():  # CPU dry run: leave the process's float32 matmuls as they were
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            d.update(gpu=torch.cuda.get_device_name(0), mem_gib=round(p.total_memory / GiB, 1),
                     capability=f"{p.major}.{p.minor}", bf16_supported=torch.cuda.is_bf16_supported())
            driver, driver_cuda = _nvidia_driver()
            d.update(driver=driver, driver_cuda=driver_cuda)
        else:
            d["diagnosis"] = cuda_diagnosis()
        d["ok"] = (self.small or d["cuda_available"]) and d["tf32_matmul"] and d["tf32_cudnn"]
        return d

    def _cli_args(self, estimator: str, dtype: str, steps: int) -> list[str]:
        sets = [f"estimator={estimator}", f"device={self.dev.type}", f"dtype={dtype}", f"steps={steps}", "seed=0"]
        if self.small:  # toy sizes (the batch of 16 stays divisible by smoke's minibatch of 16)
            sets += ["prompts_per_step=4", "group_size=4", "max_new_tokens=24", "eval_n=4"]
        else:
            sets += ["eval_n=16"]
        return [sys.executable, "-m", "ibpo_lab.train", "smoke", "--no-progress", "--set", *sets]

    def _run_cli(self, name: str, args: list[str]) -> tuple[subprocess.CompletedProcess, list[dict]]:
        """The train CLI into ``runs/<name>``: a subprocess on the GPU (a CUDA fault cannot take the
        check down with it); in-process ``ibpo_lab.train.main`` with ``--small``, the same code without
        paying a Python start-up and import per run on a small CPU."""
        run_dir = self.out / "runs" / name
        argv = [*args, "--out", str(run_dir)]
        if self.small:
            import contextlib
            import io

            from ibpo_lab.train import main as train_main

            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    rc = train_main(argv[3:])  # drop `python -m ibpo_lab.train`
                except SystemExit as e:  # argparse and usage errors
                    rc = e.code if isinstance(e.code, int) else 1
                except Exception:  # noqa: BLE001 - reported like a crashed subprocess
                    err.write(traceback.format_exc())
                    rc = 1
            p = subprocess.CompletedProcess(argv, rc or 0, "", err.getvalue())
        else:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))}
            p = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env, cwd=_REPO)
        f = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
        return p, rows

    @property
    def steps(self) -> int:
        return 2 if self.small else 3

    def cli(self, estimator: str, dtype: str) -> dict:
        p, rows = self._run_cli(f"{estimator}_{dtype}", self._cli_args(estimator, dtype, self.steps))
        keep = ("reward_mean", "loss", "grad_norm", "approx_kl", "clip_frac", "skipped", "repair_success", "time_sample", "time_update")
        finite = all(isinstance(r.get("loss"), float) and math.isfinite(r["loss"]) for r in rows)
        return {
            "ok": p.returncode == 0 and len(rows) == self.steps and finite,
            "rc": p.returncode,
            "stderr_tail": p.stderr[-1500:] if p.returncode else "",
            "rows": [{k: r.get(k) for k in keep} for r in rows],
        }

    def resume_exact(self) -> dict:
        """The uninterrupted grpo float32 CLI run against the same run stopped one step early and resumed."""
        f = self.out / "runs" / "grpo_float32" / "metrics.jsonl"
        full = [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []
        p2, _ = self._run_cli("resume_part", self._cli_args("grpo", "float32", self.steps - 1))
        p3, part = self._run_cli("resume_part", [*self._cli_args("grpo", "float32", self.steps), "--resume"])
        diffs: dict[str, float] = {}
        for a, b in zip(full, part):
            for k, v in a.items():
                w = b.get(k)
                if k.startswith("time") or not isinstance(v, (int, float)) or not isinstance(w, (int, float)):
                    continue
                if isinstance(v, float) and math.isnan(v) and isinstance(w, float) and math.isnan(w):
                    continue
                diffs[k] = max(diffs.get(k, 0.0), abs(float(v) - float(w)))
        worst = max(diffs.values(), default=math.inf)
        return {
            "ok": p2.returncode == 0 and p3.returncode == 0 and len(full) == len(part) == self.steps and worst == 0.0,
            "rc": [p2.returncode, p3.returncode],
            "stderr_tail": (p2.stderr + p3.stderr)[-1500:] if p2.returncode or p3.returncode else "",
            "max_abs_diff": worst,
            "differing": {k: v for k, v in diffs.items() if v > 0},
        }

    def sampler_vs_trainer(self) -> dict:
        from ibpo_lab.models import load_policy, response_logprobs
        from ibpo_lab.sampling import get_sampler
        from ibpo_lab.tasks import get_task

        task = get_task("synthetic")
        # prompts of different lengths, so the batch is left-padded
        prompts = [task.solve_prompt(e) for e in task.examples("train", 4)] + ["1+2=", "a longer prompt: 12+30+7="]
        out: dict[str, Any] = {}
        tol = {"float32": 1e-4, "bfloat16": 0.1}  # bf16: the decode step and the full forward round differently
        for dt in ("float32", "bfloat16"):
            pol = load_policy("tiny", dtype=dt, device=str(self.dev))
            b = get_sampler("hf", pol).sample(prompts, n=4, max_new_tokens=24 if self.small else 48, temperature=1.0, seed=0)
            pad = b.padded()
            with torch.no_grad():
                lp, ent = response_logprobs(pol.model, pad.to(self.dev), 1.0)
            m = pad.response_mask.bool()
            d = (lp.float().cpu() - pad.old_logprobs.float())[m].abs()
            left = int((pad.attention_mask[:, : pad.prompt_len] == 0).any(-1).sum())
            out[dt] = {"B": len(b), "left_padded_rows": left, "max_abs": float(d.max()), "mean_abs": float(d.mean()),
                       "finite": bool(torch.isfinite(lp).all() and torch.isfinite(ent).all())}
            out[dt]["ok"] = out[dt]["finite"] and left > 0 and out[dt]["max_abs"] <= tol[dt]
        out["bfloat16_mixed"] = self._mixed_sampler_vs_trainer(prompts)
        out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
        return out

    def _mixed_sampler_vs_trainer(self, prompts: list[str]) -> dict:
        """bf16 mixed precision as a run has it: ``step.build_lab`` with ``dtype=bfloat16`` (float32
        weights, the hf decode under autocast) against ``response_logprobs`` under
        ``step.precision_context("bfloat16", device)`` (the trainer's pass)."""
        from ibpo_lab.config import load_config
        from ibpo_lab.models import response_logprobs
        from ibpo_lab.step import build_lab, precision_context

        cfg = load_config("smoke").with_overrides([f"device={self.dev.type}", "dtype=bfloat16"])
        lab = build_lab(cfg)
        b = lab.sampler.sample(prompts, n=4, max_new_tokens=24 if self.small else 48, temperature=1.0, seed=0)
        pad = b.padded()
        with torch.no_grad(), precision_context("bfloat16", self.dev):
            lp, ent = response_logprobs(lab.policy.model, pad.to(self.dev), 1.0)
        m = pad.response_mask.bool()
        d = (lp.float().cpu() - pad.old_logprobs.float())[m].abs()
        left = int((pad.attention_mask[:, : pad.prompt_len] == 0).any(-1).sum())
        r = {"B": len(b), "left_padded_rows": left, "max_abs": float(d.max()), "mean_abs": float(d.mean()),
             "weights_dtype": str(next(lab.policy.model.parameters()).dtype).split(".")[-1],
             "logprobs_dtype": str(lp.dtype).split(".")[-1],
             "finite": bool(torch.isfinite(lp).all() and torch.isfinite(ent).all())}
        # the decode and the full forward both run bf16 matmuls, rounding differently (README: <= 0.1 nats)
        r["ok"] = r["finite"] and left > 0 and r["max_abs"] <= 0.1 and r["weights_dtype"] == "float32"
        return r

    def memory(self) -> dict:
        from ibpo_lab.models import response_logprobs

        V = 151936
        cfg = qwen_1p5b_config(V, small=self.small)
        update_shapes = [(2, 16, 32)] if self.small else [(4, 200, 512), (4, 200, 640)]  # micro_batch_size 4
        recompute_shapes = [(8, 16, 32)] if self.small else [(64, 200, 512), (64, 200, 640)]  # logprob_batch_size 64
        out: dict[str, Any] = {"vocab": V, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers}
        from ibpo_lab.step import precision_context

        # (name, weight dtype, TrainConfig.dtype whose precision_context the passes run under):
        # float32; bf16 mixed precision (float32 weights + AdamW state, bf16 autocast: the full preset,
        # README's ~41.8 GiB update peak); pure bf16 weights
        variants = [("float32", torch.float32, "float32"), ("bfloat16_mixed", torch.float32, "bfloat16"),
                    ("bfloat16", torch.bfloat16, "float32")]
        for name, dtype, run_dtype in variants:
            model = _random_model(cfg, dtype, self.dev)
            out[f"{name}_params"] = sum(p.numel() for p in model.parameters())
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
            for B, P, T in update_shapes:
                def step(B=B, P=P, T=T, run_dtype=run_dtype):
                    with precision_context(run_dtype, self.dev):
                        lp, _ = response_logprobs(model, _padded_batch(B, P, T, V, self.dev), 1.0)
                    lp.sum().backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                try:
                    step()  # the first step creates AdamW's state; the second is the steady state
                    t0 = time.perf_counter()
                    _, peak = self.measure(step)
                    sec = time.perf_counter() - t0
                    out[f"{name}_update_B{B}_P{P}_T{T}"] = {
                        "peak_gib": round(peak, 3), "seconds": round(sec, 3), "tokens": B * (P + T),
                        "tokens_per_s": round(B * (P + T) / sec, 1),
                    }
                except torch.OutOfMemoryError as e:
                    out[f"{name}_update_B{B}_P{P}_T{T}"] = {"oom": str(e)[:300], "finite": False}
                    opt.zero_grad(set_to_none=True)
            for B, P, T in recompute_shapes:
                def recompute(B=B, P=P, T=T, run_dtype=run_dtype):
                    with torch.no_grad(), precision_context(run_dtype, self.dev):
                        return response_logprobs(model, _padded_batch(B, P, T, V, self.dev), 1.0)[0]

                t0 = time.perf_counter()
                try:
                    lp, peak = self.measure(recompute)
                    sec = time.perf_counter() - t0
                    out[f"{name}_logprobs_B{B}_P{P}_T{T}"] = {
                        "peak_gib": round(peak, 3), "seconds": round(sec, 3), "tokens": B * (P + T),
                        "tokens_per_s": round(B * (P + T) / sec, 1), "finite": bool(torch.isfinite(lp).all()),
                    }
                    del lp
                except torch.OutOfMemoryError as e:
                    out[f"{name}_logprobs_B{B}_P{P}_T{T}"] = {"oom": str(e)[:300], "finite": False}
            del model, opt
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
        for dtype in (torch.float32, torch.bfloat16):  # feeds the README's activation term
            out[f"saved_activation_bytes_per_token_layer_{str(dtype).split('.')[-1]}"] = saved_activation_bytes_per_token_layer(
                dtype, tokens=64 if self.small else 1024, device=self.dev, small=self.small
            )
        limit = 60.0  # GiB: the documented budget for the full profile (README, models.response_logprobs)
        peaks = [v["peak_gib"] for v in out.values() if isinstance(v, dict) and "peak_gib" in v]
        out["max_peak_gib"] = max(peaks, default=None)
        out["ok"] = (
            all(v.get("finite", True) and "oom" not in v for v in out.values() if isinstance(v, dict))
            and bool(peaks) and max(peaks) <= limit
        )
        return out

    def hf_sampler_speed(self) -> dict:
        from ibpo_lab.models import Policy
        from ibpo_lab.sampling import HFSampler

        V = 151936
        tok = _big_char_tokenizer(V)
        cfg = qwen_1p5b_config(len(tok), small=self.small)
        n_prompts, n, new = (4, 2, 8) if self.small else (32, 8, 128)  # full: 256 trajectories
        out: dict[str, Any] = {"vocab": len(tok)}
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).split(".")[-1]
            pol = Policy(model=_random_model(cfg, dtype, self.dev), tokenizer=tok, name="qwen2.5-1.5b-shaped")
            sampler = HFSampler(pol, max_batch_size=256)
            (b, peak) = self.measure(lambda: sampler.sample(["a" * 200] * n_prompts, n=n, max_new_tokens=new, temperature=1.0, seed=0))
            st = sampler.last_stats
            out[name] = {"B": len(b), "new_tokens": int(st["new_tokens"]), "seconds": round(st["seconds"], 2),
                         "tokens_per_s": round(st["tokens_per_s"], 1), "peak_gib": round(peak, 3)}
            del pol, sampler
            if self.dev.type == "cuda":
                torch.cuda.empty_cache()
        out["ok"] = all(out[k]["new_tokens"] > 0 for k in ("float32", "bfloat16"))
        return out

    def rates(self) -> dict:
        """The throughputs measured above next to the ones ``config.GPU_COST`` assumes (its GPU-hour
        budgets): ``{GPU_COST key: {"measured", "assumed", "ratio", "source"}}``; ``measured`` is None
        where the section did not run. Token counts are padded positions B·(P+T), as ``gpu_hours``
        counts them. The train and log-prob rates are bf16 mixed precision at the full preset's
        largest shapes (update micro-batch 4, log-prob chunk 64); the sample rate is the *hf*
        sampler's in bfloat16 (GPU_COST assumes vLLM, absent here, so it is a lower bound)."""
        from ibpo_lab.config import GPU_COST

        mem = self.result.get("mem_1p5b") or {}
        hf = self.result.get("hf_sampler_1p5b") or {}

        def largest(prefix: str) -> tuple[str | None, float | None]:
            rows = [(v["tokens"], k, v["tokens_per_s"]) for k, v in mem.items()
                    if k.startswith(prefix) and isinstance(v, dict) and "tokens_per_s" in v]
            if not rows:
                return None, None
            _, k, r = max(rows)
            return f"mem_1p5b.{k}", r

        found = {
            "train_tokens_per_s": largest("bfloat16_mixed_update_"),
            "logprob_tokens_per_s": largest("bfloat16_mixed_logprobs_"),
            "sample_tokens_per_s": ("hf_sampler_1p5b.bfloat16", (hf.get("bfloat16") or {}).get("tokens_per_s")),
        }
        out: dict[str, Any] = {}
        for key, (source, measured) in found.items():
            assumed = float(GPU_COST[key])
            out[key] = {"measured": measured, "assumed": assumed, "source": source,
                        "ratio": round(measured / assumed, 4) if measured else None}
        out["note"] = ("measured on " + ("the CPU with toy sizes (not comparable)" if self.small else str(self.dev))
                       + "; update config.GPU_COST from 'measured' when on the GPU")
        return out

    def run(self) -> dict:
        self.section("env", self.env)
        if not self.small and not torch.cuda.is_available():
            self.result["ok"] = False
            self.write()
            return self.result
        for est in ("grpo", "ibpo"):
            for dt in ("float32", "bfloat16"):
                self.section(f"cli_{est}_{dt}", lambda est=est, dt=dt: self.cli(est, dt))
        self.section("resume_exact", self.resume_exact)
        shutil.rmtree(self.out / "runs", ignore_errors=True)  # the JSON holds what matters; keep $OUT small
        self.section("sampler_vs_trainer_logprobs", self.sampler_vs_trainer)
        self.section("mem_1p5b", self.memory)
        self.section("hf_sampler_1p5b", self.hf_sampler_speed)
        self.result["rates"] = self.rates()
        names = [k for k, v in self.result.items() if isinstance(v, dict) and "ok" in v]
        self.result["failed"] = [k for k in names if not self.result[k]["ok"]]
        self.result["ok"] = not self.result["failed"]
        self.write()
        return self.result


_REPO = Path(__file__).resolve().parent.parent


def _git_commit() -> str | None:
    try:
        p = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=_REPO)
        return p.stdout.strip() or None if p.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_check(out: str | os.PathLike, small: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run every section, writing ``out/gpu_check.json`` after each; returns the result dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return _Check(out, small, log).run()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ibpo_lab.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="folder for gpu_check.json (default $OUT)")
    ap.add_argument("--small", action="store_true", help="CPU dry run with toy sizes (CI)")
    a = ap.parse_args(argv)
    r = run_check(a.out, small=a.small)
    print(f"gpu_check: {'ok' if r['ok'] else 'FAILED: ' + ', '.join(r.get('failed') or ['env'])} -> {Path(a.out) / 'gpu_check.json'}")
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
