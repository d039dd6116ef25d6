"""viz: HTML token colouring, repair diffs, figures, curves and the explorer on small synthetic inputs."""

from __future__ import annotations

import itertools
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from ibpo_lab import viz
from ibpo_lab.diff import build_prefix_trie, divergence_matrix, edit_masks
from ibpo_lab.rollout import RolloutBatch


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _spans(h: str) -> list[re.Match]:
    return list(re.finditer(r'<span class="tok" data-pos="(\d+)" title="([^"]*)" style="([^"]*)">(.*?)</span>', h))


def _bg(style: str) -> tuple[int, int, int] | None:
    m = re.search(r"background-color:#([0-9a-f]{6})", style)
    if not m:
        return None
    x = m.group(1)
    return int(x[0:2], 16), int(x[2:4], 16), int(x[4:6], 16)


# ------------------------------------------------------------------------------------ token_html
def test_token_html_one_span_per_token_in_order_with_diverging_colours():
    toks = ["a", "b", "c", "d", "e"]
    vals = [-2.0, -1.0, 0.0, 1.0, 2.0]
    h = viz.token_html(toks, vals)
    assert isinstance(h, str) and h._repr_html_() == h
    spans = _spans(h)
    assert [s.group(4) for s in spans] == toks
    assert [int(s.group(1)) for s in spans] == list(range(5))
    cols = [_bg(s.group(3)) for s in spans]
    # RdBu: negative red-ish (r > b), positive blue-ish (b > r), zero near white
    assert cols[0][0] > cols[0][2] and cols[1][0] > cols[1][2]
    assert cols[3][2] > cols[3][0] and cols[4][2] > cols[4][0]
    assert min(cols[2]) > 230
    # stronger credit is a darker colour
    assert sum(cols[0]) < sum(cols[1]) and sum(cols[4]) < sum(cols[3])
    assert "+2.0000" in spans[4].group(2)


def test_token_html_mask_edit_escape_and_errors():
    h = viz.token_html(["<x>", "\n", "y"], torch.tensor([1.0, 1.0, -1.0]), mask=[True, False, True],
                       edited=[False, False, True])
    spans = _spans(h)
    assert spans[0].group(4) == "&lt;x&gt;"
    assert "↵" in spans[1].group(4) and _bg(spans[1].group(3)) is None and "not trained" in spans[1].group(2)
    assert "underline" in spans[2].group(3) and "edited" in spans[2].group(2)
    assert "underline" not in spans[0].group(3)
    with pytest.raises(ValueError, match="values"):
        viz.token_html(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="mask"):
        viz.token_html(["a", "b"], [1.0, 2.0], mask=[True])


def test_token_html_vmax_saturates():
    a = _bg(_spans(viz.token_html(["a"], [0.5], vmax=0.5))[0].group(3))
    b = _bg(_spans(viz.token_html(["a"], [5.0], vmax=0.5))[0].group(3))
    c = _bg(_spans(viz.token_html(["a"], [0.5], vmax=5.0))[0].group(3))
    assert a == b and a != c


def test_batch_token_html_reads_batch_fields():
    b = RolloutBatch(prompt_ids=[[1], [1]], response_ids=[[3, 4, 5], [6]], rewards=[0.0, 1.0], group_ids=[0, 0],
                     edit_masks=[[False, True, False], [False]])
    adv = torch.tensor([[-1.0, -2.0, 0.0], [1.0, 0.0, 0.0]])
    h = viz.batch_token_html(b, adv, None, 0)
    spans = _spans(h)
    assert [s.group(4) for s in spans] == ["3", "4", "5"]
    assert "underline" in spans[1].group(3)
    assert "reward 0" in h
    with pytest.raises(ValueError, match="advantages"):
        viz.batch_token_html(b, torch.zeros(3, 3), None, 0)


# ------------------------------------------------------------------------------------ repair diff
def test_repair_diff_marks_exactly_the_edit_mask():
    failed, repaired = "x = 3+4 = 8\ny = 9\n", "x = 3+4 = 7\ny = 8\n"
    h = viz.repair_diff_html(failed, repaired)
    dels = re.findall(r"<del [^>]*>(.*?)</del>", h)
    inss = re.findall(r"<ins [^>]*>(.*?)</ins>", h)
    changed, inserted = edit_masks([ord(c) for c in failed], [ord(c) for c in repaired])
    assert dels == [c for c, m in zip(failed, changed) if m]
    assert inss == [c for c, m in zip(repaired, inserted) if m]
    # the kept characters plus the deletions re-spell the failed attempt
    kept = re.sub(r"<ins [^>]*>.*?</ins>", "", h).replace("↵<br>", "\n")
    text = "".join(re.findall(r">([^<>]*)</(?:span|del)>", kept.split('<div style="font-size')[0]))
    assert text == failed


