"""verl adapter: the ``ibpo`` estimator on tensors shaped as verl passes them, the repair-info hook
on a DataProto-like batch, the dataset/reward helpers, and registration.

verl itself is not installed here (it pins torch/vllm/ray). Against verl's real code: set
``IBPO_VERL_SRC`` to an unpacked verl wheel (``pip download --no-deps verl==0.9.1`` + unzip);
then ``core_algos.py`` is loaded with its heavy imports stubbed and the adapter is registered in,
and compared with, verl's own registry and GRPO estimator. Otherwise those two tests skip.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import types
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from _sampler_fakes import CharTok, PredTask, ScriptedSampler
from ibpo_lab.advantages import get_estimator
from ibpo_lab.correct import CorrectConfig
from ibpo_lab.integrations import verl as iv
from ibpo_lab.rollout import RolloutBatch

G, N_GROUPS, T = 4, 3, 12


def verl_like(seed: int = 0, shuffle: bool = True):
    """Tensors as verl's compute_advantage passes them: rewards on the last response token,
    right-padded response_mask, uid strings (interleaved repeats, then reordered as verl's
    batch balancing does), repair info as the hook attaches it. Also the ragged truth."""
    g = torch.Generator().manual_seed(seed)
    B = G * N_GROUPS
    lengths = torch.randint(3, T + 1, (B,), generator=g).tolist()
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    rewards[0], rewards[1] = 1.0, 0.0  # group 0 is mixed for sure
    uids = [str(uuid.UUID(int=k + 1)) for k in range(N_GROUPS) for _ in range(G)]
    repair = torch.where(rewards < 0.5, torch.randint(0, 3, (B,), generator=g).float() / 2, torch.zeros(B))
    edit_rows = []
    for i, n in enumerate(lengths):
        m = torch.rand(n, generator=g) < 0.3
        if repair[i] > 0 and not m.any():
            m[0] = True  # a successful repair edits something
        edit_rows.append(m.numpy())
    order = torch.randperm(B, generator=g).tolist() if shuffle else list(range(B))
    lengths = [lengths[i] for i in order]
    rewards, repair = rewards[order], repair[order]
    uids = [uids[i] for i in order]
    edit_rows = [edit_rows[i] for i in order]
    mask = torch.zeros(B, T)
    tlr = torch.zeros(B, T)
    edit = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        tlr[i, n - 1] = rewards[i]
        edit[i, :n] = torch.as_tensor(edit_rows[i], dtype=torch.float32)
    ragged = RolloutBatch(
        prompt_ids=[[1]] * B,
        response_ids=[[5] * n for n in lengths],
        rewards=rewards,
        group_ids=[uids.index(u) for u in uids],
        repair_success=repair,
        edit_masks=edit_rows,
    )
    index = np.array(uids, dtype=object)
    return dict(tlr=tlr, mask=mask, index=index, repair=repair.numpy().astype(np.float32), edit=edit, ragged=ragged)


def pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def verl_grpo_reference(scores: torch.Tensor, index, eps: float = 1e-6) -> torch.Tensor:
    """verl's documented GRPO outcome advantage (compute_grpo_outcome_advantage), as a loop."""
    out = torch.zeros_like(scores)
    for u in set(index.tolist()):
        idx = [i for i, v in enumerate(index.tolist()) if v == u]
        s = scores[idx]
        out[idx] = (s - s.mean()) / (s.std() + eps)
    return out


