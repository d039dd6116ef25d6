"""Tests for ibpo_lab.warmup: SFT batches, config validation, and a short end-to-end warm-up."""

from __future__ import annotations

import json

import pytest
import torch

from ibpo_lab.models import char_tokenizer, load_policy
from ibpo_lab.tasks import get_task
from ibpo_lab.tasks.synthetic import VOCAB
from ibpo_lab.warmup import WarmupConfig, main, repair_eval_set, sft_batch


def test_sft_batch_labels_only_target_and_eos():
    tok = char_tokenizer(VOCAB)
    pairs = [("Q: 1 +2 mod 10\nA:\n", "1+2=3\nans=3"), ("Q: x\n", "ab")]
    b = sft_batch(tok, pairs)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    for i, (prompt, target) in enumerate(pairs):
        lab = b["labels"][i]
        kept = lab[lab != -100].tolist()
        assert kept[-1] == tok.eos_token_id
        assert tok.decode(kept[:-1]) == target
        n_real = int(b["attention_mask"][i].sum())
        assert n_real == len(prompt) + 1 + len(target) + 1  # BOS + prompt + target + EOS
        assert torch.all(b["input_ids"][i, n_real:] == tok.pad_token_id)  # right padding for training
        # the prompt part is exactly what the sampler feeds the model
        assert b["input_ids"][i, : len(prompt) + 1].tolist() == tok(prompt)["input_ids"]


def test_repair_eval_set_uses_failed_attempts():
    task = get_task("synthetic")
    rep = repair_eval_set(task, 20, seed=0)
    assert len(rep) == 20
    for ex, prompt in rep:
        failed = prompt.split("Failed:\n")[1].split("\nRef:")[0]
        reference = prompt.split("Ref:\n")[1].split("\nFix:")[0]
        assert task.reward(ex, failed) == 0.0 and task.reward(ex, reference) == 1.0
    assert repair_eval_set(task, 20, seed=0) == rep


@pytest.mark.parametrize("kw,name", [({"steps": 0}, "steps"), ({"error_rate": 1.5}, "error_rate"),
                                     ({"lr": 0.0}, "lr"), ({"save_every": -1}, "save_every")])
def test_config_rejects_bad_values(kw, name):
    with pytest.raises(ValueError, match=name):
        WarmupConfig(**kw)


@pytest.mark.slow
def test_short_warmup_end_to_end(tmp_path, monkeypatch):
    small = ["--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--intermediate-size", "64",
             "--batch-size", "16", "--lr-warmup-steps", "1", "--eval-every", "4", "--eval-prompts", "4",
             "--eval-repairs", "4", "--curve-prompts", "4", "--max-new-tokens", "24", "--no-progress"]
    rec = main(["--out", str(tmp_path / "run"), "--steps", "8", "--save-every", "4", *small])
    losses = rec["losses"]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    assert [c["step"] for c in rec["curve"]] == [4, 8]
    card = (tmp_path / "run" / "README.md").read_text()
    assert "solve pass@1" in card and "repair success" in card and "--steps 8" in card
    assert json.loads((tmp_path / "run" / "warmup.json").read_text())["final"] == rec["final"]

    monkeypatch.setenv("IBPO_TINY_POLICY", str(tmp_path / "run"))
    pol = load_policy("tiny")
    assert pol.num_parameters() == rec["params"]

    # the checkpoint saved at step 4 of the 8-step run is the checkpoint of a 4-step run
    main(["--out", str(tmp_path / "short"), "--steps", "4", *small])
    a = load_policy(str(tmp_path / "run" / "step-4")).model.state_dict()
    b = load_policy(str(tmp_path / "short")).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
