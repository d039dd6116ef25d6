"""What one run does: ``TrainConfig`` (every field with help text, validated before any work),
YAML in and out (a file may inherit from another with ``base: grpo.yaml``), presets and profile
sizes (:data:`PROFILES`, one table), and the method variants the notebooks compare.

Names are the method's: compare-and-correct settings are the fields of
:class:`ibpo_lab.correct.CorrectConfig`, nested as ``correct`` (YAML ``correct: {operator: policy,
num_references: 2}``, CLI ``--set correct.num_references=3``); estimator settings (λ, ρ, the
edit mask, ...) are the estimator function's own keyword arguments, in ``estimator_kwargs``
and nowhere else, checked against its signature.

Fields are typed (``list[str]``, ``dict[str, Any]``), so ``transformers.HfArgumentParser(TrainConfig)``
reads them: every flat field parses from the command line (``--lr 1e-6 --stop A B
--no_save_trajectories``); the nested ``correct`` and the ``*_kwargs`` mappings do not (argparse
cannot turn one string into a dict) but come in through ``parse_dict``/``parse_yaml_file``.
``ibpo-train`` (``train.main``) takes all of them: ``--correct.num_references 3``,
``--estimator_kwargs.lam 0.3``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ibpo_lab.advantages import get_estimator, list_estimators
from ibpo_lab.correct import CorrectConfig
from ibpo_lab.losses import AGG_MODES, get_loss, list_losses
from ibpo_lab.tasks import list_tasks

__all__ = [
    "TrainConfig",
    "CONFIG_DIR",
    "CORRECTING_ESTIMATORS",
    "PROFILES",
    "METHOD_FIELDS",
    "presets",
    "synthetic_preset",
    "profile_value",
    "require_gpu_for_full",
    "method_variants",
    "grid_configs",
    "uses_real_model",
    "experiment_tasks",
    "experiment_preset",
    "experiment_grid",
    "GPU_COST",
    "gpu_hours",
    "estimator_kwargs",
    "check_estimator_kwargs",
    "loss_kwargs",
    "check_loss_kwargs",
    "load_config",
    "read_yaml",
    "build_checked_task",
    "gsm8k_task_kwargs",
    "RANDOM_TINY",
]

#: the committed configs (one per estimator on the synthetic task, plus the IBPO ablations)
CONFIG_DIR = Path(__file__).parent / "configs"
#: estimators that need compare-and-correct before the advantage (they read repair_success/edit_masks)
CORRECTING_ESTIMATORS = ("ibpo",)
BACKENDS = ("hf", "vllm")
#: training precisions (TrainConfig.dtype): float32; bfloat16 = mixed precision (fp32 master weights and AdamW
#: state, forward passes under bf16 autocast); bfloat16-pure = bf16 weights and AdamW state (explicit, warned)
DTYPES = ("float32", "bfloat16", "bfloat16-pure")
#: transformers.get_scheduler names that need no extra arguments (train.make_scheduler)
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "inverse_sqrt")
#: J_rep advantages of a revision (TrainConfig.repair_advantage)
REPAIR_ADVANTAGES = ("group", "selected")
#: the model name that builds a randomly initialised tiny policy over the task's vocabulary
RANDOM_TINY = "tiny-random"
#: fields whose mapping value is merged key by key (YAML ``base:``, ``replace``), not replaced whole
_MERGED = ("correct", "estimator_kwargs", "loss_kwargs", "task_kwargs", "sampler_kwargs")
#: loss arguments that other TrainConfig fields (or the trainer) set, so not accepted in ``loss_kwargs``
_LOSS_ARGS_ELSEWHERE = ("clip_low", "clip_high", "agg", "kl_coef", "ref_logprobs", "is_weights", "norm_len",
                        "gate_mask")


def _f(default, help: str, **kw):
    """A dataclass field with help text (mutable defaults go through a factory)."""
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        make = (lambda d=default: dataclasses.replace(d)) if dataclasses.is_dataclass(default) else (
            lambda d=default: type(d)(d))
        return field(default_factory=make, metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def estimator_kwargs(estimator: str, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments ``kwargs`` checked against ``estimator``'s signature: THE mapping from a
    config to estimator arguments (``step.compute_advantages`` is its only caller path). Unknown
    names raise ValueError naming the estimator and the accepted names."""
    kw = dict(kwargs or {})
    names = _keyword_names(get_estimator(estimator), 1)  # the first parameter is the batch
    problems = _unknown_kwargs("estimator_kwargs", kw, names, f"estimator {estimator!r}")
    if problems:
        raise ValueError(problems[0])
    return kw


def _probe_batch():
    """Two trajectories of one group with every field an estimator may read (rewards, step spans,
    repairs, edit masks, Monte-Carlo values): the estimator checks its own argument values on it."""
    from ibpo_lab.rollout import RolloutBatch

    return RolloutBatch(prompt_ids=[[1], [1]], response_ids=[[2, 3], [2, 4]], rewards=[1.0, 0.0], group_ids=[0, 0],
                        step_spans=[[(0, 1), (1, 2)], [(0, 1), (1, 2)]], repair_success=[0.0, 1.0],
                        edit_masks=[[False, False], [False, True]], step_values=[[0.5, 1.0, 1.0], [0.5, 0.5, 0.0]])


def check_estimator_kwargs(estimator: str, kwargs: Mapping[str, Any] | None) -> None:
    """Names against the signature (:func:`estimator_kwargs`), then values by the estimator's own checks
    on a two-trajectory probe batch — before any model loads, and for any new keyword automatically."""
    kw = estimator_kwargs(estimator, kwargs)
    if kw:
        try:
            get_estimator(estimator)(_probe_batch(), **kw)
        except (ValueError, TypeError) as e:
            raise ValueError(f"estimator_kwargs: {e}") from None


