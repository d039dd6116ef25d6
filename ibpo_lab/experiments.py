"""Experiment helpers behind the notebooks: one IBPO step taken apart, credit tables, the variance
argument, training grids and stability summaries.

The notebooks stay thin (parameters, calls, pictures); everything they compute is here, where
tests reach it. A step is taken with the trainer's own phase functions (``train.sample_groups``,
``score_groups``, ``correct_groups``, ``compute_advantages``), so what a notebook shows is
exactly what training does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ibpo_lab.rollout import RolloutBatch

__all__ = [
    "Lab",
    "GroupSample",
    "build_lab",
    "sample_groups",
    "estimator_advantages",
    "sequence_advantages",
    "step_credit_frame",
    "credit_summary",
    "group_views",
    "divergence_summary",
    "recorrect",
    "k_sweep",
    "rewrite_comparison",
    "shaping_grid",
    "shaping_moments",
    "shaping_variance_curve",
    "METHOD_FIELDS",
    "method_variants",
    "pick_trajectory",
    "repair_of",
    "SYNTHETIC_SIZES",
    "synthetic_preset",
    "grid_configs",
    "run_grid",
    "load_runs",
    "stability_table",
    "final_table",
    "require_gpu_for_full",
    "gsm8k_task_kwargs",
    "cached_model",
    "profile_value",
]


# ----------------------------------------------------------------------------------------- setup
def require_gpu_for_full(profile: str) -> None:
    """``full`` runs 1.5B models with vLLM: refuse clearly on a machine without CUDA, before
    anything loads (a notebook run by hand gets the same message as ``reproduce``)."""
    if profile not in ("smoke", "full"):
        raise ValueError(f"profile must be 'smoke' or 'full', got {profile!r}")
    if profile == "full" and not torch.cuda.is_available():
        raise RuntimeError(
            "profile='full' needs a CUDA GPU (torch.cuda.is_available() is False). "
            "Run with profile='smoke' on a CPU."
        )


def profile_value(profile: str, smoke: Any, full: Any) -> Any:
    """Pick the ``smoke`` or ``full`` value of a knob (notebooks keep both next to each other)."""
    require_gpu_for_full(profile)
    return smoke if profile == "smoke" else full


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


def cached_model(name: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A fast-loading local copy of a GGUF policy (``"smollm2"`` or a ``.gguf`` path), as a folder
    name for ``TrainConfig.model``; any other name is returned unchanged.

    Reading SmolLM2's GGUF (tokenizer conversion + dequantisation) takes ~30 s on a 2-core CPU and
    ``train`` loads the policy once per run; the dequantised float32 copy (~0.5 GB, in
    ``cache_dir``, default ``$IBPO_CACHE_DIR`` or ``~/.cache/ibpo_lab``) loads in under a second
    with identical logits. Written once per machine, atomically (folder renamed into place).
    """
    if not (name == "smollm2" or str(name).endswith(".gguf")):
        return name
    root = Path(cache_dir or os.environ.get("IBPO_CACHE_DIR") or Path.home() / ".cache" / "ibpo_lab")
    target = root / "models" / Path(str(name)).stem
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    from ibpo_lab.models import load_policy

    policy = load_policy(name)
    model = policy.model
    # the GGUF loader leaves its (dequantising) quantizer attached, which blocks save_pretrained;
    # the weights are plain float32 by now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = root / "models" / f".{target.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    policy.tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return str(target)


@dataclass
class Lab:
    """What one step needs: the task, the policy and its sampler (built once, reused)."""

    cfg: Any
    task: Any
    policy: Any
    sampler: Any


def build_lab(cfg) -> Lab:
    """Task, policy and sampler of a ``TrainConfig`` (the same objects ``train`` builds)."""
    from ibpo_lab import train
    from ibpo_lab.sampling import get_sampler

    device = train.resolve_device(cfg.device)
    task = train.build_task(cfg)  # one definition of "the task of a config"
    policy = train.build_policy(cfg, task, device)
    policy.model.eval()
    return Lab(cfg=cfg, task=task, policy=policy, sampler=get_sampler(cfg.backend, policy))


