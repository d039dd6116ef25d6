"""Test fakes shared by test_correct / test_mc_values / test_diagnostics: a character tokenizer,
a scripted sampler and a tiny task whose correctness rule is a plain Python predicate."""

from __future__ import annotations

from typing import Callable, Sequence

from ibpo_lab.rollout import RolloutBatch
from ibpo_lab.tasks.base import Example, Score, Task

EOS = 3  # a control character id, never produced by ord() of the printable test texts


class CharTok:
    """ids = code points; EOS is special (dropped by decode with skip_special_tokens)."""

    eos_token_id = EOS
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False):
        return {"input_ids": [ord(c) for c in text]}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join("" if (i == EOS and skip_special_tokens) else chr(i) for i in ids)


class PredTask(Task):
    """reward 1 iff ``ok(response)``; repair prompt default template; optional oracle."""

    name = "pred"

    def __init__(self, ok: Callable[[str], bool], oracle: Callable[[str], str] | None = None):
        super().__init__()
        self.ok = ok
        self.reward_calls: list[str] = []
        if oracle is not None:
            self.oracle_repair = lambda ex, failed: oracle(failed)

    def examples(self, split="train", n=None):
        return [Example(id=str(i), prompt=f"q{i}", answer="") for i in range(n or 1)]

    def score(self, example, response):
        self.reward_calls.append(response)
        return Score(float(self.ok(response)), "ok" if self.ok(response) else "wrong")


class ScriptedSampler:
    """``.sample(prompts, n, ...)`` answers each prompt with ``script(prompt, j)`` for j < n.

    Records every call (prompts, n and kwargs) so tests can check batching."""

    def __init__(self, script: Callable[[str, int], str], lp: float = -0.5):
        self.script = script
        self.lp = lp
        self.calls: list[dict] = []
        self.tokenizer = CharTok()

    def sample(self, prompts: Sequence[str], n: int = 1, max_new_tokens: int = 64, **kw) -> RolloutBatch:
        self.calls.append(dict(prompts=list(prompts), n=n, max_new_tokens=max_new_tokens, **kw))
        tok = self.tokenizer
        texts = [self.script(p, j) for p in prompts for j in range(n)]
        return RolloutBatch(
            prompt_ids=[tok.encode(p) for p in prompts for _ in range(n)],
            response_ids=[tok.encode(t) for t in texts],
            rewards=[0.0] * len(texts),
            group_ids=[i for i in range(len(prompts)) for _ in range(n)],
            logprobs=[[self.lp] * len(t) for t in texts],
            prompts=[p for p in prompts for _ in range(n)],
            responses=texts,
        )


def make_batch(groups: Sequence[Sequence[str]], task: Task, prompts: Sequence[str] | None = None) -> tuple[RolloutBatch, list[Example]]:
    """One group per entry of ``groups`` (its response texts); rewards from ``task``."""
    tok = CharTok()
    exs = task.examples(n=len(groups))
    prompts = list(prompts) if prompts is not None else [task.solve_prompt(e) for e in exs]
    texts, gids, ex_of, pr = [], [], [], []
    for g, resp in enumerate(groups):
        for t in resp:
            texts.append(t)
            gids.append(g)
            ex_of.append(exs[g])
            pr.append(prompts[g])
    batch = RolloutBatch(
        prompt_ids=[tok.encode(p) for p in pr],
        response_ids=[tok.encode(t) for t in texts],
        rewards=[task.reward(e, t) for e, t in zip(ex_of, texts)],
        group_ids=gids,
        logprobs=[[-0.25 - 0.01 * k for k in range(len(t))] for t in texts],
        prompts=pr,
        responses=texts,
    )
    task.reward_calls.clear()
    return batch, ex_of


# ---------------------------------------------------------------------------- a fake vllm.LLM
# The class layout of vLLM V1 (read against vllm 0.33: vllm/entrypoints/llm.py, v1/engine/llm_engine.py,
# v1/engine/core_client.py, v1/executor/uniproc_executor.py, v1/worker/worker_base.py) down to what
# VLLMSampler touches, and nothing else:
#   LLM.collective_rpc -> LLMEngine.collective_rpc -> engine_core (InprocClient) -> EngineCore
#   -> ExecutorWithExternalLauncher.collective_rpc -> run_method(driver_worker, fn, args, kwargs)
#   driver_worker: WorkerWrapperBase, attributes forwarded to .worker (gpu Worker) -> .model_runner.model
# With the default multiprocess engine core the executor lives in another process: LLMEngine has no
# model_executor, and a callable sent through collective_rpc must be pickled (refused here, as vLLM
# refuses it unless VLLM_ALLOW_INSECURE_SERIALIZATION=1).
import os as _os
from types import SimpleNamespace as _NS

import torch as _torch


class FakeVLLMModel:
    """The vLLM model on the worker (e.g. vllm's Qwen2ForCausalLM): ``load_weights`` takes HF names."""

    def __init__(self):
        self.loaded: dict[str, _torch.Tensor] = {}

    def load_weights(self, weights) -> set[str]:
        names = set()
        for name, w in weights:
            self.loaded[name] = w.detach().clone()
            names.add(name)
        return names