# --------------------------------------------------------------------------- the estimator
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimator_equals_ibpo_lab_on_the_ragged_batch(seed):
    d = verl_like(seed)
    config = {"norm_adv_by_std_in_grpo": True, "ibpo": {"lam": 0.6, "rho": 0.5}}
    adv, returns = iv.compute_ibpo_outcome_advantage(
        token_level_rewards=d["tlr"], response_mask=d["mask"], index=d["index"], config=config,
        non_tensor_batch={"uid": d["index"], iv.REPAIR_SUCCESS_KEY: d["repair"]}, batch={iv.EDIT_MASK_KEY: d["edit"]},
    )
    expected = get_estimator("ibpo")(d["ragged"], lam=0.6, rho=0.5)
    assert adv.shape == (G * N_GROUPS, T) and torch.equal(adv, returns)
    torch.testing.assert_close(adv, pad_to(expected, T), rtol=0, atol=1e-6)
    assert torch.all(adv[d["mask"] == 0] == 0)
    # edit-masked credit: a repaired failed trajectory is credited exactly on its edited tokens
    rep = (d["ragged"].rewards < 0.5) & (d["ragged"].repair_success > 0)
    for i in torch.nonzero(rep).flatten().tolist():
        if adv[i].any():
            assert torch.equal(adv[i] != 0, d["edit"][i].bool())


def test_lambda_zero_without_mask_is_verl_grpo():
    d = verl_like(3)
    config = {"ibpo": {"lam": 0.0, "token_mask": False}}
    adv, _ = iv.compute_ibpo_outcome_advantage(
        d["tlr"], d["mask"], d["index"], config=config, non_tensor_batch={iv.REPAIR_SUCCESS_KEY: d["repair"]},
    )
    ref = verl_grpo_reference(d["tlr"].sum(-1), d["index"])[:, None] * d["mask"]
    torch.testing.assert_close(adv, ref, rtol=0, atol=1e-5)
    # Dr. GRPO switch of verl's config: no std division
    adv_nostd, _ = iv.compute_ibpo_outcome_advantage(
        d["tlr"], d["mask"], d["index"], config={"norm_adv_by_std_in_grpo": False, "ibpo": {"lam": 0.0}},
        non_tensor_batch={iv.REPAIR_SUCCESS_KEY: np.zeros(len(d["index"]), np.float32)},
    )
    s = d["tlr"].sum(-1)
    means = {u: s[[j for j, v in enumerate(d["index"]) if v == u]].mean() for u in set(d["index"])}
    centred = torch.stack([s[i] - means[u] for i, u in enumerate(d["index"])])
    torch.testing.assert_close(adv_nostd, centred[:, None] * d["mask"], rtol=0, atol=1e-6)


def test_shaping_changes_failed_repaired_trajectories():
    d = verl_like(4)
    kw = dict(non_tensor_batch={iv.REPAIR_SUCCESS_KEY: d["repair"]}, batch={iv.EDIT_MASK_KEY: d["edit"]})
    a0, _ = iv.compute_ibpo_outcome_advantage(d["tlr"], d["mask"], d["index"], config={"ibpo": {"lam": 0.0}}, **kw)
    a1, _ = iv.compute_ibpo_outcome_advantage(d["tlr"], d["mask"], d["index"], config={"ibpo": {"lam": 0.6}}, **kw)
    assert not torch.allclose(a0, a1)


def test_issue_case_no_positive_credit_on_a_failed_trajectory():
    # rewards [1,0,0,0,0,0,0,0], three repaired failures editing tokens 1-2 of 4: the old shaped rule
    # gave them +0.183 on exactly those tokens; the default (as in ibpo_lab) gives strictly negative credit
    B, Tn = 8, 4
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0])
    repair = np.array([0, 1, 1, 1, 0, 0, 0, 0], dtype=np.float32)
    mask = torch.ones(B, Tn)
    tlr = torch.zeros(B, Tn)
    tlr[:, -1] = rewards
    edit = torch.zeros(B, Tn)
    edit[:, 1:3] = 1.0
    index = np.array(["u"] * B, dtype=object)
    kw = dict(non_tensor_batch={iv.REPAIR_SUCCESS_KEY: repair}, batch={iv.EDIT_MASK_KEY: edit})
    adv, _ = iv.compute_ibpo_outcome_advantage(tlr, mask, index, config={"ibpo": {"lam": 0.6, "rho": 0.5}}, **kw)
    failed = rewards < 0.5
    assert (adv[failed] <= 0).all()
    # the hand value: (1 - λρ) x the GRPO penalty of a failure among [1,0,0,0,0,0,0,0], -0.125 / sqrt(0.125)
    torch.testing.assert_close(adv[1:4, 1:3], torch.full((3, 2), 0.7 * -0.125 / float(np.sqrt(0.125))), rtol=0, atol=1e-5)
    assert (adv[1:4, [0, 3]] == 0).all()
    # the old rule is still an option (an ablation), and shows the defect
    old, _ = iv.compute_ibpo_outcome_advantage(
        tlr, mask, index, config={"ibpo": {"lam": 0.6, "rho": 0.5, "sign_rule": "shaped"}}, **kw
    )
    assert (old[1:4, 1:3] > 0).all()
    assert {"phi", "sign_rule", "anchors_only"} <= set(iv.ESTIMATOR_KEYS)
    assert not {"scale", "eps", "std"} & set(iv.ESTIMATOR_KEYS)