@dataclass
class GroupSample:
    """One training step's data, taken apart.

    batch       scored batch (rewards, step spans) with repair_success / edit_masks once corrected
    examples    the Example of each group (group id g -> examples[g])
    correction  the ``correct.CorrectionResult`` (None when not corrected)
    step_labels per trajectory, the task's ground-truth step labels (None where unknown)
    """

    lab: Lab
    batch: RolloutBatch
    examples: list
    correction: Any = None
    step_labels: list = field(default_factory=list)

    @property
    def tokenizer(self):
        return self.lab.policy.tokenizer

    @property
    def repairs(self) -> pd.DataFrame:
        """One row per revision (``correct.TABLE_COLUMNS``); empty without a correction."""
        if self.correction is None:
            return pd.DataFrame()
        return self.correction.table


def sample_groups(cfg, n_prompts: int | None = None, *, seed: int = 0, split: str = "train", lab: Lab | None = None,
                  correct: bool = True) -> GroupSample:
    """Sample ``n_prompts`` groups of ``cfg.group_size``, reward them, split steps, and (``correct``)
    run compare-and-correct with ``cfg``'s corrector — exactly one training step's data.

    Prompts are the first ``n_prompts`` examples of ``split`` (default ``cfg.prompts_per_step``).
    """
    from ibpo_lab import train

    lab = lab or build_lab(cfg)
    n = cfg.prompts_per_step if n_prompts is None else int(n_prompts)
    if n < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    examples = lab.task.examples(split, n)
    if len(examples) < n:
        raise ValueError(f"n_prompts: split {split!r} has only {len(examples)} examples, asked for {n}")
    torch.manual_seed(seed)
    batch = train.sample_groups(lab.sampler, lab.task, examples, cfg, seed=seed)
    batch = train.score_groups(batch, examples, lab.task, lab.policy.tokenizer, cfg)
    correction = None
    if correct:
        from ibpo_lab.correct import compare_and_correct

        correction = compare_and_correct(batch, dict(enumerate(examples)), lab.task, lab.sampler,
                                         train.correct_config(cfg), tokenizer=lab.policy.tokenizer, seed=seed + 1)
        batch = correction.batch
    labels = [lab.task.step_labels(examples[int(g)], r) for g, r in zip(batch.group_ids.tolist(), batch.responses)]
    return GroupSample(lab=lab, batch=batch, examples=list(examples), correction=correction, step_labels=labels)


# ----------------------------------------------------------------------------------------- credit
def _estimator_spec(name: str, spec: Any) -> tuple[str, dict]:
    if spec is None:
        return name, {}
    if isinstance(spec, Mapping):
        spec = dict(spec)
        return spec.pop("estimator", name), spec
    raise ValueError(f"estimators[{name!r}] must be None or a dict of estimator kwargs, got {type(spec).__name__}")


def estimator_advantages(sample: GroupSample, estimators: Sequence[str] | Mapping[str, Any], *,
                         mc_rollouts: int | None = None, seed: int = 0) -> dict[str, Tensor]:
    """[B, T] advantages of every estimator on the same batch.

    ``estimators``: names (``list_estimators()``), or label -> kwargs where kwargs may name the
    ``estimator`` (e.g. ``{"ibpo (no mask)": {"estimator": "ibpo", "token_mask": False}}``). ``ibpo``
    gets the config's λ and ρ unless given; ``vineppo`` gets Monte-Carlo step values first
    (``mc_rollouts`` continuations per step boundary, default the config's ``mc_rollouts``).
    """
    from ibpo_lab.advantages import get_estimator

    specs = {n: None for n in estimators} if not isinstance(estimators, Mapping) else dict(estimators)
    if not specs:
        raise ValueError("estimators is empty")
    cfg, batch = sample.lab.cfg, sample.batch
    out: dict[str, Tensor] = {}
    for label, spec in specs.items():
        name, kw = _estimator_spec(label, spec)
        if name == "ibpo":
            kw = {"lam": cfg.lam, "rho": cfg.rho, **kw}
            if batch.repair_success is None:
                raise ValueError(f"estimators[{label!r}]: ibpo needs a corrected sample (sample_groups(correct=True))")
        if name == "vineppo" and batch.step_values is None:
            from ibpo_lab.mc_values import with_step_values

            # computed once and kept on the sample: every later vineppo call reuses the values
            batch = sample.batch = with_step_values(
                batch, dict(enumerate(sample.examples)), sample.lab.task, sample.lab.sampler, mc_rollouts or cfg.mc_rollouts,
                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed,
                tokenizer=sample.tokenizer, progress=False)
        out[label] = get_estimator(name)(batch, **kw)
    return out


