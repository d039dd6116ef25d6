"""RolloutBatch: validation, padded views, sub-batches and DataFrame views."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ibpo_lab.rollout import RolloutBatch, concat_batches


def make_batch(**kw) -> RolloutBatch:
    base = dict(
        prompt_ids=[[1, 2, 3], [1, 2, 3], [4, 5]],
        response_ids=[[7, 8], [9, 10, 11, 12], [13]],
        rewards=[1.0, 0.0, 1.0],
        group_ids=[0, 0, 1],
        logprobs=[[-0.1, -0.2], [-1.0, -1.1, -1.2, -1.3], [-0.5]],
        step_spans=[[(0, 1), (1, 2)], [(0, 2), (2, 4)], [(0, 1)]],
        responses=["ab", "cdef", "g"],
    )
    base.update(kw)
    return RolloutBatch(**base)


def test_padded_layout_left_prompt_right_response():
    b = make_batch()
    p = b.padded()
    assert p.prompt_len == 3 and p.input_ids.shape == (3, 7)
    # prompt of trajectory 2 is left-padded, its response right-padded
    assert p.input_ids[2].tolist() == [0, 4, 5, 13, 0, 0, 0]
    assert p.attention_mask[2].tolist() == [0, 1, 1, 1, 0, 0, 0]
    assert p.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert torch.allclose(p.old_logprobs[1], torch.tensor([-1.0, -1.1, -1.2, -1.3]))
    assert p.old_logprobs[2, 1:].abs().sum() == 0
    # every real response token sits at prompt_len + t
    for i, r in enumerate(b.response_ids):
        assert p.input_ids[i, p.prompt_len : p.prompt_len + len(r)].tolist() == r


def test_to_device_returns_tensors_on_device():
    p = make_batch().to("cpu")
    assert p.input_ids.device.type == "cpu" and p.rewards.dtype == torch.float32


def test_response_masks_and_edit_masks_padded():
    b = make_batch(
        response_masks=[[True, False], [True] * 4, [True]],
        edit_masks=[[False, True], [False] * 4, [False]],
    )
    assert b.response_mask[0].tolist() == [1, 0, 0, 0]
    assert b.edit_mask[0].tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(rewards=[1.0, 0.0]), "rewards"),
        (dict(group_ids=[0, 0]), "group_ids"),
        (dict(rewards=[1.0, math.nan, 0.0]), "NaN"),
        (dict(logprobs=[[-0.1], [-1.0] * 4, [-0.5]]), "logprobs[0]"),
        (dict(prompt_ids=[[1], [2]]), "prompt_ids"),
        (dict(step_spans=[[(0, 3)], [(0, 4)], [(0, 1)]]), "step_spans[0]"),
        (dict(edit_masks=[[True], [True] * 4, [True]]), "edit_masks[0]"),
        (dict(response_ids=[[7, 8], ["x"], [13]]), "response_ids[1]"),
        (dict(meta={"id": ["a"]}), "meta['id']"),
        (dict(repair_success=[0.5, math.nan, 0.0]), "repair_success"),
    ],
)
def test_bad_input_names_the_argument(kw, needle):
    with pytest.raises(ValueError) as e:
        make_batch(**kw)
    assert needle in str(e.value)


def test_select_and_concat_round_trip():
    b = make_batch(meta={"example_id": ["p0", "p0", "p1"]})
    parts = [b.select([0, 1]), b.select([2])]
    again = concat_batches(parts)
    assert again.response_ids == b.response_ids
    assert again.group_ids.tolist() == b.group_ids.tolist()
    assert again.meta == b.meta and again.step_spans == b.step_spans
    with pytest.raises(ValueError, match="index 5"):
        b.select([5])
    with pytest.raises(ValueError, match="logprobs"):
        concat_batches([b, make_batch(logprobs=None)])


def test_groups_in_batch_order():
    assert make_batch().groups() == {0: [0, 1], 1: [2]}


def test_dataframe_views():
    b = make_batch(meta={"example_id": ["p0", "p0", "p1"]}, repair_success=[0.0, 0.5, 0.0])
    df = b.to_dataframe()
    assert len(df) == 3
    assert df["response_len"].tolist() == [2, 4, 1]
    assert df["n_steps"].tolist() == [2, 2, 1]
    assert df["example_id"].tolist() == ["p0", "p0", "p1"]
    assert np.isclose(df.loc[1, "logprob_sum"], -4.6)
    adv = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tf = b.token_frame(advantages=adv)
    assert len(tf) == 7  # one row per real response token, padding excluded
    assert tf[tf.traj == 1]["advantage"].tolist() == [4.0, 5.0, 6.0, 7.0]
    assert tf[tf.traj == 1]["step"].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="advantages has shape"):
        b.token_frame(advantages=torch.zeros(3, 3))


def test_meta_clash_with_builtin_column_is_an_error():
    with pytest.raises(ValueError, match="clashes"):
        make_batch(meta={"reward": [1, 2, 3]}).to_dataframe()
