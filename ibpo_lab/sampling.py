"""Sampling: the policy writes G trajectories per prompt (solve attempts and compare-and-correct
repairs alike) and records the behaviour log-prob of every token it wrote.

One interface, two backends, same output (a :class:`~ibpo_lab.rollout.RolloutBatch`):

- ``hf``: our own batched decoding loop over ``model(..., cache=kv_cache)`` (a DynamicCache). Each prompt
  is prefilled once and its KV cache copied to its n trajectories; finished trajectories leave the
  batch. We write the loop ourselves rather than call ``model.generate`` because the behaviour
  log-probs must be *exactly* the trainer's (``models.response_logprobs``): same temperature
  scaling, same float32 log-softmax, same position ids counted from the first real token. Its
  sampling noise is keyed by (seed, trajectory, position), which makes copy-draft decoding
  (``drafts=``: a repair decoded against its failed attempt, several tokens verified per forward
  pass) give token for token the samples of plain decoding.
- ``vllm``: an adapter over a colocated, in-process ``vllm.LLM`` (lazy import; ``pip install
  'ibpo_lab[gpu]'``, vLLM >= 0.10.1), with sleep mode between generations and the trainer's weights
  pushed in by ``sync_weights`` (``LLM.collective_rpc``); see :class:`VLLMSampler`.

Conventions (both backends):

- behaviour log-prob = log softmax(logits / temperature) of the sampled token, *before* top-p
  filtering. That is the distribution ``response_logprobs(model, batch.padded(), temperature)``
  computes, so the PPO ratio is exactly 1 on the first update when top_p = 1; with top_p < 1 the
  tokens come from the renormalised nucleus but the log-prob stays the unfiltered one (the
  choice TRL/verl make when they recompute old log-probs with the trainer's forward pass; the vllm
  backend therefore recomputes them whenever top_p < 1, since vLLM's are after top-k/top-p).
  temperature = 0 means greedy decoding; its log-probs are then those of temperature 1.
- a trajectory ends at EOS (the EOS token is kept as the last response token, so it is trained),
  at a stop string (the tokens through the one that completes the first stop string are kept, so
  the stop string stays in the response), or after ``max_new_tokens`` (``meta["finish_reason"]``
  says which: ``"eos"``, ``"stop"``, ``"length"``).
- prompt i yields trajectories i*n ... i*n+n-1 with group id ``group_offset + i``; rewards are 0
  until a task scores them.
- a prompt that does not leave room for ``max_new_tokens`` inside the model's context is an
  error, never silently truncated.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import Tensor

from ibpo_lab.models import Policy, _forward_kwargs, position_ids_from_mask, response_logprobs
from ibpo_lab.registry import Registry
from ibpo_lab.rollout import RolloutBatch

__all__ = [
    "sample", "get_sampler", "list_backends", "register_backend", "HFSampler", "VLLMSampler", "SAMPLERS",
    "close_vllm_engines",
]

SAMPLERS: Registry = Registry("sampling backend")


def register_backend(name: str):
    """Register a sampler class ``cls(policy, **kw)`` with ``.sample(...)`` and ``.sync_weights(model)``."""
    return SAMPLERS.register(name)


def list_backends() -> list[str]:
    return SAMPLERS.names()


def get_sampler(backend: str, policy: Policy, **kw):
    """A sampler object for ``backend`` (``"hf"`` or ``"vllm"``) over ``policy``."""
    if backend not in SAMPLERS:
        raise ValueError(f"backend must be one of {list_backends()}, got {backend!r}")
    return SAMPLERS[backend](policy, **kw)


def sample(
    policy: Policy,
    prompts: list[str],
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    backend: str = "hf",
    group_offset: int = 0,
    **backend_kw,
) -> RolloutBatch:
    """Sample ``n`` trajectories for each prompt; see the module docstring for the conventions.

    Returns a RolloutBatch of B = len(prompts) * n trajectories with prompt_ids, response_ids,
    logprobs (behaviour, one per response token), prompts, responses, group_ids, rewards = 0.
    For repeated calls (and always for vllm) build the sampler once with :func:`get_sampler`.
    """
    return get_sampler(backend, policy, **backend_kw).sample(
        prompts, n, max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed, group_offset=group_offset
    )


# ---------------------------------------------------------------------------- shared checks
@dataclass(frozen=True)
class _Request:
    prompts: list[str]
    n: int
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    group_offset: int


def _check_request(prompts, n, max_new_tokens, temperature, top_p, stop, seed, group_offset) -> _Request:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single string (wrap it in a list)")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: need at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (trajectories per prompt) must be a positive int, got {n!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:  # `not >=` also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    if isinstance(group_offset, bool) or not isinstance(group_offset, int) or group_offset < 0:
        raise ValueError(f"group_offset must be a non-negative int, got {group_offset!r}")
    return _Request(prompts, n, max_new_tokens, float(temperature), float(top_p), stop, seed, group_offset)


def _encode_prompts(policy: Policy, req: _Request, limits: Sequence[int] | None = None) -> list[list[int]]:
    """Tokenise (with the tokenizer's own special tokens, e.g. BOS) and check the context fits
    (``limits``: max_new_tokens per prompt, default ``req.max_new_tokens`` for all)."""
    ids = policy.tokenizer(req.prompts, add_special_tokens=True)["input_ids"]
    ctx = policy.context_length
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompts[{i}] encodes to zero tokens; a causal LM needs at least one to condition on")
        m = req.max_new_tokens if limits is None else limits[i]
        if len(p) + m > ctx:
            raise ValueError(
                f"prompts[{i}] has {len(p)} tokens; with max_new_tokens={m} that exceeds the "
                f"model's context of {ctx} tokens. Shorten the prompt or lower max_new_tokens "
                "(prompts are never truncated silently)"
            )
    return [list(map(int, p)) for p in ids]


def _build_batch(policy: Policy, req: _Request, prompt_ids, responses, logprobs, finish, meta=None) -> RolloutBatch:
    """prompt_ids: one per prompt; responses/logprobs/finish: one per trajectory (prompt-major)."""
    B = len(req.prompts) * req.n
    tok = policy.tokenizer
    return RolloutBatch(
        prompt_ids=[prompt_ids[i // req.n] for i in range(B)],
        response_ids=responses,
        rewards=torch.zeros(B),
        group_ids=torch.tensor([req.group_offset + i // req.n for i in range(B)], dtype=torch.long),
        logprobs=logprobs,
        prompts=[req.prompts[i // req.n] for i in range(B)],
        responses=tok.batch_decode(responses, skip_special_tokens=True),
        meta={"finish_reason": list(finish), **(meta or {})},
        pad_id=int(tok.pad_token_id),
    )


class _StopChecker:
    """Finds the first stop string as tokens arrive.

    Only the tail of a trajectory is decoded each step: a stop string completed by the newest token
    lies within its last ``len(stop)`` characters, and every token decodes to >= 1 character."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = stop
        self.window = max((len(s) for s in stop), default=0) + 1

    def __call__(self, generated: list[int]) -> bool:
        if not self.stop:
            return False
        tail = self.tokenizer.decode(generated[-self.window :], skip_special_tokens=True)
        return any(s in tail for s in self.stop)


class _Sampler:
    """What every backend shares: the interface, the request checks, the prompt encoding, and
    re-pointing ``policy`` at the trainer's model. A backend implements ``_sample(req, prompt_ids)``
    and, if it keeps its own copy of the weights, extends ``sync_weights`` to push them."""

    policy: Policy
    last_stats: dict[str, float]

    def sample(
        self,
        prompts: list[str],
        n: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        group_offset: int = 0,
    ) -> RolloutBatch:
        """``n`` trajectories for each prompt, conventions as in the module docstring (see :func:`sample`)."""
        req = _check_request(prompts, n, max_new_tokens, temperature, top_p, stop, seed, group_offset)
        return self._sample(req, _encode_prompts(self.policy, req))

    def _sample(self, req: _Request, prompt_ids: list[list[int]]) -> RolloutBatch:
        raise NotImplementedError

    def sync_weights(self, model) -> None:
        """Sample from ``model`` (the trainer's module) from now on."""
        if model is not self.policy.model:
            self.policy = replace(self.policy, model=model)


def _throughput(t0: float, n_tokens: int) -> dict[str, float]:
    """``last_stats`` of a sampling call that started at ``time.perf_counter()`` = t0."""
    dt = time.perf_counter() - t0
    return {"seconds": dt, "new_tokens": n_tokens, "tokens_per_s": n_tokens / max(dt, 1e-9)}


# ---------------------------------------------------------------------------- hf backend
def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


_M32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) and a 32-bit constant c, without int64 overflow."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash with full avalanche (Wellons' "lowbias32"), elementwise on int64 in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def keyed_uniform(seed: int, rows: Tensor, positions: Tensor) -> Tensor:
    """One uniform in (0, 1) per (seed, row, position), float64, shape of ``rows`` and ``positions`` broadcast.

    A counter-based draw: the value depends on the key only, never on what else is drawn in the
    same call, so a token sampled at response position t of trajectory ``row`` gets the same noise
    whether it is decoded alone, in a batch, in another chunk, or verified inside a drafted span.
    Hand-written (torch has no keyed per-element generator): a chain of 32-bit avalanche hashes of
    the seed's two halves, the row and the position; 2**32 distinct values, offset by half a step
    so 0 and 1 never occur.
    """
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    h = _mix32(torch.tensor([s & _M32], dtype=torch.long, device=rows.device))
    h = _mix32(h ^ (s >> 32))
    h = _mix32(h ^ (rows.long() & _M32))
    h = _mix32(((h + 0x9E3779B9) & _M32) ^ (positions.long() & _M32))
    return (h.double() + 0.5) / 2.0**32