def test_estimator_errors_name_the_fix():
    d = verl_like(0)
    with pytest.raises(ValueError, match=r'"gdpo", "ibpo"'):
        iv.compute_ibpo_outcome_advantage(d["tlr"], d["mask"], d["index"])
    ntb = {iv.REPAIR_SUCCESS_KEY: d["repair"]}
    with pytest.raises(ValueError, match="unknown keys"):
        iv.compute_ibpo_outcome_advantage(d["tlr"], d["mask"], d["index"], config={"ibpo": {"lambda": 1}}, non_tensor_batch=ntb)
    with pytest.raises(ValueError, match="index"):
        iv.compute_ibpo_outcome_advantage(d["tlr"], d["mask"], None, non_tensor_batch=ntb)
    with pytest.raises(ValueError, match="ibpo_edit_mask"):
        iv.compute_ibpo_outcome_advantage(
            d["tlr"], d["mask"], d["index"], non_tensor_batch=ntb, batch={iv.EDIT_MASK_KEY: d["edit"][:, :3]}
        )
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        iv.compute_ibpo_outcome_advantage(d["tlr"], d["mask"][:, :3], d["index"], non_tensor_batch=ntb)


def test_group_ids_follow_uids_not_positions():
    gids = iv.group_ids_from_uids(np.array(["b", "a", "b", "c", "a"], dtype=object))
    assert gids.tolist() == [0, 1, 0, 2, 1]


# --------------------------------------------------------------------------- the hook
def fake_dataproto(groups: list[list[str]], task, P: int = 6) -> SimpleNamespace:
    """A verl DataProto stand-in after the reward step: left-padded prompts, right-padded responses."""
    tok = CharTok()
    exs = task.examples(n=len(groups))
    texts = [t for grp in groups for t in grp]
    B, Tr = len(texts), max(len(t) for t in texts) + 1
    prompts = torch.zeros(B, P, dtype=torch.long)
    responses = torch.zeros(B, Tr, dtype=torch.long)
    attn = torch.zeros(B, P + Tr, dtype=torch.long)
    scores = torch.zeros(B, Tr)
    uids, infos, k = [], [], 0
    for g, grp in enumerate(groups):
        p = tok.encode(task.solve_prompt(exs[g]))[-P:]
        for t in grp:
            ids = tok.encode(t)
            prompts[k, P - len(p):] = torch.tensor(p)
            attn[k, P - len(p): P] = 1
            responses[k, : len(ids)] = torch.tensor(ids)
            attn[k, P: P + len(ids)] = 1
            scores[k, len(ids) - 1] = task.reward(exs[g], t)
            uids.append(f"uid-{g}")
            infos.append({"example_id": exs[g].id, "split": "train", "index": g})
            k += 1
    batch = {"prompts": prompts, "responses": responses, "attention_mask": attn, "token_level_scores": scores,
             "response_mask": attn[:, P:].clone()}
    return SimpleNamespace(batch=batch, non_tensor_batch={"uid": np.array(uids, dtype=object),
                                                          "extra_info": np.array(infos, dtype=object)})


