"""Real vLLM: the engine ``sampling.VLLMSampler`` builds, weights synced from the trainer's model,
nucleus sampling (top_p < 1), and vLLM's log-probs checked against ``models.response_logprobs``.

The engine is built by ``VLLMSampler``'s own constructor (no engine argument repeated here), on the
committed tiny Llama (``data/tiny-policy``, float32, so vLLM's dtype="auto" is float32 too). What
is checked, with the trainer's forward pass as the independent side:

* ``sync_weights`` really replaces the engine's weights: the trainer's model is perturbed after the
  engine loaded the checkpoint from disk; before the sync vLLM's log-probs follow the checkpoint,
  after it they follow the perturbed model (and the two differ by far more than the tolerance).
* top_p < 1: every sampled token lies in the trainer's nucleus, and vLLM's ``processed_logprobs``
  (log-probs of the renormalised nucleus) equal ``response_logprobs`` (the unfiltered
  log softmax(logits / T)) minus the log of the nucleus mass computed from the trainer's logits.
* the batch's behaviour log-probs (recomputed by the sampler because top_p < 1) are
  ``response_logprobs`` of the synced model.

Runs only where vLLM and a CUDA device exist (the GPU environment, environment-gpu.yml); it skips,
saying which is missing, everywhere else.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch


def _skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (GPU environment only: environment-gpu.yml / pip install -e '.[gpu]')"
    if not torch.cuda.is_available():
        from ibpo_lab.gpu_check import cuda_diagnosis

        return f"vllm is installed but there is no CUDA device: {cuda_diagnosis()}"
    from ibpo_lab.models import tiny_policy_dir

    if not (tiny_policy_dir() / "config.json").is_file():
        return f"no committed tiny policy at {tiny_policy_dir()}"
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

TEMPERATURE, TOP_P = 0.8, 0.9
#: |Δ log-prob| allowed between vLLM's float32 kernels and the trainer's float32 forward pass
LP_TOL = 2e-3
#: a token whose nucleus membership flips under a cumulative-mass change this small is "on the boundary"
BOUNDARY = 1e-4


@pytest.fixture(scope="module")
def engine():
    """(sampler, trainer policy, untouched checkpoint policy, prompts); the engine is closed afterwards."""
    from ibpo_lab.models import load_policy
    from ibpo_lab.sampling import VLLMSampler, close_vllm_engines
    from ibpo_lab.tasks import get_task

    with pytest.MonkeyPatch.context() as mp:  # the torchrun variables the colocated engine sets
        for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "VLLM_ENABLE_V1_MULTIPROCESSING"):
            mp.delenv(var, raising=False)
        close_vllm_engines()
        policy = load_policy("tiny", dtype="float32", device="cuda")
        checkpoint = load_policy("tiny", dtype="float32", device="cuda")
        sampler = VLLMSampler(policy)  # vllm.LLM built exactly as the vllm backend builds it
        prompts = [e.prompt for e in get_task("synthetic").examples("train", n=4)]
        try:
            yield sampler, policy, checkpoint, prompts
        finally:
            close_vllm_engines()


def _full_logits(model, batch) -> torch.Tensor:
    """[B, T, V] float32 logits / T at the positions that predict each response token (trainer side)."""
    from ibpo_lab.models import position_ids_from_mask

    pb = batch.padded()
    device = next(model.parameters()).device
    ids, attn = pb.input_ids.to(device), pb.attention_mask.to(device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False).logits
    P, T = pb.prompt_len, batch.max_response_len
    return logits[:, P - 1 : P + T - 1].float() / TEMPERATURE


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """vLLM's top-p rule on one distribution [V]: sort ascending, drop the tokens whose cumulative
    mass (themselves included) is <= 1 - top_p, always keep the most likely one.
    -> (kept [V] bool, nucleus mass, on_boundary bool)."""
    p_sorted, order = probs.double().sort()
    cums = p_sorted.cumsum(0)
    drop = cums <= 1 - top_p
    drop[-1] = False
    kept = torch.zeros_like(drop)
    kept[order] = ~drop
    on_boundary = bool(((cums - (1 - top_p)).abs() < BOUNDARY).any())
    return kept, p_sorted[~drop].sum(), on_boundary


def _check_engine_logprobs(batch, model, label: str) -> None:
    """vLLM's nucleus log-probs of ``batch`` against ``model``'s (see the module docstring)."""
    from ibpo_lab.models import response_logprobs

    with torch.no_grad():
        lp, _ = response_logprobs(model, batch.padded().to(next(model.parameters()).device), TEMPERATURE)
    logits = _full_logits(model, batch)
    eng = batch.meta["engine_logprobs"]
    checked = 0
    for i, resp in enumerate(batch.response_ids):
        for t, tok in enumerate(resp):
            probs = torch.softmax(logits[i, t], -1)
            kept, mass, on_boundary = _nucleus(probs, TOP_P)
            full = float(lp[i, t])
            # response_logprobs is log softmax(logits / T): the same numbers as the full forward pass here
            assert full == pytest.approx(math.log(float(probs[tok])), abs=1e-4), (label, i, t)
            if on_boundary:
                continue
            checked += 1
            assert bool(kept[tok]), f"{label}: token {tok} at ({i}, {t}) was sampled outside the top-p nucleus"
            assert eng[i][t] == pytest.approx(full - math.log(float(mass)), abs=LP_TOL), (label, i, t)
    n = sum(len(r) for r in batch.response_ids)
    assert n > 0 and checked >= 0.9 * n, f"{label}: only {checked} of {n} tokens away from the nucleus boundary"


def test_vllm_sampler_syncs_weights_and_matches_response_logprobs(engine):
    from ibpo_lab.models import response_logprobs

    sampler, policy, checkpoint, prompts = engine
    kw = dict(n=4, max_new_tokens=24, temperature=TEMPERATURE, top_p=TOP_P, seed=0)

    # 1. the engine loaded the checkpoint from disk: its log-probs are the checkpoint's
    before = sampler.sample(prompts, **kw)
    _check_engine_logprobs(before, checkpoint.model, "checkpoint")

    # 2. the trainer moves away from the checkpoint; sync_weights pushes its weights into the engine
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
    sampler.sync_weights(policy.model)
    after = sampler.sample(prompts, **kw)
    _check_engine_logprobs(after, policy.model, "synced")
    # the check discriminates: against the stale checkpoint the same tokens are far off
    stale = _check_stale(after, checkpoint.model)
    assert stale > 20 * LP_TOL, f"the perturbation moved log-probs by only {stale:.2e}: the sync check proves nothing"

    # 3. the batch's behaviour log-probs (top_p < 1: recomputed by the sampler) are the trainer's
    with torch.no_grad():
        lp, _ = response_logprobs(policy.model, after.padded().to(policy.device), TEMPERATURE)
    torch.testing.assert_close(after.old_logprobs, lp.cpu() * after.response_mask, rtol=0, atol=1e-5)
    assert (after.group_ids == torch.arange(len(prompts)).repeat_interleave(4)).all()


def _check_stale(batch, model) -> float:
    """Mean |vLLM's unfiltered log-prob - ``model``'s| over the batch (nucleus mass from ``model``)."""
    logits = _full_logits(model, batch)
    eng = batch.meta["engine_logprobs"]
    diffs = []
    for i, resp in enumerate(batch.response_ids):
        for t, tok in enumerate(resp):
            probs = torch.softmax(logits[i, t], -1)
            _, mass, _ = _nucleus(probs, TOP_P)
            diffs.append(abs(eng[i][t] + math.log(float(mass)) - math.log(float(probs[tok]))))
    return sum(diffs) / len(diffs)
