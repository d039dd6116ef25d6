"""Sampling: the policy writes G trajectories per prompt (solve attempts and compare-and-correct
repairs alike) and records the behaviour log-prob of every token it wrote.

One interface, two backends, same output (a :class:`~ibpo_lab.rollout.RolloutBatch`):

- ``hf``: our own batched decoding loop over ``model(..., cache=kv_cache)`` (a DynamicCache). Each prompt
  is prefilled once and its KV cache copied to its n trajectories; finished trajectories leave the
  batch. We write the loop ourselves rather than call ``model.generate`` because the behaviour
  log-probs must be *exactly* the trainer's (``models.response_logprobs``): same temperature
  scaling, same float32 log-softmax, same position ids counted from the first real token.
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


def _encode_prompts(policy: Policy, req: _Request) -> list[list[int]]:
    """Tokenise (with the tokenizer's own special tokens, e.g. BOS) and check the context fits."""
    ids = policy.tokenizer(req.prompts, add_special_tokens=True)["input_ids"]
    ctx = policy.context_length
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompts[{i}] encodes to zero tokens; a causal LM needs at least one to condition on")
        if len(p) + req.max_new_tokens > ctx:
            raise ValueError(
                f"prompts[{i}] has {len(p)} tokens; with max_new_tokens={req.max_new_tokens} that exceeds the "
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


@register_backend("hf")
class HFSampler(_Sampler):
    """Batched KV-cache sampling with a transformers causal LM (CPU or GPU).

    ``max_batch_size``: at most this many trajectories decode together (prompts are chunked,
    a prompt's n trajectories are never split across chunks unless n itself is larger).
    It samples from the trainer's own module, so ``sync_weights`` has nothing to copy, only re-points.
    """

    def __init__(self, policy: Policy, max_batch_size: int = 256):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.policy = policy
        self.max_batch_size = max_batch_size
        self.last_stats: dict[str, float] = {}

    def _sample(self, req: _Request, prompt_ids: list[list[int]]) -> RolloutBatch:
        device = self.policy.device
        gen = None
        if req.seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(req.seed)
        rows = [i for i in range(len(prompt_ids)) for _ in range(req.n)]  # prompt index of each trajectory
        responses: list[list[int]] = []
        logprobs: list[list[float]] = []
        finish: list[str] = []
        t0, n_tokens = time.perf_counter(), 0
        model = self.policy.model
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start : start + self.max_batch_size]
                r, lp, fin = self._decode_chunk(prompt_ids, chunk, req, gen)
                responses += r
                logprobs += lp
                finish += fin
                n_tokens += sum(len(x) for x in r)
        finally:
            model.train(was_training)
        self.last_stats = _throughput(t0, n_tokens)
        return _build_batch(self.policy, req, prompt_ids, responses, logprobs, finish)

    @torch.inference_mode()
    def _decode_chunk(self, prompt_ids, rows: list[int], req: _Request, gen) -> tuple[list, list, list]:
        """Decode the trajectories ``rows`` (prompt index per trajectory) together."""
        model, tok = self.policy.model, self.policy.tokenizer
        device = self.policy.device
        pad = int(tok.pad_token_id)
        eos = torch.tensor(self.policy.eos_token_ids, dtype=torch.long, device=device)
        stop_hit = _StopChecker(tok, req.stop)

        # prefill each distinct prompt once, left-padded, then copy its KV cache to its n rows
        uniq = list(dict.fromkeys(rows))
        P = max(len(prompt_ids[u]) for u in uniq)
        ids = torch.full((len(uniq), P), pad, dtype=torch.long)
        attn = torch.zeros((len(uniq), P), dtype=torch.long)
        for j, u in enumerate(uniq):
            p = prompt_ids[u]
            ids[j, P - len(p) :] = torch.tensor(p)
            attn[j, P - len(p) :] = 1
        ids, attn = ids.to(device), attn.to(device)
        accepts = _forward_kwargs(model)
        # transformers >= 5.2x calls the KV cache `cache`; older versions `past_key_values`
        cache_arg = "cache" if "cache" in accepts else "past_key_values"
        kw = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=True, **kw)
        cache = _output_cache(out)
        expand = torch.tensor([uniq.index(r) for r in rows], dtype=torch.long, device=device)
        cache.batch_select_indices(expand)
        logits = out.logits[:, -1].float()[expand]
        attn = attn[expand]
        next_pos = attn.sum(-1)  # position of the next token = number of real tokens so far

        B = len(rows)
        active = torch.arange(B, device=device)  # trajectory index of each row still decoding
        responses: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list[float]] = [[] for _ in range(B)]
        finish = ["length"] * B
        for step in range(req.max_new_tokens):
            token, lp = self._next_token(logits, req, gen)
            tok_list, lp_list, act_list = token.tolist(), lp.tolist(), active.tolist()
            done = torch.isin(token, eos) if eos.numel() else torch.zeros_like(token, dtype=torch.bool)
            done_list = done.tolist()
            for k, b in enumerate(act_list):
                responses[b].append(tok_list[k])
                logprobs[b].append(lp_list[k])
                if done_list[k]:
                    finish[b] = "eos"
                elif stop_hit(responses[b]):
                    finish[b] = "stop"
                    done_list[k] = True
            if step == req.max_new_tokens - 1:
                break
            keep = [k for k, d in enumerate(done_list) if not d]
            if not keep:
                break
            if len(keep) < len(act_list):  # finished trajectories leave the batch (and the cache)
                keep_t = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(keep_t)
                active, token, attn, next_pos = active[keep_t], token[keep_t], attn[keep_t], next_pos[keep_t]
            attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
            out = model(
                input_ids=token[:, None],
                attention_mask=attn,
                position_ids=next_pos[:, None],
                use_cache=True,
                **{cache_arg: cache},
            )
            cache = _output_cache(out)
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
        return responses, logprobs, finish

    @staticmethod
    def _next_token(logits: Tensor, req: _Request, gen) -> tuple[Tensor, Tensor]:
        """logits [b, V] float32 -> (sampled token [b], its behaviour log-prob [b])."""
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
            # exponential race (argmax of p / Exp(1) is a draw from p): same distribution as
            # torch.multinomial, several times faster on 50k-token vocabularies
            race = torch.empty_like(probs).exponential_(1.0, generator=gen)
            token = (probs / race).argmax(-1)
        return token, logp.gather(-1, token[:, None]).squeeze(-1)


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
        self.policy = policy
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
        a time (``response_logprobs`` keeps its own [chunk, V] work bounded inside each)."""
        temperature = temperature if temperature > 0 else 1.0  # greedy: log-probs at temperature 1
        out: list[list[float]] = []
        device = self.policy.device
        for s in range(0, len(batch), self.logprob_batch_size):
            sub = batch.select(range(s, min(s + self.logprob_batch_size, len(batch))))
            with torch.no_grad():
                lp, _ = response_logprobs(self.policy.model, sub.padded().to(device), temperature)
            out += [lp[i, : len(r)].tolist() for i, r in enumerate(sub.response_ids)]
        return out
