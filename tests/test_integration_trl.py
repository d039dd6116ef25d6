"""TRL integration: IBPOTrainer runs TRL's GRPO loop on CPU with a tiny char-level Llama, and the
advantages TRL trains on are exactly ibpo_lab's ``get_estimator("ibpo")`` on the same rollouts."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("trl")  # the trl extra is installed in CI (the dev extra pulls it in)

from ibpo_lab.advantages import get_estimator  # noqa: E402
from ibpo_lab.models import build_tiny_policy  # noqa: E402
from ibpo_lab.rollout import RolloutBatch  # noqa: E402
from ibpo_lab.tasks.base import Example, Score, Task  # noqa: E402
from ibpo_lab.tasks.synthetic import VOCAB  # noqa: E402

G = 4  # num_generations
N_PROMPTS = 2  # prompts per generation batch


class DigitTask(Task):
    """reward 1 iff the response contains one of the digits 0-4: a random tiny policy over the
    synthetic VOCAB (~80 characters) succeeds ~40% of the time in 8 tokens, so groups are mixed
    and its own repairs sometimes verify. ``oracle_repair`` is the minimal fix (last character
    -> "0"), so the oracle operator gives one-token edit masks."""

    name = "digit"

    def examples(self, split="train", n=None):
        return [Example(id=f"{split}-{i}", prompt=f"q{i}", answer="") for i in range(4 if n is None else n)]

    def score(self, example, response):
        ok = any(c in "01234" for c in response)
        return Score(float(ok), "ok" if ok else "no digit 0-4")

    def oracle_repair(self, example, failed):
        return failed[:-1] + "0"


def _config(tmp_path, **kw):
    from ibpo_lab.integrations.trl import IBPOConfig

    base = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=N_PROMPTS * G,
        num_generations=G,
        max_completion_length=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
        correct_num_references=2,
        correct_max_new_tokens=8,
        disable_tqdm=True,
    )
    base.update(kw)
    return IBPOConfig(**base)


def _recording_trainer_cls():
    from ibpo_lab.integrations.trl import IBPOTrainer

    class Recording(IBPOTrainer):
        """Keeps every generation batch (inputs + what TRL will train on) and every loss batch."""

        generations: list = []
        trained: list = []

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            self.generations.append(
                dict(
                    ids=[x["example_id"] for x in inputs],
                    out={k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in out.items()},
                    step=self.last_ibpo,
                )
            )
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.trained.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    Recording.generations, Recording.trained = [], []
    return Recording


def _unpad(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


@pytest.fixture(scope="module", params=["policy", "oracle", "tiny-synthetic"])
def trained(request, tmp_path_factory):
    """Two TRL optimiser steps of IBPO (shared by the tests below).

    ``policy``: a random tiny char-level Llama on DigitTask; the trainer's own model writes the
    repairs (ibpo_lab's hf sampler over TRL's unwrapped model) — the method's path.
    ``oracle``: same, with the task's minimal repairs, so edit masks are partial.
    ``tiny-synthetic``: the committed warm-started tiny policy (``load_policy("tiny")``) on the
    synthetic task, policy repairs (skipped until ``data/tiny-policy/`` exists)."""
    from ibpo_lab.integrations.trl import task_dataset

    tmp_path = tmp_path_factory.mktemp("trl")
    if request.param == "tiny-synthetic":
        from ibpo_lab.models import load_policy, tiny_policy_dir
        from ibpo_lab.tasks import get_task

        if not (tiny_policy_dir() / "config.json").is_file():
            pytest.skip(f"no committed tiny policy at {tiny_policy_dir()}")
        policy, task = load_policy("tiny"), get_task("synthetic")
        args = _config(tmp_path, max_completion_length=64, correct_max_new_tokens=None)
    else:
        policy = build_tiny_policy(VOCAB, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=0)
        task = DigitTask()
        args = _config(tmp_path, correct_operator=request.param)
    cls = _recording_trainer_cls()
    torch.manual_seed(0)
    trainer = cls(
        model=policy.model,
        args=args,
        train_dataset=task_dataset(task, n=N_PROMPTS * 2),
        processing_class=policy.tokenizer,
        task=task,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    return trainer, task, args, before


@pytest.mark.slow
def test_training_steps_run_and_update_the_policy(trained):
    trainer, _, _, before = trained
    assert trainer.state.global_step == 2
    assert len(trainer.generations) == 2 and len(trainer.trained) == 2
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(np.isfinite(h["loss"]) for h in logged)
    assert any("ibpo/repair_rate" in h for h in trainer.state.log_history)
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "two optimiser steps left every parameter unchanged"


@pytest.mark.slow
def test_trl_batch_advantages_equal_ibpo_lab_estimator(trained):
    """Rebuild a RolloutBatch from the token ids TRL trains on, score it with the task, attach the
    repair info compare-and-correct produced, and call ibpo_lab's estimator: same [B, T] numbers."""
    trainer, task, args, _ = trained
    exs = trainer.ibpo_examples
    tok = trainer.processing_class
    n_repaired = 0
    for gen in trainer.generations:
        out, step = gen["out"], gen["step"]
        responses = _unpad(out["completion_ids"], out["completion_mask"])
        B = len(responses)
        rewards = [task.reward(exs[i], tok.decode(r, skip_special_tokens=True)) for i, r in zip(gen["ids"], responses)]
        batch = RolloutBatch(
            prompt_ids=_unpad(out["prompt_ids"], out["prompt_mask"]),
            response_ids=responses,
            rewards=rewards,
            group_ids=[i // G for i in range(B)],
            repair_success=step.batch.repair_success,
            edit_masks=step.batch.edit_masks,
        )
        # the trainer's view of the rollout is the one TRL sampled and scored
        assert batch.response_ids == step.batch.response_ids
        assert torch.equal(batch.rewards, step.batch.rewards)
        expected = get_estimator("ibpo")(
            batch, lam=args.ibpo_lam, rho=args.ibpo_rho, eps=args.ibpo_eps, scale="group", token_mask=True
        )
        got = out["advantages"]
        assert got.shape == out["completion_ids"].shape  # per-token [B, T], not TRL's [B]
        T = expected.shape[1]
        torch.testing.assert_close(got[:, :T], expected, rtol=0, atol=1e-6)
        assert not got[:, T:].any()
        failed = batch.rewards < 0.5
        n_repaired += int((failed & (batch.repair_success > 0)).sum())
    # the run must actually have exercised the repair path, else the equality is trivial
    assert n_repaired > 0
    assert any((g["out"]["advantages"] != 0).any() for g in trainer.generations)


@pytest.mark.slow
def test_edit_masked_credit_differs_from_broadcast(trained):
    """On a repaired failed trajectory the credit sits on edited tokens only (token_mask=True)."""
    trainer, _, args, _ = trained
    seen = partial = False
    for gen in trainer.generations:
        b, adv = gen["step"].batch, gen["out"]["advantages"]
        for i in range(len(b)):
            if b.rewards[i] < 0.5 and b.repair_success[i] > 0 and adv[i].any():
                n = len(b.response_ids[i])
                nonzero = (adv[i, :n] != 0).numpy()
                np.testing.assert_array_equal(nonzero, b.edit_masks[i] & b.response_masks[i])
                seen = True
                partial |= bool(0 < nonzero.sum() < n)
    assert seen
    if args.correct_operator == "oracle":  # one-character repairs: credit on one token, not all
        assert partial


@pytest.mark.slow
def test_trained_rows_are_generated_rows(trained):
    """What TRL's loss sees (after its shuffle/split) are rows of the IBPO generation batch."""
    trainer, *_ = trained
    for gen, loss_in in zip(trainer.generations, trainer.trained):
        rows = {
            (tuple(c.tolist()), tuple(a.tolist()))
            for c, a in zip(gen["out"]["completion_ids"], gen["out"]["advantages"])
        }
        for c, a in zip(loss_in["completion_ids"], loss_in["advantages"]):
            assert (tuple(c.tolist()), tuple(a.tolist())) in rows


@pytest.mark.slow
def test_without_shaping_and_mask_ibpo_reproduces_trl_grpo(trained):
    """λ = 0 and token_mask = False is GRPO: on the same rollouts, ibpo_lab's estimator gives
    TRL's own GRPO advantages (computed by TRL, kept before IBPO replaced them)."""
    trainer, _, args, _ = trained
    for gen in trainer.generations:
        step = gen["step"]
        params = dict(args.estimator_params(), lam=0.0, token_mask=False)
        ours = get_estimator("ibpo")(step.batch, **params)
        trl = step.trl_advantages[:, None] * step.batch.response_mask
        torch.testing.assert_close(ours, trl, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- fast unit tests
def test_task_dataset_and_reward():
    from ibpo_lab.integrations.trl import task_dataset, task_reward_func

    task = DigitTask()
    ds = task_dataset(task, n=3)
    assert ds.column_names == ["prompt", "example_id"]
    assert ds["prompt"] == [task.solve_prompt(ex) for ex in task.examples(n=3)]
    reward = task_reward_func(task)
    assert reward.__name__ == "digit_reward"
    assert reward(prompts=["p", "p"], completions=["ab", "a1"], example_id=["train-0", "train-1"]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="example_id"):
        reward(prompts=["p"], completions=["a"])
    with pytest.raises(ValueError, match="not among"):
        reward(prompts=["p"], completions=["a"], example_id=["nope"])
    dup = [Example(id="x", prompt="a", answer=""), Example(id="x", prompt="b", answer="")]
    with pytest.raises(ValueError, match="twice"):
        task_dataset(task, examples=dup)


def test_config_validation_and_translation(tmp_path):
    from ibpo_lab.integrations.trl import IBPOConfig

    args = _config(tmp_path, correct_temperature=None, temperature=0.7, correct_operator="splice")
    cc = args.correct_config()
    assert cc.operator == "splice" and cc.temperature == 0.7 and cc.max_new_tokens == 8
    assert args.estimator_params()["scale"] == "group" and args.estimator_params()["lam"] == 0.6
    assert _config(tmp_path, scale_rewards="none").estimator_params()["scale"] == "none"
    with pytest.raises(ValueError, match="correct_operator"):
        _config(tmp_path, correct_operator="nope")
    with pytest.raises(ValueError, match="correct_num_references"):
        _config(tmp_path, correct_num_references=G)
    with pytest.raises(ValueError, match="ibpo_lam"):
        _config(tmp_path, ibpo_lam=-1.0)
    # the estimator's issue-12 rules: same defaults as ibpo_lab's estimator, passed through, values checked
    import inspect

    from ibpo_lab.advantages import get_estimator

    sig = inspect.signature(get_estimator("ibpo")).parameters
    p = args.estimator_params()
    assert (p["phi"], p["sign_rule"], p["anchors_only"]) == (sig["phi"].default, sig["sign_rule"].default,
                                                             sig["anchors_only"].default) == ("indicator", "safe", False)
    q = _config(tmp_path, ibpo_phi="share", ibpo_sign_rule="shaped", ibpo_anchors_only=True).estimator_params()
    assert (q["phi"], q["sign_rule"], q["anchors_only"]) == ("share", "shaped", True)
    for field, bad in (("ibpo_phi", "mean"), ("ibpo_sign_rule", "signed"), ("ibpo_anchors_only", "yes")):
        with pytest.raises(ValueError, match=field):
            _config(tmp_path, **{field: bad})
    # CorrectConfig's issue-12 fields arrive through the correct_* fields by themselves
    cc = _config(tmp_path, correct_reference_mode="joint", correct_audit_copy=True, correct_edit_budget=0.5,
                 correct_edit_penalty=0.25).correct_config()
    assert (cc.reference_mode, cc.audit_copy, cc.edit_budget, cc.edit_penalty) == ("joint", True, 0.5, 0.25)
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        _config(tmp_path, multi_objective_aggregation="normalize_then_sum")
    with pytest.raises(ValueError, match="truncate_k"):
        _config(tmp_path, correct_truncate_k=0)
    assert all(f.metadata.get("help") for f in IBPOConfig.__dataclass_fields__.values() if f.name.startswith(("ibpo_", "correct_")))


def test_correct_fields_are_correctconfigs(tmp_path):
    """IBPOConfig's correct_* fields are CorrectConfig's fields: same names, defaults and help."""
    import dataclasses

    from ibpo_lab.correct import CorrectConfig
    from ibpo_lab.integrations.trl import IBPOConfig

    ours = {f.name: f for f in dataclasses.fields(IBPOConfig) if f.name.startswith("correct_")}
    for f in dataclasses.fields(CorrectConfig):
        if f.name == "rho":  # ρ is ibpo_rho, shared with the estimator
            assert "correct_rho" not in ours
            continue
        g = ours[f"correct_{f.name}"]
        assert g.metadata["help"].startswith(f.metadata["help"])
        if f.name not in ("temperature", "top_p", "max_new_tokens"):
            assert g.default == f.default, f.name
    # the default agrees with its help text (it said 0.5 and was 1.0)
    assert IBPOConfig.__dataclass_fields__["correct_success_threshold"].default == 0.5
    args = _config(tmp_path)
    assert args.correct_config().success_threshold == 0.5 == args.ibpo_success_threshold


def test_missing_trl_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    monkeypatch.delitem(sys.modules, "ibpo_lab.integrations.trl", raising=False)
    with pytest.raises(ImportError, match=r"ibpo_lab\[trl\]"):
        importlib.import_module("ibpo_lab.integrations.trl")


# --------------------------------------------------------------------------- recipes and CLI
def test_recipes_are_valid_configs(tmp_path):
    """Every shipped TRL recipe names only known keys and IBPOConfig fields, and builds a config
    (GPU-only switches turned off so it validates on this CPU machine)."""
    import yaml

    from ibpo_lab.integrations import RECIPES_DIR
    from ibpo_lab.integrations.trl import RECIPE_KEYS, IBPOConfig

    recipes = sorted(RECIPES_DIR.glob("trl_*.yaml"))
    assert {p.name for p in recipes} >= {"trl_ibpo_tiny.yaml", "trl_ibpo_gsm8k.yaml"}
    for path in recipes:
        cfg = yaml.safe_load(path.read_text())
        assert set(cfg) <= set(RECIPE_KEYS), path.name
        kw = dict(cfg["trainer"], output_dir=str(tmp_path), use_cpu=True, bf16=False, use_vllm=False)
        args = IBPOConfig(**kw)
        assert args.correct_config().operator == cfg["trainer"].get("correct_operator", "policy")
    script = (RECIPES_DIR / "run_trl_ibpo.sh").read_text()
    assert "accelerate launch" in script and "-m ibpo_lab.integrations.trl" in script


@pytest.mark.slow
def test_cli_runs_the_tiny_recipe(tmp_path):
    """``python -m ibpo_lab.integrations.trl --config trl_ibpo_tiny.yaml`` (in-process), one step,
    with a freshly built tiny policy standing in for the committed checkpoint."""
    from ibpo_lab.integrations import RECIPES_DIR
    from ibpo_lab.integrations.trl import main

    from ibpo_lab.tasks.synthetic import VOCAB as SYN_VOCAB

    policy = build_tiny_policy(SYN_VOCAB, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    policy.model.save_pretrained(tmp_path / "policy")
    policy.tokenizer.save_pretrained(tmp_path / "policy")
    out = tmp_path / "run"
    trainer = main([
        "--config", str(RECIPES_DIR / "trl_ibpo_tiny.yaml"),
        "--set", f"model={tmp_path / 'policy'}",
        "--set", "n_examples=4",
        "--max_steps", "1",                          # TRL's own flags pass through (HfArgumentParser types)
        "--max_completion_length=16",
        "--learning_rate", "1e-6",
        "--output_dir", str(out),
    ])
    assert trainer.state.global_step == 1
    assert trainer.args.learning_rate == 1e-6 and trainer.args.max_completion_length == 16
    if importlib.util.find_spec("tensorboard") is not None:  # the recipe reports to TensorBoard
        assert trainer.args.report_to == ["tensorboard"] and any(out.rglob("events.out.tfevents*"))
    assert trainer.last_ibpo is not None and trainer.last_ibpo.advantages.shape[0] == 16
    assert (out / "config.json").is_file() and any(out.glob("model*.safetensors"))
    with pytest.raises(ValueError, match="unknown keys"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("model: tiny\ntask: synthetic\nlearning_rate: 1\n")
        main(["--config", str(bad)])


def test_multi_process_repairs_merge_to_the_single_process_result():
    """accelerate with W processes: each repairs the groups it owns (g mod W); merging everyone's
    records gives exactly the single-process compare-and-correct result (deterministic sampler)."""
    from _sampler_fakes import PredTask, ScriptedSampler, make_batch

    from ibpo_lab.correct import CorrectConfig, compare_and_correct
    from ibpo_lab.integrations.trl import merge_repair_info, owned_rows, repair_records

    task = PredTask(lambda r: "!" not in r)

    def script(prompt, j):  # the "policy" deletes the first "!" of the failed attempt
        failed = prompt.split("A failed attempt:\n", 1)[1].split("\nA reference attempt:", 1)[0]
        return failed.replace("!", "", 1)

    groups = [["ab!c", "abc", "a!!c"], ["ok", "o!k", "fine"], ["x!", "y", "z!z"], ["!", "!!", "q"]]
    batch, exs = make_batch(groups, task)
    cfg = CorrectConfig(num_references=1)
    whole = compare_and_correct(batch, exs, task, ScriptedSampler(script), cfg).batch
    for world in (1, 2, 3):
        records = []
        for rank in range(world):
            own = owned_rows(batch.group_ids, world, rank)
            assert all(int(batch.group_ids[i]) % world == rank for i in own)
            res = compare_and_correct(batch.select(own), [exs[i] for i in own], task, ScriptedSampler(script), cfg) if own else None
            records += repair_records(own, res)
        merged = merge_repair_info(batch, records)
        assert torch.equal(merged.repair_success, whole.repair_success)
        assert all(np.array_equal(a, b) for a, b in zip(merged.edit_masks, whole.edit_masks))
    assert whole.repair_success.sum() > 0
    with pytest.raises(ValueError, match="two processes"):
        merge_repair_info(batch, records + records[:1])
    with pytest.raises(ValueError, match="rank"):
        owned_rows(batch.group_ids, 2, 2)


_DISTRIBUTED_SCRIPT = r'''
import json, os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
import test_integration_trl as t
from ibpo_lab.integrations.trl import task_dataset
from ibpo_lab.models import build_tiny_policy
from ibpo_lab.tasks.synthetic import VOCAB

out_dir = Path({out!r})
policy = build_tiny_policy(VOCAB, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=0)
task = t.DigitTask()
# 2 completions per process per step and groups of 4: every group straddles the two processes
args = t._config(out_dir / "run", per_device_train_batch_size=2, max_steps=2)
trainer = t._recording_trainer_cls()(model=policy.model, args=args, train_dataset=task_dataset(task, n=4),
                                      processing_class=policy.tokenizer, task=task)
trainer.train()
rank = trainer.accelerator.process_index
steps = []
for g in trainer.generations:
    b, st = g["step"].batch, g["step"]
    steps.append(dict(
        world=trainer.accelerator.num_processes, slice=[st.process_slice.start, st.process_slice.stop],
        response_ids=b.response_ids, rewards=b.rewards.tolist(), group_ids=b.group_ids.tolist(),
        response_masks=[m.tolist() for m in b.response_masks], repair_success=b.repair_success.tolist(),
        edit_masks=[m.tolist() for m in b.edit_masks], repaired_here=st.corrections is not None,
        trained_advantages=g["out"]["advantages"].tolist(),
    ))
(out_dir / f"rank{{rank}}.json").write_text(json.dumps(steps))
'''


@pytest.mark.slow
def test_two_processes_split_repairs_and_slice_advantages(tmp_path):
    """A real 2-process run (torchrun, gloo on CPU) where every group straddles the processes:
    both see the same gathered batch and repair info, one process repairs each group, and each
    trains on its own rows of ibpo_lab's estimator over the WHOLE batch."""
    import json
    import os
    import subprocess
    from pathlib import Path

    script = tmp_path / "run_ibpo_ddp.py"
    script.write_text(_DISTRIBUTED_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    n_repaired = 0
    for s0, s1 in zip(*ranks):
        assert s0["world"] == s1["world"] == 2
        for key in ("response_ids", "rewards", "group_ids", "repair_success", "edit_masks"):
            assert s0[key] == s1[key], key  # one gathered view of the batch and its repairs
        assert s0["slice"] == [0, 2] and s1["slice"] == [2, 4]
        assert len(set(s0["group_ids"])) == 1  # the group spans both processes
        assert s0["repaired_here"] != s1["repaired_here"]  # exactly one owner repairs it
        batch = RolloutBatch(
            prompt_ids=[[1]] * 4, response_ids=s0["response_ids"], rewards=s0["rewards"], group_ids=s0["group_ids"],
            response_masks=s0["response_masks"], repair_success=s0["repair_success"], edit_masks=s0["edit_masks"],
        )
        expected = get_estimator("ibpo")(batch, lam=0.6, rho=0.5, eps=1e-4)
        for s in (s0, s1):
            got = torch.tensor(s["trained_advantages"])
            exp = expected[s["slice"][0] : s["slice"][1]]
            w = min(got.shape[1], exp.shape[1])  # widths differ by padding only
            torch.testing.assert_close(got[:, :w], exp[:, :w], rtol=0, atol=1e-6)
            assert not got[:, w:].any() and not exp[:, w:].any()
        n_repaired += sum(r < 0.5 and p > 0 for r, p in zip(s0["rewards"], s0["repair_success"]))
    assert n_repaired > 0


def test_trl_flags_parse_with_trl_types_and_recipe_keys_stay_recipe_keys():
    from ibpo_lab.integrations.trl import trl_flag_overrides

    got = trl_flag_overrides(["--learning_rate", "1e-6", "--lr_scheduler_type", "cosine", "--gradient_checkpointing",
                              "--ibpo_lam", "0.3", "--correct_num_references=3", "--model", "tiny", "--n_examples", "4",
                              "--no_correct_insertion_credit"])
    assert got == {"learning_rate": 1e-6, "lr_scheduler_type": "cosine", "gradient_checkpointing": True, "ibpo_lam": 0.3,
                   "correct_num_references": 3, "model": "tiny", "n_examples": 4, "correct_insertion_credit": False}
    with pytest.raises(ValueError, match=r"unknown arguments \['--nope', '1'\]"):
        trl_flag_overrides(["--nope", "1"])
    with pytest.raises(SystemExit):  # TRL's choices: argparse's usage error
        trl_flag_overrides(["--lr_scheduler_type", "weird"])


# --------------------------------------------------------------------------- independently computed values
def _ibpo_tokens_by_hand(rewards, repair, edits, masks, lam=0.6, rho=0.5, eps=1e-4, thr=0.5, const_tol=1e-5):
    """IBPO token credit of ONE group from the method's definition, plain Python floats (no ibpo_lab):
    R' = R + λρ·1[failed and a revision verified]; A = GRPO (mean, unbiased std + eps; a singleton or
    constant group -> 0) on R'; a failure gets min(A', (1 - λρ·1[repaired]) · min(0, A^R)), A^R = GRPO
    on R; a repaired failure is credited on its edited trained tokens, everyone else on every trained
    token (an edit that touched no trained token: the sequence credit, TRL's ibpo_empty_edit)."""
    G = len(rewards)

    def grpo(x):
        m = sum(x) / G
        if G < 2 or max(x) - min(x) <= const_tol * max(1.0, max(abs(v) for v in x)):
            return [0.0] * G
        s = math.sqrt(sum((v - m) ** 2 for v in x) / (G - 1))
        return [(v - m) / (s + eps) for v in x]

    rep = [r < thr and p > 0 for r, p in zip(rewards, repair)]
    bonus = [lam * rho if k else 0.0 for k in rep]
    pub = grpo([r + b for r, b in zip(rewards, bonus)])
    out_r = grpo(list(rewards))
    seq = [p if r >= thr else min(p, max(0.0, 1 - b) * min(0.0, a)) for r, b, p, a in zip(rewards, bonus, pub, out_r)]
    rows = []
    for a, k, e, m in zip(seq, rep, edits, masks):
        credited = [bool(x) and bool(y) for x, y in zip(e, m)] if k and e is not None else None
        if credited is None or not any(credited):
            credited = [bool(y) for y in m]
        rows.append([a if c else 0.0 for c in credited])
    return rows


def test_estimator_params_give_hand_derived_advantages(tmp_path):
    """IBPOConfig's fields reach the estimator with their meaning: a small group against hand numbers.

    TRL's eps 1e-4. Group: R = [1, 0, 0, 0], the first failure repaired (tokens 1-2 edited), the correct
    one carries a repair share and an edit mask (ignored). R' = [1, .3, 0, 0] (mean .325, std
    sqrt(.6675/3)); GRPO on R gives a failure -.25/.5 = -.5, so the repaired failure gets
    min(-.025/std', .7·-.5) = -.35 on its edited tokens; unrepaired ones -.325/std' everywhere."""
    batch = RolloutBatch(
        prompt_ids=[[1]] * 4, response_ids=[[5] * 3, [5] * 4, [5] * 3, [5] * 2], rewards=[1.0, 0.0, 0.0, 0.0],
        group_ids=[0] * 4, repair_success=[0.5, 1.0, 0.0, 0.0],
        edit_masks=[[1, 0, 0], [0, 1, 1, 0], [1, 0, 0], [0, 1]],
    )
    sd = math.sqrt(0.6675 / 3) + 1e-4
    hand = torch.tensor(
        [
            [0.675 / sd] * 3 + [0.0],
            [0.0, 0.7 * -0.25 / (0.5 + 1e-4), 0.7 * -0.25 / (0.5 + 1e-4), 0.0],
            [-0.325 / sd] * 3 + [0.0],
            [-0.325 / sd] * 2 + [0.0, 0.0],
        ]
    )
    assert float(hand[1, 1]) == pytest.approx(-0.35, abs=1e-4)
    by_hand = _ibpo_tokens_by_hand([1.0, 0.0, 0.0, 0.0], [0.5, 1.0, 0.0, 0.0], batch.edit_masks, [[1] * len(r) for r in batch.response_ids])
    torch.testing.assert_close(torch.tensor([r + [0.0] * (4 - len(r)) for r in by_hand]), hand, rtol=0, atol=1e-6)
    args = _config(tmp_path)
    torch.testing.assert_close(get_estimator("ibpo")(batch, **args.estimator_params()), hand, rtol=0, atol=1e-6)
    # scale_rewards="none" (Dr. GRPO): no std division; the floor is then .7 · (0 - .25) = -.175
    flat = get_estimator("ibpo")(batch, **_config(tmp_path, scale_rewards="none").estimator_params())
    torch.testing.assert_close(flat[0, :3], torch.full((3,), 0.675), rtol=0, atol=1e-6)
    torch.testing.assert_close(flat[1], torch.tensor([0.0, -0.175, -0.175, 0.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(flat[2, :3], torch.full((3,), -0.325), rtol=0, atol=1e-6)
    # ibpo_lam = 0 and no token mask: GRPO on R, 0.75/0.5 and -0.25/0.5 (eps 1e-4)
    grpo = get_estimator("ibpo")(batch, **_config(tmp_path, ibpo_lam=0.0, ibpo_token_mask=False).estimator_params())
    torch.testing.assert_close(grpo[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_trl_advantages_equal_a_plain_python_reference(trained):
    """What TRL trained on, against ibpo_lab-free arithmetic on the recorded rollouts and repairs."""
    trainer, _, args, _ = trained
    seen_repaired = 0
    for gen in trainer.generations:
        b, got = gen["step"].batch, gen["out"]["advantages"]
        for members in b.groups().values():
            rows = _ibpo_tokens_by_hand(
                [float(b.rewards[i]) for i in members], [float(b.repair_success[i]) for i in members],
                [b.edit_masks[i] for i in members], [b.response_mask[i, : len(b.response_ids[i])].tolist() for i in members],
                lam=args.ibpo_lam, rho=args.ibpo_rho, eps=args.ibpo_eps, thr=args.ibpo_success_threshold,
            )
            for i, row in zip(members, rows):
                torch.testing.assert_close(got[i, : len(row)], torch.tensor(row, dtype=torch.float32), rtol=0, atol=1e-5)
                assert not got[i, len(row):].any()
                seen_repaired += int(b.rewards[i] < 0.5 and b.repair_success[i] > 0)
    assert seen_repaired > 0


def _train_repairs(tmp_path, **kw):
    from ibpo_lab.integrations.trl import IBPOTrainer, task_dataset

    policy = build_tiny_policy(VOCAB, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=0)
    task = DigitTask()
    torch.manual_seed(0)
    trainer = IBPOTrainer(model=policy.model, args=_config(tmp_path, correct_operator="policy", **kw),
                          train_dataset=task_dataset(task, n=N_PROMPTS * 2), processing_class=policy.tokenizer, task=task)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_trl_trains_the_repairs_jrep_and_bilateral(tmp_path):
    """J_rep (and bilateral rows) add a non-zero loss term and move the weights away from the λ_rep = 0 run.
    'selected' advantages (+1 on the selected repair): at ratio 1 the token-mean loss is -1 exactly
    (with 'group' advantages of equal-length revisions it is 0 while its gradient is not)."""
    on = _train_repairs(tmp_path / "on", ibpo_bilateral=True, ibpo_repair_advantage="selected", ibpo_repair_loss_weight=1.0)
    off = _train_repairs(tmp_path / "off", ibpo_bilateral=True, ibpo_repair_loss_weight=0.0)
    hist = {k: [h[k] for h in on.state.log_history if k in h] for k in ("ibpo/loss_repair", "ibpo/loss_bilateral")}
    assert hist["ibpo/loss_repair"] and hist["ibpo/loss_repair"][0] == pytest.approx(-1.0, abs=1e-5)
    assert hist["ibpo/loss_bilateral"]
    assert not any("ibpo/loss_repair" in h for h in off.state.log_history)
    objs = on.ibpo_repair_objectives
    assert objs["repair"].weight == 1.0 and set(objs["repair"].adv.unique().tolist()) <= {0.0, 1.0}
    # bilateral rows: trained on inserted tokens only, IS weights in (0, cap] there
    bi = objs["bilateral"]
    m = bi.padded.response_mask.bool()
    assert torch.all(bi.is_weights[~m] == 0) and torch.all((bi.is_weights[m] > 0) & (bi.is_weights[m] <= 2.0 + 1e-6))
    # the first generation batch is the same in both runs (same seed, same initial weights): only the repair
    # terms make the weights differ
    assert on.last_ibpo is not None and off.last_ibpo is not None
    diff = [n for (n, p), (_, q) in zip(on.model.named_parameters(), off.model.named_parameters())
            if not torch.equal(p.detach(), q.detach())]
    assert diff, "the repair objectives did not change the weights"


def test_repair_fields_are_validated(tmp_path):
    with pytest.raises(ValueError, match="ibpo_repair_advantage"):
        _config(tmp_path, ibpo_repair_advantage="best")
    with pytest.raises(ValueError, match="ibpo_repair_loss_weight"):
        _config(tmp_path, ibpo_repair_loss_weight=-1.0)
    with pytest.raises(ValueError, match="ibpo_is_cap"):
        _config(tmp_path, ibpo_is_cap=0.0)
