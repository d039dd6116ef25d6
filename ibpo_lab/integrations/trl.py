"""IBPO inside TRL: compare-and-correct and edit-masked [B, T] advantages in TRL's GRPO loop.

TRL samples and scores as usual (``GRPOTrainer._generate_and_score_completions``: vLLM or
transformers generation, reward functions, old/reference log-probs, multi-GPU gathering); then
:class:`IBPOTrainer` rebuilds an ibpo_lab :class:`~ibpo_lab.rollout.RolloutBatch` from the very
token ids TRL sampled, runs :func:`ibpo_lab.correct.compare_and_correct` with the trainer's own
(unwrapped) model as the implicit behaviour policy, and replaces TRL's ``[B]`` advantages by
``get_estimator("ibpo")``'s ``[B, T]`` ones (TRL's loss accepts per-token advantages). Loss,
clipping, KL, optimiser, DeepSpeed/FSDP and logging stay TRL's. No second implementation: the
repairs, φ, edit masks and advantages are the same functions ibpo_lab's own trainer calls.

Multi-process (``accelerate launch``): a TRL group may straddle processes, so the rollout is
gathered, every process repairs the groups it owns (group g -> process g mod world size), the
repair info is gathered back, and each process keeps its own slice of the advantages.

Repairs are trained too (added to TRL's loss in :meth:`IBPOTrainer.compute_loss`, each generation
batch's rows spread over its ``steps_per_generation`` micro-steps): IOP's joint repair objective
J_rep (``ibpo_repair_loss_weight`` λ_rep, off by default as in ibpo_lab: the policy's revisions under their repair
prompt, ``train.repair_objective_batch``) and, with ``ibpo_bilateral``, the verified repairs under
the solve prompt on their inserted tokens with the truncated IS weight min(π_old/μ, ``ibpo_is_cap``)
(``train.offpolicy_repairs``' rule). Both use ibpo_lab's token-mean clipped PPO loss with TRL's
ε_low/ε_high and no KL term. Single process only for now: with several processes they are skipped
with a warning (a forward on only the processes that own repairs desynchronises DDP).

Scope: text prompts (``task_dataset`` builds them), training mode only (evaluation keeps TRL's
advantages), no tool calling or environments.

CLI (one process or ``accelerate launch --num_processes N``); TRL's own flags pass through::

    python -m ibpo_lab.integrations.trl --config ibpo_lab/integrations/recipes/trl_ibpo_tiny.yaml
    ibpo-trl --config trl_ibpo_tiny.yaml --learning_rate 1e-6 --max_steps 5 --report_to tensorboard
"""

from __future__ import annotations

#: the TRL versions this adapter is tested with (the [trl] extra of pyproject.toml says the same; a test
#: checks). Upper bound: IBPOTrainer overrides private GRPOTrainer hooks (_generate,
#: _calculate_rewards, _generate_and_score_completions), which TRL may change in any minor release.
TRL_REQUIREMENT = "trl>=1.16,<1.17"

try:
    import trl as _trl  # noqa: F401  (the absolute import: this module is ibpo_lab.integrations.trl)
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised by a test that hides trl
    raise ImportError(
        "ibpo_lab.integrations.trl needs TRL, an optional extra: pip install 'ibpo_lab[trl]' "
        f"(or pip install '{TRL_REQUIREMENT}')"
    ) from e

# the two hooks IBPOTrainer captures the rollout through, and TRL's per-token advantage support
# (``_compute_loss`` unsqueezes only [B] advantages), exist in recent TRL; tested with trl 1.16
if not all(hasattr(GRPOTrainer, name) for name in ("_generate", "_calculate_rewards", "_generate_and_score_completions")):
    raise ImportError(
        f"ibpo_lab.integrations.trl needs {TRL_REQUIREMENT}, found trl {_trl.__version__} (GRPOTrainer._generate and "
        f"_calculate_rewards are missing): pip install '{TRL_REQUIREMENT}'"
    )


def _check_trl_version() -> None:
    """Warn (not fail) outside the tested range: the private hooks may still match."""
    import warnings

    from packaging.specifiers import SpecifierSet

    if _trl.__version__ not in SpecifierSet(TRL_REQUIREMENT[len("trl"):]):
        warnings.warn(f"ibpo_lab.integrations.trl is tested with {TRL_REQUIREMENT}, found trl {_trl.__version__}; "
                      "IBPOTrainer overrides private GRPOTrainer hooks that may have changed", stacklevel=2)


_check_trl_version()

import argparse
import hashlib
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ibpo_lab.advantages import PHI_MODES, SIGN_RULES, get_estimator
from ibpo_lab.correct import CorrectConfig, CorrectionResult, compare_and_correct
from ibpo_lab.rollout import RolloutBatch