def _keyword_names(fn, skip: int) -> list[str] | None:
    """Keyword names ``fn`` accepts after its first ``skip`` parameters; None if it takes ``**kwargs``."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _sampler_params(backend: str) -> list[str] | None:
    from ibpo_lab.sampling import SAMPLERS

    return _keyword_names(SAMPLERS[backend].__init__, 2) if backend in SAMPLERS else None  # self, policy


def _task_params(task: str) -> list[str] | None:
    """Keyword names of a registered task's factory (None: it takes **kwargs, checked when built)."""
    from ibpo_lab.tasks import base

    base._ensure_builtin_tasks()
    if ":" in task and task.split(":", 1)[0] in base._PREFIX_TASKS:
        return _keyword_names(base._PREFIX_TASKS[task.split(":", 1)[0]], 1)
    fn = base._TASKS.get(task)
    return None if fn is None else _keyword_names(fn.__init__ if isinstance(fn, type) else fn, 1 if isinstance(fn, type) else 0)


def _unknown_kwargs(field_name: str, kwargs: Mapping[str, Any], names: list[str] | None, what: str) -> list[str]:
    if names is None or not isinstance(kwargs, Mapping):
        return []
    unknown = sorted(set(map(str, kwargs)) - set(names))
    return [f"{field_name}: {unknown} are not arguments of {what} (accepted: {', '.join(names) or 'none'})"] if unknown else []


