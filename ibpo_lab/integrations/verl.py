"""IBPO inside verl: an ``ibpo`` advantage estimator in verl's registry, and the hook that
attaches compare-and-correct's repair info (φ share, edit masks) to a verl batch.

Importing this module registers :func:`compute_ibpo_outcome_advantage` as ``ibpo`` in
``verl.trainer.ppo.core_algos``'s estimator registry when verl is importable (and is harmless
without verl: the functions work on plain tensors, which is how they are tested here).

How the pieces fit in verl's PPO loop (legacy ``RayPPOTrainer.fit``, ``trainer.use_v1=False``):

1. rollout + reward as usual (``token_level_scores`` [B, T], ``uid`` per prompt);
2. :func:`attach_repair_info` (driver side) rebuilds a RolloutBatch from ``prompts`` /
   ``responses`` / ``attention_mask``, runs ``ibpo_lab.correct.compare_and_correct`` with an
   ibpo_lab sampler, and writes ``non_tensor_batch["ibpo_repair_success"]`` (float32 [B]) and
   ``batch["ibpo_edit_mask"]`` (float32 [B, T], aligned with ``responses``);
3. ``compute_advantage(..., adv_estimator="ibpo")`` calls :func:`compute_ibpo_outcome_advantage`,
   which hands those tensors to ``ibpo_lab.advantages.get_estimator("ibpo")`` — the same
   estimator ibpo_lab's own trainer uses.

verl 0.9.1 passes ``non_tensor_batch`` and ``batch`` to an estimator only for GDPO, so step 3
needs the ONE-LINE change in ``verl/trainer/ppo/ray_trainer.py::compute_advantage``::

    -        if adv_estimator in (AdvantageEstimator.GDPO, "gdpo"):
    +        if adv_estimator in (AdvantageEstimator.GDPO, "gdpo", "ibpo"):

(without it the estimator raises a ValueError saying so, rather than silently running GRPO).
Step 2 is a call you add before ``compute_advantage`` in ``fit`` (see :data:`VERL_PATCH`).
For the v1 trainer (``trainer.use_v1=True``) also add ``"ibpo_edit_mask"`` to the ``fields``
list of ``RayPPOTrainer._compute_advantage`` (it reads only listed fields from the transfer queue).

Estimator settings come from ``algorithm.ibpo`` in verl's config (``+algorithm.ibpo.lam=0.6`` ...,
keys :data:`ESTIMATOR_KEYS`); ``algorithm.norm_adv_by_std_in_grpo`` picks the scale as for GRPO.
"""

from __future__ import annotations

import argparse
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ibpo_lab.advantages import get_estimator
from ibpo_lab.rollout import RolloutBatch

__all__ = [
    "ESTIMATOR_NAME",
    "REPAIR_SUCCESS_KEY",
    "EDIT_MASK_KEY",
    "ESTIMATOR_KEYS",
    "VERL_PATCH",
    "VERL_AVAILABLE",
    "compute_ibpo_outcome_advantage",
    "register",
    "group_ids_from_uids",
    "rollout_batch_from_verl",
    "attach_repair_info",
    "repair_metrics",
    "verl_rows",
    "write_verl_dataset",
    "compute_score",
]

ESTIMATOR_NAME = "ibpo"
#: non_tensor_batch key: share of successful repairs per trajectory, np.float32 [B]
REPAIR_SUCCESS_KEY = "ibpo_repair_success"
#: batch key: 1.0 on response tokens the best repair edited, float32 [B, T] aligned with ``responses``
EDIT_MASK_KEY = "ibpo_edit_mask"
#: ``get_estimator("ibpo")`` keywords that verl's own config decides (``norm_adv_by_std_in_grpo``, ``epsilon``)
_VERL_SET_KEYS = ("scale", "eps", "std")


def _estimator_keys() -> tuple[str, ...]:
    import inspect

    sig = inspect.signature(get_estimator(ESTIMATOR_NAME))
    return tuple(
        name for name, par in sig.parameters.items() if par.kind is par.KEYWORD_ONLY and name not in _VERL_SET_KEYS
    )


