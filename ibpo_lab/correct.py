"""Compare-and-correct: IBPO's counterfactual repairs of failed trajectories (φ and edit masks).

For every failed trajectory of a group the corrector picks sibling trajectories as
references (correct ones first), asks the policy itself — the *implicit behaviour policy* —
to rewrite the failed attempt given a reference (the task's repair prompt), verifies every
revision with the task's reward, and keeps the best successful one (highest
s = reward - edit_penalty·normalised edit distance to the failed attempt: the closest one under
0/1 rewards). From that:

* ``repair_success[i]`` = share of trajectory i's revisions that verify (and pass the audit,
  when it is on); the estimator turns it into φ (``advantages.repair_phi``: by default
  φ = ρ·1[at least one revision verified], as published; ``phi="share"``: ρ·share) and shapes
  the reward R' = R + λ·φ before group centring;
* ``edit_masks[i]`` = tokens of the failed response that a Levenshtein alignment to the best
  repair deletes or replaces (``ibpo_lab.diff.edit_masks``) — the only tokens that get credit;
  optionally truncated to the first K* edited tokens (IOP);
* ``repaired`` = the best repairs as a :class:`RolloutBatch` under the ORIGINAL solve prompt,
  with ``edit_masks`` = the inserted tokens, for IOP's bilateral training.

K references, two readings (``CorrectConfig.reference_mode``):

* ``"separate"`` (default): K separate repair prompts, one per (failed, reference) pair, each
  sampled ``revisions_per_reference`` times. K then buys independent repair attempts (and more
  candidates to select from): with the indicator φ, K=2 raises the chance that *some* repair
  verifies.
* ``"joint"``: ONE repair prompt showing all K references (the task's ``repair_prompt_joint``:
  its ``"repair_joint"`` template, see ``ibpo_lab.tasks.base``; a duck-typed task without one
  gets its singular template with :func:`join_references`), sampled K·``revisions_per_reference``
  times so the revision budget equals ``"separate"``'s. K then buys contrast: the policy sees several
  correct solutions at once and can tell what they share (the method) from how they differ
  (incidental wording).

Which reading the paper's "K ≥ 2 is needed" ablation corresponds to (our reading; the lab has
not reproduced it): ``"joint"``. Under ``"separate"`` a larger K only adds independent repair
attempts — the same thing more ``revisions_per_reference`` buys — so a K = 1 vs K = 2 gap there
is a sampling-budget effect, and at equal budget it should largely vanish; a comparison that
*needs* two references is one where the repair is conditioned on several of them at once. At
K = 1 the two readings send the same prompt. The comparison at equal budget belongs in
notebook 06 (``reference_mode`` x ``num_references``).

Audit (IOP, off by default): a verified revision is rejected when it copies a reference
rather than repairing the failed attempt (``audit_copy``: normalised token edit distance to the
nearest reference < to the failed attempt) or edits more than ``edit_budget`` of the failed
attempt's tokens; among the accepted ones the selected repair maximises
s = reward - ``edit_penalty``·(normalised edit distance to the failed attempt).

Operators (registry :data:`OPERATORS`, all behind :func:`compare_and_correct`):
``policy`` (repair prompt → policy revisions; the method), ``splice`` (keep the failed prefix up
to its first divergence from the reference and let the policy continue under the solve prompt —
for models that cannot follow a repair prompt) and ``oracle`` (the task's ground-truth minimal
repair, ``task.oracle_repair``; synthetic task only, for validating credit).

Token ids. Everything is compared at the policy tokenizer's token level. ``policy`` and
``splice`` revisions keep the ids the sampler generated (so their log-probs stay aligned);
text-only revisions (``oracle``) are re-tokenised with ``tokenizer(text,
add_special_tokens=False)`` and get the failed response's trailing EOS back if it had one.
With a character tokenizer this is exact; with BPE a re-tokenised span can differ from a
generated one near the edit (a few spurious edited tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ibpo_lab.advantages import repair_phi  # the one home of φ
from ibpo_lab.diff import Opcode, apply_opcodes, edit_distance, edit_masks, first_divergence, opcodes
from ibpo_lab.registry import Registry
from ibpo_lab.rollout import RolloutBatch

__all__ = [
    "CorrectConfig",
    "CorrectionResult",
    "RepairRequest",
    "Revision",
    "OPERATORS",
    "register_operator",
    "get_operator",
    "list_operators",
    "select_references",
    "truncation_blocks",
    "join_references",
    "compare_and_correct",
    "TABLE_COLUMNS",
]

REFERENCE_SELECTIONS = ("correct_first", "correct_only", "any", "most_similar")
NO_CORRECT_POLICIES = ("skip", "any")
REFERENCE_MODES = ("separate", "joint")


# --------------------------------------------------------------------------- config
@dataclass
class CorrectConfig:
    """Compare-and-correct settings. Validated on construction (``ValueError`` naming the field)."""

    operator: str = field(
        default="policy",
        metadata={"help": "how revisions are made: 'policy' (repair prompt, the policy rewrites its failed attempt), "
                  "'splice' (failed prefix up to the first divergence from the reference, policy continues), "
                  "'oracle' (task.oracle_repair ground truth; synthetic task only)"},
    )
    num_references: int = field(
        default=2,
        metadata={"help": "sibling references per failed trajectory: the paper's K (its K=1 ablation = one "
                  "reference). The issue's 'K-1 references' counts the failed attempt among K compared "
                  "trajectories; under that reading set this to K-1. Must be <= group size - 1"},
    )
    revisions_per_reference: int = field(
        default=1, metadata={"help": "revisions sampled per (failed, reference) pair (the oracle makes one "
                                     "deterministic revision per failed trajectory)"}
    )
    reference_selection: str = field(
        default="correct_first",
        metadata={"help": "which siblings become references: 'correct_first' (correct siblings in batch order, then "
                  "failed ones to fill num_references), 'correct_only' (correct siblings only; may give fewer), "
                  "'any' (siblings in batch order regardless of reward), 'most_similar' (like correct_first but "
                  "each class ordered by normalised token edit distance to the failed attempt)"},
    )
    no_correct: str = field(
        default="skip",
        metadata={"help": "groups without a correct sibling: 'skip' (no repair, repair_success 0, sequence-level "
                  "credit) or 'any' (use failed siblings as references). Applies to every reference_selection; "
                  "the oracle operator needs no reference and ignores it"},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "sampling temperature of the revisions (>= 0; 0 = greedy, one revision suffices)"}
    )
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the revisions, in (0, 1]"})
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "token budget of one revision; None = 2 x the longest response in the batch + 16 "
                  "(a repair is about as long as the attempt it fixes)"},
    )
    stop: list[str] | None = field(
        default=None, metadata={"help": "stop strings of the revisions (as in sampling.sample); None = EOS only"}
    )
    truncate_k: int | None = field(
        default=None,
        metadata={"help": "IOP credit truncation: None = credit every edited token; K = credit only the first K* "
                  "edited tokens, K* = K if grafting the edit blocks holding the first K edited tokens onto the "
                  "failed attempt already verifies, else 2K if that verifies, else all"},
    )
    rho: float = field(default=0.5, metadata={"help": "ρ in φ = ρ·1[a revision verified] (ρ·share with the estimator's "
                                                       "phi='share'); reported in stats (the estimator applies φ with "
                                                       "its own rho and λ)"})
    success_threshold: float = field(
        default=0.5,
        metadata={"help": "a trajectory or revision is correct when its reward >= this (0.5, as the ibpo "
                  "estimator's success_threshold, so both agree on which trajectories failed)"},
    )
    insertion_credit: bool = field(
        default=True,
        metadata={"help": "also credit the failed token at each pure-insertion point (the token the insertion "
                  "goes before, or the last token when the repair appends): an omission-only repair then still "
                  "marks a token (the ibpo estimator rejects a successful repair with an empty mask); "
                  "False = exactly diff.edit_masks (deleted or replaced tokens only)"},
    )

    reference_mode: str = field(
        default="separate",
        metadata={"help": "how the K = num_references references reach the policy: 'separate' (K repair prompts, one "
                  "per reference, revisions_per_reference samples each) or 'joint' (one prompt holding all K "
                  "references, K x revisions_per_reference samples: the same budget). Our reading of the paper's "
                  "'K >= 2 needed' ablation is 'joint' (see the module docstring). Not for the splice operator"},
    )
    audit_copy: bool = field(
        default=False,
        metadata={"help": "IOP audit: reject a verified revision closer (normalised token edit distance) to a reference "
                  "than to the failed attempt: a copy of the reference, not a repair, whose edit mask is the whole "
                  "divergence rather than the error. Off by default: IBPO as published has no audit, and when the "
                  "failed attempt and a reference differ only at the error, the copy IS the minimal repair"},
    )
    edit_budget: float | None = field(
        default=None,
        metadata={"help": "IOP audit: reject a verified revision that edits more than this share of the failed "
                  "attempt's tokens (n_edited / length, in (0, 1]); None = no budget (the default: a sensible budget "
                  "depends on the task's response length and on how local its errors are)"},
    )
    edit_penalty: float = field(
        default=1.0,
        metadata={"help": "λ_edit in the selection score s = reward - λ_edit·(normalised edit distance to the failed "
                  "attempt): the selected repair maximises s among accepted revisions (ties: the first). Any λ_edit > 0 "
                  "picks the closest repair under 0/1 rewards (the earlier rule); 0 = the first best-rewarded one"},
    )

    copy_draft: bool = field(
        default=True,
        metadata={"help": "decode policy revisions with the failed attempt as the draft (copy-draft speculative "
                  "decoding; the splice operator drafts the failed attempt's tail after the cut): the samples and "
                  "log-probs are unchanged, only fewer forward passes; ignored by samplers without supports_drafts"},
    )
    repair_length_margin: int | None = field(
        default=16,
        metadata={"help": "cap each revision's new tokens at len(failed attempt) + this margin (and at max_new_tokens): "
                  "a repair is about as long as the attempt it fixes; None = no cap. Samplers without per-prompt "
                  "budgets (no supports_drafts) get the largest cap of the call"},
    )

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ValueError(f"operator must be one of {sorted(OPERATORS)}, got {self.operator!r}")
        for name in ("num_references", "revisions_per_reference"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.reference_selection not in REFERENCE_SELECTIONS:
            raise ValueError(f"reference_selection must be one of {REFERENCE_SELECTIONS}, got {self.reference_selection!r}")
        if self.no_correct not in NO_CORRECT_POLICIES:
            raise ValueError(f"no_correct must be one of {NO_CORRECT_POLICIES}, got {self.no_correct!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be None or an int >= 1, got {self.max_new_tokens!r}")
        if self.truncate_k is not None and (
            not isinstance(self.truncate_k, (int, np.integer)) or isinstance(self.truncate_k, bool) or self.truncate_k < 1
        ):
            raise ValueError(f"truncate_k must be None or an int >= 1, got {self.truncate_k!r}")
        if not 0 <= self.rho:
            raise ValueError(f"rho must be >= 0, got {self.rho!r}")
        if self.reference_mode not in REFERENCE_MODES:
            raise ValueError(f"reference_mode must be one of {REFERENCE_MODES}, got {self.reference_mode!r}")
        if self.reference_mode == "joint" and self.operator == "splice":
            raise ValueError("reference_mode='joint' does not apply to operator 'splice' (it continues from the first "
                             "divergence from ONE reference); use reference_mode='separate'")
        if not isinstance(self.copy_draft, bool):
            raise ValueError(f"copy_draft must be a bool, got {self.copy_draft!r}")
        if self.repair_length_margin is not None and (
            isinstance(self.repair_length_margin, bool) or not isinstance(self.repair_length_margin, (int, np.integer))
            or self.repair_length_margin < 0
        ):
            raise ValueError(f"repair_length_margin must be None or an int >= 0, got {self.repair_length_margin!r}")
        if not isinstance(self.audit_copy, bool):
            raise ValueError(f"audit_copy must be a bool, got {self.audit_copy!r}")
        if self.edit_budget is not None and (
            isinstance(self.edit_budget, bool) or not isinstance(self.edit_budget, (int, float))
            or not 0 < self.edit_budget <= 1
        ):
            raise ValueError(f"edit_budget must be None or a number in (0, 1], got {self.edit_budget!r}")
        if isinstance(self.edit_penalty, bool) or not isinstance(self.edit_penalty, (int, float)) or not (
            np.isfinite(self.edit_penalty) and self.edit_penalty >= 0
        ):
            raise ValueError(f"edit_penalty must be a finite number >= 0, got {self.edit_penalty!r}")

    @classmethod
    def help(cls) -> dict[str, str]:
        """field name -> help text."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