def test_repair_diff_token_ids_and_strings():
    class Tok:
        def decode(self, ids):
            return "".join(chr(96 + i) for i in ids)

    h = viz.repair_diff_html([1, 2, 3], [1, 5, 3], Tok())
    assert re.findall(r"<del [^>]*>(.*?)</del>", h) == ["b"]
    assert re.findall(r"<ins [^>]*>(.*?)</ins>", h) == ["e"]
    h2 = viz.repair_diff_html(["x", "=", "1"], ["x", "=", "2", "!"])
    assert re.findall(r"<del [^>]*>(.*?)</del>", h2) == ["1"]
    assert re.findall(r"<ins [^>]*>(.*?)</ins>", h2) == ["2", "!"]
    with pytest.raises(ValueError, match="both"):
        viz.repair_diff_html("abc", [1, 2])


def test_step_labels_html():
    h = viz.step_labels_html(["a=1\n", "b=2\n", "c"], [True, False, None])
    assert h.index("✓") < h.index("✗") < h.index("?")
    with pytest.raises(ValueError, match="labels"):
        viz.step_labels_html(["a"], [True, False])


# ------------------------------------------------------------------------------------ figures
def test_divergence_heatmap_shows_the_matrix():
    seqs = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 6], [7]]
    M = divergence_matrix(seqs)
    fig = viz.divergence_heatmap(M, rewards=[1, 0, 1, 0], hide_diagonal=False)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), M)
    shown = viz.divergence_heatmap(M).axes[0].images[0].get_array()
    assert np.ma.getmaskarray(shown).diagonal().all() and not np.ma.getmaskarray(shown)[0, 1]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0 (R=1)", "1 (R=0)", "2 (R=1)", "3 (R=0)"]
    assert len(ax.texts) == 16
    with pytest.raises(ValueError, match="square"):
        viz.divergence_heatmap(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="rewards"):
        viz.divergence_heatmap(M, rewards=[1, 0])


def test_prefix_trie_plot_one_marker_per_node_and_distinct_leaves():
    trie = build_prefix_trie([["a", "b"], ["a", "c"], ["a", "b", "d"], ["e"]], [1, 0, 1, 0])
    fig = viz.prefix_trie_plot(trie)
    sc = fig.axes[0].collections[0]
    xy = sc.get_offsets()
    assert len(xy) == trie.n_nodes
    np.testing.assert_array_equal(xy[:, 0], trie.depth)
    np.testing.assert_allclose(sc.get_array(), trie.mean)
    leaves = trie.leaves()
    assert len(set(xy[leaves, 1])) == len(leaves)
    # an inner node sits between its children
    for v in range(trie.n_nodes):
        kids = trie.children(v)
        if kids:
            assert min(xy[kids, 1]) <= xy[v, 1] <= max(xy[kids, 1])
    with pytest.raises(ValueError, match="PrefixTrie"):
        viz.prefix_trie_plot(object())