def build_checked_task(cfg: "TrainConfig"):
    """The config's task, built and checked before any model loads: ``task_kwargs`` by the task's own
    constructor, ``train_split`` and (with ``eval_n > 0``) ``eval_split`` against the task's splits.
    Returns the task; raises one ValueError naming the field."""
    from ibpo_lab.tasks import get_task

    try:
        task = get_task(cfg.task, **cfg.task_kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid TrainConfig: task_kwargs: task {cfg.task!r} rejects {cfg.task_kwargs!r}: {e}") from None
    for name in ("train_split",) + (("eval_split",) if cfg.eval_n > 0 else ()):
        split = getattr(cfg, name)
        try:
            ok = len(task.examples(split, None)) > 0
        except (TypeError, ValueError, KeyError, FileNotFoundError) as e:
            raise ValueError(f"invalid TrainConfig: {name}: task {cfg.task!r} has no split {split!r} ({e})") from None
        if not ok:
            raise ValueError(f"invalid TrainConfig: {name}: task {cfg.task!r} has no examples in split {split!r}")
    return task


def loss_kwargs(loss: str, kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments ``kwargs`` checked against loss ``loss``'s signature: the keyword-only
    arguments that no other field sets (``gspo``: ``gate``; ``ppo``: none). Arguments with a home of
    their own (clip_low, clip_high, agg, kl_coef: TrainConfig fields; ref_logprobs, is_weights,
    norm_len, gate_mask: the trainer's tensors) and unknown names raise ValueError naming the loss."""
    kw = dict(kwargs or {})
    params = inspect.signature(get_loss(loss)).parameters.values()
    names = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _LOSS_ARGS_ELSEWHERE]
    elsewhere = sorted(set(kw) & set(_LOSS_ARGS_ELSEWHERE))
    if elsewhere:
        raise ValueError(f"loss_kwargs: {elsewhere} are set by their own TrainConfig fields or by the trainer, "
                         "not by loss_kwargs")
    unknown = sorted(set(kw) - set(names))
    if unknown:
        raise ValueError(f"loss_kwargs: {unknown} are not arguments of loss {loss!r} "
                         f"(accepted: {', '.join(names) or 'none'})")
    return kw


def check_loss_kwargs(loss: str, kwargs: Mapping[str, Any] | None) -> None:
    """Names against the signature (:func:`loss_kwargs`), then values by the loss's own checks on a
    one-sequence probe (before any model loads)."""
    import torch

    kw = loss_kwargs(loss, kwargs)
    if kw:
        z = torch.zeros(1, 2)
        try:
            get_loss(loss)(z, z, torch.tensor([[1.0, 0.0]]), torch.ones(1, 2), **kw)
        except (ValueError, TypeError) as e:
            raise ValueError(f"loss_kwargs: {e}") from None


def _estimator_default(estimator: str, name: str, default: Any = None) -> Any:
    p = inspect.signature(get_estimator(estimator)).parameters.get(name)
    return default if p is None or p.default is inspect.Parameter.empty else p.default


@dataclass
class TrainConfig:
    """Everything one training run does. Build it in code, from YAML (``from_yaml``) or from a
    preset (``presets("smoke")``); ``validate()`` runs on construction and names the bad field."""

    # -- run ------------------------------------------------------------------------------
    label: str = _f("", "name of this configuration, used to group seeds and ablations in summaries "
                        "(empty: the estimator name)")
    seed: int = _f(0, "run seed; every step reseeds python/numpy/torch from (seed, step)")
    device: str = _f("auto", "'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'")

    # -- task -----------------------------------------------------------------------------
    task: str = _f("synthetic", "task name for ibpo_lab.tasks.get_task (synthetic, gsm8k, math, humaneval, rg:<name>)")
    task_kwargs: dict[str, Any] = _f({}, "keyword arguments for the task constructor")
    train_split: str = _f("train", "split the training prompts are drawn from")
    step_delimiter: str = _f("", "how responses split into steps (ibpo_lab.steps.split_steps); empty: the task's own")

    # -- model and sampler ----------------------------------------------------------------
    model: str = _f("tiny", "policy for ibpo_lab.models.load_policy (alias, hub id or local path); "
                            f"'{RANDOM_TINY}' builds a randomly initialised tiny policy (tests)")
    dtype: str = _f("float32", "training precision. float32: float32 weights and matmuls (TF32 tensor cores on "
                               "CUDA). bfloat16: mixed precision, float32 master weights and AdamW state, every "
                               "forward pass (update, old/reference log-probs, the hf sampler's decode) under "
                               "torch.autocast(bfloat16), log-softmax in float32. bfloat16-pure: bfloat16 weights "
                               "and AdamW state (warned: an AdamW step below a weight's bf16 resolution, 2^-8 of "
                               "its magnitude, e.g. lr 1e-6 on weights of 0.01 or more, is rounded away)")
    backend: str = _f("hf", "sampler backend: " + ", ".join(BACKENDS))
    max_new_tokens: int = _f(48, "response length limit when sampling")
    temperature: float = _f(1.0, "sampling temperature; the trainer's log-probs use the same temperature")
    top_p: float = _f(1.0, "nucleus sampling threshold in (0, 1]")
    stop: list[str] = _f([], "stop strings for the sampler (empty: only EOS)")
    sampler_kwargs: dict[str, Any] = _f({}, "extra keyword arguments for ibpo_lab.sampling.get_sampler (e.g. vllm "
                                  "gpu_memory_utilization)")
    recompute_logprobs: bool = _f(False, "recompute behaviour log-probs with the trainer's forward pass instead "
                                         "of trusting the sampler's (use with vllm)")

    # -- schedule -------------------------------------------------------------------------
    steps: int = _f(20, "number of training steps (one step = one batch of groups)")
    prompts_per_step: int = _f(4, "prompts sampled per step")
    group_size: int = _f(8, "trajectories sampled per prompt (G)")

    # -- estimator ------------------------------------------------------------------------
    estimator: str = _f("ibpo", "advantage estimator: " + ", ".join(list_estimators()))
    estimator_kwargs: dict[str, Any] = _f({}, "keyword arguments of the estimator function, checked against its signature "
                                    "(ibpo: lam, rho, token_mask, shaping...; grpo: eps, scale...); the only place "
                                    "for estimator settings")
    mc_rollouts: int = _f(4, "VinePPO: fresh continuations per step prefix for Monte-Carlo step values (K)")

    # -- compare-and-correct (IBPO) -------------------------------------------------------
    correct: CorrectConfig = _f(CorrectConfig(), "compare-and-correct settings (ibpo_lab.correct.CorrectConfig; "
                                                  "one line per field in TrainConfig.help()). max_new_tokens None: "
                                                  "the run's max_new_tokens; stop None: the run's stop; rho follows "
                                                  "the estimator's rho")
    bilateral: bool = _f(False, "IOP bilateral mode: also train the verified repairs as off-policy samples "
                                "on their inserted tokens, with a truncated importance weight")
    is_cap: float = _f(2.0, "truncation of the bilateral importance weight: w = min(π/μ, is_cap)")
    repair_loss_weight: float = _f(0.0, "λ_rep, weight of IOP's joint repair objective J_rep: the policy is also "
                                        "trained on its own revisions UNDER THE REPAIR PROMPT in the same update, so "
                                        "its repairs improve as training goes (train.repair_objective_batch); 0 = off. "
                                        "Only with the policy operator (the revisions of splice/oracle have no repair "
                                        "prompt). Off by default: IBPO as published has no J_rep, the sister method "
                                        "IOP adds it (configs/ibpo_jrep.yaml turns it on with λ_rep = 1)")
    repair_advantage: str = _f("selected", "J_rep's advantage of a revision: 'selected' = +1 on the selected verified "
                                           "repair of each failure, 0 elsewhere (rejection-sampling fine-tuning on the "
                                           "policy's own verified repairs, as IOP trains them; the default: over 25 "
                                           "smoke-sized steps it raised in-loop repair success about twice as fast as "
                                           "'group', benchmarks/README.md); 'group' = 1[accepted] minus the mean over "
                                           "the revisions of the same failed attempt (REINFORCE with a group baseline: "
                                           "failed revisions are pushed down too; a failure whose revisions all agree "
                                           "gives no signal)")

    # -- loss -----------------------------------------------------------------------------
    loss: str = _f("ppo", "policy loss: ppo (token-level clipped ratio) or gspo (sequence-level ratio)")
    clip_low: float = _f(0.2, "lower clip range ε_low of the ratio")
    clip_high: float = _f(0.2, "upper clip range ε_high of the ratio (DAPO clip-higher uses 0.28)")
    agg: str = _f("token-mean", "loss aggregation over tokens (ibpo_lab.losses.aggregate mode)")
    loss_kwargs: dict = _f({}, "keyword arguments of the loss function that no other field sets, checked against "
                               "its signature (gspo: gate = 'mask' (plain GSPO, ratio over every trained token) or "
                               "'credited' (IOP's gated ratio over the tokens with a non-zero advantage))")
    kl_coef: float = _f(0.0, "weight of the k3 KL penalty to a frozen copy of the initial policy (0: no reference)")

    # -- optimiser ------------------------------------------------------------------------
    lr: float = _f(1e-5, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    lr_schedule: str = _f("constant", "learning-rate schedule over steps (transformers.get_scheduler; 'constant' with "
                                        "warmup_steps > 0 is constant_with_warmup): " + ", ".join(LR_SCHEDULES))
    warmup_steps: int = _f(0, "linear warm-up steps")
    ppo_epochs: int = _f(1, "passes over each batch")
    micro_batch_size: int = _f(0, "trajectories per forward/backward pass; gradients accumulate over the micro-batches "
                                  "of a minibatch (0: the whole minibatch at once)")
    minibatch_size: int = _f(0, "trajectories per optimiser step; must divide prompts_per_step * group_size "
                                "(0: the whole batch, one optimiser step per epoch)")

    # -- evaluation and records -----------------------------------------------------------
    eval_every: int = _f(0, "held-out evaluation every N steps (0: only after the last step)")
    eval_split: str = _f("test", "held-out split")
    eval_n: int = _f(32, "held-out prompts per evaluation (0: no evaluation)")
    eval_k: int = _f(4, "samples per held-out prompt (avg@k, pass@k)")
    eval_temperature: float = _f(1.0, "sampling temperature of evaluation")
    checkpoint_every: int = _f(0, "checkpoint every N steps (0: only at the end); always at the end")
    save_checkpoints: bool = _f(True, "write checkpoint/ (needed for resume and RunRecord.load_policy); False writes "
                                      "every other record but no weights (a 135M policy + AdamW is 1.6 GB); "
                                      "checkpoint_every must then be 0")
    save_trajectories: bool = _f(True, "write trajectories/step_*.parquet")
    report_to: list[str] = _f(["none"], "trackers that get the metrics/eval scalars besides metrics.jsonl "
                                        "(ibpo_lab.loggers): tensorboard (<run>/tensorboard/), wandb, trackio, "
                                        "'all' (every installed one) or 'none'; HF TrainingArguments' names. "
                                        "A single name is a one-item list")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _HINTS()[f.name]))
        if self.estimator in list_estimators() and isinstance(self.correct, CorrectConfig):
            # one ρ: the corrector's stats report φ with the estimator's ρ
            rho = self.estimator_kwargs.get("rho", _estimator_default(self.estimator, "rho", self.correct.rho))
            if isinstance(rho, (int, float)) and rho >= 0 and rho != self.correct.rho:
                self.correct = dataclasses.replace(self.correct, rho=float(rho))
        self.validate()

    # -------------------------------------------------------------------- derived values
    @property
    def name(self) -> str:
        """The label, or the estimator name when no label is set."""
        return self.label or self.estimator

    @property
    def batch_size(self) -> int:
        """Trajectories per step, B = prompts_per_step · group_size."""
        return self.prompts_per_step * self.group_size

    @property
    def uses_correction(self) -> bool:
        return self.estimator in CORRECTING_ESTIMATORS

    @property
    def uses_step_values(self) -> bool:
        return self.estimator == "vineppo"

    # -------------------------------------------------------------------- validation
    def problems(self) -> list[str]:
        """Every problem with this config, one ``field: message`` string each."""
        p: list[str] = []

        def need(ok: bool, name: str, msg: str) -> None:
            if not ok:
                p.append(f"{name}: {msg}, got {_get(self, name)!r}")

        need(isinstance(self.task, str) and bool(self.task.strip()), "task", "a task name is required")
        if self.task and self.task.strip():
            known = list_tasks()
            prefixes = [k[: -len("<name>")] for k in known if k.endswith(":<name>")]
            need(self.task in known or any(self.task.startswith(q) for q in prefixes), "task",
                 f"unknown task (known: {', '.join(known)})")
        need(isinstance(self.model, str) and bool(self.model), "model", "a model name or path is required")
        ests = list_estimators()
        need(self.estimator in ests, "estimator", f"unknown estimator (allowed: {', '.join(ests)})")
        if self.estimator in ests:
            try:
                check_estimator_kwargs(self.estimator, self.estimator_kwargs)
            except ValueError as e:
                p.append(str(e))
        losses = list_losses()
        need(self.loss in losses, "loss", f"unknown loss (allowed: {', '.join(losses)})")
        if self.loss in losses:
            try:
                check_loss_kwargs(self.loss, self.loss_kwargs)
            except ValueError as e:
                p.append(str(e))
        need(self.agg in AGG_MODES, "agg", f"must be one of {', '.join(AGG_MODES)}")
        need(self.device == "auto" or self.device == "cpu" or self.device.split(":")[0] == "cuda", "device",
             "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        need(self.backend in BACKENDS, "backend", f"must be one of {', '.join(BACKENDS)}")
        need(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}"
             + (" (float16 training needs loss scaling, which the trainer does not do; bfloat16 is mixed precision "
                "with float32 master weights)" if self.dtype == "float16" else ""))
        try:  # names here; whether the package is installed: train() and the CLI, before any model loads
            from ibpo_lab.loggers import check_report_to

            check_report_to(self.report_to, installed=False)
        except ValueError as e:
            p.append(str(e))
        for name in ("steps", "prompts_per_step", "max_new_tokens", "ppo_epochs", "eval_k", "mc_rollouts"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.group_size >= 2, "group_size", "must be >= 2 (advantages compare trajectories within a group)")
        for name in ("seed", "warmup_steps", "eval_every", "eval_n", "checkpoint_every", "minibatch_size",
                     "micro_batch_size"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("kl_coef", "clip_low", "clip_high", "weight_decay"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "must be a finite number >= 0")
        need(self.clip_low < 1, "clip_low", "must be < 1 (the ratio is clipped to [1 - clip_low, 1 + clip_high])")
        need(self.temperature > 0 and math.isfinite(self.temperature), "temperature", "must be > 0")
        need(self.eval_temperature >= 0, "eval_temperature", "must be >= 0")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be > 0")
        need(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        need(self.adam_eps > 0, "adam_eps", "must be > 0")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
             "must be two numbers in [0, 1)")
        need(self.is_cap > 0, "is_cap", "must be > 0")
        need(isinstance(self.repair_loss_weight, (int, float)) and not isinstance(self.repair_loss_weight, bool)
             and math.isfinite(self.repair_loss_weight) and self.repair_loss_weight >= 0, "repair_loss_weight",
             "must be a finite number >= 0")
        need(self.repair_advantage in REPAIR_ADVANTAGES, "repair_advantage",
             f"must be one of {', '.join(REPAIR_ADVANTAGES)}")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
        if self.uses_correction and self.correct.operator != "oracle":
            need(self.correct.num_references <= self.group_size - 1, "correct.num_references",
                 f"K repairs per failure each use a different sibling, so 1 <= K <= group_size - 1 = "
                 f"{self.group_size - 1}")
        need(not self.bilateral or self.uses_correction, "bilateral",
             f"needs an estimator that runs compare-and-correct ({', '.join(CORRECTING_ESTIMATORS)})")
        need(self.save_checkpoints or self.checkpoint_every == 0, "checkpoint_every",
             "must be 0 when save_checkpoints is False (no checkpoint is ever written)")
        if self.minibatch_size > 0 and self.prompts_per_step >= 1 and self.group_size >= 1:
            need(self.batch_size % self.minibatch_size == 0, "minibatch_size",
                 f"must divide the batch of prompts_per_step * group_size = {self.batch_size} trajectories")
        for name in ("task_kwargs", "estimator_kwargs", "loss_kwargs", "sampler_kwargs"):
            need(all(isinstance(k, str) for k in getattr(self, name)), name, "keys must be strings")
        need(self.seed < 2**63, "seed", "must be < 2**63 (torch.manual_seed's range)")
        if self.backend in BACKENDS:
            p += _unknown_kwargs("sampler_kwargs", self.sampler_kwargs, _sampler_params(self.backend),
                                 f"the {self.backend!r} sampler")
        if isinstance(self.task, str) and self.task.strip():
            p += _unknown_kwargs("task_kwargs", self.task_kwargs, _task_params(self.task), f"task {self.task!r}")
        return p

    def validate(self) -> "TrainConfig":
        """Raise one ValueError listing every bad field; return self when the config is fine."""
        p = self.problems()
        if p:
            raise ValueError("invalid TrainConfig: " + "; ".join(p))
        return self

    # -------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a TrainConfig needs a mapping of fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            hint = {k: _RENAMED[k] for k in unknown if k in _RENAMED}
            raise ValueError(f"invalid TrainConfig: unknown field(s) {unknown}"
                             + (f" (renamed: {hint})" if hint else "") + f"; known fields: {', '.join(sorted(names))}")
        return cls(**d)

    def to_yaml(self, path: str | os.PathLike | None = None) -> str:
        """The config as YAML text (fields in declaration order); also written to ``path`` if given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if path is not None:
            from ibpo_lab.runs import atomic_write_text

            atomic_write_text(Path(path), text)
        return text

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike) -> "TrainConfig":
        """Load from a YAML file path (``base:`` followed), or from YAML text (a string with a newline)."""
        s = str(path_or_text)
        if isinstance(path_or_text, os.PathLike) or "\n" not in s:
            return cls.from_dict(read_yaml(Path(s)))
        d = _load_yaml_text(s, "config text")
        if not isinstance(d, dict):
            raise ValueError(f"config text: expected a mapping of fields, got {type(d).__name__}")
        return cls.from_dict(d)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (validated again). Mapping fields (``correct``,
        ``estimator_kwargs``, ...) given as dicts are merged key by key; changing ``estimator``
        starts the new estimator from its defaults plus the ``estimator_kwargs`` given (``loss``
        and ``loss_kwargs`` likewise)."""
        d = self.to_dict()
        if "estimator" in changes and changes["estimator"] != self.estimator:
            d["estimator_kwargs"] = {}  # another estimator's settings do not carry over
        if "loss" in changes and changes["loss"] != self.loss:
            d["loss_kwargs"] = {}  # nor another loss's
        return self.from_dict(_merge(d, changes))

    def with_overrides(self, assignments: Sequence[str]) -> "TrainConfig":
        """Apply ``key=value`` strings (values parsed as YAML; ``correct.num_references=3`` or
        ``task_kwargs.n_steps=3`` sets one key of a mapping field)."""
        d = self.to_dict()
        names = {f.name for f in dataclasses.fields(self)}
        for a in assignments:
            if "=" not in a:
                raise ValueError(f"--set expects key=value, got {a!r}")
            key, raw = a.split("=", 1)
            key = key.strip()
            value = yaml.safe_load(raw) if raw.strip() else ""
            head, _, sub = key.partition(".")
            if head not in names:
                raise ValueError(f"--set {key}: unknown field {head!r}; known fields: {', '.join(sorted(names))}")
            if sub:
                if not isinstance(d[head], dict):
                    raise ValueError(f"--set {key}: field {head!r} is not a mapping")
                if head == "correct" and sub not in CorrectConfig.help():
                    raise ValueError(f"--set {key}: unknown field {sub!r} of correct; known: "
                                     f"{', '.join(CorrectConfig.help())}")
                d[head] = {**d[head], sub: value}
            else:
                d[head] = value
        return self.from_dict(d)

    @classmethod
    def help(cls) -> str:
        """One line per field (``correct.*`` from CorrectConfig's own fields): name, default, help text."""
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, CorrectConfig):
                rows.append(f"{f.name}:\n    {f.metadata['help']}")
                for cf in dataclasses.fields(CorrectConfig):
                    rows.append(f"{f.name}.{cf.name} = {getattr(default, cf.name)!r}\n    {cf.metadata.get('help', '')}")
                continue
            rows.append(f"{f.name} = {default!r}\n    {f.metadata['help']}")
        return "\n".join(rows)


#: old field names -> where they live now (named in the unknown-field error)
_RENAMED = {
    "lam": "estimator_kwargs.lam", "rho": "estimator_kwargs.rho", "edit_mask": "estimator_kwargs.token_mask",
    "corrector": "correct.operator", "repair_k": "correct.num_references", "k_star": "correct.truncate_k",
    "repair_max_new_tokens": "correct.max_new_tokens", "repair_temperature": "correct.temperature",
    "correct_kwargs": "correct",
}


def _get(cfg: TrainConfig, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes``; mapping fields (:data:`_MERGED`) merge key by key."""
    out = dict(base)
    for k, v in changes.items():
        if k in _MERGED and isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **v}
        elif k in _MERGED and dataclasses.is_dataclass(v) and not isinstance(v, type):
            out[k] = asdict(v)
        else:
            out[k] = v
    return out


_HINTS_CACHE: dict[str, Any] = {}


def _HINTS() -> dict[str, Any]:
    if not _HINTS_CACHE:
        _HINTS_CACHE.update(typing.get_type_hints(TrainConfig))
    return _HINTS_CACHE


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Bring YAML/CLI values to the field's type (YAML reads ``1e-5`` as a string, for one)."""
    origin = typing.get_origin(tp)
    if origin in (list, dict):  # list[str], dict[str, Any]: the container is checked (items as YAML gave them)
        if name == "report_to" and isinstance(value, str):
            value = [value]  # as HF TrainingArguments: report_to="tensorboard"
        tp = origin
    try:
        if tp is CorrectConfig:
            if isinstance(value, CorrectConfig):
                return value
            if value is None:
                return CorrectConfig()
            if not isinstance(value, Mapping):
                raise TypeError
            known = CorrectConfig.help()
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(f"invalid TrainConfig: correct: unknown field(s) {unknown}; known: {', '.join(known)}")
            try:
                return CorrectConfig(**dict(value))
            except (TypeError, ValueError) as e:
                raise ValueError(f"invalid TrainConfig: correct.{e}") from None
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, (bool, int)) and not isinstance(value, float):
                return bool(value)
            raise TypeError
        if tp is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            if value is None:
                return ""
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if tp is dict:
            if value is None:
                return {}
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if tp is list:
            if value is None:
                return []
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise TypeError
            return list(value)
    except (TypeError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith("invalid TrainConfig"):
            raise
        raise ValueError(
            f"invalid TrainConfig: {name}: expected {getattr(tp, '__name__', tp)}, got {value!r}"
        ) from None
    return value


# ======================================================================================== YAML files
class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a repeated key (PyYAML keeps the last one silently)."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r} (first at line "
                f"{seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _load_yaml_text(text: str, where: str) -> Any:
    """YAML text as Python objects (safe loader, duplicate keys refused); a syntax error or a duplicate
    key is one ValueError naming ``where`` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: invalid YAML: {' '.join(str(e).split())}") from None


def read_yaml(path: str | os.PathLike, _seen: tuple = ()) -> dict[str, Any]:
    """The fields of a config file, with ``base: other.yaml`` (relative to the file) followed: the
    base's fields, then this file's (mapping fields merged key by key)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    if p.resolve() in _seen:
        raise ValueError(f"config file {p}: 'base:' loops back to itself")
    try:
        d = _load_yaml_text(p.read_bytes().decode("utf-8"), str(p))
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {p}: not UTF-8 text ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {p}: expected a mapping of fields, got {type(d).__name__}")
    base = d.pop("base", None)
    if base is None:
        return d
    parent = read_yaml(p.parent / str(base), _seen + (p.resolve(),))
    return _merge(parent, d)


def load_config(name_or_path: str | os.PathLike) -> TrainConfig:
    """A config from a YAML path, a committed config name (``"ibpo"`` -> ``configs/ibpo.yaml``) or a
    preset/profile name (``"smoke"``, ``"full"``)."""
    s = str(name_or_path)
    if s in PROFILES:
        return presets(s)
    p = Path(s)
    if not p.is_file() and (CONFIG_DIR / f"{s}.yaml").is_file():
        p = CONFIG_DIR / f"{s}.yaml"
    return TrainConfig.from_yaml(p)


# ======================================================================================== presets and profiles
#: one row per profile: ``preset`` (the general TrainConfig of :func:`presets`), ``minibatches`` (split of
#: the batch unless minibatch_size is given), ``synthetic`` (sizes of the tiny-policy synthetic experiments,
#: :func:`synthetic_preset`), ``gpu`` (refused without CUDA), ``knobs`` (which column of the notebooks'
#: ``profile_value(profile, smoke, full, cpu=...)`` it takes; ``cpu`` falls back to ``smoke`` where a
#: notebook gives no cpu value), ``jobs`` (notebooks ``reproduce`` runs at once, each kernel on
#: ``threads`` torch threads; ``first``: the notebooks started first, the longest), ``skip`` (notebook numbers ``reproduce`` leaves out, with the reason) and
#: ``help`` (one line for ``--profile``) and, optionally, ``experiments``: the real-model sizes of the
#: controlled experiments (notebooks 04, 06, 08; :func:`experiment_preset`); a profile without it runs
#: them on the synthetic task (the CPU testbed). Adding a profile is adding a row.
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(
        help="CI: every notebook in a few minutes on a 2-core CPU; shows the machinery, resolves nothing",
        gpu=False, knobs="smoke", minibatches=2, jobs=1, threads=None, skip={},
        preset=dict(task="synthetic", model="tiny", device="cpu", backend="hf", steps=5, prompts_per_step=4,
                    group_size=8, max_new_tokens=48, lr=1e-4, max_grad_norm=1.0, ppo_epochs=1,
                    correct={"num_references": 2, "max_new_tokens": 48}, eval_every=0, eval_n=16, eval_k=2,
                    checkpoint_every=0),
        synthetic=dict(steps=3, prompts_per_step=2, group_size=4, minibatch_size=0, eval_every=0, eval_n=8, eval_k=1),
    ),
    # cpu: the main job. The tiny policy on the synthetic task at the benchmarks' sizes (4 prompts x 8 samples
    # x 48 tokens per step, 25 steps, a 32 x 4 held-out evaluation at the end), so the paper's claims are
    # measured with seeds enough for an interval; two notebooks at a time, one torch thread each (the 3M
    # policy's matmuls are too small for two threads to help one process). Sized for <= 15 min on 2 cores.
    "cpu": dict(
        help="the main job: the paper's claims measured on the tiny policy, <= 15 min on a 2-core CPU",
        gpu=False, knobs="cpu", minibatches=2, jobs=2, threads=1, first=["04", "03"],
        skip={"05": "a real model (SmolLM2 on GSM8K) cannot learn anything in minutes on a CPU: run it in full"},
        preset=dict(task="synthetic", model="tiny", device="cpu", backend="hf", steps=25, prompts_per_step=4,
                    group_size=8, max_new_tokens=48, lr=1e-4, max_grad_norm=1.0, ppo_epochs=1,
                    correct={"num_references": 2, "max_new_tokens": 48}, eval_every=0, eval_n=32, eval_k=4,
                    checkpoint_every=0),
        synthetic=dict(steps=25, prompts_per_step=4, group_size=8, minibatch_size=16, eval_every=0, eval_n=32,
                       eval_k=4),
    ),
    "full": dict(
        help="one 80 GB GPU: a 1.5B instruct model on GSM8K with vLLM, and long synthetic runs",
        gpu=True, knobs="full", minibatches=4, jobs=1, threads=None, skip={},
        # device cuda: never a silent CPU fallback (vLLM needs a GPU); dtype bfloat16: mixed precision (fp32
        # master weights + AdamW state, bf16 autocast); the old log-probs are the trainer's own autocast pass
        # (recompute_logprobs), so vLLM's are not recomputed a second time in the sampler
        preset=dict(task="gsm8k", model="Qwen/Qwen2.5-1.5B-Instruct", device="cuda", backend="vllm", dtype="bfloat16",
                    recompute_logprobs=True,
                    sampler_kwargs={"gpu_memory_utilization": 0.35, "recompute_logprobs": False}, steps=200, prompts_per_step=32, group_size=8,
                    max_new_tokens=512, correct={"num_references": 2, "max_new_tokens": 640}, lr=1e-6,
                    lr_schedule="constant", warmup_steps=10, max_grad_norm=1.0, ppo_epochs=1, micro_batch_size=4,
                    clip_high=0.28, kl_coef=0.0, eval_every=25, eval_n=256, eval_k=4, eval_temperature=0.6,
                    checkpoint_every=25),
        synthetic=dict(steps=100, prompts_per_step=8, group_size=8, minibatch_size=32, eval_every=20, eval_n=64,
                       eval_k=4, lr=1e-4),
        # the controlled experiments (notebooks 04, 06, 08) on the real model: the preset with half the prompts
        # per step and half the steps (GPU-hours per notebook: gpu_hours(), stated in each notebook)
        experiments=dict(tasks=("gsm8k", "math"), steps=100, prompts_per_step=16, eval_every=25),
    ),
}


def _profile(profile: str) -> dict[str, Any]:
    if profile not in PROFILES:
        raise ValueError(f"profile: unknown profile {profile!r} (allowed: {', '.join(PROFILES)})")
    return PROFILES[profile]


def require_gpu_for_full(profile: str) -> None:
    """Refuse a GPU profile (``full``: 1.5B models with vLLM) clearly on a machine without CUDA,
    before anything loads (a notebook run by hand gets the same message as ``reproduce``)."""
    if _profile(profile)["gpu"]:
        import torch

        if not torch.cuda.is_available():
            from ibpo_lab.gpu_check import cuda_diagnosis

            raise RuntimeError(f"profile={profile!r} needs a CUDA GPU (torch.cuda.is_available() is False). "
                               f"Run with profile='smoke' on a CPU. Why: {cuda_diagnosis()}")


def profile_value(profile: str, smoke: Any, full: Any, cpu: Any = None) -> Any:
    """Pick the ``smoke``, ``full`` or ``cpu`` value of a notebook knob (per :data:`PROFILES`' ``knobs``).
    A ``cpu`` profile given no ``cpu`` value takes the ``smoke`` one (``None`` cannot be a cpu value)."""
    require_gpu_for_full(profile)
    col = _profile(profile)["knobs"]
    if col == "cpu":
        return smoke if cpu is None else cpu
    return {"smoke": smoke, "full": full}[col]


def presets(profile: str = "smoke", **overrides) -> TrainConfig:
    """A ready config from :data:`PROFILES`. ``smoke``: the tiny policy on the synthetic task, a minute
    or so per run on a 2-core CPU. ``full``: one GPU, a 1.5B instruct model on GSM8K with vllm.
    ``overrides`` are TrainConfig fields (``presets("smoke", estimator="grpo", seed=1)``; mapping fields
    merge). Unless ``minibatch_size`` is given, the batch is split into the profile's number of
    minibatches when it divides evenly, else trained as one minibatch."""
    prof = _profile(profile)
    d = _merge(prof["preset"], overrides)
    if "minibatch_size" not in overrides:
        batch, n = int(d["prompts_per_step"]) * int(d["group_size"]), prof["minibatches"]
        d["minibatch_size"] = batch // n if batch % n == 0 else 0
    return TrainConfig.from_dict(d)


def synthetic_preset(profile: str, **overrides) -> TrainConfig:
    """A ``TrainConfig`` for the controlled experiments: the tiny policy on the synthetic task, sized
    by the profile's ``synthetic`` row (smoke: seconds per run on a CPU; full: minutes on a GPU)."""
    require_gpu_for_full(profile)
    base = {"task": "synthetic", "model": "tiny", "device": "auto", "backend": "hf", **_profile(profile)["synthetic"]}
    return presets("smoke", **_merge(base, overrides))


# ======================================================================================== method variants
#: the TrainConfig fields that define a method (estimator, loss, IBPO knobs); sizes and schedules come
#: from the profile's preset instead
METHOD_FIELDS = ("estimator", "estimator_kwargs", "loss", "loss_kwargs", "agg", "correct", "bilateral", "is_cap",
                 "repair_loss_weight", "repair_advantage", "clip_low",
                 "clip_high", "mc_rollouts", "kl_coef")


def method_variants(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """label -> method overrides, read from the committed configs (``configs/<name>.yaml``, ``base:``
    followed), keeping only :data:`METHOD_FIELDS` — one definition of each baseline and ablation."""
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    out = {}
    for n in names:
        f = CONFIG_DIR / f"{n}.yaml"
        if not f.is_file():
            raise ValueError(f"method {n!r} has no config in {CONFIG_DIR}; known: {', '.join(known)}")
        d = read_yaml(f)
        out[n] = {k: v for k, v in d.items() if k in METHOD_FIELDS}
        out[n].setdefault("estimator_kwargs", {})
        out[n].setdefault("loss_kwargs", {})
    return out


def grid_configs(profile: str, variants: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], *,
                 synthetic: bool = True, fixed: Mapping[str, Any] | None = None, **common) -> list[TrainConfig]:
    """One ``TrainConfig`` per (variant, seed), variant by variant: the profile's preset
    (:func:`synthetic_preset` if ``synthetic`` else :func:`presets`) with ``common``, then the
    variant's overrides, then ``fixed`` (settings that win over every variant, e.g. a smaller K for
    tiny groups), ``label=<variant name>`` and ``seed``. Mapping fields merge key by key.

    ``variants``: label -> TrainConfig overrides (e.g. ``{"k1": {"correct": {"num_references": 1}}}``).
    """
    make = (lambda **kw: synthetic_preset(profile, **kw)) if synthetic else (lambda **kw: presets(profile, **kw))
    return _grid(make, variants, seeds, fixed, common)


def _grid(make, variants, seeds, fixed, common) -> list[TrainConfig]:
    if not variants:
        raise ValueError("variants is empty")
    if not seeds:
        raise ValueError("seeds is empty")
    out = []
    for name, v in variants.items():
        d = _merge(_merge(dict(common), dict(v)), dict(fixed or {}))
        if "estimator" in v and "estimator_kwargs" not in v:
            d["estimator_kwargs"] = {}
        if "loss" in v and "loss_kwargs" not in v:
            d["loss_kwargs"] = {}
        out += [make(**{**d, "label": name, "seed": int(s)}) for s in seeds]
    return out


# ======================================================================================== controlled experiments
def uses_real_model(profile: str) -> bool:
    """Whether the controlled experiments (notebooks 04, 06, 08) of ``profile`` train the real model on a
    real benchmark (a row with ``experiments``: ``full``) or the tiny policy on the synthetic task (the
    CPU testbed: ``smoke`` and any row without it)."""
    return "experiments" in _profile(profile)


def experiment_tasks(profile: str) -> tuple[str, ...]:
    """The benchmarks the controlled experiments of ``profile`` may run on (the first is the default):
    ``("synthetic",)`` in a CPU profile, the ``experiments`` row's tasks (gsm8k, math) otherwise."""
    return tuple(_profile(profile)["experiments"]["tasks"]) if uses_real_model(profile) else ("synthetic",)


def experiment_task_kwargs(task: str) -> dict[str, Any]:
    """Task arguments of a real benchmark: GSM8K through :func:`gsm8k_task_kwargs`; MATH-format problems
    from ``$IBPO_DATA_DIR/math/<split>.jsonl`` (``tasks.mathtask``), checked when the task loads."""
    return gsm8k_task_kwargs() if task == "gsm8k" else {}


def experiment_preset(profile: str, task: str | None = None, **overrides) -> TrainConfig:
    """The base config of the controlled experiments (notebooks 04 estimators/ablations, 06 K and
    local repair vs rewrite, 08 λ/ρ): in a CPU profile the tiny policy on the synthetic task
    (:func:`synthetic_preset`); in ``full`` the profile's real-model preset (Qwen2.5-1.5B-Instruct,
    vLLM, bf16 mixed precision) on ``task`` (``experiment_tasks(profile)``, default the first: gsm8k)
    with the ``experiments`` row's sizes. ``overrides`` win (``model=`` picks another policy)."""
    tasks = experiment_tasks(profile)
    task = task or tasks[0]
    if task not in tasks:
        raise ValueError(f"task: profile {profile!r} runs the controlled experiments on {', '.join(tasks)}, "
                         f"got {task!r}")
    if not uses_real_model(profile):
        return synthetic_preset(profile, **overrides)
    require_gpu_for_full(profile)
    sizes = {k: v for k, v in _profile(profile)["experiments"].items() if k != "tasks"}
    base = {**sizes, "task": task, "task_kwargs": experiment_task_kwargs(task)}
    return presets(profile, **_merge(base, overrides))


def experiment_grid(profile: str, variants: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], *,
                    task: str | None = None, fixed: Mapping[str, Any] | None = None, **common) -> list[TrainConfig]:
    """:func:`grid_configs` over :func:`experiment_preset` (the controlled experiments' model and task
    for ``profile``): one config per (variant, seed)."""
    return _grid(lambda **kw: experiment_preset(profile, task, **kw), variants, seeds, fixed, common)


