"""The rollout batch: the one data type that flows through the whole IBPO pipeline.

Per trajectory it holds prompt and response token ids, behaviour log-probs, the terminal
reward, the group id (trajectories sampled for the same prompt share it), step spans, and —
once compare-and-correct has run — the repair share and the edit mask. Storage is ragged
(python lists / numpy arrays, one entry per trajectory); padded tensor views are built on
demand with :meth:`RolloutBatch.padded`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

Span = tuple[int, int]

__all__ = ["RolloutBatch", "PaddedBatch", "Span", "concat_batches"]


def _as_int_list(x: Any, name: str, i: int) -> list[int]:
    if isinstance(x, Tensor):
        x = x.tolist()
    elif isinstance(x, np.ndarray):
        x = x.tolist()
    try:
        out = [int(t) for t in x]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}[{i}] must be a sequence of token ids, got {type(x).__name__}") from e
    return out


@dataclass
class PaddedBatch:
    """Padded tensor view of a :class:`RolloutBatch`.

    input_ids       [B, P+T]  left-padded prompt followed by right-padded response
    attention_mask  [B, P+T]  1 on real tokens
    response_ids    [B, T]    right-padded response
    response_mask   [B, T]    1 on response tokens that count (``RolloutBatch.response_mask``)
    old_logprobs    [B, T]    behaviour log-probs (0 where unknown or padded)
    rewards         [B]       terminal rewards
    group_ids       [B]       group index of each trajectory
    prompt_len      int       P; response token t sits at input position P + t
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    old_logprobs: Tensor
    rewards: Tensor
    group_ids: Tensor
    prompt_len: int

    def to(self, device: torch.device | str) -> "PaddedBatch":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return PaddedBatch(**{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in kw.items()})