def test_advantage_panel_one_heatmap_per_estimator_masked_blank():
    adv = {"grpo": torch.randn(3, 5), "rloo": torch.randn(3, 5), "ibpo": torch.randn(3, 5), "x": torch.randn(3, 5)}
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    fig = viz.advantage_panel(adv, mask, rewards=[1, 0, 0], group_ids=[0, 0, 0], step_spans=[[(0, 2), (2, 5)]] * 3)
    shown = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in shown] == list(adv)
    arr = shown[0].images[0].get_array()
    assert np.ma.getmaskarray(arr)[1, 3:].all() and not np.ma.getmaskarray(arr)[0].any()
    assert np.allclose(np.ma.getdata(arr)[0], adv["grpo"][0].numpy())
    with pytest.raises(ValueError, match="one shape"):
        viz.advantage_panel({"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="empty"):
        viz.advantage_panel({})


def _curves_df(seeds=4, steps=6):
    rng = np.random.default_rng(0)
    rows = [dict(step=s, seed=k, label=lab, reward_mean=off + 0.1 * s + rng.normal(0, 0.1))
            for lab, off in (("grpo", 0.0), ("ibpo", 0.5)) for k in range(seeds) for s in range(steps)]
    return pd.DataFrame(rows)


def test_learning_curves_mean_and_ci_band():
    df = _curves_df()
    fig = viz.learning_curves(df, "reward_mean", band="ci")
    ax = fig.axes[0]
    assert len(ax.lines) == 2
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["grpo (n=4 seeds)", "ibpo (n=4 seeds)"]
    sub = df[(df.label == "ibpo") & (df.step == 3)]["reward_mean"]
    assert np.isclose(ax.lines[1].get_ydata()[3], sub.mean())
    band = ax.collections[1].get_paths()[0].vertices
    half = 3.182 * sub.std(ddof=1) / np.sqrt(len(sub))  # Student-t, df = 3: the interval of the tables
    assert np.any(np.isclose(band[:, 1], sub.mean() + half, rtol=1e-3))
    with pytest.raises(ValueError, match="column"):
        viz.learning_curves(df, "nope")
    with pytest.raises(ValueError, match="band"):
        viz.learning_curves(df, "reward_mean", band="iqr")


def test_runs_frame_from_records_and_metric_grid():
    class Rec:
        def __init__(self, est, seed):
            self.config = {"estimator": est, "seed": seed}
            self.metrics = pd.DataFrame({"step": [0, 1, 2], "reward_mean": [0.1, 0.2, seed], "entropy": [1, 1, 1]})

    recs = [Rec(e, s) for e, s in itertools.product(["grpo", "ibpo"], [0, 1])]
    df = viz.runs_frame(recs)
    assert set(df.label) == {"grpo", "ibpo"} and set(df.seed) == {0, 1} and len(df) == 12
    fig = viz.metric_grid(recs, ["reward_mean", "entropy"])
    assert len([a for a in fig.axes if a.get_visible()]) == 2
    with pytest.raises(ValueError, match="grad_norm"):
        viz.metric_grid(recs, ["grad_norm"])


def test_summary_bars_heights_are_group_means():
    df = pd.DataFrame({"estimator": ["a", "a", "b", "b"], "auc": [0.6, 0.8, 0.4, 0.5]})
    fig = viz.summary_bars(df, "estimator", "auc")
    heights = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(heights, [0.7, 0.45])


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 5, 40).astype(float)  # ties on purpose
    y = rng.random(40) < 0.4
    _, _, auc = viz.roc_curve(s, y)
    pos, neg = s[y], s[~y]
    mw = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert np.isclose(auc, mw)
    with pytest.raises(ValueError, match="both classes"):
        viz.roc_curve([1, 2], [True, True])


def test_roc_plot_and_step_credit_plot():
    df = pd.DataFrame({"estimator": ["a"] * 6 + ["b"] * 6, "advantage": [1, 2, 3, -1, -2, -3] * 2,
                       "correct": [True, True, True, False, False, False] * 2})
    fig = viz.roc_plot(df)
    assert "AUC 1.00" in fig.axes[0].get_legend().get_texts()[0].get_text()
    fig2 = viz.step_credit_plot(df)
    assert len(fig2.axes[0].patches) == 4  # correct and wrong box per estimator


def test_save_fig_and_table(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    p = viz.save_fig(fig, tmp_path / "figs", "my fig/1")
    assert p.name == "my_fig_1.png" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert viz.save_fig(fig, None, "x") is None
    t = viz.save_table(pd.DataFrame({"a": [1]}), tmp_path, "tab")
    assert pd.read_csv(t).a.tolist() == [1]
    with pytest.raises(ValueError, match="Figure"):
        viz.save_fig("not a figure", tmp_path, "x")
    h = viz.save_html(viz.token_html(["x"], [1.0]), tmp_path, "view")
    assert h.read_text().startswith('<div class="ibpo-tokens"') and viz.save_html("<b/>", None, "v") is None


# ------------------------------------------------------------------------------------ explorer
def _fake_run(tmp_path):
    b = RolloutBatch(
        prompt_ids=[[1]] * 4, response_ids=[[3, 4, 5, 6], [3, 4, 7], [3, 8], [9, 9]], rewards=[1.0, 0.0, 1.0, 0.0],
        group_ids=[0, 0, 1, 1], step_spans=[[(0, 2), (2, 4)], [(0, 2), (2, 3)], [(0, 2)], [(0, 1), (1, 2)]],
        responses=["cdef", "cdg", "ch", "ii"],
    )
    df = b.to_dataframe()
    df["advantages"] = [[0.5] * 4, [-0.5, -0.5, -1.0], [0.2, 0.2], [-0.3, -0.9]]
    df["edit_mask"] = [[False] * 4, [False, False, True], [False] * 2, [False, True]]
    df["repaired_ids"] = [[], [3, 4, 5, 6], [], [9, 8]]
    df["step_labels"] = [[True, True], [True, False], [True], [True, False]]
    run = tmp_path / "run_a"
    (run / "trajectories").mkdir(parents=True)
    # a run folder has its config; this model's tokenizer is not available offline, so views use characters
    (run / "config.yaml").write_text("model: no-such-model\ntask: synthetic\n")
    df.to_parquet(run / "trajectories" / "step_000002.parquet")
    df.assign(reward=0.0).to_parquet(run / "trajectories" / "step_000001.parquet")
    return run


def test_trajectory_view_static(tmp_path):
    run = _fake_run(tmp_path)
    frame = viz.load_trajectories(run)
    assert frame.reward.tolist() == [1.0, 0.0, 1.0, 0.0]  # last step by default
    v = viz.trajectory_view(frame, 1)
    # response text as long as its ids: a character policy, so the tokens are the characters
    assert [s.group(4) for s in _spans(v["tokens"])] == ["c", "d", "g"]
    assert [s.group(4) for s in _spans(viz.trajectory_view(frame.drop(columns="response"), 1)["tokens"])] == ["3", "4", "7"]
    assert re.findall(r"<del [^>]*>(.*?)</del>", v["diff"]) == ["7"]
    assert "✗" in v["steps"]
    heat = v["heatmap"].axes[0].images[0].get_array()
    np.testing.assert_array_equal(heat[0, 1], divergence_matrix([[3, 4, 5, 6], [3, 4, 7]])[0, 1])
    assert heat.shape == (2, 2)
    assert "no repair" in viz.trajectory_view(frame, 0)["diff"]
    with pytest.raises(ValueError, match="step 5"):
        viz.load_trajectories(run, 5)


def test_explorer_builds_and_follows_the_dropdowns(tmp_path):
    run = _fake_run(tmp_path)
    box = viz.explorer(tmp_path)
    c = box.controls
    assert c["step"].value == 2 and list(c["step"].options) == [1, 2]
    assert c["prompt"].value == 0 and c["trajectory"].value == 0
    c["trajectory"].value = 1
    assert re.findall(r"<del [^>]*>(.*?)</del>", box.views["diff"].value) == ["7"]
    c["prompt"].value = 1
    assert c["trajectory"].value == 2
    assert [s.group(4) for s in _spans(box.views["tokens"].value)] == ["c", "h"]
    with pytest.raises(ValueError, match="no run"):
        viz.explorer(tmp_path / "run_a" / "trajectories")


def test_run_step_labeler_matches_logged_prompts_back_to_examples(tmp_path):
    from ibpo_lab.tasks import get_task

    (tmp_path / "config.yaml").write_text("task: synthetic\ntask_kwargs: {}\n")
    labeler = viz.run_step_labeler(tmp_path)
    task = get_task("synthetic")
    ex = task.examples("train", 1)[0]
    good = task.solution(ex)
    assert labeler(task.solve_prompt(ex), good) == [True] * len(good.strip().splitlines())
    assert labeler("a prompt never logged", good) is None
    assert viz.run_step_labeler(tmp_path / "nowhere") is None


def test_trajectory_view_uses_a_labeler_when_labels_are_not_logged(tmp_path):
    frame = viz.load_trajectories(_fake_run(tmp_path)).drop(columns="step_labels")
    frame["prompt"] = "p"
    assert "?" in viz.trajectory_view(frame, 1)["steps"]
    seen = []
    steps = viz.trajectory_view(frame, 1, labeler=lambda p, r: seen.append((p, r)) or [True, False])["steps"]
    assert seen == [("p", "cdg")] and "✓" in steps and "✗" in steps


def test_grid_heatmap_cells_are_the_means():
    df = pd.DataFrame({"lam": [0.0, 0.0, 0.6, 0.6, 0.0], "rho": [0.5, 1.0, 0.5, 1.0, 0.5], "v": [1, 2, 3, 4, 3]})
    fig = viz.grid_heatmap(df, "lam", "rho", "v")
    arr = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(arr, [[2, 3], [2, 4]])  # rows rho 0.5, 1.0; columns lam 0, 0.6; (1+3)/2 = 2
    assert [t.get_text() for t in fig.axes[0].texts] == ["2", "3", "2", "4"]
    with pytest.raises(ValueError, match="columns"):
        viz.grid_heatmap(df, "lam", "rho", "nope")


def _fake_run_b(tmp_path):
    """A second run with the same steps, prompts and trajectory numbers as run_a but other tokens,
    rewards and advantages: switching runs keeps every dropdown's value."""
    b = RolloutBatch(
        prompt_ids=[[1]] * 4, response_ids=[[5, 5], [5, 6, 6], [7, 7, 7], [8]], rewards=[0.0, 1.0, 0.0, 1.0],
        group_ids=[0, 0, 1, 1], step_spans=[[(0, 2)], [(0, 3)], [(0, 3)], [(0, 1)]],
        responses=["ee", "eff", "ggg", "h"],
    )
    df = b.to_dataframe()
    df["advantages"] = [[-0.86, 0.1], [0.3, 0.3, 0.3], [0.2, 0.2, 0.2], [0.4]]
    df["response_mask"] = [[True, True], [True, True, True], [True, True, True], [True]]
    run = tmp_path / "run_b"
    (run / "trajectories").mkdir(parents=True)
    (run / "config.yaml").write_text("model: no-such-model\ntask: synthetic\n")  # a run folder has its config
    df.to_parquet(run / "trajectories" / "step_000002.parquet")
    df.assign(reward=[1.0, 1.0, 1.0, 0.0], advantages=[[2.0, 0.0], [0.0] * 3, [0.0] * 3, [-1.0]]).to_parquet(
        run / "trajectories" / "step_000001.parquet")
    return run


def _scale(box) -> float:
    return float(re.search(r'class="ibpo-scale">([^<]*)<', box.views["header"].value).group(1))


def test_explorer_redraws_every_panel_when_downstream_values_stay(tmp_path):
    _fake_run(tmp_path)
    run_b = _fake_run_b(tmp_path)
    box = viz.explorer(tmp_path)
    c, v = box.controls, box.views
    assert box.selection()["run"].name == "run_a" and box.selection()["step"] == 2
    before_png = v["heatmap"].value
    assert _scale(box) == 1.0  # run_a step 2: max |advantage| is traj 1's -1.0
    c["run"].value = run_b  # step 2, prompt 0, trajectory 0 all stay: none of their observers fires
    assert box.selection() == {"run": run_b, "step": 2, "prompt": 0, "trajectory": 0}
    assert [s.group(4) for s in _spans(v["tokens"].value)] == ["e", "e"]
    assert "reward 0" in v["tokens"].value and "reward 0" in v["header"].value
    assert [lab for lab, _ in c["trajectory"].options] == ["0 (R=0)", "1 (R=1)"]
    assert _scale(box) == 0.86  # run_b step 2: |-0.86| over 0.1, 0.3, 0.2, 0.4
    assert "colour scale ±0.86" in v["tokens"].value
    assert "no repair" in v["diff"].value and "ee" in v["steps"].value
    assert bytes(v["heatmap"].value) != bytes(before_png) and bytes(v["heatmap"].value).startswith(b"\x89PNG")
    c["step"].value = 1  # prompt 0 / trajectory 0 stay again
    assert [lab for lab, _ in c["trajectory"].options] == ["0 (R=1)", "1 (R=1)"]
    assert "reward 1" in v["tokens"].value and _scale(box) == 2.0
    c["prompt"].value = 1
    assert box.selection()["trajectory"] == 2 and [s.group(4) for s in _spans(v["tokens"].value)] == ["g"] * 3
    c["trajectory"].value = 3
    assert [s.group(4) for s in _spans(v["tokens"].value)] == ["h"] and "reward 0" in v["header"].value
    # the darkest red is the step's -2.0 (traj 0), so traj 3's -1.0 is half-way: not saturated
    assert _bg(_spans(v["tokens"].value)[0].group(3)) != _bg(_spans(viz.token_html(["x"], [-1.0]))[0].group(3))
    c["run"].value = tmp_path / "run_a"  # back: step 1 exists there too and stays; trajectory 3 stays
    assert box.selection()["step"] == 1 and box.selection()["trajectory"] == 3
    assert [s.group(4) for s in _spans(v["tokens"].value)] == ["i", "i"] and "reward 0" in v["tokens"].value


def test_explorer_trajectory_scale_is_the_trajectorys_own_max(tmp_path):
    _fake_run(tmp_path)
    box = viz.explorer(tmp_path / "run_a", scale="trajectory")
    box.controls["prompt"].value = 1
    box.controls["trajectory"].value = 3
    assert _scale(box) == 0.9 and "of trajectory 3" in box.views["header"].value  # |-0.9| > |-0.3|
    with pytest.raises(ValueError, match="scale"):
        viz.explorer(tmp_path, scale="global")


def test_explorer_shows_a_broken_row_in_the_panel(tmp_path):
    run = _fake_run(tmp_path)
    df = pd.read_parquet(run / "trajectories" / "step_000002.parquet")
    df["advantages"] = [[0.5] * 4, [0.5] * 3, [0.5] * 2, [0.5]]  # traj 3 has 2 tokens but 1 advantage
    df.to_parquet(run / "trajectories" / "step_000002.parquet")
    box = viz.explorer(run)
    box.controls["prompt"].value = 1
    box.controls["trajectory"].value = 3
    assert "cannot show this trajectory" in box.views["header"].value and box.views["tokens"].value == ""


def test_divergence_heatmap_labels_rewards_and_marks_the_selected_row():
    fig = viz.divergence_heatmap(np.array([[3, 2, 0], [2, 4, 0], [0, 0, 2]]), rewards=[1.0, 0.0, 0.5], highlight=1)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["0 (R=1)", "▶ 1 (R=0)", "2 (R=0.5)"] == [t.get_text() for t in ax.get_xticklabels()]
    assert ax.get_yticklabels()[1].get_fontweight() == "bold" and ax.get_yticklabels()[0].get_fontweight() != "bold"
    boxes = sorted((p.get_xy(), p.get_width(), p.get_height()) for p in ax.patches)
    assert boxes == [((-0.5, 0.5), 3, 1), ((0.5, -0.5), 1, 3)]  # row 1 and column 1 outlined
    with pytest.raises(ValueError, match="highlight"):
        viz.divergence_heatmap(np.eye(2), highlight=2)


def test_trajectory_view_heatmap_labels_the_group_with_rewards(tmp_path):
    frame = viz.load_trajectories(_fake_run(tmp_path))
    ax = viz.trajectory_view(frame, 3)["heatmap"].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["2 (R=1)", "▶ 3 (R=0)"]


# ------------------------------------------------------------------------------------ byte-level BPE text
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (the byte-level BPE alphabet), written out here so the
    test reads token bytes without going through the tokenizer's decoder."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_bpe(merges: list[tuple[str, str]]):
    """A byte-level BPE (the GPT-2/SmolLM2 kind) with the whole byte alphabet and the given merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode().values())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _expected_pieces(text: str, tokens: list[str]) -> list[str]:
    """Each character goes to the token holding its last byte (hand-derived from the byte table)."""
    inv = {c: b for b, c in _bytes_to_unicode().items()}
    ends = np.cumsum([len(t) for t in tokens])  # byte offset where each token ends (one char per byte)
    assert bytes(inv[c] for c in "".join(tokens)) == text.encode()
    pieces, pos = [""] * len(tokens), 0
    for ch in text:
        pos += len(ch.encode())
        pieces[int(np.searchsorted(ends, pos))] += ch
    return pieces


@pytest.mark.parametrize("wrap", [False, True])
def test_decoding_byte_level_bpe_never_splits_a_character(wrap):
    u = _bytes_to_unicode()
    zh, wen = "中".encode(), "文".encode()
    # merges that cut characters: 中's last byte with 文's first, 😀 in two halves, é in one token
    merges = [(u[zh[2]], u[wen[0]]), (u[0xF0], u[0x9F]), (u[0x98], u[0x80]), (u[0xC3], u[0xA9])]
    tok = _byte_bpe(merges)
    text = "café 中文 ok😀!"
    enc = tok.encode(text)
    if wrap:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_object=tok)
    assert any("\ufffd" in tok.decode([i]) for i in enc.ids)  # token by token the text is broken
    pieces = viz._decode_each(enc.ids, tok)
    assert pieces == _expected_pieces(text, enc.tokens)
    assert "".join(pieces) == text and len(pieces) == len(enc.ids)
    assert "中" in pieces and "😀" in pieces and "é" in pieces
    # generation stopped inside 😀: the bytes that are there show as one replacement character
    cut = viz._decode_each(enc.ids[:-2], tok)
    assert "".join(cut[:-1]) == "café 中文 ok" and cut[-1] == "\ufffd"


def test_trajectory_view_shows_whole_characters_of_a_byte_level_bpe(tmp_path):
    u = _bytes_to_unicode()
    tok = _byte_bpe([(u[0xC3], u[0xA9])])
    text = "né 中"
    ids = tok.encode(text).ids
    frame = pd.DataFrame({"traj": [0], "group": [0], "reward": [1.0], "response_ids": [ids],
                          "response": [text], "advantages": [[0.1] * len(ids)]})
    shown = [s.group(4) for s in _spans(viz.trajectory_view(frame, 0, tokenizer=tok)["tokens"])]
    assert "".join(shown) == text and "\ufffd" not in "".join(shown) and shown[-3:] == ["", "", "中"]


# ----------------------------------------------------------------- figures that say what they show (issue 17, 5-8)
def _overlaps(fig, a, b) -> bool:
    fig.canvas.draw()
    ra, rb = a.get_window_extent(), b.get_window_extent()
    return ra.x0 < rb.x1 and rb.x0 < ra.x1 and ra.y0 < rb.y1 and rb.y0 < ra.y1


def test_one_step_one_seed_curves_have_markers_say_1_step_and_promise_no_band():
    df = pd.DataFrame({"step": [1, 1], "seed": [0, 0], "label": ["grpo", "ibpo"], "reward_mean": [0.0, 0.25]})
    fig = viz.learning_curves(df, "reward_mean", band="ci")
    ax = fig.axes[0]
    assert all(line.get_marker() == "o" for line in ax.lines[:2])
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["grpo (n=1 seed, 1 step)", "ibpo (n=1 seed, 1 step)"]
    assert not ax.collections  # no band drawn ...
    assert "95%" not in ax.get_title() and "no band" in ax.get_title()  # ... and none promised
    assert any("1 step" in t.get_text() for t in ax.texts)
    assert not any(t.get_text() == "all zero" for t in ax.texts)  # 0.25 is not zero
    ax = viz.learning_curves(df.assign(reward_mean=0.0), "reward_mean").axes[0]
    assert any(t.get_text() == "all zero" for t in ax.texts)


def test_band_is_named_in_the_title_only_when_drawn():
    fig = viz.learning_curves(_curves_df(seeds=3), "reward_mean", band="ci")
    ax = fig.axes[0]
    assert len(ax.collections) == 2 and "95% CI" in ax.get_title()
    one = pd.DataFrame({"step": [1, 1], "seed": [0, 1], "label": "grpo", "reward_mean": [0.2, 0.4]})
    ax = viz.learning_curves(one, "reward_mean").axes[0]
    assert "error bar: 95% CI" in ax.get_title() and "band" not in ax.get_title()


def test_identical_curves_are_flagged_dashed_and_legend_is_outside_the_axes():
    df = _curves_df(seeds=2)
    copy = df[df.label == "ibpo"].assign(label="ibpo_no_gate")
    df = pd.concat([df, copy, df[df.label == "ibpo"].assign(label="ibpo_k1")], ignore_index=True)
    fig = viz.learning_curves(df, "reward_mean")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[0] == "grpo (n=2 seeds)" and texts[1] == "ibpo (n=2 seeds)"
    assert texts[2].startswith("ibpo_no_gate = ibpo (identical") and texts[3].startswith("ibpo_k1 = ibpo (identical")
    solid, dup1, dup2 = ax.lines[1], ax.lines[2], ax.lines[3]
    assert solid.get_linestyle() == "-" and dup1.get_linestyle() != "-" and dup2.get_linestyle() != "-"
    assert dup1._unscaled_dash_pattern[0] != dup2._unscaled_dash_pattern[0]  # offset: both colours show
    assert len(ax.collections) == 2  # copies draw no second band over the first
    assert not _overlaps(fig, ax.get_legend(), ax)


def test_metric_grid_one_legend_outside_the_panels():
    df = _curves_df(seeds=2)
    fig = viz.metric_grid(df.assign(entropy=2 * df.reward_mean), ["reward_mean", "entropy"])
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    assert not any(_overlaps(fig, fig.legends[0], ax) for ax in fig.axes)
    # equal entropy for both methods: that panel's legend differs (flags the copy), so each keeps its own
    fig = viz.metric_grid(df.assign(entropy=1.0), ["reward_mean", "entropy"])
    assert not fig.legends and "identical" in fig.axes[1].get_legend().get_texts()[1].get_text()


def test_metric_grid_keeps_each_methods_colour_in_every_panel():
    """A metric only some methods log (repair_success: IBPO only) must not shift the others' colours."""
    df = _curves_df(seeds=2)
    df["repair_success"] = np.where(df.label == "ibpo", 0.5, np.nan)  # grpo has no repairs
    fig = viz.metric_grid(df, ["reward_mean", "repair_success"])
    colour = [{ln.get_label().split(" ")[0]: ln.get_color() for ln in ax.lines if not ln.get_label().startswith("_")}
              for ax in fig.axes[:2]]
    assert set(colour[0]) == {"grpo", "ibpo"} and set(colour[1]) == {"ibpo"}
    assert colour[0]["ibpo"] == colour[1]["ibpo"] != colour[0]["grpo"]


def test_axis_labels_are_words_not_column_names():
    fig = viz.learning_curves(_curves_df(seeds=2), "reward_mean")
    ax = fig.axes[0]
    assert ax.get_ylabel() == viz.AXIS_LABELS["reward_mean"] and ax.get_xlabel() == "training step"
    grid = pd.DataFrame({"lam": [0.1, 0.1, 0.5, 0.5], "rho": [0.5, 1.0, 0.5, 1.0], "var_shaped": [1.0, 2, 3, 4]})
    ax = viz.grid_heatmap(grid, "lam", "rho", "var_shaped").axes[0]
    for text in (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()):
        assert "_" not in text and text not in ("lam", "rho", "var_shaped")
    assert ax.get_xlabel().startswith("λ") and ax.get_ylabel().startswith("ρ")
    final = pd.DataFrame({"label": ["a", "b"], "mean": [0.2, 0.3]})
    assert viz.summary_bars(final, "label", "mean").axes[0].get_ylabel() != "mean"
    assert viz.axis_label("some_new_col") == "some new col"


def test_summary_bars_all_zero_is_said_and_bars_carry_values_and_n():
    final = pd.DataFrame({"experiment": ["05_gsm8k"] * 2, "label": ["grpo", "ibpo"], "mean": [0.0, 0.0],
                          "n_seeds": [1, 1]})
    fig = viz.summary_bars(final, "experiment", "mean", hue="label", n="n_seeds")
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 1.0)
    assert any(t.get_text() == "all zero" for t in ax.texts)
    fig = viz.summary_bars(final.assign(ci_lo=np.nan, ci_hi=np.nan), "experiment", "mean", hue="label",
                           err=("ci_lo", "ci_hi"), err_label="error bars: 95% CI over seeds", n="n_seeds")
    title = fig.axes[0].get_title()
    assert "95%" not in title and "no error bars" in title  # one seed: no interval, none promised
    assert [t.get_text() for t in ax.texts if t.get_text().startswith("0")] == ["0\nn=1", "0\nn=1"]
    assert not _overlaps(fig, ax.get_legend(), ax)


def test_summary_bars_interval_columns_give_asymmetric_error_bars():
    var = pd.DataFrame({"estimator": ["grpo", "ibpo"], "rel_var": [2.0, 1.0], "lo": [1.5, 0.2], "hi": [3.0, 1.1]})
    fig = viz.summary_bars(var, "estimator", "rel_var", err=("lo", "hi"), err_label="95% bootstrap interval")
    ax = fig.axes[0]
    segs = [c for c in ax.collections if hasattr(c, "get_segments")][0].get_segments()
    np.testing.assert_allclose([s[:, 1] for s in segs], [[1.5, 3.0], [0.2, 1.1]])
    assert "95% bootstrap interval" in ax.get_title()
    with pytest.raises(ValueError, match="pair"):
        viz.summary_bars(var, "estimator", "rel_var", err=("lo", "hi", "x"))


def test_advantage_panel_one_symmetric_scale_and_explained_step_lines():
    adv = {"grpo": torch.full((2, 4), 0.5), "ibpo": torch.tensor([[2.0, -1, 0, 0], [0, 0, 0, 0]])}
    fig = viz.advantage_panel(adv, rewards=[1, 0], step_spans=[[(0, 2), (2, 4)]] * 2)
    ims = [ax.images[0] for ax in fig.axes if ax.images]
    assert [im.get_clim() for im in ims] == [(-2.0, 2.0), (-2.0, 2.0)]  # one scale, the max |A| of all panels
    assert sum(1 for ax in fig.axes if ax.get_label() == "<colorbar>") == 1
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("step boundary" in t for t in legend)
    fig = viz.advantage_panel(adv, scale="panel")
    ims = [ax.images[0] for ax in fig.axes if ax.images]
    assert [im.get_clim() for im in ims] == [(-0.5, 0.5), (-2.0, 2.0)]
    assert all("own scale" in ax.get_title() for ax in fig.axes if ax.images)
    with pytest.raises(ValueError, match="scale"):
        viz.advantage_panel(adv, scale="log")


def test_roc_plot_flags_identical_curves():
    rng = np.random.default_rng(4)
    adv = rng.normal(size=40)
    lab = adv + rng.normal(size=40) > 0
    df = pd.concat([pd.DataFrame({"estimator": e, "advantage": a, "correct": lab})
                    for e, a in (("grpo", adv), ("rloo", 2 * adv), ("ibpo", -adv))])  # rloo: same ranking
    fig = viz.roc_plot(df)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[1].startswith("rloo = grpo (identical") and "identical" not in texts[2]
    assert ax.lines[1].get_linestyle() != "-" and ax.lines[0].get_linestyle() == "-"
    assert not _overlaps(fig, ax.get_legend(), ax)


def test_bands_and_error_bars_of_shares_stay_in_0_1():
    df = pd.DataFrame({"step": [1, 1, 2, 2], "seed": [0, 1, 0, 1], "label": "ibpo", "accuracy": [0.0, 1.0, 0.5, 1.0]})
    ax = viz.learning_curves(df, "accuracy").axes[0]
    ys = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == 0.0 and ys.max() == 1.0  # the t-interval over 2 seeds (±6.4 at step 1) is cut at 0 and 1
    final = pd.DataFrame({"label": ["a", "a"], "avg@k": [0.0, 1.0]})
    segs = [c for c in viz.summary_bars(final, "label", "avg@k").axes[0].collections
            if hasattr(c, "get_segments")][0].get_segments()
    np.testing.assert_allclose(segs[0][:, 1], [0.0, 1.0])


def test_a_copy_lines_legend_handle_shows_its_colour():
    df = _curves_df(seeds=1)
    df = pd.concat([df] + [df[df.label == "grpo"].assign(label=f"copy{k}") for k in range(4)], ignore_index=True)
    ax = viz.learning_curves(df, "reward_mean").axes[0]
    handles = ax.get_legend().legend_handles
    for line, h in zip(ax.lines[2:], handles[2:]):  # the four copies of grpo
        assert line._unscaled_dash_pattern[0] > 0  # the line's dashes are offset (so the copies interleave) ...
        assert h.get_color() == line.get_color() and h._unscaled_dash_pattern[0] == 0  # ... its handle starts with a dash