def test_attach_repair_info_then_estimator_equals_ibpo_lab():
    task = PredTask(lambda r: "!" not in r)
    # the scripted policy repairs by deleting the first "!" of the failed attempt
    def script(prompt, j):
        failed = prompt.split("A failed attempt:\n", 1)[1].split("\nA reference attempt:", 1)[0]
        return failed.replace("!", "", 1)

    data = fake_dataproto([["ab!c", "abc", "a!!c", "xyz"], ["ok", "o!k", "fine", "f!ne!"]], task)
    result = iv.attach_repair_info(
        data, task, ScriptedSampler(script), CorrectConfig(num_references=1), tokenizer=CharTok(),
        examples=task.examples(n=2),
    )
    rs = data.non_tensor_batch[iv.REPAIR_SUCCESS_KEY]
    edit = data.batch[iv.EDIT_MASK_KEY]
    assert rs.dtype == np.float32 and rs.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # one-"!" failures verify
    assert edit.shape == data.batch["responses"].shape
    assert edit[0].tolist()[:4] == [0, 0, 1, 0]  # the "!" of "ab!c" is the edited token
    assert edit[5].tolist()[:3] == [0, 1, 0]
    # what verl would then compute (after the one-line change) is ibpo_lab's estimator on the repaired batch
    adv, _ = iv.compute_ibpo_outcome_advantage(
        data.batch["token_level_scores"], data.batch["response_mask"].float(), data.non_tensor_batch["uid"],
        config={"ibpo": {"lam": 0.6}}, non_tensor_batch=data.non_tensor_batch, batch=data.batch,
    )
    expected = get_estimator("ibpo")(result.batch, lam=0.6)
    torch.testing.assert_close(adv, pad_to(expected, adv.shape[1]), rtol=0, atol=1e-6)
    assert iv.repair_metrics(result)["ibpo/n_repaired"] == 2.0


def test_rollout_batch_from_verl_unpads():
    task = PredTask(lambda r: True)
    data = fake_dataproto([["abc", "d"]], task, P=4)
    rb = iv.rollout_batch_from_verl(data, CharTok())
    assert rb.response_ids == [[ord(c) for c in "abc"], [ord("d")]]
    assert rb.responses == ["abc", "d"] and rb.rewards.tolist() == [1.0, 1.0]
    assert all(len(p) == 4 for p in rb.prompt_ids)
    del data.batch["token_level_scores"]
    with pytest.raises(ValueError, match="token_level_scores"):
        iv.rollout_batch_from_verl(data)


# --------------------------------------------------------------------------- data, reward, CLI
def test_write_verl_dataset_and_compute_score(tmp_path):
    from ibpo_lab.tasks import get_task

    task = get_task("synthetic")
    paths = iv.write_verl_dataset(task, tmp_path, n=3)
    assert [p.name for p in paths] == ["train.parquet", "test.parquet"]
    df = pd.read_parquet(paths[0])
    assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert len(df) == 3 and df.data_source.iloc[0] == "ibpo_lab/synthetic"
    ex = task.examples("train", 3)[1]
    row = df.iloc[1]
    assert row.prompt[0]["content"] == task.solve_prompt(ex)
    info = dict(row.extra_info)
    assert iv.compute_score(row.data_source, task.solution(ex), row.reward_model["ground_truth"], info) == 1.0
    assert iv.compute_score(row.data_source, "ans=nope", row.reward_model["ground_truth"], info) == 0.0
    with pytest.raises(ValueError, match="ibpo_lab/"):
        iv.compute_score("openai/gsm8k", "x", "1", info)
    assert iv.main(["prepare", "--task", "synthetic", "--out", str(tmp_path / "cli"), "--n", "2"])[0].is_file()