#: the cost model of :func:`gpu_hours` on one H100/H200-class GPU for a 1.5B model in bf16 mixed precision.
#: ESTIMATES, not measurements (no GPU was available when they were written): replace them with
#: ``python -m ibpo_lab.gpu_check``'s numbers (``mem_1p5b.*.seconds``, ``hf_sampler_1p5b``) once measured.
GPU_COST = dict(
    # vLLM decode, 1.5B, bf16, >= 128 sequences at once: ~20k generated tokens/s
    sample_tokens_per_s=20_000.0,
    # trainer forward + backward: 6 N FLOPs per token, N = 1.54e9 -> 9.3 GFLOP; 30k tokens/s = 280 TFLOP/s,
    # ~28% of the GPU's ~990 dense bf16 TFLOP/s
    train_tokens_per_s=30_000.0,
    # no-grad log-prob pass (old log-probs): 2 N FLOPs per token, 3x the training rate
    logprob_tokens_per_s=90_000.0,
    # vLLM wake/sleep, weight sync and scheduling per step
    overhead_s_per_step=2.0,
    # prompt tokens (GSM8K/MATH chat prompts ~150-250)
    prompt_tokens=200.0,
    # share of trajectories that fail and get K repairs (IBPO); 0.5 is the worst case for a 1.5B model
    failed_share=0.5,
    # step boundaries per response (VinePPO values each one with mc_rollouts continuations)
    steps_per_response=8.0,
)