#: ``algorithm.ibpo`` keys passed on to ``get_estimator("ibpo")`` (see its docstring): every keyword of the
#: estimator except those verl's config sets, read from its signature so a new estimator option is a key here
#: too (``lam``, ``rho``, ``phi``, ``sign_rule``, ``anchors_only``, ``token_mask``, ``no_repair``, ...). The defaults
#: are the estimator's: sign-safe credit (a failed trajectory never gets positive credit) and φ = ρ·1[repaired]
ESTIMATOR_KEYS = _estimator_keys()

VERL_PATCH = '''\
# verl/trainer/ppo/ray_trainer.py (verl 0.9.1), legacy trainer (trainer.use_v1=False)
# (1) compute_advantage(): pass the batch to the ibpo estimator too  <- the one-line change
        if adv_estimator in (AdvantageEstimator.GDPO, "gdpo", "ibpo"):
# (2) RayPPOTrainer.fit(), just before `batch = compute_advantage(batch, ...)`. IBPO_TASK = the
#     ibpo_lab task (get_task("gsm8k")), IBPO_CORRECT_CFG = ibpo_lab.correct.CorrectConfig(...),
#     IBPO_SAMPLER = an object with ibpo_lab's sampler interface (.sample(prompts, n, max_new_tokens,
#     temperature, top_p, stop, seed) -> RolloutBatch) that can reach the current policy. ibpo_lab
#     does not ship one over verl's rollout replicas (they are asleep at this point): untested ground.
                        if self.config.algorithm.adv_estimator == "ibpo":
                            from ibpo_lab.integrations import verl as ibpo_verl
                            result = ibpo_verl.attach_repair_info(batch, IBPO_TASK, IBPO_SAMPLER, IBPO_CORRECT_CFG,
                                                                  tokenizer=self.tokenizer, seed=self.global_steps)
                            metrics.update(ibpo_verl.repair_metrics(result))
'''


# --------------------------------------------------------------------------- the estimator
def _config_get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    getter = getattr(config, "get", None)
    if callable(getter):  # dict, OmegaConf DictConfig and verl's BaseConfig all have .get
        return getter(key, default)
    return getattr(config, key, default)