class FakeGPUModelRunner:
    def __init__(self):
        self.model = FakeVLLMModel()


class FakeGPUWorker:
    def __init__(self):
        self.model_runner = FakeGPUModelRunner()


class FakeWorkerWrapperBase:
    """vllm.v1.worker.worker_base.WorkerWrapperBase: forwards unknown attributes to ``worker``."""

    def __init__(self):
        self.worker = FakeGPUWorker()

    def __getattr__(self, name):
        return getattr(self.__dict__["worker"], name)


def _run_method(obj, method, args, kwargs):
    """vllm.v1.serial_utils.run_method: a str names a method of obj; a callable gets obj first."""
    fn = getattr(obj, method) if isinstance(method, str) else (lambda *a, **k: method(obj, *a, **k))
    return fn(*args, **kwargs)


class FakeExternalLauncherExecutor:
    def __init__(self):
        self.driver_worker = FakeWorkerWrapperBase()
        self.is_shut_down = False

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return [_run_method(self.driver_worker, method, args, kwargs or {})]

    def shutdown(self):
        self.is_shut_down = True


class FakeEngineCore:
    def __init__(self, executor):
        self.model_executor = executor


class FakeInprocClient:
    def __init__(self, executor):
        self.engine_core = FakeEngineCore(executor)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return self.engine_core.model_executor.collective_rpc(method, timeout, args, kwargs)

    def reset_prefix_cache(self):
        return True

    def shutdown(self):
        self.engine_core.model_executor.shutdown()


class FakeMPClient:
    """The multiprocess engine core client: the executor is in another process."""

    def __init__(self):
        self.is_shut_down = False

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if not isinstance(method, str) and _os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") != "1":
            raise TypeError("cannot send a callable to a worker in another process without pickling it")
        raise NotImplementedError("the fake does not run a worker process")

    def reset_prefix_cache(self):
        return True

    def shutdown(self):
        self.is_shut_down = True


class FakeLLMEngine:
    def __init__(self, multiprocess_mode: bool):
        if multiprocess_mode:
            self.engine_core = FakeMPClient()
        else:
            self.engine_core = FakeInprocClient(FakeExternalLauncherExecutor())
            self.model_executor = self.engine_core.engine_core.model_executor  # as vLLM: in-process only

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return self.engine_core.collective_rpc(method, timeout, args, kwargs)

    def reset_prefix_cache(self):
        return self.engine_core.reset_prefix_cache()


class FakeLLM:
    """``vllm.LLM`` as VLLMSampler uses it; ``generate`` emits random tokens, some ending with EOS.

    Built with the sampler's keyword arguments (kept in ``kwargs``). Records sleep/wake/reset/generate
    calls in ``calls``; every instance ever built is in ``FakeLLM.built``."""

    built: list["FakeLLM"] = []

    def __init__(self, model: str, *, eos_id: int = EOS, vocab_size: int = 64, **kwargs):
        self.model, self.kwargs = model, kwargs
        self.eos_id, self.vocab_size = eos_id, vocab_size
        external = kwargs.get("distributed_executor_backend") == "external_launcher"
        if external and _os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") != "0":
            raise AssertionError("To get deterministic execution in V1, please set VLLM_ENABLE_V1_MULTIPROCESSING=0")
        self.llm_engine = FakeLLMEngine(multiprocess_mode=not external)
        self.calls: list[str] = []
        self.requests = self.params = None
        FakeLLM.built.append(self)

    @property
    def runner_model(self) -> FakeVLLMModel:
        """Test access to the worker's model (not part of vLLM's API)."""
        return self.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append("rpc")
        return self.llm_engine.collective_rpc(method, timeout, args, kwargs)

    def sleep(self, level=1):
        self.calls.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.calls.append("wake:" + ",".join(tags))

    def reset_prefix_cache(self):
        self.calls.append("reset")
        return self.llm_engine.reset_prefix_cache()

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, **kw):
        self.calls.append("generate")
        self.requests, self.params = prompts, sampling_params
        g = _torch.Generator().manual_seed(sampling_params.seed or 0)
        outs = []
        for _ in prompts:
            comps = []
            for j in range(sampling_params.n):
                k = int(_torch.randint(1, sampling_params.max_tokens + 1, (1,), generator=g))
                ids = _torch.randint(4, self.vocab_size, (k,), generator=g).tolist()
                if j % 2 == 0:
                    ids[-1] = self.eos_id
                lps = [{t: _NS(logprob=-1.0)} for t in ids]
                comps.append(_NS(token_ids=ids, logprobs=lps, finish_reason="stop" if j % 2 == 0 else "length"))
            outs.append(_NS(outputs=comps))
        return outs


class FakeSamplingParams(_NS):
    """vllm.SamplingParams' check that matters here: greedy decoding allows only n = 1."""

    def __init__(self, **kw):
        if kw.get("temperature", 1.0) == 0 and kw.get("n", 1) > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {kw['n']}.")
        super().__init__(**kw)