def sequence_advantages(sample: GroupSample, advantages: Mapping[str, Tensor]) -> pd.DataFrame:
    """One row per trajectory: reward, repair share and, per estimator, the mean advantage over its
    trained tokens (for sequence-level estimators, the advantage itself)."""
    b = sample.batch
    mask = b.response_mask
    n = mask.sum(1).clamp(min=1)
    df = pd.DataFrame({"traj": np.arange(len(b)), "group": b.group_ids.numpy(), "reward": b.rewards.numpy()})
    if b.repair_success is not None:
        df["repair_success"] = b.repair_success.numpy()
    for name, adv in advantages.items():
        if tuple(adv.shape) != tuple(mask.shape):
            raise ValueError(f"advantages[{name!r}] has shape {tuple(adv.shape)}, expected {tuple(mask.shape)}")
        df[name] = ((adv * mask).sum(1) / n).numpy()
    return df


def step_credit_frame(sample: GroupSample, advantages: Mapping[str, Tensor]) -> pd.DataFrame:
    """Long table, one row per (estimator, trajectory, step): mean token advantage of the step
    (``diagnostics.step_advantages``), its ground-truth label ``correct``, ``first_error`` (the
    trajectory's first wrong step), the trajectory's reward and group. Unlabelled trajectories and
    trajectories whose label count differs from their step count are left out (counted in
    ``credit_summary``'s ``n_unlabelled``)."""
    from ibpo_lab.diagnostics import step_advantages

    b = sample.batch
    if b.step_spans is None:
        raise ValueError("sample.batch has no step spans")
    rows = []
    for name, adv in advantages.items():
        per = step_advantages(adv, b.step_spans, b.response_mask)
        for i, (vals, labs) in enumerate(zip(per, sample.step_labels)):
            if labs is None or len(labs) != len(vals):
                continue
            wrong = [k for k, ok in enumerate(labs) if not ok]
            first = wrong[0] if wrong else -1
            for k, (v, ok) in enumerate(zip(vals, labs)):
                rows.append({"estimator": name, "traj": i, "group": int(b.group_ids[i]), "step": k,
                             "advantage": float(v), "correct": bool(ok), "first_error": k == first,
                             "reward": float(b.rewards[i])})
    return pd.DataFrame(rows, columns=["estimator", "traj", "group", "step", "advantage", "correct", "first_error",
                                       "reward"])


def credit_summary(sample: GroupSample, advantages: Mapping[str, Tensor]) -> pd.DataFrame:
    """One row per estimator: ``diagnostics.credit_quality`` (AUC, within-failure AUC, first-error
    localisation, blame share on wrong steps) and ``effective_updates`` on the sample."""
    from ibpo_lab.diagnostics import credit_quality, effective_updates, step_advantages

    b = sample.batch
    rows = []
    for name, adv in advantages.items():
        per = step_advantages(adv, b.step_spans, b.response_mask)
        labs = [lab if lab is not None and len(lab) == len(v) else None for lab, v in zip(sample.step_labels, per)]
        q = credit_quality(per, labs, b.rewards.tolist())
        rows.append({"estimator": name, **q, **{f"live_{k}": v for k, v in effective_updates(b, adv).items()}})
    return pd.DataFrame(rows)


def group_views(sample: GroupSample, group: int = 0) -> dict[str, Any]:
    """A group's token and step divergence matrices, its step prefix trie and member indices."""
    from ibpo_lab.diff import build_prefix_trie, divergence_matrix, step_divergence_matrix, step_keys

    b = sample.batch
    groups = b.groups()
    if group not in groups:
        raise ValueError(f"group {group} not in the sample; groups: {sorted(groups)}")
    idx = groups[group]
    ids = [b.response_ids[i] for i in idx]
    steps = [step_keys(b.response_ids[i], b.step_spans[i]) for i in idx]
    r = b.rewards[idx].numpy()
    return {"members": idx, "rewards": r, "token_divergence": divergence_matrix(ids),
            "step_divergence": step_divergence_matrix(steps), "trie": build_prefix_trie(steps, r)}