__all__ = [
    "IBPOConfig",
    "IBPOTrainer",
    "IBPOStep",
    "TaskReward",
    "task_reward_func",
    "task_dataset",
    "examples_by_id",
    "trl_scale",
    "owned_rows",
    "repair_records",
    "merge_repair_info",
    "build_trainer",
    "main",
]

#: dataset column holding each row's ``Example.id`` (TRL passes every column to reward functions)
EXAMPLE_ID_COLUMN = "example_id"

# --------------------------------------------------------------------------- data and rewards
def examples_by_id(examples: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """id -> Example; a duplicate id is an error (two problems would share one reward)."""
    if isinstance(examples, Mapping):
        return {str(k): v for k, v in examples.items()}
    out: dict[str, Any] = {}
    for ex in examples:
        key = str(ex.id)
        if key in out:
            raise ValueError(f"examples: id {key!r} occurs twice; example ids must be unique")
        out[key] = ex
    return out


def task_dataset(task: Any, split: str = "train", n: int | None = None, examples: Sequence[Any] | None = None):
    """A TRL prompt dataset from a task: columns ``prompt`` (the task's solve prompt, plain text)
    and ``example_id`` (the ``Example.id``, which reward functions and the corrector look up).

    ``examples`` overrides ``task.examples(split, n)``. -> ``datasets.Dataset`` of len(examples) rows.
    """
    from datasets import Dataset

    exs = list(task.examples(split, n) if examples is None else examples)
    if not exs:
        raise ValueError(f"task_dataset: no examples (split={split!r}, n={n!r})")
    examples_by_id(exs)  # reject duplicate ids early
    return Dataset.from_dict(
        {"prompt": [task.solve_prompt(ex) for ex in exs], EXAMPLE_ID_COLUMN: [str(ex.id) for ex in exs]}
    )


class TaskReward:
    """A TRL reward function over an ibpo_lab Task: ``reward(prompts, completions, example_id, **kw)
    -> list[float]``, one ``task.reward(example, completion)`` per completion (0/1, never raises)."""

    def __init__(self, task: Any, examples: Sequence[Any] | Mapping[str, Any]):
        self.task = task
        self.examples = examples_by_id(examples)
        # TRL names reward columns and metrics after __name__
        self.__name__ = f"{getattr(task, 'name', 'task')}_reward"

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        ids = kwargs.get(EXAMPLE_ID_COLUMN)
        if ids is None:
            raise ValueError(
                f"the dataset has no {EXAMPLE_ID_COLUMN!r} column: build it with ibpo_lab.integrations.trl.task_dataset"
            )
        if len(ids) != len(completions):
            raise ValueError(f"{EXAMPLE_ID_COLUMN} has {len(ids)} entries but there are {len(completions)} completions")
        out = []
        for key, completion in zip(ids, completions):
            if not isinstance(completion, str):
                raise ValueError("TaskReward expects plain-text completions (conversational datasets are not supported)")
            out.append(float(self.task.reward(self._example(key), completion)))
        return out

    def _example(self, key: Any) -> Any:
        key = str(key)
        if key not in self.examples:
            raise ValueError(f"example id {key!r} is not among the {len(self.examples)} examples the reward was built with")
        return self.examples[key]


def task_reward_func(task: Any, examples: Sequence[Any] | Mapping[str, Any] | None = None) -> TaskReward:
    """TRL reward function for ``task``; ``examples`` defaults to ``task.examples("train")``."""
    return TaskReward(task, task.examples("train") if examples is None else examples)


def trl_scale(scale_rewards: Any) -> str:
    """TRL's ``scale_rewards`` (True/False/"group"/"batch"/"none") -> ibpo_lab's ``scale``."""
    value = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if value not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return value


# --------------------------------------------------------------------------- config
def _ibpo(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


#: CorrectConfig fields whose IBPOConfig value None means "TRL's own setting" (CorrectConfig field -> TRL field)
_CORRECT_FROM_TRL = {"temperature": "temperature", "top_p": "top_p", "max_new_tokens": "max_completion_length"}
#: CorrectConfig fields IBPOConfig takes from its ibpo_* fields instead (one ρ for the estimator and the stats)
_CORRECT_FROM_IBPO = {"rho": "ibpo_rho"}


def _add_correct_fields(namespace: dict) -> None:
    """Declare ``correct_<name>`` for every CorrectConfig field in a class body being built (so
    IBPOConfig's compare-and-correct fields are CorrectConfig's, with its defaults and help)."""
    import dataclasses

    ann = namespace.setdefault("__annotations__", {})
    for f in dataclasses.fields(CorrectConfig):
        if f.name in _CORRECT_FROM_IBPO:
            continue
        name, help = f"correct_{f.name}", f.metadata.get("help", "")
        if f.name in _CORRECT_FROM_TRL:
            ann[name] = f"{str(f.type).replace(' | None', '')} | None"
            namespace[name] = _ibpo(None, f"{help}. None = TRL's `{_CORRECT_FROM_TRL[f.name]}`")
        else:
            ann[name] = str(f.type)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            namespace[name] = _ibpo(default, help)


@dataclass
class IBPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus IBPO's fields (``ibpo_*``: the estimator; ``correct_*``: compare-and-correct).

    TRL's own fields keep their meaning; ``scale_rewards`` is used as the IBPO advantage's
    ``scale`` and ``temperature``/``top_p``/``max_completion_length`` are the repairs' defaults.
    """

    ibpo_lam: float = _ibpo(0.6, "IBPO shaping weight λ in R' = R + λ·φ (0 = no shaping)")
    ibpo_rho: float = _ibpo(0.5, "ρ in φ = ρ·1[a repair verified] (ibpo_phi='share': ρ·share of verified revisions) "
                                 "on failed trajectories")
    ibpo_phi: str = _ibpo("indicator", "φ rule: 'indicator' (published, ρ·1[a revision verified]) or 'share' "
                                       "(ρ·share of the revisions that verified; diluted with fewer good references "
                                       "than K)")
    ibpo_sign_rule: str = _ibpo(
        "safe", "a failed trajectory's sign: 'safe' (never positive on any token; a verified repair softens its "
        "penalty by at most λφ of GRPO's) or 'shaped' (GRPO on R' = R + λφ: can put positive credit on the tokens "
        "a repair replaced; the earlier rule, for ablation)")
    ibpo_anchors_only: bool = _ibpo(
        False, "IOP anchors: correct trajectories get zero advantage (references and baseline only). Here only the "
        "advantage is zeroed: TRL's loss still counts their tokens in its normaliser (ibpo_lab's trainer also "
        "drops them from the loss mask)")
    ibpo_token_mask: bool = _ibpo(
        True, "credit a repaired failed trajectory only on the tokens its repair edited (False = every token)"
    )
    ibpo_renormalize: bool = _ibpo(
        False, "scale edited-token credit by n_tokens/n_edited so a trajectory's total credit is unchanged"
    )
    ibpo_no_repair: str = _ibpo(
        "sequence", "failed trajectories without a successful repair: 'sequence' (credit on all tokens) or 'zero'"
    )
    ibpo_empty_edit: str = _ibpo(
        "sequence",
        "a successful repair that edited no trained token: 'error', 'sequence' or 'zero'. Default 'sequence' "
        "(not ibpo_lab's 'error'): TRL untrains whole completions (mask_truncated_completions), whose repairs "
        "then edit only untrained tokens; their credit is 0 either way",
    )
    ibpo_success_threshold: float = _ibpo(0.5, "a trajectory counts as failed when its reward is below this")
    ibpo_eps: float = _ibpo(1e-4, "added to the group std when scaling (TRL's GRPO uses 1e-4; ibpo_lab's default is 1e-6)")
    ibpo_repair_loss_weight: float = _ibpo(
        0.0, "λ_rep of IOP's joint repair objective J_rep (the policy's revisions trained under their repair prompt; "
             "TrainConfig.repair_loss_weight); 0 = off. Policy operator only"
    )
    ibpo_repair_advantage: str = _ibpo(
        "selected", "J_rep's advantage of a revision: 'selected' (+1 on the selected repair) or 'group' (1[accepted] "
                    "minus its failure's mean); TrainConfig.repair_advantage"
    )
    ibpo_bilateral: bool = _ibpo(
        False, "IOP bilateral mode: also train the verified repairs under the SOLVE prompt on their inserted tokens, "
               "with the truncated importance weight min(π_old/μ, ibpo_is_cap)"
    )
    ibpo_is_cap: float = _ibpo(2.0, "truncation of the bilateral importance weight")
    # correct_<name>: one field per CorrectConfig field, with its help text (a new CorrectConfig field
    # appears here by itself); temperature/top_p/max_new_tokens default to TRL's own settings, ρ is ibpo_rho
    _add_correct_fields(locals())
    correct_max_batch_size: int = _ibpo(
        64, "at most this many repair trajectories decode together (ibpo_lab's hf sampler, per process)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ibpo_no_repair not in ("sequence", "zero"):
            raise ValueError(f"ibpo_no_repair must be 'sequence' or 'zero', got {self.ibpo_no_repair!r}")
        if self.ibpo_empty_edit not in ("error", "sequence", "zero"):
            raise ValueError(f"ibpo_empty_edit must be 'error', 'sequence' or 'zero', got {self.ibpo_empty_edit!r}")
        if self.ibpo_phi not in PHI_MODES:
            raise ValueError(f"ibpo_phi must be one of {', '.join(map(repr, PHI_MODES))}, got {self.ibpo_phi!r}")
        if self.ibpo_sign_rule not in SIGN_RULES:
            raise ValueError(f"ibpo_sign_rule must be one of {', '.join(map(repr, SIGN_RULES))}, "
                             f"got {self.ibpo_sign_rule!r}")
        if not isinstance(self.ibpo_anchors_only, bool):
            raise ValueError(f"ibpo_anchors_only must be a bool, got {self.ibpo_anchors_only!r}")
        if self.ibpo_repair_advantage not in ("group", "selected"):
            raise ValueError(f"ibpo_repair_advantage must be 'group' or 'selected', got {self.ibpo_repair_advantage!r}")
        if not self.ibpo_is_cap > 0:
            raise ValueError(f"ibpo_is_cap must be > 0, got {self.ibpo_is_cap!r}")
        for name in ("ibpo_lam", "ibpo_rho", "ibpo_eps", "ibpo_repair_loss_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "multi_objective_aggregation must be 'sum_then_normalize' for IBPO (φ shapes the summed reward), "
                f"got {self.multi_objective_aggregation!r}"
            )
        if self.correct_operator != "oracle" and self.correct_num_references > self.num_generations - 1:
            raise ValueError(
                f"correct_num_references={self.correct_num_references} but a group has num_generations="
                f"{self.num_generations} trajectories (at most {self.num_generations - 1} siblings)"
            )
        trl_scale(self.scale_rewards)
        self.correct_config()  # validates the correct_* fields with CorrectConfig's own checks

    def correct_config(self) -> CorrectConfig:
        """The :class:`~ibpo_lab.correct.CorrectConfig` these fields describe (its own checks, errors
        naming the ``correct_*`` field)."""
        import dataclasses

        kw = {}
        for f in dataclasses.fields(CorrectConfig):
            if f.name in _CORRECT_FROM_IBPO:
                kw[f.name] = getattr(self, _CORRECT_FROM_IBPO[f.name])
                continue
            v = getattr(self, f"correct_{f.name}")
            kw[f.name] = getattr(self, _CORRECT_FROM_TRL[f.name]) if v is None and f.name in _CORRECT_FROM_TRL else v
        try:
            return CorrectConfig(**kw)
        except ValueError as e:
            raise ValueError(f"correct_{e}") from None

    def estimator_params(self) -> dict[str, Any]:
        """Keyword arguments of ``get_estimator("ibpo")`` these fields describe."""
        return dict(
            lam=self.ibpo_lam,
            rho=self.ibpo_rho,
            eps=self.ibpo_eps,
            scale=trl_scale(self.scale_rewards),
            std="unbiased",  # TRL's nanstd is the unbiased one
            success_threshold=self.ibpo_success_threshold,
            token_mask=self.ibpo_token_mask,
            renormalize=self.ibpo_renormalize,
            no_repair=self.ibpo_no_repair,
            empty_edit=self.ibpo_empty_edit,
            phi=self.ibpo_phi,
            sign_rule=self.ibpo_sign_rule,
            anchors_only=self.ibpo_anchors_only,
        )



# --------------------------------------------------------------------------- trainer
@dataclass
class IBPOStep:
    """What the last IBPO generation step computed (for tests, notebooks and debugging).

    batch          the whole (all processes) rollout with ``repair_success`` and ``edit_masks``
    advantages     [B, T] ibpo advantages of ``batch`` (before the process slice)
    trl_advantages [B_local] what TRL's GRPO would have used on this process
    corrections    this process's CorrectionResult (None if it owned no group)
    process_slice  rows of ``batch`` this process trains on
    """

    batch: RolloutBatch
    advantages: Tensor
    trl_advantages: Tensor
    corrections: CorrectionResult | None
    process_slice: slice


class IBPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with IBPO's compare-and-correct and [B, T] advantages.

    ``task``: the ibpo_lab Task whose ``reward`` verifies repairs (and, by default, scores
    completions: ``reward_funcs=None`` -> ``[task_reward_func(task, examples)]``).
    ``examples``: the Examples the dataset's ``example_id`` column refers to (default
    ``task.examples("train")``). ``correct_sampler``: an object with ibpo_lab's sampler interface
    used for the repairs; default ibpo_lab's ``hf`` sampler over the trainer's unwrapped model
    (entered with TRL's ``unwrap_model_for_generation``, so ZeRO-3 parameters are gathered).
    Other arguments are ``GRPOTrainer``'s.
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: IBPOConfig | None = None,
        train_dataset: Any = None,
        *,
        task: Any,
        examples: Sequence[Any] | Mapping[str, Any] | None = None,
        correct_sampler: Any = None,
        **kwargs: Any,
    ):
        if args is None or not isinstance(args, IBPOConfig):
            raise ValueError(f"args must be an IBPOConfig, got {type(args).__name__}")
        for unsupported in ("tools", "environment_factory"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"IBPOTrainer does not support {unsupported} (repairs are plain-text rewrites)")
        if task is None:
            raise ValueError("task is required: its reward verifies the repairs")
        self.ibpo_task = task
        self.ibpo_examples = examples_by_id(task.examples("train") if examples is None else examples)
        if reward_funcs is None:
            reward_funcs = [TaskReward(task, self.ibpo_examples)]
        self.correct_sampler = correct_sampler
        self.last_ibpo: IBPOStep | None = None
        self._ibpo_captured: dict[str, Any] = {}
        #: the repair objectives of the current generation batch (name -> train.RepairObjective)
        self.ibpo_repair_objectives: dict[str, Any] = {}
        self._ibpo_loss_calls = 0
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset, **kwargs)

    # -- capture what TRL sampled and scored (the two hooks TRL's loop goes through) -------------
    def _generate(self, prompts: list):
        out = super()._generate(prompts)
        prompt_ids, completion_ids, tool_mask = out[0], out[1], out[2]
        self._ibpo_captured.update(
            prompt_ids=[list(map(int, p)) for p in prompt_ids],
            completion_ids=[list(map(int, c)) for c in completion_ids],
            tool_mask=None if tool_mask is None else [list(map(int, m)) for m in tool_mask],
        )
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._ibpo_captured["rewards_per_func"] = rewards_per_func  # already gathered over processes
        return rewards_per_func

    # -- the IBPO step -------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        self._ibpo_captured = {}
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training:  # evaluation: TRL's advantages (they only feed the eval loss)
            return output
        prompts = [x["prompt"] for x in inputs]
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("IBPOTrainer needs plain-text prompts (build the dataset with task_dataset)")
        if any(EXAMPLE_ID_COLUMN not in x for x in inputs):
            raise ValueError(f"the dataset has no {EXAMPLE_ID_COLUMN!r} column: build it with task_dataset")
        batch, slc = self._rollout_batch(inputs, output)
        batch, corrections = self._correct(batch)
        adv = get_estimator("ibpo")(batch, **self.args.estimator_params())
        local = adv[slc]
        T = output["completion_ids"].shape[1]
        if local.shape[1] > T:
            if local[:, T:].abs().sum() > 0:  # cannot happen: local rows are at most T long
                raise RuntimeError("IBPO advantages beyond the local completion width")
            local = local[:, :T]
        elif local.shape[1] < T:
            local = torch.nn.functional.pad(local, (0, T - local.shape[1]))
        trl_adv = output["advantages"]
        output["advantages"] = local.to(device=trl_adv.device, dtype=torch.float32)
        self.last_ibpo = IBPOStep(
            batch=batch, advantages=adv, trl_advantages=trl_adv.detach().cpu(), corrections=corrections, process_slice=slc
        )
        self._log_ibpo(batch, adv)
        self.ibpo_repair_objectives = self._repair_objectives(corrections)
        self._ibpo_loss_calls = 0
        return output

    # -- training the repairs: J_rep and bilateral ----------------------------------------------
    def _repair_objectives(self, result: CorrectionResult | None) -> dict[str, Any]:
        """``{"repair": J_rep rows, "bilateral": repaired rows}`` of this process's corrections (absent: nothing to train)."""
        from types import SimpleNamespace

        from ibpo_lab.advantages import ibpo_repair_advantages
        from ibpo_lab.losses import truncated_is_weights
        from ibpo_lab.models import response_logprobs
        from ibpo_lab.train import RepairObjective, repair_objective_batch

        out: dict[str, Any] = {}
        if result is None:
            return out
        a = self.args
        if self.accelerator.num_processes > 1 and (a.ibpo_repair_loss_weight > 0 or a.ibpo_bilateral):
            # an extra forward on only the processes that own repairs desynchronises DDP's collectives (measured: a
            # 2-process run hangs); until the rows are balanced over processes, repairs train single-process only
            import warnings

            warnings.warn("IBPOTrainer: J_rep and bilateral repair training run single-process only; with "
                          f"{self.accelerator.num_processes} processes the repairs are not trained", stacklevel=2)
            return out
        device = self.accelerator.device
        # the revisions were just sampled by this very model: μ is π_old (no recomputation, weight 1)
        cfg = SimpleNamespace(repair_loss_weight=a.ibpo_repair_loss_weight, repair_advantage=a.ibpo_repair_advantage,
                              recompute_logprobs=False, is_cap=a.ibpo_is_cap)
        rep = repair_objective_batch(None, result.revisions, cfg, device)
        if rep is not None:
            out["repair"] = rep
        repaired = result.repaired
        if a.ibpo_bilateral and repaired is not None and len(repaired) > 0:
            trained = repaired.replace(response_masks=[np.asarray(m, dtype=bool) for m in repaired.edit_masks])
            padded = trained.padded()
            with torch.no_grad(), self._repair_model() as model:
                old = response_logprobs(model, padded.to(device), temperature=a.temperature)[0].float().cpu()
            mask = padded.response_mask.float()
            w = truncated_is_weights(padded.old_logprobs.float(), old, cap=a.ibpo_is_cap) if repaired.logprobs is not None \
                else torch.ones_like(old)
            params = self.args.estimator_params()
            rkw = {k: params[k] for k in ("lam", "rho", "eps", "scale", "std", "success_threshold")}
            adv = ibpo_repair_advantages(repaired, result.batch, repaired.meta["source_traj"], **rkw)
            adv = torch.nn.functional.pad(adv, (0, old.shape[1] - adv.shape[1])) * mask
            out["bilateral"] = RepairObjective(padded=padded, old=old, adv=adv, is_weights=w * mask, weight=1.0)
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's GRPO loss plus this micro-step's share of the repair objectives (weight·loss each)."""
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self.model.training or not self.ibpo_repair_objectives:
            return loss
        from ibpo_lab.losses import get_loss
        from ibpo_lab.models import response_logprobs
        from ibpo_lab.train import _select_padded

        steps = max(1, int(self.args.steps_per_generation or 1))
        k = self._ibpo_loss_calls % steps
        self._ibpo_loss_calls += 1
        device = loss.device
        for name, obj in self.ibpo_repair_objectives.items():
            idx = torch.tensor_split(torch.arange(len(obj.adv)), steps)[k]
            if len(idx) == 0:
                continue
            sub = _select_padded(obj.padded, idx).to(device)
            lp, _ = response_logprobs(model, sub, temperature=self.args.temperature)
            term, _ = get_loss("ppo")(lp, obj.old[idx].to(device), obj.adv[idx].to(device),
                                      sub.response_mask.float(), clip_low=self.epsilon_low,
                                      clip_high=self.epsilon_high, agg="token-mean",
                                      is_weights=obj.is_weights[idx].to(device))
            loss = loss + obj.weight * term
            self._metrics["train"][f"ibpo/loss_{name}"].append(float(term.detach()))
            self._metrics["train"][f"ibpo/{name}_weight"].append(float(obj.weight))
        return loss

    def _rollout_batch(self, inputs, output) -> tuple[RolloutBatch, slice]:
        """The whole generation batch (all processes) as a RolloutBatch, and this process's rows."""
        from accelerate.utils import gather_object

        cap = self._ibpo_captured
        if "completion_ids" not in cap or "rewards_per_func" not in cap:
            raise RuntimeError("IBPOTrainer: TRL's _generate/_calculate_rewards hooks did not run")
        n_local = len(inputs)
        loss_mask = output["completion_mask"]
        if "tool_mask" in output:
            loss_mask = loss_mask * output["tool_mask"]
        loss_mask = loss_mask.detach().cpu().bool()
        local_masks = [loss_mask[i, : len(c)].numpy().tolist() for i, c in enumerate(cap["completion_ids"])]
        prompt_ids = gather_object(cap["prompt_ids"])
        completion_ids = gather_object(cap["completion_ids"])
        masks = gather_object(local_masks)
        ids = gather_object([str(x[EXAMPLE_ID_COLUMN]) for x in inputs])
        prompts = gather_object([x["prompt"] for x in inputs])
        rpf = cap["rewards_per_func"].detach().cpu()
        weights = self.reward_weights.detach().cpu()
        rewards = (rpf * weights[None, :]).nansum(dim=1)  # TRL's sum_then_normalize reward
        unscorable = torch.isnan(rpf).all(dim=1)
        if unscorable.any():
            bad = torch.nonzero(unscorable).flatten().tolist()[:5]
            raise ValueError(f"every reward function returned None for trajectories {bad}; IBPO needs a reward for each")
        B, G = len(completion_ids), self.num_generations
        if rewards.numel() != B or B % G:
            raise RuntimeError(f"gathered {B} completions and {rewards.numel()} rewards for groups of {G}")
        group_ids = torch.arange(B) // G  # TRL's layout: rewards.view(-1, num_generations)
        for g in range(B // G):
            if len(set(ids[g * G : (g + 1) * G])) != 1:
                raise RuntimeError(f"group {g} mixes example ids {sorted(set(ids[g * G:(g + 1) * G]))}")
        tok = self.processing_class
        batch = RolloutBatch(
            prompt_ids=prompt_ids,
            response_ids=completion_ids,
            rewards=rewards,
            group_ids=group_ids,
            response_masks=[np.asarray(m, dtype=bool) for m in masks],
            prompts=prompts,
            responses=tok.batch_decode(completion_ids, skip_special_tokens=True),
            meta={EXAMPLE_ID_COLUMN: ids},
            pad_id=int(tok.pad_token_id),
        )
        p = self.accelerator.process_index
        return batch, slice(p * n_local, (p + 1) * n_local)

    def _correct(self, batch: RolloutBatch) -> tuple[RolloutBatch, CorrectionResult | None]:
        """Compare-and-correct the groups this process owns; gather everyone's repair info."""
        from accelerate.utils import gather_object

        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        own = owned_rows(batch.group_ids, world, rank)
        examples = [self._example(k) for k in batch.meta[EXAMPLE_ID_COLUMN]]
        seed = _step_seed(self.args.seed, self.state.global_step, rank)
        result = None
        # every process enters the context (a ZeRO-3 gather is collective), repairing or not
        with self._repair_model() as model:
            if own:
                sampler = self.correct_sampler or self._default_sampler(model)
                result = compare_and_correct(
                    batch.select(own), [examples[i] for i in own], self.ibpo_task, sampler,
                    self.args.correct_config(), tokenizer=self.processing_class, seed=seed,
                )
        return merge_repair_info(batch, gather_object(repair_records(own, result))), result

    def _repair_model(self):
        from trl.models import unwrap_model_for_generation

        return unwrap_model_for_generation(
            self.model_wrapped,
            self.accelerator,
            gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        )

    def _default_sampler(self, model):
        from ibpo_lab.models import Policy
        from ibpo_lab.sampling import get_sampler

        policy = Policy(model=model, tokenizer=self.processing_class, name="trl policy")
        return get_sampler("hf", policy, max_batch_size=self.args.correct_max_batch_size)

    def _example(self, key: str) -> Any:
        if key not in self.ibpo_examples:
            raise ValueError(
                f"example id {key!r} from the dataset is not among the trainer's {len(self.ibpo_examples)} examples "
                "(pass examples= the list the dataset was built from)"
            )
        return self.ibpo_examples[key]

    def _log_ibpo(self, batch: RolloutBatch, adv: Tensor) -> None:
        """ibpo/* metrics next to TRL's (a quantity with nothing to average over is not logged)."""
        failed = batch.rewards < self.args.ibpo_success_threshold
        share = batch.repair_success[failed]
        repaired = torch.nonzero(failed & (batch.repair_success > 0)).flatten().tolist()
        mask = batch.response_mask
        values = {
            "ibpo/failed_frac": float(failed.float().mean()),
            "ibpo/credited_token_frac": float(((adv != 0) & (mask > 0)).sum() / mask.sum().clamp(min=1)),
        }
        if share.numel():
            values["ibpo/repair_rate"] = float((share > 0).float().mean())
            values["ibpo/repair_success_mean"] = float(share.mean())
        if repaired:
            values["ibpo/edited_tokens_mean"] = float(np.mean([int(batch.edit_masks[i].sum()) for i in repaired]))
        for key, value in values.items():
            self._metrics["train"][key].append(value)


def owned_rows(group_ids: Tensor, world: int, rank: int) -> list[int]:
    """Rows whose group this process repairs: group g belongs to process g mod world.

    group_ids [B] -> sorted row indices. Whole groups stay together, so every failed
    trajectory sees all its siblings as references."""
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"need 0 <= rank < world, got rank={rank!r}, world={world!r}")
    return [i for i, g in enumerate(group_ids.tolist()) if g % world == rank]


def repair_records(rows: Sequence[int], result: CorrectionResult | None) -> list[tuple[int, float, list[bool]]]:
    """(row, repair_success, edit mask) per repaired row of ``result`` (rows = its batch's rows in the
    whole batch); picklable, for ``gather_object``."""
    if result is None:
        return []
    if len(rows) != len(result.batch):
        raise ValueError(f"{len(rows)} rows for a correction result of {len(result.batch)} trajectories")
    return [(int(i), float(result.batch.repair_success[k]), result.batch.edit_masks[k].tolist()) for k, i in enumerate(rows)]


def merge_repair_info(batch: RolloutBatch, records: Sequence[tuple[int, float, list[bool]]]) -> RolloutBatch:
    """``batch`` with repair_success [B] and edit_masks filled from every process's records
    (rows without a record: 0 and all-False, as compare-and-correct leaves an unrepaired row)."""
    repair_success = torch.zeros(len(batch))
    edit_masks = [np.zeros(len(r), dtype=bool) for r in batch.response_ids]
    seen: set[int] = set()
    for i, share, mask in records:
        if i in seen:
            raise ValueError(f"row {i} was repaired by two processes")
        seen.add(i)
        repair_success[i] = share
        edit_masks[i] = np.asarray(mask, dtype=bool)
    return batch.replace(repair_success=repair_success, edit_masks=edit_masks)


def _step_seed(seed: int, step: int, rank: int) -> int:
    """A repair seed per (run seed, optimiser step, process): reproducible, different per process."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# --------------------------------------------------------------------------- CLI
#: top-level keys of a TRL recipe (everything under ``trainer:`` is an IBPOConfig field)
RECIPE_KEYS = ("model", "task", "task_kwargs", "split", "n_examples", "dtype", "trainer")


def _load_yaml(path: str) -> dict[str, Any]:
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"--config {path}: expected a mapping at the top level")
    unknown = set(cfg) - set(RECIPE_KEYS)
    if unknown:
        raise ValueError(f"--config {path}: unknown keys {sorted(unknown)}; allowed: {', '.join(RECIPE_KEYS)}")
    return cfg


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def build_trainer(cfg: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> IBPOTrainer:
    """An :class:`IBPOTrainer` from a recipe mapping: ``model`` (``load_policy`` name or path), ``task``,
    ``task_kwargs``, ``split``, ``n_examples``, ``dtype``, ``trainer`` (IBPOConfig fields)."""
    from ibpo_lab.models import load_policy
    from ibpo_lab.tasks import get_task

    if "model" not in cfg or "task" not in cfg:
        raise ValueError("the config needs 'model' (a load_policy name or path) and 'task' (a task name)")
    trainer_kw = dict(cfg.get("trainer") or {})
    trainer_kw.update(overrides or {})
    args = IBPOConfig(**trainer_kw)
    task = get_task(cfg["task"], **(cfg.get("task_kwargs") or {}))
    exs = task.examples(cfg.get("split", "train"), cfg.get("n_examples"))
    policy = load_policy(cfg["model"], dtype=cfg.get("dtype", "float32"))
    return IBPOTrainer(
        model=policy.model,
        args=args,
        train_dataset=task_dataset(task, examples=exs),
        processing_class=policy.tokenizer,
        task=task,
        examples=exs,
    )


def trl_flag_overrides(args: Sequence[str]) -> dict[str, Any]:
    """TRL's own command-line flags (``--learning_rate 1e-6 --bf16 --lr_scheduler_type cosine
    --ibpo_lam 0.3 --correct_num_references 3``) as typed IBPOConfig overrides: parsed by
    ``transformers.HfArgumentParser(IBPOConfig)`` (the parser of ``trl`` scripts), so types, choices,
    bool flags (``--bf16``, ``--no_bf16``...) and errors are TRL's. Only the flags given are returned;
    recipe keys (``--model``, ``--task``, ``--n_examples``...) are returned as is, YAML-parsed."""
    from transformers import HfArgumentParser

    args = list(args)
    recipe: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):  # recipe keys first: they are not IBPOConfig fields
        key, eq, inline = args[i][2:].partition("=") if args[i].startswith("--") else ("", "", "")
        if key.replace("-", "_") in RECIPE_KEYS and key != "trainer":
            if eq:
                recipe[key.replace("-", "_")] = _parse_value(inline)
                i += 1
            elif i + 1 < len(args):
                recipe[key.replace("-", "_")] = _parse_value(args[i + 1])
                i += 2
            else:
                raise ValueError(f"--{key} needs a value")
            continue
        rest.append(args[i])
        i += 1
    parser = HfArgumentParser(IBPOConfig, allow_abbrev=False)
    for action in parser._actions:  # only the flags given come back (no defaults)
        if action.dest != "help":
            action.default = argparse.SUPPRESS
            action.required = False
    ns, unknown = parser.parse_known_args(rest)
    if unknown:
        raise ValueError(f"unknown arguments {unknown}: neither a recipe key ({', '.join(RECIPE_KEYS[:-1])}) "
                         "nor an IBPOConfig field (TRL's GRPOConfig + ibpo_* + correct_*)")
    return {**recipe, **vars(ns)}


def main(argv: Sequence[str] | None = None) -> IBPOTrainer:
    """``ibpo-trl --config RECIPE.yaml [--set key=value ...] [--learning_rate 1e-6 ...]`` (also
    ``python -m ibpo_lab.integrations.trl``, and under ``accelerate launch``). ``--set`` overrides a
    recipe key (model, task, split, n_examples, dtype) or else a ``trainer:`` field (values are YAML);
    any TRL/IBPOConfig flag (``--learning_rate 1e-6 --max_steps 10 --report_to tensorboard``) and
    ``--model``/``--task``... override the recipe too, after ``--set``."""
    parser = argparse.ArgumentParser(prog="ibpo-trl", description=main.__doc__, allow_abbrev=False,
                                     epilog="Every TRL GRPOConfig flag and IBPOConfig's ibpo_*/correct_* fields are "
                                            "accepted (see TRL's GRPOConfig documentation).")
    parser.add_argument("--config", required=True, help="recipe YAML (see ibpo_lab/integrations/recipes/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key or trainer field")
    ns, rest = parser.parse_known_args(argv)
    cfg = _load_yaml(ns.config)
    overrides: dict[str, Any] = {}
    for item in ns.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = (x.strip() for x in item.split("=", 1))
        if k in RECIPE_KEYS and k != "trainer":
            cfg[k] = _parse_value(v)
        else:
            overrides[k] = _parse_value(v)
    for k, v in trl_flag_overrides(rest).items():
        if k in RECIPE_KEYS:
            cfg[k] = v
        else:
            overrides[k] = v
    trainer = build_trainer(cfg, overrides)
    trainer.train()
    trainer.save_model()
    return trainer


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