@dataclass
class RolloutBatch:
    """A batch of sampled trajectories, B of them, ragged.

    prompt_ids      B lists of prompt token ids
    response_ids    B lists of response token ids (what the policy generated)
    rewards         [B] float terminal rewards (NaN is rejected)
    group_ids       [B] int; trajectories of one prompt share a group id
    logprobs        B lists of behaviour log-probs, one per response token (or None)
    response_masks  B boolean arrays, one per response token: True where the token is trained
                    (None = all True)
    step_spans      B lists of (start, end) token spans into the response (or None)
    prompts, responses  decoded text (optional, for display and rewards)
    repair_success  [B] share of successful repairs in [0, 1] (IBPO's φ/ρ; 0 on correct ones)
    edit_masks      B boolean arrays over response tokens: True where the repair edited the
                    token (IBPO's token credit); None until compare-and-correct ran
    step_values     B lists of Monte-Carlo values at step boundaries, len = n_steps + 1
                    (VinePPO); None unless computed
    meta            free per-trajectory columns, each a list of length B
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    rewards: Tensor
    group_ids: Tensor
    logprobs: list[list[float]] | None = None
    response_masks: list[np.ndarray] | None = None
    step_spans: list[list[Span]] | None = None
    prompts: list[str] | None = None
    responses: list[str] | None = None
    repair_success: Tensor | None = None
    edit_masks: list[np.ndarray] | None = None
    step_values: list[list[float]] | None = None
    meta: dict[str, list] = field(default_factory=dict)
    pad_id: int = 0

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        B = len(self.response_ids)
        if len(self.prompt_ids) != B:
            raise ValueError(f"prompt_ids has {len(self.prompt_ids)} entries but response_ids has {B}")
        self.prompt_ids = [_as_int_list(p, "prompt_ids", i) for i, p in enumerate(self.prompt_ids)]
        self.response_ids = [_as_int_list(r, "response_ids", i) for i, r in enumerate(self.response_ids)]
        self.rewards = torch.as_tensor(self.rewards, dtype=torch.float32).reshape(-1)
        if self.rewards.numel() != B:
            raise ValueError(f"rewards has {self.rewards.numel()} entries but the batch has {B} trajectories")
        if torch.isnan(self.rewards).any():
            bad = torch.nonzero(torch.isnan(self.rewards)).flatten().tolist()
            raise ValueError(f"rewards contains NaN at trajectories {bad}")
        self.group_ids = torch.as_tensor(self.group_ids, dtype=torch.long).reshape(-1)
        if self.group_ids.numel() != B:
            raise ValueError(f"group_ids has {self.group_ids.numel()} entries but the batch has {B} trajectories")
        lens = [len(r) for r in self.response_ids]
        if self.logprobs is not None:
            self.logprobs = [
                [float(v) for v in (lp.tolist() if isinstance(lp, (Tensor, np.ndarray)) else lp)]
                for lp in self._check_ragged("logprobs", self.logprobs, lens)
            ]
        if self.response_masks is not None:
            self.response_masks = [
                np.asarray(m, dtype=bool) for m in self._check_ragged("response_masks", self.response_masks, lens)
            ]
        if self.edit_masks is not None:
            self.edit_masks = [np.asarray(m, dtype=bool) for m in self._check_ragged("edit_masks", self.edit_masks, lens)]
        if self.step_spans is not None:
            self._check_len("step_spans", self.step_spans)
            spans = []
            for i, ss in enumerate(self.step_spans):
                cur = [(int(a), int(b)) for a, b in ss]
                for a, b in cur:
                    if not (0 <= a <= b <= lens[i]):
                        raise ValueError(f"step_spans[{i}] has span ({a}, {b}) outside the response of {lens[i]} tokens")
                spans.append(cur)
            self.step_spans = spans
        for name in ("prompts", "responses", "step_values"):
            if getattr(self, name) is not None:
                self._check_len(name, getattr(self, name))
        if self.repair_success is not None:
            self.repair_success = torch.as_tensor(self.repair_success, dtype=torch.float32).reshape(-1)
            if self.repair_success.numel() != B:
                raise ValueError(f"repair_success has {self.repair_success.numel()} entries but the batch has {B}")
            if torch.isnan(self.repair_success).any():
                raise ValueError("repair_success contains NaN")
        for k, v in self.meta.items():
            if len(v) != B:
                raise ValueError(f"meta[{k!r}] has {len(v)} entries but the batch has {B} trajectories")

    def _check_len(self, name: str, seq: Sequence) -> None:
        if len(seq) != len(self):
            raise ValueError(f"{name} has {len(seq)} entries but the batch has {len(self)} trajectories")

    def _check_ragged(self, name: str, seq: Sequence, lens: list[int]) -> Sequence:
        self._check_len(name, seq)
        for i, (x, n) in enumerate(zip(seq, lens)):
            if len(x) != n:
                raise ValueError(f"{name}[{i}] has {len(x)} values but response_ids[{i}] has {n} tokens")
        return seq

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def batch_size(self) -> int:
        return len(self)

    @property
    def max_response_len(self) -> int:
        return max((len(r) for r in self.response_ids), default=0)

    @property
    def response_lengths(self) -> Tensor:
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)

    def groups(self) -> dict[int, list[int]]:
        """group id -> indices of its members, in batch order."""
        out: dict[int, list[int]] = {}
        for i, g in enumerate(self.group_ids.tolist()):
            out.setdefault(g, []).append(i)
        return out

    def _pad(self, rows: Iterable[Sequence], value, dtype) -> Tensor:
        T = self.max_response_len
        out = torch.full((len(self), T), value, dtype=dtype)
        for i, r in enumerate(rows):
            if len(r):
                out[i, : len(r)] = torch.as_tensor(np.asarray(r), dtype=dtype)
        return out

    @property
    def response_mask(self) -> Tensor:
        """[B, T] float, 1 on response tokens that are trained (padding and masked tokens 0)."""
        if self.response_masks is None:
            return self._pad(([1.0] * len(r) for r in self.response_ids), 0.0, torch.float32)
        return self._pad((m.astype(np.float32) for m in self.response_masks), 0.0, torch.float32)

    @property
    def edit_mask(self) -> Tensor | None:
        """[B, T] float, 1 on tokens a repair edited; None if compare-and-correct has not run."""
        if self.edit_masks is None:
            return None
        return self._pad((m.astype(np.float32) for m in self.edit_masks), 0.0, torch.float32)

    @property
    def old_logprobs(self) -> Tensor:
        """[B, T] float behaviour log-probs (0 on padding; raises if none were recorded)."""
        if self.logprobs is None:
            raise ValueError("this batch has no behaviour logprobs (sample with a backend that records them)")
        return self._pad(self.logprobs, 0.0, torch.float32)

    def padded(self, pad_id: int | None = None) -> PaddedBatch:
        """Left-pad prompts, right-pad responses: the layout a causal LM forward pass wants."""
        pad = self.pad_id if pad_id is None else pad_id
        B, T = len(self), self.max_response_len
        P = max((len(p) for p in self.prompt_ids), default=0)
        input_ids = torch.full((B, P + T), pad, dtype=torch.long)
        attn = torch.zeros((B, P + T), dtype=torch.long)
        for i, (p, r) in enumerate(zip(self.prompt_ids, self.response_ids)):
            if p:
                input_ids[i, P - len(p) : P] = torch.tensor(p)
                attn[i, P - len(p) : P] = 1
            if r:
                input_ids[i, P : P + len(r)] = torch.tensor(r)
                attn[i, P : P + len(r)] = 1
        old = self.old_logprobs if self.logprobs is not None else torch.zeros((B, T))
        return PaddedBatch(
            input_ids=input_ids,
            attention_mask=attn,
            response_ids=self._pad(self.response_ids, pad, torch.long),
            response_mask=self.response_mask,
            old_logprobs=old,
            rewards=self.rewards.clone(),
            group_ids=self.group_ids.clone(),
            prompt_len=P,
        )

    def to(self, device: torch.device | str) -> PaddedBatch:
        """Padded tensor view on ``device``."""
        return self.padded().to(device)

    # ------------------------------------------------------------------ editing
    def replace(self, **changes) -> "RolloutBatch":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def select(self, indices: Sequence[int]) -> "RolloutBatch":
        """The sub-batch of the given trajectory indices (group ids kept)."""
        idx = [int(i) for i in indices]
        for i in idx:
            if not 0 <= i < len(self):
                raise ValueError(f"index {i} out of range for a batch of {len(self)}")

        def pick(x):
            if x is None:
                return None
            if isinstance(x, Tensor):
                return x[torch.tensor(idx, dtype=torch.long)] if idx else x[:0]
            return [x[i] for i in idx]

        return RolloutBatch(
            prompt_ids=pick(self.prompt_ids),
            response_ids=pick(self.response_ids),
            rewards=pick(self.rewards),
            group_ids=pick(self.group_ids),
            logprobs=pick(self.logprobs),
            response_masks=pick(self.response_masks),
            step_spans=pick(self.step_spans),
            prompts=pick(self.prompts),
            responses=pick(self.responses),
            repair_success=pick(self.repair_success),
            edit_masks=pick(self.edit_masks),
            step_values=pick(self.step_values),
            meta={k: pick(v) for k, v in self.meta.items()},
            pad_id=self.pad_id,
        )

    # ------------------------------------------------------------------ views
    def to_dataframe(self) -> pd.DataFrame:
        """One row per trajectory: ids, text, reward, group, lengths, repair fields and meta."""
        B = len(self)
        cols: dict[str, Any] = {
            "traj": np.arange(B),
            "group": self.group_ids.numpy(),
            "reward": self.rewards.numpy(),
            "prompt_len": [len(p) for p in self.prompt_ids],
            "response_len": [len(r) for r in self.response_ids],
            "prompt_ids": self.prompt_ids,
            "response_ids": self.response_ids,
        }
        if self.prompts is not None:
            cols["prompt"] = self.prompts
        if self.responses is not None:
            cols["response"] = self.responses
        if self.logprobs is not None:
            cols["logprob_sum"] = [float(sum(lp)) for lp in self.logprobs]
        if self.step_spans is not None:
            cols["n_steps"] = [len(s) for s in self.step_spans]
            cols["step_spans"] = [[list(s) for s in ss] for ss in self.step_spans]
        if self.repair_success is not None:
            cols["repair_success"] = self.repair_success.numpy()
        if self.edit_masks is not None:
            cols["n_edited"] = [int(m.sum()) for m in self.edit_masks]
        for k, v in self.meta.items():
            if k in cols:
                raise ValueError(f"meta column {k!r} clashes with a built-in column")
            cols[k] = list(v)
        return pd.DataFrame(cols)

    def token_frame(self, advantages: Tensor | None = None, tokenizer=None) -> pd.DataFrame:
        """Long form, one row per response token: traj, group, pos, token_id, step, logprob,
        mask, edited, advantage (if given, [B, T]) and the token text (if a tokenizer is given)."""
        if advantages is not None and tuple(advantages.shape) != (len(self), self.max_response_len):
            raise ValueError(
                f"advantages has shape {tuple(advantages.shape)}, expected {(len(self), self.max_response_len)}"
            )
        rows: dict[str, list] = {k: [] for k in ("traj", "group", "pos", "token_id", "step", "mask")}
        extra: dict[str, list] = {}
        if self.logprobs is not None:
            extra["logprob"] = []
        if self.edit_masks is not None:
            extra["edited"] = []
        if advantages is not None:
            extra["advantage"] = []
        if tokenizer is not None:
            extra["token"] = []
        mask = self.response_mask
        for i, r in enumerate(self.response_ids):
            n = len(r)
            step_of = np.full(n, -1, dtype=int)
            for k, (a, b) in enumerate(self.step_spans[i] if self.step_spans is not None else []):
                step_of[a:b] = k
            rows["traj"] += [i] * n
            rows["group"] += [int(self.group_ids[i])] * n
            rows["pos"] += list(range(n))
            rows["token_id"] += list(r)
            rows["step"] += step_of.tolist()
            rows["mask"] += mask[i, :n].tolist()
            if self.logprobs is not None:
                extra["logprob"] += list(self.logprobs[i])
            if self.edit_masks is not None:
                extra["edited"] += self.edit_masks[i].tolist()
            if advantages is not None:
                extra["advantage"] += advantages[i, :n].detach().cpu().tolist()
            if tokenizer is not None:
                extra["token"] += [tokenizer.decode([t]) for t in r]
        return pd.DataFrame({**rows, **extra})

    def __repr__(self) -> str:
        g = len(self.groups())
        acc = float(self.rewards.mean()) if len(self) else math.nan
        return f"RolloutBatch(B={len(self)}, groups={g}, T_max={self.max_response_len}, reward_mean={acc:.3f})"


def concat_batches(batches: Sequence[RolloutBatch]) -> RolloutBatch:
    """Concatenate batches; optional fields must be present in all or none of them."""
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    out: dict[str, Any] = {}
    for f in fields(RolloutBatch):
        if f.name in ("meta", "pad_id"):
            continue
        vals = [getattr(b, f.name) for b in batches]
        present = [v is not None for v in vals]
        if any(present) and not all(present):
            raise ValueError(f"field {f.name!r} is set in some batches and None in others")
        if not present[0]:
            out[f.name] = None
        elif isinstance(vals[0], Tensor):
            out[f.name] = torch.cat(vals)
        else:
            out[f.name] = [x for v in vals for x in v]
    keys = set(batches[0].meta)
    for b in batches[1:]:
        if set(b.meta) != keys:
            raise ValueError(f"meta columns differ between batches: {sorted(keys)} vs {sorted(b.meta)}")
    out["meta"] = {k: [x for b in batches for x in b.meta[k]] for k in keys}
    out["pad_id"] = batches[0].pad_id
    return RolloutBatch(**out)