def divergence_summary(views: Mapping[str, Any], group: int = -1) -> dict[str, float]:
    """Numbers behind a group's heatmaps (:func:`group_views` output): mean shared token prefix and
    shared steps over pairs, as a share of the shorter trajectory too, and the trie's size."""
    T = np.asarray(views["token_divergence"], dtype=float)
    S = np.asarray(views["step_divergence"], dtype=float)
    G = T.shape[0]
    off = ~np.eye(G, dtype=bool)
    lens, steps = np.diag(T), np.diag(S)
    shorter = np.minimum.outer(lens, lens)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(shorter > 0, T / shorter, np.nan)
    trie = views["trie"]
    return {"group": group, "G": G, "reward_mean": float(np.mean(views["rewards"])),
            "mean_len": float(lens.mean()), "mean_steps": float(steps.mean()),
            "shared_tokens": float(T[off].mean()) if G > 1 else math.nan,
            "shared_token_share": float(np.nanmean(share[off])) if G > 1 else math.nan,
            "shared_steps": float(S[off].mean()) if G > 1 else math.nan,
            "trie_nodes": int(trie.n_nodes), "root_branches": int(trie.branching()[0])}


def recorrect(sample: GroupSample, *, seed: int = 1, **cfg_overrides) -> GroupSample:
    """The same sampled batch, compare-and-correct run again with changed ``TrainConfig`` fields
    (``repair_k``, ``corrector``, ``k_star``...): isolates the corrector from sampling noise."""
    from ibpo_lab import train
    from ibpo_lab.correct import compare_and_correct

    cfg = sample.lab.cfg.replace(**cfg_overrides) if cfg_overrides else sample.lab.cfg
    lab = Lab(cfg=cfg, task=sample.lab.task, policy=sample.lab.policy, sampler=sample.lab.sampler)
    base = sample.batch.replace(repair_success=None, edit_masks=None)
    res = compare_and_correct(base, dict(enumerate(sample.examples)), lab.task, lab.sampler, train.correct_config(cfg),
                              tokenizer=lab.policy.tokenizer, seed=seed)
    return GroupSample(lab=lab, batch=res.batch, examples=sample.examples, correction=res,
                       step_labels=sample.step_labels)


def _repair_stats(s: GroupSample) -> dict[str, float]:
    b = s.batch
    failed = (b.rewards < 0.5).numpy()
    rs = b.repair_success.numpy()
    n_edit = np.array([m.sum() for m in b.edit_masks]) if b.edit_masks is not None else np.zeros(len(b))
    lens = np.array([max(len(r), 1) for r in b.response_ids])
    rep = failed & (rs > 0)
    return {"n_failed": int(failed.sum()), "repaired_share": float(rep.sum() / max(failed.sum(), 1)),
            "phi_share_mean": float(rs[failed].mean()) if failed.any() else math.nan,
            "edited_fraction": float((n_edit[rep] / lens[rep]).mean()) if rep.any() else math.nan}


def k_sweep(sample: GroupSample, ks: Sequence[int], *, seed: int = 1) -> pd.DataFrame:
    """Number of sibling references K: for each K, compare-and-correct on the same batch, then the
    repair statistics and IBPO's credit quality. One row per K."""
    rows = []
    G = min(len(v) for v in sample.batch.groups().values())
    for k in ks:
        if not 1 <= int(k) <= G - 1:
            raise ValueError(f"ks: K={k} needs 1 <= K <= group size - 1 = {G - 1}")
        s = recorrect(sample, repair_k=int(k), seed=seed)
        q = credit_summary(s, estimator_advantages(s, ["ibpo"])).iloc[0].to_dict()
        rows.append({"K": int(k), **_repair_stats(s), **{k2: q[k2] for k2 in
                     ("auc", "auc_within_failed", "first_error_localisation", "live_group_share")}})
    return pd.DataFrame(rows)