def gpu_hours(cfgs: Sequence[TrainConfig], cost: Mapping[str, float] | None = None) -> float:
    """Estimated GPU-hours of training ``cfgs`` (upper bound: every response at full length), by the
    cost model :data:`GPU_COST`. Per step, with B = prompts_per_step · group_size, T = max_new_tokens:

        sample   B·T / sample_tokens_per_s
        repairs  failed_share · B · K · T_repair / sample_tokens_per_s       (correcting estimators)
        MC       B · steps_per_response · mc_rollouts · T/2 / sample_tokens_per_s  (vineppo: continuations
                 from every step boundary, half a response long on average)
        update   B·(prompt + T) · ppo_epochs / train_tokens_per_s  (+ the repairs' tokens when bilateral)
        old lp   B·(prompt + T) / logprob_tokens_per_s                        (recompute_logprobs)
        + overhead_s_per_step;  evaluation: (steps / eval_every + 1) · eval_n · eval_k · T / sample rate.
    """
    c = {**GPU_COST, **(cost or {})}
    total = 0.0
    for cfg in cfgs:
        B, T, P = cfg.batch_size, cfg.max_new_tokens, c["prompt_tokens"]
        t_rep = cfg.correct.max_new_tokens or T
        gen = B * T
        train_tok = B * (P + T) * cfg.ppo_epochs
        if cfg.uses_correction:
            rep = c["failed_share"] * B * cfg.correct.num_references * t_rep
            gen += rep
            if cfg.bilateral:
                train_tok += c["failed_share"] * B * (P + t_rep) * cfg.ppo_epochs
        if cfg.uses_step_values:
            gen += B * c["steps_per_response"] * cfg.mc_rollouts * T / 2
        per_step = (gen / c["sample_tokens_per_s"] + train_tok / c["train_tokens_per_s"]
                    + (B * (P + T) / c["logprob_tokens_per_s"] if cfg.recompute_logprobs else 0.0)
                    + c["overhead_s_per_step"])
        n_eval = (cfg.steps // cfg.eval_every if cfg.eval_every else 0) + 1 if cfg.eval_n else 0
        total += cfg.steps * per_step + n_eval * cfg.eval_n * cfg.eval_k * T / c["sample_tokens_per_s"]
    return total / 3600.0


def gsm8k_task_kwargs(path: str | None = None) -> dict[str, Any]:
    """GSM8K task arguments: ``path`` if given, else ``$IBPO_DATA_DIR/gsm8k`` when it exists, else
    the 20-problem fixture shipped with the package (so smoke runs work from a bare clone)."""
    if path:
        return {"path": str(path)}
    d = os.environ.get("IBPO_DATA_DIR")
    if d and (Path(d) / "gsm8k" / "train.jsonl").is_file():
        return {}
    fixture = Path(__file__).parent / "tasks" / "fixtures" / "gsm8k_mini.jsonl"
    return {"path": str(fixture)}