def _estimator_params(config: Any, norm_adv_by_std_in_grpo: bool, epsilon: float) -> dict[str, Any]:
    raw = _config_get(config, "ibpo", None) or {}
    params = {str(k): v for k, v in dict(raw).items()}
    unknown = sorted(set(params) - set(ESTIMATOR_KEYS))
    if unknown:
        raise ValueError(f"algorithm.ibpo has unknown keys {unknown}; allowed: {', '.join(ESTIMATOR_KEYS)}")
    norm = _config_get(config, "norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
    params.update(scale="group" if norm else "none", eps=float(epsilon), std="unbiased")  # verl: torch.std (ddof=1)
    return params


def group_ids_from_uids(index: Any) -> Tensor:
    """verl's ``index`` (``non_tensor_batch["uid"]``: one id per trajectory, equal within a
    prompt's group; strings, uuids or ints) -> int group ids [B], numbered by first appearance."""
    ids = np.asarray(index, dtype=object).reshape(-1)
    first: dict[Any, int] = {}
    return torch.tensor([first.setdefault(u, len(first)) for u in ids.tolist()], dtype=torch.long)


def _rows(mask: Tensor) -> list[np.ndarray]:
    return [row for row in mask.detach().cpu().numpy().astype(bool)]


def compute_ibpo_outcome_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: Any = None,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    config: Any = None,
    non_tensor_batch: Mapping[str, Any] | None = None,
    batch: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """verl advantage estimator ``ibpo`` (signature of verl's outcome estimators).

    token_level_rewards [B, T] (the terminal reward sits on the last response token; summed
    over T, as verl's GRPO does), response_mask [B, T], index [B] uids (group = prompt),
    non_tensor_batch[REPAIR_SUCCESS_KEY] [B], batch[EDIT_MASK_KEY] [B, T] (optional: without it
    every failed trajectory gets sequence-level credit)  ->  (advantages [B, T], returns [B, T]),
    both equal, 0 off ``response_mask`` — ``get_estimator("ibpo")`` on the same data.
    ``config.ibpo`` holds the estimator's keyword arguments (:data:`ESTIMATOR_KEYS`); without them
    the estimator's defaults apply, as in ibpo_lab's trainer — in particular ``sign_rule="safe"``
    (no positive credit on any token of a failed trajectory) and ``phi="indicator"``.
    """
    if token_level_rewards.dim() != 2 or tuple(response_mask.shape) != tuple(token_level_rewards.shape):
        raise ValueError(
            f"token_level_rewards and response_mask must both be [B, T]; got {tuple(token_level_rewards.shape)} "
            f"and {tuple(response_mask.shape)}"
        )
    if index is None:
        raise ValueError("index (non_tensor_batch['uid']) is required: IBPO centres rewards within each prompt's group")
    if non_tensor_batch is None or REPAIR_SUCCESS_KEY not in non_tensor_batch:
        raise ValueError(
            f"the ibpo estimator needs non_tensor_batch[{REPAIR_SUCCESS_KEY!r}] (from attach_repair_info). verl 0.9.1 "
            "passes non_tensor_batch/batch only to GDPO: in verl/trainer/ppo/ray_trainer.py::compute_advantage change "
            "`if adv_estimator in (AdvantageEstimator.GDPO, \"gdpo\"):` to "
            "`if adv_estimator in (AdvantageEstimator.GDPO, \"gdpo\", \"ibpo\"):` and call attach_repair_info before it"
        )
    B, T = token_level_rewards.shape
    group_ids = group_ids_from_uids(index)
    if group_ids.numel() != B:
        raise ValueError(f"index has {group_ids.numel()} uids but token_level_rewards has {B} rows")
    repair_success = torch.as_tensor(np.asarray(non_tensor_batch[REPAIR_SUCCESS_KEY], dtype=np.float32)).reshape(-1)
    edit = None
    if batch is not None and EDIT_MASK_KEY in batch:
        edit = torch.as_tensor(batch[EDIT_MASK_KEY])
        if tuple(edit.shape) != (B, T):
            raise ValueError(f"batch[{EDIT_MASK_KEY!r}] has shape {tuple(edit.shape)}, expected {(B, T)} like responses")
    mask = response_mask.detach().cpu()
    rollout = RolloutBatch(
        prompt_ids=[[] for _ in range(B)],  # the estimator reads neither prompt nor response ids
        response_ids=[np.zeros(T, dtype=np.int64)] * B,
        rewards=token_level_rewards.detach().cpu().float().sum(dim=-1),
        group_ids=group_ids,
        response_masks=_rows(mask),
        repair_success=repair_success,
        edit_masks=None if edit is None else _rows(edit),
    )
    adv = get_estimator(ESTIMATOR_NAME)(rollout, **_estimator_params(config, norm_adv_by_std_in_grpo, epsilon))
    adv = adv.to(device=token_level_rewards.device, dtype=token_level_rewards.dtype)
    return adv, adv


def register(core_algos: Any = None) -> bool:
    """Register ``ibpo`` in verl's estimator registry (``core_algos`` defaults to
    ``verl.trainer.ppo.core_algos``). -> False when verl is not importable."""
    if core_algos is None:
        try:
            from verl.trainer.ppo import core_algos
        except ImportError:
            return False
    registry = getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", {})
    if registry.get(ESTIMATOR_NAME) is not compute_ibpo_outcome_advantage:
        core_algos.register_adv_est(ESTIMATOR_NAME)(compute_ibpo_outcome_advantage)
    return True


#: True when importing this module registered ``ibpo`` in an installed verl
VERL_AVAILABLE: bool = register()


# --------------------------------------------------------------------------- the hook
def rollout_batch_from_verl(data: Any, tokenizer: Any = None) -> RolloutBatch:
    """A verl ``DataProto`` (anything with ``.batch`` and ``.non_tensor_batch`` mappings) -> RolloutBatch.

    Reads batch["prompts"] [B, P] (left-padded), batch["responses"] [B, T] (right-padded),
    batch["attention_mask"] [B, P+T], batch["token_level_scores"] [B, T] (rewards = row sums),
    non_tensor_batch["uid"] [B]; optional batch["response_mask"] [B, T] (trained tokens).
    """
    b, nb = data.batch, data.non_tensor_batch
    for key in ("prompts", "responses", "attention_mask", "token_level_scores"):
        if key not in b:
            raise ValueError(f"data.batch has no {key!r}: call attach_repair_info after the reward step")
    if "uid" not in nb:
        raise ValueError("data.non_tensor_batch has no 'uid' (verl's group id)")
    prompts, responses, attn = (b[k].detach().cpu() for k in ("prompts", "responses", "attention_mask"))
    P, T = prompts.shape[1], responses.shape[1]
    if attn.shape[1] != P + T:
        raise ValueError(f"attention_mask has {attn.shape[1]} columns, expected prompts + responses = {P + T}")
    p_mask, r_mask = attn[:, :P].bool(), attn[:, P:].bool()
    trained = b["response_mask"].detach().cpu().bool() if "response_mask" in b else r_mask
    lengths = r_mask.sum(dim=1).tolist()
    for i, n in enumerate(lengths):
        if n and not bool(r_mask[i, :n].all()):
            raise ValueError(f"responses[{i}] is not right-padded (attention_mask has holes)")
    response_ids = [responses[i, :n].tolist() for i, n in enumerate(lengths)]
    pad = 0 if tokenizer is None or tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
    return RolloutBatch(
        prompt_ids=[prompts[i][p_mask[i]].tolist() for i in range(len(lengths))],
        response_ids=response_ids,
        rewards=b["token_level_scores"].detach().cpu().float().sum(dim=-1),
        group_ids=group_ids_from_uids(nb["uid"]),
        response_masks=[trained[i, :n].numpy() for i, n in enumerate(lengths)],
        responses=None if tokenizer is None else [tokenizer.decode(r, skip_special_tokens=True) for r in response_ids],
        pad_id=pad,
    )


def _example_ids(data: Any) -> list[str]:
    extra = data.non_tensor_batch.get("extra_info")
    if extra is None:
        raise ValueError("data.non_tensor_batch has no 'extra_info' (build the parquet files with write_verl_dataset)")
    out = []
    for i, info in enumerate(extra):
        if not isinstance(info, Mapping) or "example_id" not in info:
            raise ValueError(f"extra_info[{i}] has no 'example_id' (build the parquet files with write_verl_dataset)")
        out.append(str(info["example_id"]))
    return out


def attach_repair_info(
    data: Any,
    task: Any,
    sampler: Any,
    cfg: Any = None,
    *,
    examples: Sequence[Any] | Mapping[str, Any] | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
):
    """Run compare-and-correct on a verl batch and attach the repair info the estimator reads.

    data: verl DataProto after the reward step (see :func:`rollout_batch_from_verl`), with
    ``extra_info["example_id"]`` per row (:func:`write_verl_dataset`); task: the ibpo_lab Task;
    sampler: any ibpo_lab sampler (``.sample(prompts, n, ...) -> RolloutBatch``); cfg: CorrectConfig;
    examples: the Examples the ids refer to (default: the task's train and test splits).
    Writes ``data.non_tensor_batch[REPAIR_SUCCESS_KEY]`` (float32 [B]) and ``data.batch[EDIT_MASK_KEY]``
    (float32 [B, T]) in place. -> the CorrectionResult (table, stats, repaired trajectories).
    """
    from ibpo_lab.correct import compare_and_correct

    rollout = rollout_batch_from_verl(data, tokenizer)
    lookup = _lookup(task, examples)
    keys = _example_ids(data)
    missing = sorted({k for k in keys if k not in lookup})
    if missing:
        raise ValueError(f"example ids {missing[:5]} are not among the task's examples (pass examples=)")
    result = compare_and_correct(rollout, [lookup[k] for k in keys], task, sampler, cfg, tokenizer=tokenizer, seed=seed)
    responses = data.batch["responses"]
    B, T = responses.shape
    edit = torch.zeros((B, T), dtype=torch.float32)
    for i, m in enumerate(result.batch.edit_masks):
        edit[i, : len(m)] = torch.as_tensor(m, dtype=torch.float32)
    data.non_tensor_batch[REPAIR_SUCCESS_KEY] = result.batch.repair_success.numpy().astype(np.float32)
    data.batch[EDIT_MASK_KEY] = edit.to(responses.device)
    return result


def _lookup(task: Any, examples: Sequence[Any] | Mapping[str, Any] | None) -> dict[str, Any]:
    if isinstance(examples, Mapping):
        return {str(k): v for k, v in examples.items()}
    if examples is None:
        examples = [ex for split in ("train", "test") for ex in task.examples(split)]
    return {str(ex.id): ex for ex in examples}


def repair_metrics(result: Any) -> dict[str, float]:
    """CorrectionResult.stats as verl metrics (``ibpo/<name>``)."""
    return {f"ibpo/{k}": float(v) for k, v in result.stats.items()}


# --------------------------------------------------------------------------- data and reward
def verl_rows(task: Any, split: str = "train", n: int | None = None) -> list[dict[str, Any]]:
    """Rows in verl's RL dataset layout for ``task``: data_source ``ibpo_lab/<task>``, prompt as one
    user message holding the task's solve prompt, reward_model.ground_truth = the gold answer,
    extra_info = {split, index, example_id}."""
    rows = []
    for i, ex in enumerate(task.examples(split, n)):
        rows.append(
            {
                "data_source": f"ibpo_lab/{task.name}",
                "prompt": [{"role": "user", "content": task.solve_prompt(ex)}],
                "ability": "reasoning",
                "reward_model": {"style": "rule", "ground_truth": str(ex.answer)},
                "extra_info": {"split": split, "index": i, "example_id": str(ex.id)},
            }
        )
    if not rows:
        raise ValueError(f"task {task.name!r} has no {split!r} examples")
    return rows


def write_verl_dataset(task: Any, out_dir: str | Path, splits: Sequence[str] = ("train", "test"), n: int | None = None) -> list[Path]:
    """Write ``<out_dir>/<split>.parquet`` for verl's ``data.train_files`` / ``data.val_files``."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in splits:
        path = out / f"{split}.parquet"
        pd.DataFrame(verl_rows(task, split, n)).to_parquet(path)
        paths.append(path)
    return paths


@lru_cache(maxsize=8)
def _task_and_examples(name: str) -> tuple[Any, dict[str, Any]]:
    from ibpo_lab.tasks import get_task

    task = get_task(name)
    return task, _lookup(task, None)


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None, **kwargs) -> float:
    """verl ``custom_reward_function`` (``custom_reward_function.name=compute_score``): the task's
    own 0/1 reward for rows written by :func:`write_verl_dataset` (task name from ``data_source``)."""
    prefix = "ibpo_lab/"
    if not str(data_source).startswith(prefix):
        raise ValueError(f"data_source {data_source!r} was not written by ibpo_lab (expected 'ibpo_lab/<task>')")
    task, lookup = _task_and_examples(str(data_source)[len(prefix):])
    key = None if extra_info is None else extra_info.get("example_id")
    if key is None or str(key) not in lookup:
        raise ValueError(f"extra_info.example_id {key!r} is not an example of task {task.name!r}")
    return float(task.reward(lookup[str(key)], solution_str))


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> list[Path]:
    """``python -m ibpo_lab.integrations.verl prepare --task gsm8k --out ~/data/ibpo_gsm8k``."""
    from ibpo_lab.tasks import get_task

    parser = argparse.ArgumentParser(prog="python -m ibpo_lab.integrations.verl")
    sub = parser.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="write train/test parquet files in verl's RL dataset layout")
    prep.add_argument("--task", required=True, help="ibpo_lab task name (synthetic, gsm8k, math, ...)")
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--n", type=int, default=None, help="first n examples of each split")
    sub.add_parser("patch", help="print the verl patch (estimator arguments + repair hook)")
    ns = parser.parse_args(argv)
    if ns.cmd == "patch":
        print(VERL_PATCH)
        return []
    paths = write_verl_dataset(get_task(ns.task), ns.out, n=ns.n)
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