def rewrite_comparison(sample: GroupSample) -> pd.DataFrame:
    """Local repair vs full rewrite on one corrected batch. For the failed trajectories with a
    verified repair, the credited tokens come from:

    * ``local repair``: the edit mask of the policy's own minimal repair (IBPO);
    * ``full rewrite``: the edit mask against the reference sibling it was repaired from — what a
      repair that simply rewrites the attempt as the reference would change;
    * ``no mask``: every token (sequence-level credit of the shaped reward).

    One row per variant: edited fraction and IBPO's credit quality with those masks.
    """
    from ibpo_lab.diff import edit_masks

    c = sample.correction
    if c is None:
        raise ValueError("sample has no correction: sample_groups(correct=True)")
    b = sample.batch
    table = c.table
    sel = table[table["selected"].astype(bool)] if len(table) else table
    ref_of = {int(t): int(r) for t, r in zip(sel.get("traj", []), sel.get("reference_traj", [])) if int(r) >= 0}
    rewrite = []
    for i in range(len(b)):
        m = b.edit_masks[i] if b.edit_masks is not None else np.zeros(len(b.response_ids[i]), bool)
        if i in ref_of:
            m = edit_masks(b.response_ids[i], b.response_ids[ref_of[i]])[0]
            if not m.any():  # identical to the reference: nothing to rewrite, credit its last token
                m = np.zeros(len(m), bool)
                m[-1:] = True
        rewrite.append(np.asarray(m, bool))
    variants = {
        "local repair": (sample, {"estimator": "ibpo"}),
        "full rewrite": (GroupSample(lab=sample.lab, batch=b.replace(edit_masks=rewrite), examples=sample.examples,
                                     correction=c, step_labels=sample.step_labels), {"estimator": "ibpo"}),
        "no mask": (sample, {"estimator": "ibpo", "token_mask": False}),
    }
    rows = []
    for name, (s, spec) in variants.items():
        adv = estimator_advantages(s, {name: spec})
        q = credit_summary(s, adv).iloc[0].to_dict()
        st = _repair_stats(s)
        if name == "no mask":
            st["edited_fraction"] = 1.0 if not math.isnan(st["edited_fraction"]) else math.nan
        rows.append({"credit": name, "edited_fraction": st["edited_fraction"], "repaired_share": st["repaired_share"],
                     **{k: q[k] for k in ("auc", "auc_within_failed", "first_error_localisation",
                                          "wrong_step_credit_share")}})
    return pd.DataFrame(rows)


def shaping_grid(sample: GroupSample, lams: Sequence[float], rhos: Sequence[float]) -> pd.DataFrame:
    """Sensitivity to λ and ρ on one corrected batch: for every (λ, ρ), the pooled within-group
    variance of the shaped reward, the share of groups IBPO gives a non-zero signal, and its
    credit quality. One row per (λ, ρ)."""
    from ibpo_lab.diagnostics import effective_updates

    rows = []
    for rho in rhos:
        for lam in lams:
            pooled = shaping_moments(sample, lam, rho).iloc[-1]
            adv = estimator_advantages(sample, {"ibpo": {"lam": lam, "rho": rho}})
            q = credit_summary(sample, adv).iloc[0]
            eff = effective_updates(sample.batch, adv["ibpo"])
            rows.append({"lam": float(lam), "rho": float(rho), "var_shaped": pooled.var_shaped,
                         "live_group_share": eff["group_share"], "auc": q.auc,
                         "auc_within_failed": q.auc_within_failed,
                         "first_error_localisation": q.first_error_localisation})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------- variance