# --------------------------------------------------------------------------- data
@dataclass
class RepairRequest:
    """One repair prompt: a failed trajectory and its reference(s); ``reference`` is None for the oracle.

    ``reference_mode="separate"``: one reference (``references == [reference]``). ``"joint"``: all K
    references in ``references`` / ``references_ids``; ``reference`` is the first, and
    ``reference_text`` the joined text of all (:func:`join_references`)."""

    traj: int
    group: int
    reference: int | None
    example: Any
    solve_prompt: str
    failed_ids: list[int]
    failed_text: str
    failed_logprobs: list[float] | None
    reference_ids: list[int] | None
    reference_text: str | None
    references: list[int] = field(default_factory=list)
    references_ids: list[list[int]] = field(default_factory=list)
    references_text: list[str] = field(default_factory=list)


@dataclass
class Revision:
    """A candidate repair: policy token ids, its text, and its behaviour log-probs (None if unknown)."""

    ids: list[int]
    text: str
    logprobs: list[float] | None
    #: the prompt it was sampled under (token ids and text; None for the oracle): the repair prompt for
    #: ``policy``, solve prompt + kept prefix for ``splice``. J_rep (train.repair_objective_batch) trains on it
    prompt_ids: list[int] | None = None
    prompt: str | None = None


@dataclass
class CorrectionResult:
    """What compare-and-correct returns.

    batch     the input batch with ``repair_success`` [B] and ``edit_masks`` filled
    repaired  the selected successful repairs (one per repaired failed trajectory) as a batch:
              prompt = original solve prompt ids, response = repair ids, logprobs = the
              corrector's behaviour log-probs (under the repair prompt for ``policy``; None for
              ``oracle``), edit_masks = inserted tokens, group ids = source groups, reward = the
              repair's reward, meta ``source_traj``/``reference_traj`` (+ the input's meta columns)
    table     one row per revision (:data:`TABLE_COLUMNS`)
    stats     summary numbers (counts, success rates, φ mean, edited tokens, K* counts)
    revisions every revision of the ``policy`` operator as a batch UNDER ITS REPAIR PROMPT (what
              IOP's joint repair objective J_rep trains, ``train.repair_objective_batch``): prompt =
              repair prompt ids, response = revision ids, logprobs = the sampler's (μ), reward = its
              reward, group ids = the failed trajectory it revises (revisions of one failure form a
              group), meta ``source_traj``, ``accepted`` (verified and passed the audit), ``selected``;
              None for operators without a repair prompt (``splice``: under the solve prompt, trained by
              ``bilateral``; ``oracle``: not a sample) or without behaviour log-probs
    """

    batch: RolloutBatch
    repaired: RolloutBatch
    table: pd.DataFrame
    stats: dict[str, float]
    revisions: RolloutBatch | None = None