def test_recipe_uses_the_estimator_and_reward():
    import yaml

    from ibpo_lab.integrations import RECIPES_DIR

    cfg = yaml.safe_load((RECIPES_DIR / "verl_ibpo_gsm8k.yaml").read_text())
    assert cfg["algorithm"]["adv_estimator"] == iv.ESTIMATOR_NAME
    assert set(cfg["algorithm"]["ibpo"]) <= set(iv.ESTIMATOR_KEYS)
    reward = cfg["reward"]["custom_reward_function"]
    assert reward["name"] == "compute_score" and reward["path"].endswith("ibpo_lab/integrations/verl.py")
    assert cfg["trainer"]["use_v1"] is False  # the documented patch targets the legacy trainer
    script = (RECIPES_DIR / "run_verl_ibpo.sh").read_text()
    assert "verl.trainer.main_ppo" in script and "verl_ibpo_gsm8k" in script


# --------------------------------------------------------------------------- against verl's own code
def _verl_core_algos(monkeypatch):
    """verl's core_algos: installed, or loaded from $IBPO_VERL_SRC with its heavy imports stubbed
    (the registry and the GRPO estimator only need torch and numpy)."""
    try:
        from verl.trainer.ppo import core_algos  # type: ignore

        return core_algos
    except ImportError:
        pass
    src = os.environ.get("IBPO_VERL_SRC")
    path = Path(src or "/nonexistent") / "verl" / "trainer" / "ppo" / "core_algos.py"
    if not path.is_file():
        pytest.skip("verl is not installed and IBPO_VERL_SRC does not point to an unpacked verl wheel")

    def stub(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)

    class _Cfg:  # stands in for omegaconf.DictConfig / verl config classes in annotations
        pass

    for name in ("verl", "verl.trainer", "verl.workers"):
        stub(name)
    stub("omegaconf", DictConfig=_Cfg)
    stub("verl.utils", as_torch_index=None, group_mean_std=None)
    stub("verl.utils.torch_functional")
    stub("verl.utils.import_utils", deprecated=lambda *a, **k: (lambda obj: obj))
    stub("verl.trainer.config", AlgoConfig=_Cfg)
    stub("verl.workers.config", ActorConfig=_Cfg)
    spec = importlib.util.spec_from_file_location("_verl_core_algos_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_registers_in_verls_registry_and_matches_verl_grpo(monkeypatch):
    core_algos = _verl_core_algos(monkeypatch)
    assert iv.register(core_algos) is True
    fn = core_algos.get_adv_estimator_fn("ibpo")
    assert fn is iv.compute_ibpo_outcome_advantage
    assert iv.register(core_algos) is True  # idempotent (verl raises on a different second registration)
    d = verl_like(5)
    # called exactly as verl's compute_advantage calls a registered estimator (+ the one-line change)
    zero = {"uid": d["index"], iv.REPAIR_SUCCESS_KEY: np.zeros(len(d["index"]), np.float32)}
    adv, _ = fn(token_level_rewards=d["tlr"], response_mask=d["mask"], config={"ibpo": {"lam": 0.6}},
                index=d["index"], non_tensor_batch=zero, batch={})
    verl_adv, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=d["tlr"], response_mask=d["mask"], index=d["index"], norm_adv_by_std_in_grpo=True
    )
    # no repair succeeded -> no shaping, sequence credit: IBPO is GRPO, to verl's own numbers
    torch.testing.assert_close(adv, verl_adv, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- hand-derived values (independent of ibpo_lab)
def _safe_ibpo_by_hand(rewards, repaired, lam=0.6, rho=0.5, eps=1e-6):
    """IBPO's sequence advantage of ONE group, 0/1 rewards, written from the method's definition with
    plain floats: R' = R + λρ·1[repaired failure]; A' = (R' - mean R') / (std R' + eps) (ddof 1);
    a failure gets min(A', (1 - λρ·1[repaired]) · min(0, A^R)), A^R = GRPO on R; a constant group gets 0."""
    G = len(rewards)

    def grpo(x):
        m = sum(x) / G
        if max(x) - min(x) < 1e-9:
            return [0.0] * G
        s = math.sqrt(sum((v - m) ** 2 for v in x) / (G - 1))
        return [(v - m) / (s + eps) for v in x]

    bonus = [lam * rho if (r < 0.5 and rep) else 0.0 for r, rep in zip(rewards, repaired)]
    pub = grpo([r + b for r, b in zip(rewards, bonus)])
    out_r = grpo(list(rewards))
    return [p if r >= 0.5 else min(p, (1 - b) * min(0.0, a)) for r, b, p, a in zip(rewards, bonus, pub, out_r)]


def test_adapter_matches_hand_derived_values_on_a_small_batch():
    """The verl estimator on two small groups against numbers derived by hand (not via ibpo_lab).

    uid "a" (shuffled among "b"'s rows): R = [1, 0, 0, 0], the first failure repaired. R' = [1, .3, 0, 0],
    mean .325, std sqrt(.6675/3); GRPO on R: a failure gets -.25/.5 = -.5, so the repaired one gets
    min(-.025/std', .7 · -.5) = -.35 on its edited tokens only, the unrepaired ones their published
    -.325/std' on every token, and the correct one +.675/std' on every token — although it carries
    a repair share and an edit mask (a correct trajectory gets no edit credit).
    uid "b": R = [0, 0], the first repaired: no GRPO penalty to shrink (A^R = 0), so the repaired one
    gets 0 (published +.7071), the unrepaired one its published -.15/sqrt(.045) = -.7071."""
    sd_a = math.sqrt(0.6675 / 3)
    expected_seq = {
        "a": [0.675 / (sd_a + 1e-6), 0.7 * -0.25 / (0.5 + 1e-6), -0.325 / (sd_a + 1e-6), -0.325 / (sd_a + 1e-6)],
        "b": [0.0, -0.15 / (math.sqrt(0.045) + 1e-6)],
    }
    assert expected_seq["a"][1] == pytest.approx(-0.35, abs=1e-6)
    assert expected_seq["a"][1] < -0.025 / sd_a  # the floor binds: the published value is only -0.053
    assert _safe_ibpo_by_hand([1, 0, 0, 0], [0, 1, 0, 0]) == pytest.approx(expected_seq["a"], abs=1e-12)
    assert _safe_ibpo_by_hand([0, 0], [1, 0]) == pytest.approx(expected_seq["b"], abs=1e-12)
    rows = [  # (uid, reward, repair_success, length, edit mask); verl order interleaves the groups
        ("b", 0.0, 0.5, 3, [1, 1, 0]),
        ("a", 1.0, 0.5, 3, [1, 0, 0]),  # correct, with a repair share and an edit mask: both ignored
        ("a", 0.0, 1.0, 4, [0, 1, 1, 0]),  # repaired failure
        ("b", 0.0, 0.0, 2, [0, 0]),
        ("a", 0.0, 0.0, 3, [1, 0, 0]),  # unrepaired failure: its edit mask is not a correction
        ("a", 0.0, 0.0, 2, [0, 1]),
    ]
    Tn = 5
    B = len(rows)
    tlr, mask, edit = torch.zeros(B, Tn), torch.zeros(B, Tn), torch.zeros(B, Tn)
    for i, (_, r, _, n, e) in enumerate(rows):
        mask[i, :n] = 1
        tlr[i, n - 1] = r
        edit[i, :n] = torch.tensor(e, dtype=torch.float32)
    index = np.array([u for u, *_ in rows], dtype=object)
    repair = np.array([p for _, _, p, _, _ in rows], dtype=np.float32)
    adv, returns = iv.compute_ibpo_outcome_advantage(
        tlr, mask, index, config={"ibpo": {"lam": 0.6, "rho": 0.5}},
        non_tensor_batch={"uid": index, iv.REPAIR_SUCCESS_KEY: repair}, batch={iv.EDIT_MASK_KEY: edit},
    )
    # row -> position in its group's hand list
    pos = {"a": iter(range(4)), "b": iter(range(2))}
    hand = torch.zeros(B, Tn)
    for i, (u, r, p, n, e) in enumerate(rows):
        a = expected_seq[u][next(pos[u])]
        credit = e if (r < 0.5 and p > 0) else [1] * n  # edit mask only for a repaired failure
        hand[i, :n] = torch.tensor([a * c for c in credit], dtype=torch.float32)
    torch.testing.assert_close(adv, hand, rtol=0, atol=1e-6)
    assert torch.equal(adv, returns)
    assert float(adv[2, 1]) == pytest.approx(-0.35, abs=1e-6) and float(adv[2, 0]) == 0.0
    assert float(adv[0].abs().sum()) == 0.0  # all-failed group: the repaired one gets nothing


def test_hook_then_adapter_matches_hand_derived_values():
    """attach_repair_info + the estimator on the scripted groups of the test above, against hand numbers.

    Group 1: "ab!c", "abc", "a!!c", "xyz" -> R = [0, 1, 0, 1]; deleting the first "!" verifies only for
    "ab!c" (edited token: the "!" at position 2). R' = [.3, 1, 0, 1]: mean .575, std sqrt(.7675/3);
    GRPO on R gives a failure -.5/sqrt(1/3) = -.8660, so the repaired one gets min(-.275/std', .7·-.8660)
    = -.6062 on token 2 only; "a!!c" its published -.575/std' on its 4 tokens; the correct ones .425/std'.
    Group 2 ("ok", "o!k", "fine", "f!ne!") is the same pattern with "o!k" repaired at token 1."""
    task = PredTask(lambda r: "!" not in r)

    def script(prompt, j):
        failed = prompt.split("A failed attempt:\n", 1)[1].split("\nA reference attempt:", 1)[0]
        return failed.replace("!", "", 1)

    groups = [["ab!c", "abc", "a!!c", "xyz"], ["ok", "o!k", "fine", "f!ne!"]]
    data = fake_dataproto(groups, task)
    iv.attach_repair_info(
        data, task, ScriptedSampler(script), CorrectConfig(num_references=1), tokenizer=CharTok(),
        examples=task.examples(n=2),
    )
    adv, _ = iv.compute_ibpo_outcome_advantage(
        data.batch["token_level_scores"], data.batch["response_mask"].float(), data.non_tensor_batch["uid"],
        config={"ibpo": {"lam": 0.6}}, non_tensor_batch=data.non_tensor_batch, batch=data.batch,
    )
    sd = math.sqrt(0.7675 / 3) + 1e-6
    repaired_val = 0.7 * (-0.5 / (math.sqrt(1 / 3) + 1e-6))
    assert repaired_val == pytest.approx(-0.6062, abs=1e-4) and -0.275 / sd > repaired_val  # the floor binds
    assert _safe_ibpo_by_hand([0, 1, 0, 1], [1, 0, 0, 0]) == pytest.approx(
        [repaired_val, 0.425 / sd, -0.575 / sd, 0.425 / sd], abs=1e-12
    )
    hand = {  # response -> per-token advantages
        "ab!c": [0.0, 0.0, repaired_val, 0.0],
        "abc": [0.425 / sd] * 3,
        "a!!c": [-0.575 / sd] * 4,
        "xyz": [0.425 / sd] * 3,
        "ok": [0.425 / sd] * 2,
        "o!k": [0.0, repaired_val, 0.0],
        "fine": [0.425 / sd] * 4,
        "f!ne!": [-0.575 / sd] * 5,
    }
    for i, resp in enumerate(r for g in groups for r in g):
        n = len(resp)
        torch.testing.assert_close(adv[i, :n], torch.tensor(hand[resp]), rtol=0, atol=1e-6, msg=resp)
        assert not adv[i, n:].any()