def _phi(sample_or_batch, rho: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = sample_or_batch.batch if isinstance(sample_or_batch, GroupSample) else sample_or_batch
    if b.repair_success is None:
        raise ValueError("the batch has no repair_success: run compare-and-correct first")
    r = b.rewards.double().numpy()
    share = b.repair_success.double().numpy()
    phi = np.where(r >= 0.5, 0.0, rho * share)  # φ only on failed trajectories
    return r, phi, b.group_ids.numpy()


def shaping_moments(sample: GroupSample | RolloutBatch, lam: float = 0.6, rho: float = 0.5) -> pd.DataFrame:
    """The variance argument, measured. Per group and pooled over groups (within-group moments,
    what group normalisation divides by): Var(R), Var(φ), Cov(R, φ), corr, Var(R + λφ), and the
    decomposition Var(R) + λ²Var(φ) + 2λCov(R, φ) (equal to it up to rounding).

    φ = ρ·(share of successful repairs) on failed trajectories, 0 on correct ones.
    """
    if lam < 0 or rho < 0:
        raise ValueError(f"lam and rho must be >= 0, got lam={lam}, rho={rho}")
    r, phi, g = _phi(sample, rho)
    rows = []
    for gid in np.unique(g):
        m = g == gid
        rr, pp = r[m], phi[m]
        if len(rr) < 2:
            continue
        c = np.cov(np.stack([rr, pp]), ddof=1)
        shaped = np.var(rr + lam * pp, ddof=1)
        rows.append({"group": int(gid), "n": int(m.sum()), "reward_mean": rr.mean(), "var_R": c[0, 0],
                     "var_phi": c[1, 1], "cov_R_phi": c[0, 1], "var_shaped": shaped,
                     "var_decomposed": c[0, 0] + lam**2 * c[1, 1] + 2 * lam * c[0, 1],
                     "all_failed": bool(rr.max() < 0.5), "all_correct": bool(rr.min() >= 0.5)})
    df = pd.DataFrame(rows)
    if df.empty:
        raise ValueError("no group with >= 2 trajectories")
    pooled = {"group": -1, "n": int(df.n.sum()), "reward_mean": float(r.mean()), "all_failed": False,
              "all_correct": False}
    for col in ("var_R", "var_phi", "cov_R_phi", "var_shaped", "var_decomposed"):
        pooled[col] = float(np.average(df[col], weights=df.n - 1))  # pooled within-group moments
    df = pd.concat([df, pd.DataFrame([pooled])], ignore_index=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        df["corr_R_phi"] = df.cov_R_phi / np.sqrt(df.var_R * df.var_phi)
    return df


def shaping_variance_curve(sample: GroupSample | RolloutBatch, lams: Sequence[float], rho: float = 0.5) -> pd.DataFrame:
    """Pooled within-group Var(R + λφ) for each λ, measured and from the decomposition."""
    rows = []
    for lam in lams:
        pooled = shaping_moments(sample, lam, rho).iloc[-1]
        rows.append({"lam": float(lam), "rho": rho, "var_shaped": pooled.var_shaped, "var_decomposed": pooled.var_decomposed,
                     "var_R": pooled.var_R, "cov_R_phi": pooled.cov_R_phi, "var_phi": pooled.var_phi})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------- training
#: the TrainConfig fields that define a method (estimator, loss, IBPO knobs); sizes and schedules
#: come from the profile's preset instead
METHOD_FIELDS = ("estimator", "estimator_kwargs", "loss", "agg", "lam", "rho", "edit_mask", "corrector", "repair_k",
                 "k_star", "bilateral", "is_cap", "clip_low", "clip_high", "mc_rollouts", "kl_coef", "correct_kwargs")


def method_variants(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """label -> method overrides, read from the committed configs (``ibpo_lab/configs/<name>.yaml``),
    keeping only :data:`METHOD_FIELDS` — one definition of each baseline and ablation."""
    import yaml

    from ibpo_lab.train import CONFIG_DIR

    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    out = {}
    for n in names:
        f = CONFIG_DIR / f"{n}.yaml"
        if not f.is_file():
            raise ValueError(f"method {n!r} has no config in {CONFIG_DIR}; known: {', '.join(known)}")
        d = yaml.safe_load(f.read_text()) or {}
        out[n] = {k: v for k, v in d.items() if k in METHOD_FIELDS}
    return out


def pick_trajectory(sample: GroupSample, prefer: str = "repaired") -> int:
    """A trajectory worth showing: ``"repaired"`` = the first failed one with a verified repair
    (else the first failed, else 0); ``"failed"`` = the first failed; ``"correct"`` = the first correct."""
    b = sample.batch
    r = b.rewards.numpy()
    rs = b.repair_success.numpy() if b.repair_success is not None else np.zeros(len(b))
    if prefer not in ("repaired", "failed", "correct"):
        raise ValueError(f"prefer must be 'repaired', 'failed' or 'correct', got {prefer!r}")
    cands = {"repaired": np.flatnonzero((r < 0.5) & (rs > 0)), "failed": np.flatnonzero(r < 0.5),
             "correct": np.flatnonzero(r >= 0.5)}
    for key in ([prefer, "failed"] if prefer == "repaired" else [prefer]):
        if len(cands[key]):
            return int(cands[key][0])
    return 0


def repair_of(sample: GroupSample, traj: int) -> tuple[list[int], list[int]] | None:
    """(failed response ids, its selected repair's ids) of trajectory ``traj``; None if not repaired."""
    c = sample.correction
    if c is None or c.repaired is None or len(c.repaired) == 0:
        return None
    src = [int(x) for x in c.repaired.meta.get("source_traj", [])]
    if traj not in src:
        return None
    j = src.index(traj)
    return sample.batch.response_ids[traj], c.repaired.response_ids[j]


#: run sizes of the synthetic-task experiments per profile (the tiny policy; ``full`` on one GPU)
SYNTHETIC_SIZES: dict[str, dict[str, Any]] = {
    "smoke": dict(steps=3, prompts_per_step=2, group_size=4, minibatch_size=0, eval_every=0, eval_n=8, eval_k=1),
    "full": dict(steps=100, prompts_per_step=8, group_size=8, minibatch_size=32, eval_every=20, eval_n=64, eval_k=4,
                 lr=1e-4),
}


def synthetic_preset(profile: str, **overrides):
    """A ``TrainConfig`` for the controlled experiments: the tiny policy on the synthetic task, sized
    by :data:`SYNTHETIC_SIZES` (smoke: seconds per run on a CPU; full: minutes per run on a GPU)."""
    from ibpo_lab.train import presets

    require_gpu_for_full(profile)
    base = {"task": "synthetic", "model": "tiny", "device": "auto", "backend": "hf", **SYNTHETIC_SIZES[profile]}
    return presets("smoke", **{**base, **overrides})


def grid_configs(profile: str, variants: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], *,
                 synthetic: bool = True, fixed: Mapping[str, Any] | None = None, **common) -> list:
    """One ``TrainConfig`` per (variant, seed), variant by variant: the profile's preset
    (:func:`synthetic_preset` if ``synthetic`` else ``train.presets``) with ``common``, then the
    variant's overrides, then ``fixed`` (settings that win over every variant, e.g. a smaller K for
    tiny groups), ``label=<variant name>`` and ``seed``.

    ``variants``: label -> TrainConfig overrides (e.g. ``{"ibpo_k1": {"estimator": "ibpo", "repair_k": 1}}``).
    """
    from ibpo_lab.train import presets

    make = (lambda **kw: synthetic_preset(profile, **kw)) if synthetic else (lambda **kw: presets(profile, **kw))
    if not variants:
        raise ValueError("variants is empty")
    if not seeds:
        raise ValueError("seeds is empty")
    fixed = dict(fixed or {})
    return [make(**{**common, **dict(v), **fixed, "label": name, "seed": int(s)})
            for name, v in variants.items() for s in seeds]


def run_grid(cfgs: Sequence, runs_dir: str | os.PathLike | None, experiment: str, *, progress: bool = False,
             keep_checkpoints: bool = False) -> list:
    """Train every config under ``runs_dir/experiment/<label>-seed<seed>`` (``train.train``, named as
    ``train.train_many`` names them) and return the run records, each with ``.experiment`` set.

    ``runs_dir=None`` trains into ``runs/notebooks/<experiment>``. ``keep_checkpoints=False`` trains
    with ``save_checkpoints=False, checkpoint_every=0`` (no ``checkpoint/`` is written): the notebooks
    read metrics and trajectories only, and a 135M-parameter policy's checkpoint (weights + AdamW
    state) is 1.6 GB.
    """
    from ibpo_lab.train import train

    root = Path(runs_dir if runs_dir is not None else Path("runs") / "notebooks") / experiment
    root.mkdir(parents=True, exist_ok=True)
    records, used = [], set()
    for cfg in cfgs:
        base = f"{cfg.name}-seed{cfg.seed}"
        name, i = base, 1
        while name in used or (root / name).exists():
            i += 1
            name = f"{base}-{i}"
        used.add(name)
        if not keep_checkpoints:
            cfg = cfg.replace(save_checkpoints=False, checkpoint_every=0)
        rec = train(cfg, root / name, progress=progress)
        rec.experiment = experiment  # as load_runs would name it
        records.append(rec)
    return records


def load_runs(runs_dir: str | os.PathLike) -> list:
    """Every run folder (one holding ``config.yaml`` and ``metrics.jsonl``) under ``runs_dir``; the
    experiment (first folder below ``runs_dir``) is kept in ``record.experiment``."""
    from ibpo_lab.train import load_run

    root = Path(runs_dir)
    if not root.is_dir():
        raise ValueError(f"runs_dir: {root} is not a directory")
    out = []
    for cfg in sorted(root.rglob("config.yaml")):
        d = cfg.parent
        if not (d / "metrics.jsonl").is_file():
            continue
        rec = load_run(d)
        rel = d.relative_to(root).parts
        rec.experiment = rel[0] if len(rel) > 1 else ""
        out.append(rec)
    return out


def stability_table(records: Sequence) -> pd.DataFrame:
    """Training stability per config label, over its seeds: final and best reward, run-to-run
    jitter (std over seeds of the final reward), step-to-step jitter (mean |Δ reward|), entropy
    at start and end, mean and max gradient norm, mean approximate KL, skipped optimiser steps."""
    if not records:
        raise ValueError("records is empty")
    per_run = []
    for r in records:
        m = r.metrics
        if m is None or len(m) == 0:
            continue

        def col(name):
            return m[name].astype(float) if name in m.columns else pd.Series([math.nan] * len(m))

        rew = col("reward_mean")
        ent = col("entropy")
        gn = col("grad_norm")
        per_run.append({
            "experiment": getattr(r, "experiment", ""), "label": r.label, "seed": r.config.seed,
            "steps": len(m), "final_reward": rew.iloc[-1], "best_reward": rew.max(),
            "mean_abs_step_change": float(rew.diff().abs().mean()) if len(m) > 1 else math.nan,
            "entropy_start": ent.iloc[0], "entropy_end": ent.iloc[-1],
            "grad_norm_mean": gn.mean(), "grad_norm_max": gn.max(),
            "approx_kl_mean": col("approx_kl").mean(),
            "skipped": float(col("skipped").sum()),
            "repair_success": col("repair_success").mean(),
        })
    df = pd.DataFrame(per_run)
    if df.empty:
        raise ValueError("no record has metrics")
    agg = df.groupby(["experiment", "label"], sort=False).agg(
        n_seeds=("seed", "nunique"), steps=("steps", "max"), final_reward=("final_reward", "mean"),
        run_to_run_std=("final_reward", lambda s: float(s.std(ddof=1)) if len(s) > 1 else math.nan),
        best_reward=("best_reward", "mean"), step_jitter=("mean_abs_step_change", "mean"),
        entropy_start=("entropy_start", "mean"), entropy_end=("entropy_end", "mean"),
        grad_norm_mean=("grad_norm_mean", "mean"), grad_norm_max=("grad_norm_max", "max"),
        approx_kl_mean=("approx_kl_mean", "mean"), skipped=("skipped", "sum"),
        repair_success=("repair_success", "mean"),
    ).reset_index()
    return agg


def final_table(records: Sequence, metric: str = "avg@k") -> pd.DataFrame:
    """``train.summarise_runs`` per experiment: final held-out ``metric`` (mean, 95% CI over seeds)."""
    from ibpo_lab.train import summarise_runs

    if not records:
        raise ValueError("records is empty")
    frames = []
    by_exp: dict[str, list] = {}
    for r in records:
        by_exp.setdefault(getattr(r, "experiment", ""), []).append(r)
    for exp, recs in by_exp.items():
        t = summarise_runs(recs, metric=metric)
        t.insert(0, "experiment", exp)
        frames.append(t)
    return pd.concat(frames, ignore_index=True)