#: the repairs table: one row per revision. ``reference_traj`` -1 for the oracle (the first reference in
#: ``joint`` mode); ``n_references`` references its prompt showed; ``edit_distance`` normalised token Levenshtein
#: distance to the failed attempt; ``reference_distance`` the same to the nearest reference (NaN for the oracle);
#: ``n_edited`` failed tokens the revision would credit (before truncation); ``audit`` "" (not verified, or no audit
#: configured), "pass", "copy" (closer to a reference than to the failed attempt) or "budget" (edits more than
#: edit_budget); ``accepted`` verified and not rejected by the audit; ``score`` reward - edit_penalty·edit_distance;
#: ``selected`` the accepted revision of its trajectory with the highest score; ``k_star`` its IOP K* (-1 = all edits)
TABLE_COLUMNS = [
    "group", "traj", "reference_traj", "n_references", "operator", "failed", "reference", "revision", "reward",
    "verified", "edit_distance", "reference_distance", "n_edited", "audit", "accepted", "score", "selected", "k_star",
]


@dataclass
class _Context:
    task: Any
    sampler: Any
    cfg: CorrectConfig
    tokenizer: Any
    seed: int | None
    max_new_tokens: int


# --------------------------------------------------------------------------- operators
Operator = Callable[[list[RepairRequest], _Context], list[list[Revision]]]
OPERATORS: Registry = Registry("operator")