def _draw(logits: Tensor, req: _Request, u: Tensor | None) -> tuple[Tensor, Tensor]:
    """logits [N, V] float32, u [N] keyed uniforms -> (sampled token [N], its behaviour log-prob [N]).

    Inverse-CDF sampling: the token whose cumulative-probability interval (in vocabulary order,
    float64) contains ``u``; an exact draw from the (top-p renormalised) distribution that needs one
    uniform per sampled token (not one per vocabulary entry, as the exponential race / Gumbel-max
    draw does), so keying the noise by (seed, row, position) is cheap. temperature 0: argmax.
    NaN logits (diverged weights, a float16 overflow) are an error: drawn, they would give the last
    token with a NaN log-prob and poison the loss. ``-inf`` (a masked token) is fine."""
    nan_rows = torch.isnan(logits).any(-1)
    if bool(nan_rows.any()):
        rows = nan_rows.nonzero().flatten().tolist()
        raise ValueError(f"the policy returned NaN logits for {len(rows)} of {len(logits)} rows (first: {rows[:5]}); "
                         "its weights or activations diverged (e.g. an overflow in float16)")
    if req.temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)
        token = logp.argmax(-1)
    else:
        scaled = logits / req.temperature
        logp = torch.log_softmax(scaled, dim=-1)
        if req.top_p < 1.0:
            from transformers.generation.logits_process import TopPLogitsWarper

            probs = torch.softmax(TopPLogitsWarper(req.top_p)(None, scaled), dim=-1)
        else:
            probs = logp.exp()
        cdf = probs.double().cumsum(-1)
        # u < 1, so u * total < total: the interval found always has positive width (zero-probability
        # tokens, e.g. outside the nucleus, have empty intervals and are never drawn)
        token = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        token = token.clamp(max=logits.shape[-1] - 1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


def realign_draft(draft: Sequence[int], generated: Sequence[int], miss: int, ngram: int = 3) -> int:
    """Where to continue copying ``draft`` after the output left it at draft index ``miss``.

    ``generated``: the output so far, whose last token is the one that differed from
    ``draft[miss]``. Rule: the longest suffix of ``generated`` of n tokens, n = ``ngram`` down to 2,
    that occurs in the draft, at the occurrence whose end is nearest to ``miss + 1`` (ties: the
    later one); the pointer goes just after it (prompt-lookup decoding's n-gram match, made local
    because a repair edits the failed attempt in place). No such suffix: ``miss + 1``, i.e. assume
    the token was substituted (the commonest local edit). 1-grams are not used: on a small
    vocabulary a single token occurs all over the draft and sends the pointer astray. The rule only
    decides what is proposed, never what is sampled. It was chosen by replaying the tiny policy's
    repairs on the synthetic task against alternatives (pure substitution guess, 1-grams,
    prompt-lookup's first occurrence without fallback): it needed the fewest forward passes for the
    slowest row of the batch, which sets the number of batched forward passes.
    """
    for n in range(min(ngram, len(generated)), 1, -1):
        tail = list(generated[-n:])
        ends = [j + n for j in range(len(draft) - n + 1) if list(draft[j : j + n]) == tail]
        if ends:
            return min(ends, key=lambda e: (abs(e - (miss + 1)), -e))
    return miss + 1


def _cache_kv(cache) -> list[tuple[Any, str, Any]] | None:
    """(holder, attribute or index, tensor [B, H, C, D]) of every key/value tensor of a DynamicCache, or
    None for a cache layout we do not know (then it is never compacted)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        out = []
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if not isinstance(t, Tensor) or t.dim() != 4:
                    return None
                out.append((layer, name, t))
        return out
    if isinstance(getattr(cache, "key_cache", None), list):  # older transformers: per-layer lists
        return [(lst, i, t) for lst in (cache.key_cache, cache.value_cache) for i, t in enumerate(lst)]
    return None


def _should_compact(width: int, live: int) -> bool:
    """Compact a KV cache of ``width`` columns whose longest row attends to ``live`` of them once the
    holes left by rejected draft tokens are at least 64 columns and at least the live width (one
    gather of the cache halves it or better, so compaction costs O(1) per decoded column)."""
    holes = width - live
    return holes >= 64 and holes >= live


def _compact(cache, attn: Tensor) -> Tensor:
    """Drop cache columns that no row attends to, keeping each row's live columns in order,
    right-aligned. attn [B, C] 0/1 -> the new attn [B, C']; the cache is changed in place."""
    kv = _cache_kv(cache)
    if kv is None:
        return attn
    live = int(attn.sum(-1).max())
    idx = torch.sort(attn, dim=1, stable=True).indices[:, attn.shape[1] - live :]  # holes first, then live columns
    for holder, key, t in kv:
        g = t.gather(2, idx[:, None, :, None].expand(t.shape[0], t.shape[1], live, t.shape[3]))
        if isinstance(key, str):
            setattr(holder, key, g)
        else:
            holder[key] = g
    return attn.gather(1, idx)


@register_backend("hf")
class HFSampler(_Sampler):
    """Batched KV-cache sampling with a transformers causal LM (CPU or GPU), with optional
    copy-draft (prompt-lookup) speculative decoding.

    ``max_batch_size``: at most this many trajectories decode together (prompts are chunked,
    a prompt's n trajectories are never split across chunks unless n itself is larger).
    It samples from the trainer's own module, so ``sync_weights`` has nothing to copy, only re-points.

    Noise: the uniform behind the token at response position t of trajectory b (its index in the
    call, prompt-major) is :func:`keyed_uniform` (seed, b, t) (seed=None draws a seed from torch's
    global generator). So outputs do not depend on chunking, and drafted decoding is token-for-token
    plain decoding (up to float rounding of logits computed in a different batch shape, which can
    flip a draw whose uniform lies within ~1e-7 of an interval boundary).

    Copy-draft decoding (``sample(..., drafts=...)``): each prompt may come with a draft, a token
    list the output is expected to copy (a repair's failed attempt). Each forward pass feeds a
    row's last sampled token plus up to ``draft_tokens`` draft tokens from its draft pointer, draws
    the policy's own token at every position with the keyed noise, and keeps the draws up to and
    including the first one that differs from the draft token fed next (the tokens after a
    difference were computed on a wrong context and are dropped, their KV columns masked out and
    cropped). Every kept token is the draw plain decoding would make, so the distribution and the
    behaviour log-probs are exactly the policy's. After a difference the pointer re-aligns with
    :func:`realign_draft` (``draft_ngram``). ``last_stats``: ``tokens_per_forward`` (new tokens per
    row-forward; 1.0 without drafts, the prefill counts as one forward), ``model_calls`` (batched
    forward passes), ``positions`` (input positions computed, padding and rejected drafts included:
    the compute a draft costs), ``draft_fed`` / ``draft_accepted`` (draft tokens fed / confirmed).
    Drafting saves forward passes, not arithmetic: it pays where a decode step is bound by memory
    traffic or per-call overhead (GPU decoding), less on a CPU where a step's cost grows with the
    positions it computes. ``draft_tokens`` = 4 by default: on the tiny policy's synthetic-task
    repairs on a CPU, 2 and 4 draft tokens were about equally fast and 8 slower (more rejected
    positions computed); raise it on a GPU, where wider forward passes cost little.
    """

    #: ``sample`` accepts ``drafts=`` and a per-prompt ``max_new_tokens`` list (callers check this attribute)
    supports_drafts = True

    def __init__(self, policy: Policy, max_batch_size: int = 256, draft_tokens: int = 4, draft_ngram: int = 3):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
            raise ValueError(f"draft_tokens (draft tokens fed per forward pass) must be a positive int, got {draft_tokens!r}")
        if isinstance(draft_ngram, bool) or not isinstance(draft_ngram, int) or draft_ngram < 2:
            raise ValueError(f"draft_ngram (longest n-gram used to re-align a draft) must be an int >= 2, got {draft_ngram!r}")
        self.policy = policy
        self.max_batch_size = max_batch_size
        self.draft_tokens = draft_tokens
        self.draft_ngram = draft_ngram
        self.last_stats: dict[str, float] = {}

    def sample(
        self,
        prompts: list[str],
        n: int,
        max_new_tokens: int | Sequence[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        group_offset: int = 0,
        drafts: Sequence[Sequence[int] | None] | None = None,
    ) -> RolloutBatch:
        """``n`` trajectories for each prompt, conventions as in the module docstring (see :func:`sample`).

        max_new_tokens: one int, or one per prompt (e.g. a repair capped at its failed attempt's
        length plus a margin). drafts: None, or one token-id list (or None) per prompt that its n
        trajectories are decoded against (copy-draft decoding; the samples are the same as without).
        """
        if max_new_tokens is None or isinstance(max_new_tokens, (numbers.Number, str)):
            limits = None
            req = _check_request(prompts, n, max_new_tokens, temperature, top_p, stop, seed, group_offset)
        else:
            limits = list(max_new_tokens)
            if isinstance(prompts, (list, tuple)) and len(limits) != len(prompts):
                raise ValueError(f"max_new_tokens has {len(limits)} entries for {len(prompts)} prompts (need one per prompt)")
            for i, m in enumerate(limits):
                if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
                    raise ValueError(f"max_new_tokens[{i}] must be a positive int, got {m!r}")
                limits[i] = int(m)
            req = _check_request(prompts, n, max(limits, default=1), temperature, top_p, stop, seed, group_offset)
        drafts = self._check_drafts(drafts, len(req.prompts))
        return self._sample(req, _encode_prompts(self.policy, req, limits), drafts=drafts, limits=limits)

    def _check_drafts(self, drafts, n_prompts: int) -> list[list[int] | None] | None:
        if drafts is None:
            return None
        if isinstance(drafts, (str, Tensor)) or not isinstance(drafts, Sequence):
            raise ValueError(f"drafts must be a list with one token-id list (or None) per prompt, got {type(drafts).__name__}")
        drafts = list(drafts)
        if len(drafts) != n_prompts:
            raise ValueError(f"drafts has {len(drafts)} entries for {n_prompts} prompts (need one per prompt, None for none)")
        vocab = self.policy.model.get_input_embeddings().num_embeddings
        out: list[list[int] | None] = []
        for i, d in enumerate(drafts):
            if d is None:
                out.append(None)
                continue
            if isinstance(d, (str, int)) or not isinstance(d, (Sequence, Tensor)):
                raise ValueError(f"drafts[{i}] must be a list of token ids or None, got {type(d).__name__}")
            ids = d.tolist() if isinstance(d, Tensor) else list(d)
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab]
            if bad:
                raise ValueError(f"drafts[{i}] has entries that are not token ids in [0, {vocab}): {bad[:5]}")
            out.append([int(t) for t in ids] or None)
        if any(d is not None for d in out) and getattr(self.policy.model.config, "sliding_window", None):
            raise ValueError("drafts need a full-attention model: rejected draft columns would shift a sliding window")
        return out if any(d is not None for d in out) else None

    def _sample(self, req: _Request, prompt_ids: list[list[int]], drafts=None, limits=None) -> RolloutBatch:
        seed = req.seed if req.seed is not None else int(torch.randint(0, 2**62, (1,)))
        limits = limits if limits is not None else [req.max_new_tokens] * len(prompt_ids)
        trajs = list(range(len(prompt_ids) * req.n))  # prompt of trajectory b: b // n
        responses: list[list[int]] = []
        logprobs: list[list[float]] = []
        finish: list[str] = []
        counts = {"row_forwards": 0, "model_calls": 0, "positions": 0, "draft_fed": 0, "draft_accepted": 0}
        t0, n_tokens = time.perf_counter(), 0
        model = self.policy.model
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            for start in range(0, len(trajs), self.max_batch_size):
                chunk = trajs[start : start + self.max_batch_size]
                with torch.inference_mode():
                    r, lp, fin = self._decode_chunk(prompt_ids, chunk, req, seed, drafts, limits, counts)
                responses += r
                logprobs += lp
                finish += fin
                n_tokens += sum(len(x) for x in r)
        finally:
            model.train(was_training)
        self.last_stats = {
            **_throughput(t0, n_tokens),
            **counts,
            "tokens_per_forward": n_tokens / max(counts["row_forwards"], 1),
        }
        return _build_batch(self.policy, req, prompt_ids, responses, logprobs, finish)

    def _decode_chunk(self, prompt_ids, trajs: list[int], req: _Request, seed: int, drafts, limits, counts) -> tuple[list, list, list]:
        """Decode the trajectories ``trajs`` (global indices; prompt b // n) together.

        The caller (``_sample``) runs it under ``torch.inference_mode()`` (a context, not a
        decorator here, so mutation testing, which skips decorated functions, reaches this step)."""
        model, tok = self.policy.model, self.policy.tokenizer
        device = self.policy.device
        pad = int(tok.pad_token_id)
        eos = set(self.policy.eos_token_ids)
        stop_hit = _StopChecker(tok, req.stop)
        rows = [b // req.n for b in trajs]  # prompt index of each trajectory

        # prefill each distinct prompt once, left-padded, then copy its KV cache to its n rows
        uniq = list(dict.fromkeys(rows))
        P = max(len(prompt_ids[u]) for u in uniq)
        # every tensor is made on the policy's device, never on torch's default one (a notebook may
        # have called torch.set_default_device)
        lpad = [P - len(prompt_ids[u]) for u in uniq]
        ids = torch.tensor([[pad] * n + list(prompt_ids[u]) for n, u in zip(lpad, uniq)], dtype=torch.long, device=device)
        attn = torch.tensor([[0] * n + [1] * (P - n) for n in lpad], dtype=torch.long, device=device)
        accepts = _forward_kwargs(model)
        # transformers >= 5.2x calls the KV cache `cache`; older versions `past_key_values`
        cache_arg = "cache" if "cache" in accepts else "past_key_values"
        kw = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=True, **kw)
        cache = _output_cache(out)
        expand = torch.tensor([uniq.index(r) for r in rows], dtype=torch.long, device=device)
        cache.batch_select_indices(expand)
        logits = out.logits[:, -1:].float()[expand]  # [b, W, V]: W = 1 after the prefill
        attn = attn[expand]
        next_pos = attn.sum(-1)  # position of the next input token = number of real tokens so far
        counts["model_calls"] += 1

        B = len(trajs)
        key = torch.tensor(trajs, dtype=torch.long, device=device)  # noise key of each active row
        active = list(range(B))  # local index of each row still decoding
        draft = [None if drafts is None else drafts[r] for r in rows]
        ptr = [0] * B  # next draft index each row expects to copy
        fed: list[list[int]] = [[] for _ in range(B)]  # draft tokens fed after the last token, per active row
        limit = [limits[r] for r in rows]
        responses: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list[float]] = [[] for _ in range(B)]
        finish = ["length"] * B
        decoding = False  # False while the logits come from the prefill
        while True:
            nb, W, V = logits.shape
            counts["row_forwards"] += nb
            counts["positions"] += nb * W  # decode-step inputs the model computed (rejected and padding included)
            u = None
            if req.temperature > 0:
                pos = torch.tensor([len(responses[b]) for b in active], dtype=torch.long, device=device)
                u = keyed_uniform(seed, key[:, None], pos[:, None] + torch.arange(W, device=device)).reshape(-1)
            token, lp = _draw(logits.reshape(nb * W, V), req, u)
            token, lp = token.view(nb, W).tolist(), lp.view(nb, W).tolist()
            keep, n_valid = [], []
            for k, b in enumerate(active):
                f, resp, done = fed[k], responses[b], False
                for j in range(len(f) + 1):
                    t = token[k][j]
                    resp.append(t)
                    logprobs[b].append(lp[k][j])
                    if t in eos:
                        finish[b], done = "eos", True
                    elif stop_hit(resp):
                        finish[b], done = "stop", True
                    elif len(resp) >= limit[b]:
                        done = True  # finish stays "length"
                    if done or j == len(f) or t != f[j]:
                        break
                counts["draft_fed"] += len(f)
                counts["draft_accepted"] += j  # fed draft tokens that were confirmed by the draw after them
                if done:
                    continue
                keep.append(k)
                n_valid.append(j + 1)  # inputs whose KV columns stay: the last token and j confirmed draft tokens
                d = draft[b]
                if d is not None:
                    miss = ptr[b] + j
                    ptr[b] = miss + 1 if miss < len(d) and d[miss] == t else realign_draft(d, resp, miss, self.draft_ngram)
            if not keep:
                break
            keep_t = torch.tensor(keep, dtype=torch.long, device=device)
            if len(keep) < nb:  # finished trajectories leave the batch (and the cache)
                cache.batch_select_indices(keep_t)
                attn, next_pos, key = attn[keep_t], next_pos[keep_t], key[keep_t]
            active = [active[k] for k in keep]
            if decoding:
                nv = torch.tensor(n_valid, dtype=torch.long, device=device)
                # drafted inputs after a difference were computed on a wrong context: mask their KV columns ...
                attn[:, -W:] *= (torch.arange(W, device=device)[None, :] < nv[:, None]).long()
                next_pos = next_pos + nv
                surplus = W - max(n_valid)  # ... and crop the columns no row kept
                if surplus:
                    cache.crop(-surplus)
                    attn = attn[:, :-surplus]
                if _should_compact(attn.shape[1], int(attn.sum(-1).max())):
                    attn = _compact(cache, attn)
            decoding = True
            # next input per row: its last sampled token, then up to draft_tokens draft tokens
            fed = []
            for b in active:
                d, room = draft[b], limit[b] - len(responses[b])  # room >= 1 for an active row
                m = 0 if d is None else max(0, min(self.draft_tokens, len(d) - ptr[b], room - 1))
                fed.append(d[ptr[b] : ptr[b] + m] if m else [])
            W = 1 + max(len(f) for f in fed)
            xs = [[responses[b][-1]] + fed[k] for k, b in enumerate(active)]  # right-padded to W
            inp = torch.tensor([x + [pad] * (W - len(x)) for x in xs], dtype=torch.long, device=device)
            new_attn = torch.tensor([[1] * len(x) + [0] * (W - len(x)) for x in xs], dtype=torch.long, device=device)
            attn = torch.cat([attn, new_attn], dim=1)
            out = model(
                input_ids=inp,
                attention_mask=attn,
                position_ids=next_pos[:, None] + torch.arange(W, device=device)[None, :],
                use_cache=True,
                **{cache_arg: cache},
            )
            cache = _output_cache(out)
            logits = out.logits.float()
            counts["model_calls"] += 1
        return responses, logprobs, finish


# ---------------------------------------------------------------------------- vllm backend
_VLLM_MISSING = (
    "backend='vllm' needs the vllm package, which is not installed. On a CUDA machine install the gpu "
    "extra (`pip install -e '.[gpu]'`; vllm pins its own torch and transformers, so use a separate "
    "venv); on CPU use backend='hf'."
)


@dataclass
class _Engine:
    """One colocated ``vllm.LLM`` and its sleep state (shared by every sampler that reuses it)."""

    llm: Any
    asleep: set = field(default_factory=set)
    weights_lost: bool = False  # a level-2 sleep dropped the weights; sync_weights must run first


#: the engines this process built, by configuration; at most one lives at a time (a GPU holds one)
_ENGINES: dict[tuple, _Engine] = {}


def close_vllm_engines() -> int:
    """Shut down every vLLM engine this process built and free its GPU memory; returns how many.

    ``VLLMSampler`` calls it before building an engine with a different configuration; call it
    yourself to give the GPU back between experiments in a notebook."""
    n = len(_ENGINES)
    while _ENGINES:
        _, eng = _ENGINES.popitem()
        _shutdown_llm(eng.llm)
    if n:
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return n


def _shutdown_llm(llm) -> None:
    """Stop an in-process engine: its engine core (executor, worker, KV cache) and vLLM's
    torch.distributed group, so a next ``vllm.LLM`` in this process can initialise its own."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    except ImportError:  # a fake engine in tests, or a vllm without these helpers
        return
    destroy_model_parallel()
    destroy_distributed_environment()


def _colocated_env() -> None:
    """``distributed_executor_backend="external_launcher"`` runs the engine core, executor and worker
    in this process (vLLM's torchrun mode, world size 1 here); it reads the torchrun variables."""
    import os

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:  # a free port, so two kernels on one machine never collide
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    # external_launcher requires the in-process engine core (vLLM asserts it); say so explicitly
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def _load_weights_on_worker(worker, weights: list) -> None:
    """Runs inside the engine through ``LLM.collective_rpc``: ``worker`` is the executor's
    ``driver_worker`` (a ``WorkerWrapperBase``, whose attributes forward to the GPU worker)."""
    worker = getattr(worker, "worker", worker)
    worker.model_runner.model.load_weights(weights)


@register_backend("vllm")
class VLLMSampler(_Sampler):
    """A colocated ``vllm.LLM`` (vLLM >= 0.10.1, read against 0.33) behind the same interface.

    Engine: built with ``distributed_executor_backend="external_launcher"``, as TRL 1.16's colocate
    mode does (``trl/generation/vllm_generation.py``), so the engine core, executor and worker live
    in this process and share the trainer's GPU (``gpu_memory_utilization``). It sleeps between
    generations (``enable_sleep_mode``; level 1 offloads the weights to CPU RAM, level 2 drops them,
    so they must be pushed again by ``sync_weights``). Engines are cached per configuration in this
    process: a second sampler with the same settings (the next run of a grid in one kernel) reuses
    the engine, and its first ``sync_weights`` loads the new run's weights; a different
    configuration shuts the old engine down first (:func:`close_vllm_engines`).

    ``sync_weights(model)``: ``LLM.collective_rpc`` runs :func:`_load_weights_on_worker` on the
    worker, which calls the vLLM model's ``load_weights`` with the trainer's ``named_parameters()``
    (HF names; vLLM fuses q/k/v and gate/up itself and casts to the engine dtype), then the prefix
    cache is reset. ``collective_rpc`` is public API in every vLLM V1 release; in-process it calls
    the worker directly, so no tensor is serialised or copied between processes.

    Behaviour log-probs: vLLM's ``processed_logprobs`` (``logprobs_mode``) are taken *after*
    temperature, top-k and top-p, i.e. log-probs of the renormalised nucleus, while our convention
    (module docstring) is the unfiltered ``log softmax(logits / temperature)``. So they are
    recomputed with :func:`models.response_logprobs` on the trainer's model whenever
    ``recompute_logprobs=True`` (default), and always when ``top_p < 1`` or ``temperature == 0``
    (greedy: our convention is temperature 1); vLLM's own are kept in ``meta["engine_logprobs"]``.

    Greedy (``temperature == 0``) with ``n > 1``: vLLM's ``SamplingParams`` refuses ``n > 1``
    without sampling, and greedy decoding is deterministic, so each prompt is decoded once (n=1)
    and its completion repeated n times, as the hf backend's n greedy trajectories would be.

    ``trainer_dtype``: the run's ``TrainConfig.dtype``. The recomputed behaviour log-probs are the
    trainer's, so they run under the trainer's :func:`step.precision_context` (bf16 autocast for
    ``"bfloat16"``): the old log-probs are then those of the same mixed-precision forward pass the
    update differentiates (``step.build_lab`` passes it; the engine itself always runs in its own
    ``dtype``).

    ``engine`` / ``llm_cls`` / ``sampling_params_cls``: inject a ready engine, the class to build
    (default ``vllm.LLM``) or the params class (fakes, in tests).
    """

    def __init__(
        self,
        policy: Policy,
        *,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = True,
        sleep_level: int = 1,
        max_model_len: int | None = None,
        dtype: str = "auto",
        recompute_logprobs: bool = True,
        logprob_batch_size: int = 64,
        trainer_dtype: str = "float32",
        model: str | None = None,
        engine: Any = None,
        llm_cls: Any = None,
        sampling_params_cls: Any = None,
        **engine_kw,
    ):
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        if isinstance(logprob_batch_size, bool) or not isinstance(logprob_batch_size, int) or logprob_batch_size < 1:
            raise ValueError(f"logprob_batch_size must be a positive int, got {logprob_batch_size!r}")
        from ibpo_lab.config import DTYPES

        if trainer_dtype not in DTYPES:
            raise ValueError(f"trainer_dtype must be one of {DTYPES}, got {trainer_dtype!r}")
        self.policy = policy
        self.trainer_dtype = trainer_dtype
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self.recompute_logprobs = recompute_logprobs
        self.logprob_batch_size = logprob_batch_size
        if (engine is None and llm_cls is None) or sampling_params_cls is None:
            try:
                import vllm
            except ImportError as e:
                raise ImportError(_VLLM_MISSING) from e
            llm_cls = llm_cls or vllm.LLM
            sampling_params_cls = sampling_params_cls or vllm.SamplingParams
        self.sampling_params_cls = sampling_params_cls
        if engine is not None:
            self._engine = _Engine(engine)
        else:
            kwargs = dict(
                model=model or policy.model.name_or_path,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_sleep_mode=enable_sleep_mode,
                max_model_len=max_model_len or policy.context_length,
                dtype=dtype,
                # in-process engine (TRL's colocate mode), so collective_rpc reaches the worker directly
                distributed_executor_backend="external_launcher",
                # temperature-scaled log-probs (vLLM's default is the raw logits'); see the class docstring
                logprobs_mode="processed_logprobs",
                **engine_kw,
            )
            key = (getattr(llm_cls, "__qualname__", repr(llm_cls)), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
            if key not in _ENGINES:
                close_vllm_engines()  # one engine per GPU: the previous run's goes first
                _colocated_env()
                _ENGINES[key] = _Engine(llm_cls(**kwargs))
            self._engine = _ENGINES[key]
        self.last_stats: dict[str, float] = {}

    @property
    def engine(self):
        """The ``vllm.LLM`` this sampler drives."""
        return self._engine.llm

    # -- sleep mode --------------------------------------------------------------
    def _wake(self, tags: Sequence[str]) -> None:
        todo = [t for t in tags if t in self._engine.asleep]
        if todo:
            self.engine.wake_up(tags=todo)
            self._engine.asleep -= set(todo)

    def _sleep(self) -> None:
        if self.enable_sleep_mode and not self._engine.asleep:
            self.engine.sleep(level=self.sleep_level)
            self._engine.asleep = {"weights", "kv_cache"}
            self._engine.weights_lost = self.sleep_level == 2

    def sync_weights(self, model) -> None:
        """Push ``model``'s parameters into the engine (call after each optimiser step)."""
        super().sync_weights(model)
        self._wake(["weights"])
        with torch.no_grad():
            weights = [(name, p.detach()) for name, p in model.named_parameters()]
            self.engine.collective_rpc(_load_weights_on_worker, args=(weights,))
        self.engine.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self._engine.weights_lost = False

    def _sample(self, req: _Request, prompt_ids: list[list[int]]) -> RolloutBatch:
        greedy = req.temperature == 0
        n_engine = 1 if greedy else req.n  # vLLM refuses n > 1 for greedy; its n copies are identical
        params = self.sampling_params_cls(
            n=n_engine,
            temperature=req.temperature,
            top_p=req.top_p,
            max_tokens=req.max_new_tokens,
            stop=list(req.stop) or None,
            include_stop_str_in_output=True,  # the stop string stays, as in the hf backend
            seed=req.seed,
            logprobs=0,  # the sampled token's log-prob only
        )
        if self._engine.weights_lost:
            raise RuntimeError("the vllm engine slept at level 2 and lost its weights: call sync_weights(model) before sample")
        t0 = time.perf_counter()
        self._wake(["weights", "kv_cache"])
        try:
            outputs = self.engine.generate([{"prompt_token_ids": p} for p in prompt_ids], sampling_params=params, use_tqdm=False)
        finally:
            self._sleep()
        if len(outputs) != len(prompt_ids):
            raise RuntimeError(f"vllm returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
        eos = set(self.policy.eos_token_ids)
        responses, engine_lp, finish = [], [], []
        for i, o in enumerate(outputs):
            if len(o.outputs) != n_engine:
                raise RuntimeError(f"vllm returned {len(o.outputs)} completions for prompt {i}, expected n={n_engine}")
            for c in o.outputs * (req.n // n_engine):
                ids = [int(t) for t in c.token_ids]
                responses.append(ids)
                engine_lp.append(
                    [float(d[t].logprob) for d, t in zip(c.logprobs, ids)] if c.logprobs is not None else [0.0] * len(ids)
                )
                if ids and ids[-1] in eos:
                    finish.append("eos")
                elif c.finish_reason == "stop":
                    finish.append("stop")
                else:
                    finish.append("length")
        batch = _build_batch(self.policy, req, prompt_ids, responses, engine_lp, finish, meta={"engine_logprobs": engine_lp})
        if self.recompute_logprobs or req.top_p < 1 or greedy:  # vLLM's are after top-p (and greedy's are not ours)
            batch = batch.replace(logprobs=self._trainer_logprobs(batch, req.temperature))
        self.last_stats = _throughput(t0, sum(len(r) for r in responses))
        return batch

    def _trainer_logprobs(self, batch: RolloutBatch, temperature: float) -> list[list[float]]:
        """Behaviour log-probs from the trainer's forward pass, ``logprob_batch_size`` trajectories at
        a time (``response_logprobs`` keeps its own [chunk, V] work bounded inside each), under the
        run's precision context (``trainer_dtype``)."""
        from ibpo_lab.step import precision_context  # step imports this module

        temperature = temperature if temperature > 0 else 1.0  # greedy: log-probs at temperature 1
        out: list[list[float]] = []
        device = self.policy.device
        for s in range(0, len(batch), self.logprob_batch_size):
            sub = batch.select(range(s, min(s + self.logprob_batch_size, len(batch))))
            with torch.no_grad(), precision_context(self.trainer_dtype, device):
                lp, _ = response_logprobs(self.policy.model, sub.padded().to(device), temperature)
            out += [lp[i, : len(r)].tolist() for i, r in enumerate(sub.response_ids)]
        return out