def register_operator(name: str):
    """Register ``fn(requests, ctx) -> revisions per request`` under ``name``."""
    return OPERATORS.register(name)


def get_operator(name: str) -> Operator:
    return OPERATORS.get_registered(name)


def list_operators() -> list[str]:
    return sorted(OPERATORS)


def _sample(ctx: _Context, prompts: list[str], n: int, **kw) -> RolloutBatch:
    """One sampler call; ``kw`` (``max_new_tokens``, ``drafts``) override the defaults."""
    args = dict(max_new_tokens=ctx.max_new_tokens, temperature=ctx.cfg.temperature, top_p=ctx.cfg.top_p,
                stop=ctx.cfg.stop, seed=ctx.seed)
    args.update({k: v for k, v in kw.items() if v is not None})
    out = ctx.sampler.sample(prompts, n=n, **args)
    if len(out) != len(prompts) * n:
        raise ValueError(f"sampler returned {len(out)} trajectories for {len(prompts)} prompts x n={n}")
    return out


def _budget_kwargs(ctx: _Context, failed: Sequence[Sequence[int]], drafts: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Sampler kwargs of one repair call: per-prompt budgets min(max_new_tokens, len(failed) + margin)
    and copy-drafts when the sampler supports them, else one budget (the largest cap)."""
    m = ctx.cfg.repair_length_margin
    caps = [ctx.max_new_tokens if m is None else max(1, min(ctx.max_new_tokens, len(f) + m)) for f in failed]
    if getattr(ctx.sampler, "supports_drafts", False):
        return dict(max_new_tokens=caps, drafts=[list(d) for d in drafts] if ctx.cfg.copy_draft else None)
    return dict(max_new_tokens=max(caps, default=ctx.max_new_tokens))


def _texts(b: RolloutBatch, tokenizer) -> list[str]:
    if b.responses is not None:
        return list(b.responses)
    if tokenizer is None:
        raise ValueError("tokenizer is required when the sampler returns no response texts")
    return [_decode(tokenizer, r) for r in b.response_ids]


@register_operator("policy")
def policy_operator(requests: list[RepairRequest], ctx: _Context) -> list[list[Revision]]:
    """The policy rewrites each failed attempt given its reference(s) (task.repair_prompt); one batched call.

    ``reference_mode="joint"``: the request's prompt shows all its K references and is sampled
    K·revisions_per_reference times (the prompt is repeated K times in the one call)."""
    n = ctx.cfg.revisions_per_reference
    joint = ctx.cfg.reference_mode == "joint"
    prompts, counts, failed = [], [], []
    for r in requests:
        copies = max(1, len(r.references)) if joint else 1
        prompt = _joint_prompt(ctx.task, r) if joint else ctx.task.repair_prompt(r.example, r.failed_text, r.reference_text)
        prompts += [prompt] * copies
        failed += [r.failed_ids] * copies
        counts.append(copies * n)
    out = _sample(ctx, prompts, n, **_budget_kwargs(ctx, failed, failed))
    texts = _texts(out, ctx.tokenizer)
    revs = [
        Revision(ids=list(out.response_ids[j]), text=texts[j], logprobs=None if out.logprobs is None else list(out.logprobs[j]),
                 prompt_ids=list(out.prompt_ids[j]), prompt=prompts[j // n])
        for j in range(len(out))
    ]
    bounds = np.cumsum([0] + counts)
    return [revs[bounds[k] : bounds[k + 1]] for k in range(len(requests))]


def join_references(texts: Sequence[str]) -> str:
    """Fallback for a task without ``repair_prompt_joint``: K reference texts as one block for its
    singular repair template's ``{reference}`` field (also the table's ``reference`` column in ``joint`` mode):
    ``Reference 1:\n<text>\nReference 2:\n<text>`` (one reference: its text unchanged, so
    ``joint`` with K = 1 gives exactly the ``separate`` prompt)."""
    if len(texts) == 1:
        return texts[0]
    return "\n".join(f"Reference {k}:\n{t}" for k, t in enumerate(texts, start=1))


def _joint_prompt(task, r: RepairRequest) -> str:
    """The one repair prompt of a ``joint`` request: the task's ``repair_prompt_joint(example,
    failed, references)`` (every ``tasks.base.Task`` has one: its ``"repair_joint"`` template), else,
    for a duck-typed task without it, its singular repair template with :func:`join_references`."""
    own = getattr(task, "repair_prompt_joint", None)
    if callable(own):
        return own(r.example, r.failed_text, list(r.references_text))
    return task.repair_prompt(r.example, r.failed_text, join_references(r.references_text))


@register_operator("splice")
def splice_operator(requests: list[RepairRequest], ctx: _Context) -> list[list[Revision]]:
    """Keep the failed prefix up to its first token divergence from the reference, let the policy
    continue under the solve prompt. The prefix's behaviour log-probs are the failed trajectory's
    own (same policy, same context), so the spliced revision's log-probs are exact — as long as the
    tokenizer encodes ``solve prompt + decoded prefix`` back to the same ids (true for the char
    tokenizer; a BPE merge across the boundary makes the continuation's context differ slightly)."""
    if ctx.tokenizer is None:
        raise ValueError("tokenizer is required for the splice operator (to decode the kept prefix)")
    n = ctx.cfg.revisions_per_reference
    cuts = [first_divergence(r.failed_ids, r.reference_ids) for r in requests]
    prefix_texts = [_decode(ctx.tokenizer, r.failed_ids[:d]) for r, d in zip(requests, cuts)]
    # the continuation replaces the failed attempt's tail: that tail is its natural draft (and budget)
    tails = [r.failed_ids[d:] for r, d in zip(requests, cuts)]
    out = _sample(ctx, [r.solve_prompt + p for r, p in zip(requests, prefix_texts)], n, **_budget_kwargs(ctx, tails, tails))
    texts = _texts(out, ctx.tokenizer)
    result = []
    for k, (r, d, p) in enumerate(zip(requests, cuts, prefix_texts)):
        revs = []
        for j in range(k * n, (k + 1) * n):
            lp = None
            if r.failed_logprobs is not None and out.logprobs is not None:
                lp = list(r.failed_logprobs[:d]) + list(out.logprobs[j])
            revs.append(Revision(ids=list(r.failed_ids[:d]) + list(out.response_ids[j]), text=p + texts[j], logprobs=lp))
        result.append(revs)
    return result


@register_operator("oracle")
def oracle_operator(requests: list[RepairRequest], ctx: _Context) -> list[list[Revision]]:
    """The task's ground-truth minimal repair (``task.oracle_repair``), re-tokenised; no log-probs."""
    if not callable(getattr(ctx.task, "oracle_repair", None)):
        raise ValueError(f"operator 'oracle' needs a task with oracle_repair (the synthetic task); {ctx.task!r} has none")
    if ctx.tokenizer is None:
        raise ValueError("tokenizer is required for the oracle operator (to tokenise the repair text)")
    eos = getattr(ctx.tokenizer, "eos_token_id", None)
    result = []
    for r in requests:
        text = ctx.task.oracle_repair(r.example, r.failed_text)
        ids = _encode(ctx.tokenizer, text)
        # sampled responses end with EOS; without it every oracle repair would "delete" the EOS
        if eos is not None and r.failed_ids and r.failed_ids[-1] == eos and (not ids or ids[-1] != eos):
            ids.append(int(eos))
        result.append([Revision(ids=ids, text=text, logprobs=None)])
    return result


# --------------------------------------------------------------------------- pure helpers
def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _encode(tokenizer, text: str) -> list[int]:
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def select_references(
    failed: int,
    members: Sequence[int],
    correct: Sequence[bool],
    k: int,
    rule: str = "correct_first",
    no_correct: str = "skip",
    response_ids: Sequence[Sequence[int]] | None = None,
) -> list[int]:
    """References for failed trajectory ``failed`` among its group ``members`` (batch indices).

    correct [B] bool over the whole batch; k references at most; ``rule`` and ``no_correct`` as in
    :class:`CorrectConfig`; ``response_ids`` (whole batch) only for ``most_similar``.
    Siblings keep batch order within a class: they are i.i.d. draws, so batch order is already random.
    Returns [] when the group has no correct sibling and ``no_correct == "skip"``.
    """
    if rule not in REFERENCE_SELECTIONS:
        raise ValueError(f"reference_selection must be one of {REFERENCE_SELECTIONS}, got {rule!r}")
    if no_correct not in NO_CORRECT_POLICIES:
        raise ValueError(f"no_correct must be one of {NO_CORRECT_POLICIES}, got {no_correct!r}")
    sibs = [int(j) for j in members if int(j) != int(failed)]
    good = [j for j in sibs if correct[j]]
    bad = [j for j in sibs if not correct[j]]
    if not good:
        if no_correct == "skip":
            return []
        # no_correct == "any": failed siblings are the only references there are
        if rule == "most_similar":
            bad = _by_similarity(failed, bad, response_ids)
        return bad[:k]
    if rule == "correct_only":
        return good[:k]
    if rule == "any":
        return sibs[:k]
    if rule == "most_similar":
        good, bad = _by_similarity(failed, good, response_ids), _by_similarity(failed, bad, response_ids)
    return (good + bad)[:k]


def _by_similarity(failed: int, cands: list[int], response_ids) -> list[int]:
    if response_ids is None:
        raise ValueError("response_ids is required for reference_selection='most_similar'")
    # stable sort: equal distances keep batch order
    return sorted(cands, key=lambda j: edit_distance(response_ids[failed], response_ids[j]))


def truncation_blocks(a: Sequence[int], b: Sequence[int], k: int, count_insertions: bool = False) -> int:
    """Number of leading edit blocks of ``a -> b`` that hold the first ``k`` changed tokens of ``a``
    (all blocks if ``a`` has fewer than k changed tokens). A pure-insertion block changes no token
    of ``a`` and rides along with the block after it, unless ``count_insertions`` (the
    ``insertion_credit`` convention: it marks one token, its insertion point)."""
    return _blocks_holding(opcodes(a, b), k, count_insertions)


def _blocks_holding(ops: Sequence[Opcode], k: int, count_insertions: bool) -> int:
    """:func:`truncation_blocks` from an alignment ``ops`` (``diff.opcodes``) already computed."""
    blocks = [op for op in ops if op[0] != "equal"]
    seen = 0
    for m, (tag, i1, i2, _, _) in enumerate(blocks, start=1):
        seen += 1 if (tag == "insert" and count_insertions) else i2 - i1
        if seen >= k:
            return m
    return len(blocks)


def _first_true(mask: np.ndarray, k: int) -> np.ndarray:
    """mask with only its first k True positions kept."""
    out = np.zeros_like(mask)
    idx = np.flatnonzero(mask)[:k]
    out[idx] = True
    return out


def _insertion_points(n: int, ops: Sequence[Opcode]) -> np.ndarray:
    """bool [n]: the failed token at each pure insertion of the alignment ``ops`` (the last one when appending)."""
    out = np.zeros(n, dtype=bool)
    for tag, i1, _, _, _ in ops:
        if tag == "insert" and n:
            out[min(i1, n - 1)] = True
    return out


def _credit_masks(
    failed_ids, repair_ids, cfg: CorrectConfig, k_star: int | None, ops: Sequence[Opcode] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(changed tokens of the failed attempt that get credit, inserted tokens of the repair);
    ``ops``: their alignment ``diff.opcodes(failed_ids, repair_ids)`` if already computed."""
    if ops is None:
        ops = opcodes(failed_ids, repair_ids)
    changed, inserted = edit_masks(failed_ids, repair_ids, ops=ops)
    if cfg.insertion_credit:
        changed = changed | _insertion_points(len(failed_ids), ops)
    if k_star is not None:
        changed, inserted = _first_true(changed, k_star), _first_true(inserted, k_star)
    return changed, inserted


# --------------------------------------------------------------------------- main entry
def _example_of(examples, batch: RolloutBatch) -> Callable[[int], Any]:
    """trajectory index -> its Example, from one Example per trajectory or a mapping group id -> Example."""
    B = len(batch)
    if isinstance(examples, Mapping):
        gids = batch.group_ids.tolist()
        missing = sorted({g for g in gids if g not in examples})
        if missing:
            raise ValueError(f"examples (a mapping by group id) has no entry for groups {missing[:5]}")
        return lambda i: examples[gids[i]]
    if len(examples) != B:
        raise ValueError(
            f"examples has {len(examples)} entries but the batch has {B} trajectories "
            "(pass one Example per trajectory, or a mapping group id -> Example)"
        )
    return lambda i: examples[i]


def _resolve_tokenizer(tokenizer, sampler):
    """``tokenizer``, else ``sampler.tokenizer``, else ``sampler.policy.tokenizer`` (None if none)."""
    if tokenizer is not None:
        return tokenizer
    tok = getattr(sampler, "tokenizer", None)
    if tok is None:
        tok = getattr(getattr(sampler, "policy", None), "tokenizer", None)
    return tok


def compare_and_correct(
    batch: RolloutBatch,
    examples: Sequence[Any] | Mapping[int, Any],
    task: Any,
    sampler: Any,
    cfg: CorrectConfig | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
) -> CorrectionResult:
    """Repair every failed trajectory of ``batch`` with its siblings as references.

    batch: B trajectories (rewards, group ids, response ids; ``responses`` texts or a tokenizer);
    examples: the Example of each trajectory (len B) or a mapping group id -> Example;
    task: a ``Task`` (repair_prompt, reward; oracle_repair for the oracle operator);
    sampler: object with ``.sample(prompts, n, max_new_tokens, temperature, top_p, seed) -> RolloutBatch``
    (not used by the oracle); tokenizer: the policy tokenizer (default: ``sampler.tokenizer`` or
    ``sampler.policy.tokenizer``); seed: sampler seed of this call.
    All repairs of the batch are sampled in ONE sampler call.
    """
    cfg = CorrectConfig() if cfg is None else cfg
    if not isinstance(cfg, CorrectConfig):
        raise ValueError(f"cfg must be a CorrectConfig, got {type(cfg).__name__}")
    if not isinstance(batch, RolloutBatch):
        raise ValueError(f"batch must be a RolloutBatch, got {type(batch).__name__}")
    example_of = _example_of(examples, batch)
    tokenizer = _resolve_tokenizer(tokenizer, sampler)
    B = len(batch)
    rewards = batch.rewards.tolist()
    correct = [r >= cfg.success_threshold for r in rewards]
    groups = batch.groups()
    group_of = batch.group_ids.tolist()
    failed = [i for i in range(B) if not correct[i]]

    if cfg.operator != "oracle":
        for i in failed:
            size = len(groups[group_of[i]])
            if cfg.num_references > size - 1:
                raise ValueError(
                    f"num_references={cfg.num_references} but group {group_of[i]} has only {size} trajectories "
                    f"(at most {size - 1} siblings)"
                )

    def text_of(i: int) -> str:
        if batch.responses is not None:
            return batch.responses[i]
        if tokenizer is None:
            raise ValueError("tokenizer is required when the batch has no response texts")
        return _decode(tokenizer, batch.response_ids[i])

    def solve_prompt_of(i: int) -> str:
        return batch.prompts[i] if batch.prompts is not None else task.solve_prompt(example_of(i))

    # ---- references and requests
    requests: list[RepairRequest] = []
    skipped: list[int] = []
    for i in failed:
        if cfg.operator == "oracle":
            refs: list[int | None] = [None]
        else:
            refs = select_references(
                i, groups[group_of[i]], correct, cfg.num_references, cfg.reference_selection, cfg.no_correct,
                batch.response_ids,
            )
        if not refs:
            skipped.append(i)
            continue
        joint = cfg.reference_mode == "joint" and refs[0] is not None
        for group_refs in ([refs] if joint else [[ref] for ref in refs]):
            ref = group_refs[0]
            real = [j for j in group_refs if j is not None]
            ref_texts = [text_of(j) for j in real]
            requests.append(
                RepairRequest(
                    traj=i, group=group_of[i], reference=ref, example=example_of(i), solve_prompt=solve_prompt_of(i),
                    failed_ids=list(batch.response_ids[i]), failed_text=text_of(i),
                    failed_logprobs=None if batch.logprobs is None else list(batch.logprobs[i]),
                    reference_ids=None if ref is None else list(batch.response_ids[ref]),
                    reference_text=None if ref is None else (join_references(ref_texts) if joint else ref_texts[0]),
                    references=real, references_ids=[list(batch.response_ids[j]) for j in real],
                    references_text=ref_texts,
                )
            )

    max_new = cfg.max_new_tokens if cfg.max_new_tokens is not None else 2 * batch.max_response_len + 16
    ctx = _Context(task=task, sampler=sampler, cfg=cfg, tokenizer=tokenizer, seed=seed, max_new_tokens=max_new)
    revisions = get_operator(cfg.operator)(requests, ctx) if requests else []
    if len(revisions) != len(requests):
        raise ValueError(f"operator {cfg.operator!r} returned {len(revisions)} revision lists for {len(requests)} requests")

    # ---- verify, score, pick the best per failed trajectory
    rows: list[dict[str, Any]] = []
    per_traj: dict[int, list[int]] = {}  # failed traj -> row indices
    revs_flat: list[Revision] = []
    ops_flat: list[list[Opcode]] = []  # alignment of each row's failed attempt to its revision, computed once
    for req, revs in zip(requests, revisions):
        for rev in revs:
            reward = float(task.reward(req.example, rev.text))
            ops = opcodes(req.failed_ids, rev.ids)
            verified = reward >= cfg.success_threshold
            dist = edit_distance(req.failed_ids, rev.ids)
            ref_dist = min((edit_distance(ref_ids, rev.ids) for ref_ids in req.references_ids), default=float("nan"))
            n_edited = int(_credit_masks(req.failed_ids, rev.ids, cfg, None, ops)[0].sum())
            verdict = _audit(verified, dist, ref_dist, n_edited, len(req.failed_ids), cfg)
            rows.append(
                dict(
                    group=req.group, traj=req.traj, reference_traj=-1 if req.reference is None else req.reference,
                    n_references=len(req.references), operator=cfg.operator, failed=req.failed_text,
                    reference=req.reference_text, revision=rev.text, reward=reward, verified=verified,
                    edit_distance=dist, reference_distance=ref_dist, n_edited=n_edited, audit=verdict,
                    accepted=verified and verdict in ("", "pass"), score=reward - cfg.edit_penalty * dist,
                    selected=False, k_star=-1,
                )
            )
            per_traj.setdefault(req.traj, []).append(len(rows) - 1)
            revs_flat.append(rev)
            ops_flat.append(ops)

    repair_success = torch.zeros(B)
    masks = [np.zeros(len(r), dtype=bool) for r in batch.response_ids]
    rep: dict[str, list] = {k: [] for k in ("prompt_ids", "response_ids", "rewards", "group_ids", "logprobs",
                                            "edit_masks", "prompts", "responses", "source", "reference")}
    for i, idx in per_traj.items():
        ok = [r for r in idx if rows[r]["accepted"]]
        repair_success[i] = len(ok) / len(idx)
        if not ok:
            continue
        # highest s = reward - edit_penalty·edit distance (max keeps the first of equal scores)
        best = max(ok, key=lambda r: rows[r]["score"])
        rev, ops = revs_flat[best], ops_flat[best]
        failed_ids = batch.response_ids[i]
        k_star = None
        if cfg.truncate_k is not None:
            k_star = _iop_k_star(failed_ids, rev.ids, cfg.truncate_k, example_of(i), task, tokenizer, cfg, ops)
        changed, inserted = _credit_masks(failed_ids, rev.ids, cfg, k_star, ops)
        masks[i] = changed
        rows[best]["selected"] = True
        rows[best]["k_star"] = -1 if k_star is None else k_star
        rep["prompt_ids"].append(batch.prompt_ids[i])
        rep["response_ids"].append(rev.ids)
        rep["rewards"].append(rows[best]["reward"])
        rep["group_ids"].append(group_of[i])
        rep["logprobs"].append(rev.logprobs)
        rep["edit_masks"].append(inserted)
        rep["prompts"].append(solve_prompt_of(i))
        rep["responses"].append(rev.text)
        rep["source"].append(i)
        rep["reference"].append(rows[best]["reference_traj"])

    out_batch = batch.replace(repair_success=repair_success, edit_masks=masks)
    repaired = _repaired_batch(batch, rep, task, tokenizer)
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    stats = _stats(B, failed, skipped, per_traj, rows, repair_success, masks, cfg, rewards)
    return CorrectionResult(batch=out_batch, repaired=repaired, table=table, stats=stats,
                            revisions=_revisions_batch(rows, revs_flat, batch.pad_id))


def _revisions_batch(rows: list[dict[str, Any]], revs: list[Revision], pad_id: int | None) -> RolloutBatch | None:
    """All revisions under their repair prompts (``CorrectionResult.revisions``); None unless every
    revision has a repair prompt and behaviour log-probs."""
    if not revs or any(r.prompt_ids is None or r.logprobs is None for r in revs):
        return None
    return RolloutBatch(
        prompt_ids=[r.prompt_ids for r in revs],
        response_ids=[r.ids for r in revs],
        rewards=torch.tensor([row["reward"] for row in rows], dtype=torch.float32),
        group_ids=torch.tensor([row["traj"] for row in rows], dtype=torch.long),
        logprobs=[r.logprobs for r in revs],
        prompts=[r.prompt for r in revs],
        responses=[r.text for r in revs],
        meta={"source_traj": [row["traj"] for row in rows], "accepted": [bool(row["accepted"]) for row in rows],
              "selected": [bool(row["selected"]) for row in rows]},
        pad_id=pad_id,
    )


def _iop_k_star(
    failed_ids, repair_ids, k: int, example, task, tokenizer, cfg: CorrectConfig, ops: Sequence[Opcode]
) -> int | None:
    """IOP's K*: K if grafting the blocks of the first K edited tokens verifies, else 2K, else None (all).
    ``ops``: the alignment ``diff.opcodes(failed_ids, repair_ids)``."""
    n_changed = int(_credit_masks(failed_ids, repair_ids, cfg, None, ops)[0].sum())
    n_blocks = sum(op[0] != "equal" for op in ops)
    for kk in (k, 2 * k):
        m = _blocks_holding(ops, kk, cfg.insertion_credit)
        if m >= n_blocks:
            # the graft is the whole (verified) repair: no need to ask the verifier again
            return kk if kk < n_changed else None
        if tokenizer is None:
            raise ValueError("tokenizer is required for truncate_k (the graft is decoded and verified)")
        graft = apply_opcodes(failed_ids, repair_ids, ops, upto=m)
        if task.reward(example, _decode(tokenizer, graft.tolist())) >= cfg.success_threshold:
            return kk
    return None


def _task_step_spans(response_ids: Sequence[Sequence[int]], task, tokenizer) -> list[list[tuple[int, int]]]:
    """Token step spans of each response, split with the task's ``step_delimiter``."""
    from ibpo_lab.steps import split_steps  # only needed when the caller tracks steps

    delim = getattr(task, "step_delimiter", "newline")
    return [split_steps(ids, tokenizer, delim) for ids in response_ids]


def _repaired_batch(batch: RolloutBatch, rep: dict[str, list], task, tokenizer) -> RolloutBatch:
    idx = rep["source"]
    have_lp = bool(idx) and all(lp is not None for lp in rep["logprobs"])
    spans = None
    if batch.step_spans is not None and tokenizer is not None:
        spans = _task_step_spans(rep["response_ids"], task, tokenizer)
    meta = {k: [v[i] for i in idx] for k, v in batch.meta.items()}
    meta["source_traj"] = list(idx)
    meta["reference_traj"] = list(rep["reference"])
    return RolloutBatch(
        prompt_ids=rep["prompt_ids"],
        response_ids=rep["response_ids"],
        rewards=torch.tensor(rep["rewards"], dtype=torch.float32),
        group_ids=torch.tensor(rep["group_ids"], dtype=torch.long),
        logprobs=rep["logprobs"] if have_lp else None,
        step_spans=spans,
        prompts=rep["prompts"],
        responses=rep["responses"],
        # repairs are correct trajectories: φ is 0 on them
        repair_success=torch.zeros(len(idx)),
        edit_masks=rep["edit_masks"],
        meta=meta,
        pad_id=batch.pad_id,
    )


def _audit(verified: bool, dist: float, ref_dist: float, n_edited: int, n_failed: int, cfg: CorrectConfig) -> str:
    """The audit verdict of one revision: "" (unverified, or no audit configured), "copy", "budget" or "pass"."""
    if not verified or (not cfg.audit_copy and cfg.edit_budget is None):
        return ""
    if cfg.audit_copy and np.isfinite(ref_dist) and ref_dist < dist:
        return "copy"
    if cfg.edit_budget is not None and n_edited > cfg.edit_budget * max(n_failed, 1):
        return "budget"
    return "pass"


def _stats(B, failed, skipped, per_traj, rows, repair_success, masks, cfg, rewards) -> dict[str, float]:
    attempted = list(per_traj)
    n_rev = len(rows)
    n_ok = sum(r["verified"] for r in rows)
    n_rejected = sum(r["verified"] and not r["accepted"] for r in rows)
    repaired = [i for i in attempted if repair_success[i] > 0]
    edited = [int(masks[i].sum()) for i in repaired]
    frac = [int(masks[i].sum()) / max(len(masks[i]), 1) for i in repaired]
    share_failed = float(repair_success[failed].mean()) if failed else 0.0
    r_failed = torch.as_tensor(rewards, dtype=torch.float64)[failed]
    phi = {
        mode: float(
            repair_phi(r_failed, repair_success[failed], rho=cfg.rho, phi=mode, success_threshold=cfg.success_threshold).mean()
        ) if failed else 0.0
        for mode in ("indicator", "share")
    }
    out = {
        "n_trajectories": float(B),
        "n_failed": float(len(failed)),
        "n_attempted": float(len(attempted)),
        "n_skipped": float(len(skipped)),
        "n_revisions": float(n_rev),
        "revision_success_rate": n_ok / n_rev if n_rev else float("nan"),
        "n_repaired": float(len(repaired)),
        "repair_rate": len(repaired) / len(failed) if failed else float("nan"),
        "repair_success_mean": share_failed,
        "phi_mean": phi["indicator"],
        "phi_share_mean": phi["share"],
        "audit_rejected": float(n_rejected),
        "audit_rejection_share": n_rejected / n_ok if n_ok else float("nan"),
        "edited_tokens_mean": float(np.mean(edited)) if edited else float("nan"),
        "edited_fraction_mean": float(np.mean(frac)) if frac else float("nan"),
        "repaired_without_credit": float(sum(e == 0 for e in edited)),
    }
    if cfg.truncate_k is not None:
        k = cfg.truncate_k
        k_stars = [r["k_star"] for r in rows if r["selected"]]
        out["k_star_k"] = float(sum(s == k for s in k_stars))
        out["k_star_2k"] = float(sum(s == 2 * k for s in k_stars))
        out["k_star_all"] = float(sum(s == -1 for s in k_stars))
    return out
