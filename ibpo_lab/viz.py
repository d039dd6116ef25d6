"""Seeing IBPO's credit: token colouring, repair diffs, divergence heatmaps, prefix tries, curves.

Every view exists twice: a static function (a matplotlib figure or an HTML string that
papermill outputs and reports keep) and, for exploring, :func:`explorer`, an ipywidgets box
whose panels are drawn by the very same static functions.

HTML views return :class:`HTML`, a ``str`` that Jupyter renders (``_repr_html_``), so tests
and reports can read it as text. Figures are plain ``matplotlib`` figures; :func:`save_fig`
writes them as PNG into a notebook's ``out_dir`` where ``ibpo_lab.reproduce`` collects them.
"""

from __future__ import annotations

import html as _html
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "HTML",
    "save_fig",
    "save_table",
    "save_html",
    "token_html",
    "batch_token_html",
    "repair_diff_html",
    "divergence_heatmap",
    "prefix_trie_plot",
    "advantage_panel",
    "runs_frame",
    "learning_curves",
    "metric_grid",
    "summary_bars",
    "grid_heatmap",
    "roc_curve",
    "roc_plot",
    "step_credit_plot",
    "step_labels_html",
    "AXIS_LABELS",
    "axis_label",
    "SHARE_METRICS",
    "load_trajectories",
    "run_tokenizer",
    "run_step_labeler",
    "trajectory_view",
    "explorer",
]


class HTML(str):
    """An HTML fragment: a plain ``str`` that Jupyter displays rendered."""

    def _repr_html_(self) -> str:
        return str(self)


# ------------------------------------------------------------------------------------------ labels
#: Words (and units) for the column names figures plot: axis labels, colour-bar labels and default
#: titles read these, never the raw column name. Short forms of ``runs.METRIC_HELP`` /
#: ``runs.EVAL_HELP`` (whose long texts stay the definition) plus the notebooks' summary columns.
AXIS_LABELS: dict[str, str] = {
    "step": "training step",
    "reward_mean": "mean training reward",
    "accuracy": "training accuracy (share with reward ≥ 1)",
    "zero_var_groups": "share of groups with equal rewards",
    "active_tokens": "share of credited tokens",
    "response_len": "response length (tokens)",
    "repair_success": "share of failures with a verified repair",
    "entropy": "token entropy (nats)",
    "approx_kl": "KL(behaviour ‖ current), k3 estimate",
    "clip_frac": "share of clipped tokens",
    "kl_ref": "KL to the reference policy (k3)",
    "loss": "policy loss",
    "grad_norm": "gradient norm (before clipping)",
    "updates": "optimiser steps",
    "skipped": "skipped optimiser steps",
    "lr": "learning rate",
    "n_repaired": "verified repairs",
    "time_step": "time per step (s)",
    "time_sample": "sampling time (s)",
    "time_correct": "repair time (s)",
    "time_update": "update time (s)",
    "avg@k": "held-out accuracy (avg@k)",
    "pass@1": "held-out pass@1",
    "pass@k": "held-out pass@k",
    "mean": "mean over seeds",
    "final_reward": "final training reward",
    "best_reward": "best training reward",
    "rel_var": "relative gradient variance  tr Cov(g) / ‖E g‖²",
    "total_var": "total gradient variance  tr Cov(g)",
    "mean_cos": "mean cos(g, E g)",
    "lam": "λ (shaping weight)",
    "rho": "ρ (repair bonus)",
    "auc_within_failed": "AUC of step credit within failed trajectories",
    "first_error_localisation": "share of failures: first wrong\nstep is the most blamed",
    "repaired_share": "share of failures with a verified repair",
    "live_group_share": "share of groups with a non-zero signal",
    "edited_fraction": "share of response tokens\ncredited (edited)",
    "var_shaped": "pooled Var(R + λφ)",
    "advantage": "step advantage",
    "K": "K (references per failure)",
    "label": "method",
    "estimator": "estimator",
    "experiment": "experiment",
}


#: metrics that are shares in [0, 1]: bands and error bars are clipped to this range (a mean of
#: shares cannot leave it, while a Student-t interval over 2 seeds easily does)
SHARE_METRICS = frozenset({
    "accuracy", "zero_var_groups", "active_tokens", "repair_success", "clip_frac", "avg@k", "pass@1", "pass@k",
    "repaired_share", "live_group_share", "edited_fraction", "first_error_localisation", "auc_within_failed",
})


def axis_label(name: Any) -> str:
    """Words for a column name: :data:`AXIS_LABELS`, else the name with underscores as spaces
    (never the raw ``snake_case`` name on an axis)."""
    key = str(name)
    return AXIS_LABELS.get(key, key.replace("_", " "))


# ------------------------------------------------------------------------------------------ saving
def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_.")
    if not s:
        raise ValueError(f"name {name!r} has no usable characters for a file name")
    return s


def save_fig(fig, out_dir: str | Path | None, name: str, *, dpi: int = 110) -> Path | None:
    """Save ``fig`` as ``out_dir/name.png`` (folder created) and return the path.

    ``out_dir=None`` saves nothing (interactive use) and returns None. The figure stays open so
    the notebook still shows it.
    """
    if out_dir is None:
        return None
    if not hasattr(fig, "savefig"):
        raise ValueError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    path = Path(out_dir) / f"{_slug(name)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def save_table(df: pd.DataFrame, out_dir: str | Path | None, name: str) -> Path | None:
    """Save a results table as ``out_dir/name.csv`` (the report shows it); returns the path."""
    if out_dir is None:
        return None
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    path = Path(out_dir) / f"{_slug(name)}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def save_html(fragment: str, out_dir: str | Path | None, name: str) -> Path | None:
    """Save an HTML view (token colouring, repair diff, step labels) as ``out_dir/name.html``, the
    static equivalent of an explorer panel that ``reproduce`` puts into its report; returns the path."""
    if out_dir is None:
        return None
    if not isinstance(fragment, str):
        raise ValueError(f"fragment must be an HTML string, got {type(fragment).__name__}")
    path = Path(out_dir) / f"{_slug(name)}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(fragment), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ colours
def _to_numpy(x: Any, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"{name} is None")
    if type(x).__module__.startswith("torch"):
        x = x.detach().float().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric ({e})") from e


def _hex(rgba) -> str:
    r, g, b = (int(round(255 * float(c))) for c in rgba[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def _text_colour(rgba) -> str:
    # relative luminance decides black or white text, so dark cells stay readable
    lum = 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]
    return "#000000" if lum > 0.5 else "#ffffff"


def _show_token(tok: str) -> str:
    # make whitespace visible: a newline shows as ↵ and breaks the line, a tab as →
    t = _html.escape(str(tok))
    return t.replace("\t", "→").replace("\n", "↵<br>")


# ------------------------------------------------------------------------------------------ tokens
def token_html(
    tokens: Sequence[str],
    values: Any,
    *,
    mask: Any = None,
    edited: Any = None,
    vmax: float | None = None,
    cmap: str = "RdBu",
    tooltips: Sequence[str] | None = None,
    title: str | None = None,
) -> HTML:
    """Tokens as coloured HTML spans: background = value on a diverging colour map.

    tokens [T] strings, values [T] (e.g. one trajectory's advantages); mask [T] bool (False →
    grey text, no colour: the token is not trained); edited [T] bool (underlined: the repair
    changed it). Colours are symmetric around 0 with ``vmax`` (default max |value|); with
    ``RdBu`` negative credit is red and positive blue. Every span has a tooltip with position
    and value (or ``tooltips[i]``).
    """
    import matplotlib

    toks = [str(t) for t in tokens]
    vals = _to_numpy(values, "values").reshape(-1)
    if len(vals) != len(toks):
        raise ValueError(f"values has {len(vals)} entries but tokens has {len(toks)}")
    m = np.ones(len(toks), dtype=bool) if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
    e = np.zeros(len(toks), dtype=bool) if edited is None else np.asarray(edited, dtype=bool).reshape(-1)
    for nm, arr in (("mask", m), ("edited", e)):
        if len(arr) != len(toks):
            raise ValueError(f"{nm} has {len(arr)} entries but tokens has {len(toks)}")
    if tooltips is not None and len(tooltips) != len(toks):
        raise ValueError(f"tooltips has {len(tooltips)} entries but tokens has {len(toks)}")
    if not np.all(np.isfinite(vals[m])):
        raise ValueError("values must be finite on masked-in tokens")
    scale = vmax if vmax is not None else float(np.max(np.abs(vals[m]), initial=0.0))
    if scale < 0:
        raise ValueError(f"vmax must be >= 0, got {vmax}")
    cm = matplotlib.colormaps[cmap]
    spans = []
    for i, (tok, v) in enumerate(zip(toks, vals)):
        tip = tooltips[i] if tooltips is not None else f"pos {i} · value {v:+.4f}"
        style = "white-space:pre-wrap;padding:1px 0;border-radius:2px;"
        if m[i]:
            # map [-scale, scale] onto [0, 1]; all-zero credit is the colour map's midpoint
            x = 0.5 if scale == 0 else 0.5 + 0.5 * float(np.clip(v / scale, -1, 1))
            rgba = cm(x)
            style += f"background-color:{_hex(rgba)};color:{_text_colour(rgba)};"
        else:
            style += "color:#999999;"
            tip += " · not trained"
        if e[i]:
            style += "text-decoration:underline;text-decoration-thickness:2px;"
            tip += " · edited by the repair"
        spans.append(
            f'<span class="tok" data-pos="{i}" title="{_html.escape(tip, quote=True)}" style="{style}">'
            f"{_show_token(tok)}</span>"
        )
    head = f"<div><b>{_html.escape(title)}</b></div>" if title else ""
    legend = (
        f'<div style="font-size:80%;color:#555">colour scale ±{scale:.3g} '
        f"({_html.escape(cmap)}: low → high); grey = not trained; underline = edited by the repair</div>"
    )
    return HTML(
        f'<div class="ibpo-tokens" style="font-family:monospace;line-height:1.6">{head}'
        + "".join(spans)
        + legend
        + "</div>"
    )


def _decode(tokenizer, ids: list[int]) -> str:
    try:  # a transformers tokenizer: keep special tokens and the spacing exactly as generated
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    except TypeError:  # a tokenizer without these options (tokenizers.Tokenizer, a test stub)
        return tokenizer.decode(ids)


def _decode_each(token_ids: Sequence[int], tokenizer) -> list[str]:
    """The text each token contributes, read off the decoded sequence rather than each token alone.

    A byte-level BPE (GPT-2, SmolLM2, Qwen) may split one character (é, 中, an emoji) over several
    tokens, or end a token inside the next character; decoded alone such a token is U+FFFD (``�``).
    Here the sequence is decoded incrementally (as text-generation servers stream it): every
    character goes to the token that holds its last byte, a token holding only the first bytes of
    a character shows nothing, and the pieces join to exactly ``tokenizer.decode(ids)``. The
    decoding window starts a token before the new text, which keeps SentencePiece's leading-space
    rule right. A sequence cut inside a character ends in ``�`` on its last token (those bytes are
    really there). No tokenizer: the ids as strings."""
    if tokenizer is None:
        return [str(t) for t in token_ids]
    ids = [int(t) for t in token_ids]
    out: list[str] = []
    prefix = boundary = 0  # window start; the latest token boundary between whole characters
    emitted = 0  # characters of decode(ids[prefix:...]) already given to tokens
    for i in range(len(ids)):
        text = _decode(tokenizer, ids[prefix:i + 1])
        whole = text if i == len(ids) - 1 else text.rstrip("\ufffd")  # drop a trailing incomplete character
        out.append(whole[emitted:])
        emitted = max(emitted, len(whole))
        if not text.endswith("\ufffd"):  # token i ends on a character boundary: slide the window up
            prefix, boundary = boundary, i + 1
            emitted = len(_decode(tokenizer, ids[prefix:i + 1]))
    return out


def batch_token_html(batch, advantages: Any, tokenizer=None, index: int = 0, *, vmax: float | None = None) -> HTML:
    """:func:`token_html` of trajectory ``index`` of a RolloutBatch with advantages [B, T]."""
    adv = _to_numpy(advantages, "advantages")
    if adv.ndim != 2 or adv.shape[0] != len(batch):
        raise ValueError(f"advantages must be [B, T] with B={len(batch)}, got shape {adv.shape}")
    if not 0 <= int(index) < len(batch):
        raise ValueError(f"index {index} out of range for a batch of {len(batch)}")
    ids = batch.response_ids[index]
    n = len(ids)
    mask = batch.response_mask[index, :n].numpy() > 0
    edited = batch.edit_masks[index] if batch.edit_masks is not None else None
    title = f"trajectory {index} · group {int(batch.group_ids[index])} · reward {float(batch.rewards[index]):g}"
    return token_html(_decode_each(ids, tokenizer), adv[index, :n], mask=mask, edited=edited, vmax=vmax, title=title)


# ------------------------------------------------------------------------------------------ repairs
def _as_units(x: Any, tokenizer, vocab: dict[str, int]) -> tuple[list[int], list[str]]:
    """(ids for alignment, display strings) of a failed/repaired attempt. ``vocab`` is shared by
    both sides so that equal token strings get equal ids."""
    if isinstance(x, str):
        if tokenizer is not None:
            ids = tokenizer.encode(x, add_special_tokens=False)
            return list(ids), _decode_each(ids, tokenizer)
        return [ord(c) for c in x], list(x)  # no tokenizer: a character-level diff
    seq = list(x)
    if seq and all(isinstance(t, str) for t in seq):
        return [vocab.setdefault(t, len(vocab)) for t in seq], seq
    from ibpo_lab.diff import as_token_array

    ids = as_token_array(seq, "failed/repaired").tolist()
    return ids, _decode_each(ids, tokenizer)


def repair_diff_html(failed: Any, repaired: Any, tokenizer=None, *, title: str | None = None) -> HTML:
    """The repair as an inline diff: kept tokens plain, tokens of the failed attempt that the
    repair changed struck through in red, tokens it inserted in green.

    failed, repaired: texts (tokenised with ``tokenizer``, or diffed by character without one),
    token-id sequences (decoded with ``tokenizer``) or token-string lists. The alignment is
    ``ibpo_lab.diff.opcodes``, so the red tokens are exactly IBPO's edit mask.
    """
    from ibpo_lab.diff import opcodes

    if isinstance(failed, str) != isinstance(repaired, str):
        raise ValueError("failed and repaired must both be texts or both be token sequences")
    vocab: dict[str, int] = {}
    a_ids, a_txt = _as_units(failed, tokenizer, vocab)
    b_ids, b_txt = _as_units(repaired, tokenizer, vocab)
    ops = opcodes(a_ids, b_ids)
    out, n_del, n_ins = [], 0, 0
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            out += [f'<span class="eq">{_show_token(t)}</span>' for t in a_txt[i1:i2]]
            continue
        if i2 > i1:
            n_del += i2 - i1
            out += [
                '<del class="del" style="background:#ffd7d7;color:#a00000;white-space:pre-wrap" '
                f'title="changed in the failed attempt (pos {i1 + k})">{_show_token(t)}</del>'
                for k, t in enumerate(a_txt[i1:i2])
            ]
        if j2 > j1:
            n_ins += j2 - j1
            out += [
                '<ins class="ins" style="background:#d4f7d4;color:#006000;text-decoration:none;white-space:pre-wrap" '
                f'title="inserted by the repair (pos {j1 + k})">{_show_token(t)}</ins>'
                for k, t in enumerate(b_txt[j1:j2])
            ]
    head = f"<div><b>{_html.escape(title)}</b></div>" if title else ""
    summary = (
        f'<div style="font-size:80%;color:#555">{n_del} of {len(a_txt)} tokens changed in the failed attempt '
        f"(red), {n_ins} inserted by the repair (green)</div>"
    )
    return HTML(
        f'<div class="ibpo-diff" style="font-family:monospace;line-height:1.6">{head}{"".join(out)}{summary}</div>'
    )


def step_labels_html(steps: Sequence[str], labels: Sequence[bool | None] | None, *, title: str | None = None) -> HTML:
    """A trajectory's steps with their ground-truth labels (✓ correct, ✗ wrong, ? unknown)."""
    steps = [str(s) for s in steps]
    if labels is not None and len(labels) != len(steps):
        raise ValueError(f"labels has {len(labels)} entries but steps has {len(steps)}")
    rows = []
    for k, s in enumerate(steps):
        lab = None if labels is None else labels[k]
        mark, colour = ("?", "#777777") if lab is None else (("✓", "#006000") if lab else ("✗", "#a00000"))
        rows.append(
            f'<tr><td style="color:{colour};font-weight:bold">{mark}</td><td>{k}</td>'
            f'<td style="font-family:monospace;white-space:pre-wrap">{_html.escape(s)}</td></tr>'
        )
    head = f"<div><b>{_html.escape(title)}</b></div>" if title else ""
    return HTML(f'<div class="ibpo-steps">{head}<table>{"".join(rows)}</table></div>')


# ------------------------------------------------------------------------------------------ groups
def _new_ax(ax, figsize):
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def divergence_heatmap(
    matrix: Any,
    ax=None,
    *,
    rewards: Any = None,
    labels: Sequence[str] | None = None,
    title: str = "shared prefix length",
    unit: str = "tokens",
    annotate: bool | None = None,
    hide_diagonal: bool = True,
    highlight: int | None = None,
):
    """Heatmap of a group's divergence matrix (``diff.divergence_matrix`` or
    ``diff.step_divergence_matrix``): cell (i, j) = length of the prefix trajectories i and j share
    (the diagonal is each trajectory's own length: blank unless ``hide_diagonal=False``, so the
    colour scale shows the pairs; its numbers stay written). Rows and columns are labelled
    ``i (R=reward)`` when ``rewards`` are given. ``highlight``: the row/column index of one
    trajectory (the explorer's selection), outlined in red with a bold red ``▶`` label.
    int[G, G] -> Figure."""
    M = _to_numpy(matrix, "matrix")
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"matrix must be square [G, G], got shape {M.shape}")
    G = M.shape[0]
    if labels is None:
        r = None if rewards is None else _to_numpy(rewards, "rewards").reshape(-1)
        if r is not None and len(r) != G:
            raise ValueError(f"rewards has {len(r)} entries but the matrix is {G}x{G}")
        labels = [f"{i}" + ("" if r is None else f" (R={r[i]:g})") for i in range(G)]
    elif len(labels) != G:
        raise ValueError(f"labels has {len(labels)} entries but the matrix is {G}x{G}")
    if highlight is not None and not 0 <= int(highlight) < G:
        raise ValueError(f"highlight {highlight} out of range for a {G}x{G} matrix")
    labels = [("▶ " if highlight is not None and i == int(highlight) else "") + str(lab)
              for i, lab in enumerate(labels)]
    fig, ax = _new_ax(ax, (1.6 + 0.45 * G, 0.9 + 0.4 * G))
    shown = M.astype(float)
    if hide_diagonal and G > 1:
        np.fill_diagonal(shown, np.nan)
    im = ax.imshow(shown, cmap="viridis", vmin=0)
    ax.set_xticks(range(G), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(G), labels, fontsize=8)
    ax.set_title(f"{title} ({unit})", fontsize=10)
    if annotate is None:
        annotate = G <= 16
    if annotate:
        top = np.nanmax(shown) if np.isfinite(shown).any() else 0
        for i in range(G):
            for j in range(G):
                dark = not np.isfinite(shown[i, j]) or shown[i, j] > 0.6 * top
                ax.text(j, i, f"{M[i, j]:g}", ha="center", va="center", fontsize=7,
                        color="black" if dark else "white")
    if highlight is not None:
        from matplotlib.patches import Rectangle

        h = int(highlight)
        for xy, w, hh in (((-0.5, h - 0.5), G, 1), ((h - 0.5, -0.5), 1, G)):  # its row, its column
            ax.add_patch(Rectangle(xy, w, hh, fill=False, edgecolor="red", linewidth=2, clip_on=False))
        for tick in (ax.get_xticklabels()[h], ax.get_yticklabels()[h]):
            tick.set_color("red")
            tick.set_fontweight("bold")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def _trie_layout(parent: np.ndarray) -> np.ndarray:
    """y position of every trie node: leaves 0, 1, 2... in depth-first order, an inner node in
    the middle of its children (the usual tidy dendrogram layout, written out: it is ten lines)."""
    n = len(parent)
    kids: list[list[int]] = [[] for _ in range(n)]
    for c in range(1, n):
        kids[int(parent[c])].append(c)
    y = np.zeros(n)
    next_leaf = 0
    order, stack = [], [0]
    while stack:  # iterative DFS (deep tries would hit Python's recursion limit)
        v = stack.pop()
        order.append(v)
        stack.extend(reversed(kids[v]))
    for v in order:
        if not kids[v]:
            y[v] = next_leaf
            next_leaf += 1
    for v in reversed(order):
        if kids[v]:
            y[v] = np.mean([y[c] for c in kids[v]])
    return y


def prefix_trie_plot(trie, ax=None, *, title: str = "step prefix trie", annotate: bool = True):
    """Draw a ``diff.PrefixTrie``: x = step depth, one row per distinct path; node size = how many
    trajectories share the prefix, colour = their mean reward (the prefix's Monte-Carlo value)."""
    for attr in ("parent", "depth", "count", "mean"):
        if not hasattr(trie, attr):
            raise ValueError(f"trie must be a PrefixTrie (missing {attr!r})")
    parent = np.asarray(trie.parent, dtype=int)
    depth = np.asarray(trie.depth, dtype=float)
    count = np.asarray(trie.count, dtype=float)
    mean = np.asarray(trie.mean, dtype=float)
    y = _trie_layout(parent)
    n_leaves = int(y.max()) + 1 if len(y) else 1
    fig, ax = _new_ax(ax, (1.5 + 0.9 * max(depth.max(initial=0), 1), 1.0 + 0.35 * n_leaves))
    for c in range(1, len(parent)):
        p = parent[c]
        ax.plot([depth[p], depth[p], depth[c]], [y[p], y[c], y[c]], color="#999999", lw=1, zorder=1)
    size = 40 + 260 * count / max(count.max(initial=1), 1)
    sc = ax.scatter(depth, y, s=size, c=mean, cmap="RdYlGn", vmin=0, vmax=1, edgecolors="black", zorder=2)
    if annotate:
        for v in range(len(parent)):  # the count inside its node
            ax.text(depth[v], y[v], f"{int(count[v])}", ha="center", va="center", fontsize=7, zorder=3)
    ax.margins(x=0.12, y=0.15)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    ax.set_yticks([])
    ax.invert_yaxis()
    ax.set_title(title + "\n(node: #trajectories sharing the prefix, colour = their mean reward)", fontsize=9)
    fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.04, label="mean reward")
    return fig


_MASKED = "#bdbdbd"  # advantage_panel: cells that are not trained response tokens (0 is near-white)


def advantage_panel(
    advantages: Mapping[str, Any],
    mask: Any = None,
    *,
    rewards: Any = None,
    group_ids: Any = None,
    step_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
    title: str | None = None,
    scale: str = "shared",
):
    """Token advantages of several estimators side by side: one heatmap per estimator, one row
    per trajectory, one column per response token, red < 0 < blue (masked-out tokens grey).

    advantages: name -> [B, T]; mask [B, T] (response mask); rewards [B], group_ids [B] label
    the rows (``#i g<group> R=<reward>``, on the left column only); step_spans (B lists of token
    spans) draw step boundaries as short black bars between tokens, named in the figure legend.
    scale: ``"shared"`` (default) one symmetric colour scale ±max|A| over all panels and one colour
    bar, so a colour means the same advantage in every panel; ``"panel"`` each panel its own
    ±max|A|, written in its title (colours then do not compare across panels).
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not advantages:
        raise ValueError("advantages is empty: pass {estimator name: [B, T] tensor}")
    if scale not in ("shared", "panel"):
        raise ValueError(f"scale must be 'shared' or 'panel', got {scale!r}")
    arrs = {k: _to_numpy(v, f"advantages[{k!r}]") for k, v in advantages.items()}
    shapes = {a.shape for a in arrs.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every advantages[...] must be [B, T] with one shape, got {sorted(shapes)}")
    B, T = next(iter(shapes))
    m = np.ones((B, T), dtype=bool) if mask is None else _to_numpy(mask, "mask") > 0
    if m.shape != (B, T):
        raise ValueError(f"mask has shape {m.shape}, expected {(B, T)}")
    labels = [f"#{i}" for i in range(B)]
    if rewards is not None:
        r = _to_numpy(rewards, "rewards").reshape(-1)
        g = None if group_ids is None else _to_numpy(group_ids, "group_ids").reshape(-1)
        labels = [f"#{i}" + (f" g{int(g[i])}" if g is not None else "") + f"  R={r[i]:g}" for i in range(B)]
    shown = {name: np.where(m, a, np.nan) for name, a in arrs.items()}

    def _vmax(x: np.ndarray) -> float:
        v = float(np.nanmax(np.abs(x))) if np.isfinite(x).any() else 1.0
        return v or 1.0

    shared = _vmax(np.stack(list(shown.values())))
    k = len(arrs)
    ncol = min(k, 3)
    nrow = math.ceil(k / ncol)
    row_h = max(1.8, 0.3 * B)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.0 + 4.2 * ncol, 1.2 + row_h * nrow), squeeze=False,
                             sharey=True, layout="constrained")
    label_size = 9 if B <= 24 else 7
    cmap = plt.get_cmap("RdBu").with_extremes(bad=_MASKED)
    for idx, (ax, (name, a)) in enumerate(zip(axes.flat, shown.items())):
        vmax = shared if scale == "shared" else _vmax(a)
        im = ax.imshow(a, aspect="auto", cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
        if step_spans is not None:
            for i, spans in enumerate(step_spans):
                for _, end in spans[:-1]:
                    ax.plot([end - 0.5, end - 0.5], [i - 0.45, i + 0.45], color="black", lw=1.0)
        ax.set_title(name if scale == "shared" else f"{name} (own scale ±{vmax:.2g})", fontsize=10)
        ax.set_yticks(range(B), labels, fontsize=label_size)
        ax.tick_params(axis="y", labelleft=idx % ncol == 0)
        ax.set_xlabel("response token")
        if scale == "panel":
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="token advantage")
    for ax in list(axes.flat)[k:]:
        ax.set_visible(False)
    if scale == "shared":
        fig.colorbar(im, ax=list(axes.flat)[:k], fraction=0.03, pad=0.01,
                     label=f"token advantage (one scale, ±{shared:.2g})")
    handles = [Patch(facecolor=_MASKED, edgecolor="#999999", label="grey: not a trained response token")]
    if step_spans is not None:
        handles.insert(0, Line2D([], [], color="black", lw=1.0, label="step boundary"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    note = "one colour scale for all panels" if scale == "shared" else "each panel has its own colour scale"
    fig.suptitle((f"{title}\n" if title else "") + f"red < 0 < blue; {note}",
                 fontsize=11 if title else 9)
    return fig


# ------------------------------------------------------------------------------------------ runs
def runs_frame(runs: Any, *, label: str | Callable | None = None) -> pd.DataFrame:
    """Metrics of several runs as one long DataFrame with ``label`` and ``seed`` columns.

    ``runs``: a DataFrame (returned as is), or run records / run folders (anything with a
    ``metrics`` DataFrame and a ``config``; folders are read with ``ibpo_lab.runs.load_run``).
    ``label``: config attribute or function(record) naming the curve (default: the config's
    ``label`` if it has one, else its ``estimator``).
    """
    if isinstance(runs, pd.DataFrame):
        return runs
    if isinstance(runs, (str, Path)) or hasattr(runs, "metrics"):
        runs = [runs]
    frames = []
    for r in runs:
        if isinstance(r, (str, Path)):
            from ibpo_lab.runs import load_run

            r = load_run(r)
        if not hasattr(r, "metrics"):
            raise ValueError(f"runs: expected run records with .metrics, got {type(r).__name__}")
        cfg = getattr(r, "config", None)
        df = pd.DataFrame(r.metrics).copy()

        def get(name, default=None):
            if isinstance(cfg, Mapping):
                return cfg.get(name, default)
            return getattr(cfg, name, default)

        if callable(label):
            lab = label(r)
        elif isinstance(label, str):
            lab = get(label)
        else:
            lab = getattr(r, "label", None) or get("label") or get("estimator") or "run"
        if "label" not in df.columns:
            df["label"] = str(lab)
        if "seed" not in df.columns:
            df["seed"] = get("seed", 0)
        frames.append(df)
    if not frames:
        raise ValueError("runs is empty")
    return pd.concat(frames, ignore_index=True)


_BAND_WORDS = {"ci": "95% CI of the mean", "std": "±1 std", "minmax": "min–max"}


def _band(values: pd.Series, band: str | None) -> tuple[float, float, float]:
    v = values.dropna().to_numpy(dtype=float)
    mu = float(v.mean()) if len(v) else math.nan
    if band is None or len(v) < 2:
        return mu, mu, mu
    if band == "ci":  # the 95% interval of the tables (runs.mean_ci)
        from ibpo_lab.runs import mean_ci

        return mean_ci(v)
    if band == "std":
        s = v.std(ddof=1)
        return mu, mu - s, mu + s
    if band == "minmax":
        return mu, float(v.min()), float(v.max())
    raise ValueError(f"band must be 'ci', 'std', 'minmax' or None, got {band!r}")


def _handles(ax) -> tuple[list, list[str]]:
    """The axes' legend handles, a copy line's own proxy (plain short dashes: its offset dash pattern
    can start with a gap longer than a legend handle) in place of the line."""
    handles, labels = ax.get_legend_handles_labels()
    return [getattr(h, "_legend_proxy", h) for h in handles], labels


def _mark_copy(line) -> None:
    """Give a dashed copy line a legend proxy that shows its colour (see :func:`_handles`)."""
    from matplotlib.lines import Line2D

    line._legend_proxy = Line2D([], [], color=line.get_color(), ls=(0, (2.0, 1.0)), lw=line.get_linewidth(),
                                marker=line.get_marker(), markersize=min(line.get_markersize(), 7),
                                fillstyle=line.get_fillstyle(), markeredgewidth=line.get_markeredgewidth())


def _legend_outside(ax, **kw) -> None:
    """A legend to the right of the axes (never over the data); nothing when no artist is labelled."""
    handles, labels = _handles(ax)
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                  fontsize=7, frameon=False, **kw)


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True))


def _copies(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> tuple[dict[int, int], dict[int, list[int]]]:
    """Which lines repeat an earlier one: (copy index -> first index, first index -> [first, copies...])."""
    copy_of: dict[int, int] = {}
    for i in range(len(xs)):
        for j in range(i):
            if j not in copy_of and _same_values(xs[j], xs[i]) and _same_values(ys[j], ys[i]):
                copy_of[i] = j
                break
    cluster = {j: [j] + [i for i, b in copy_of.items() if b == j] for j in range(len(xs)) if j not in copy_of}
    return copy_of, cluster


def _dashed(pos: int, m: int, dash: float = 4.0) -> tuple[float, tuple[float, float]]:
    """Line style of the ``pos``-th of ``m`` identical lines: dashes offset so that every colour shows
    in its own slot (slot 0 is the first, solid line underneath)."""
    return (pos * dash, (dash, dash * (m - 1)))


def _seeds(n: int) -> str:
    return f"n={n} seed" + ("" if n == 1 else "s")


def learning_curves(
    runs: Any,
    metric: str = "reward_mean",
    *,
    by: str = "label",
    band: str | None = "ci",
    x: str = "step",
    smooth: int = 1,
    ax=None,
    title: str | None = None,
    colors: Mapping[str, str] | None = None,
):
    """Mean curve of ``metric`` against ``x`` for each value of ``by`` with a band across seeds
    (``"ci"`` 95% CI of the mean, ``"std"``, ``"minmax"`` or None). ``smooth``: rolling-mean window
    applied per run before averaging. ``runs``: see :func:`runs_frame`. -> Figure.

    What the figure promises is what it draws: the legend gives n (seeds) per line; a band is
    drawn only for lines with n ≥ 2 seeds and the title names it (or says there is none); lines
    with few points carry markers and a one-step line says "1 step"; a line identical to an
    earlier one is drawn dashed, offset so both colours show, with the legend entry
    ``name = other (identical)``; all-zero data says "all zero"; the legend sits outside the axes;
    bands of :data:`SHARE_METRICS` are clipped to [0, 1]. ``colors``: a colour per ``by`` value
    (:func:`metric_grid` passes one map so a method keeps its colour in every panel)."""
    df = runs_frame(runs)
    for col in (metric, by, x):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in the run metrics; available: {sorted(df.columns)}")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    _band(pd.Series([0.0, 1.0]), band)  # validate band before drawing
    own = ax is None
    if own:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 3.6), layout="constrained")
    fig = ax.figure
    seed_col = "seed" if "seed" in df.columns else None
    curves = []
    for name, sub in df.groupby(by, sort=False):
        sub = sub.dropna(subset=[metric]).sort_values(x)
        if sub.empty:
            continue
        if smooth > 1:
            if seed_col:
                sub = sub.assign(**{metric: sub.groupby(seed_col)[metric].transform(
                    lambda s: s.rolling(smooth, min_periods=1).mean())})
            else:
                sub = sub.assign(**{metric: sub[metric].rolling(smooth, min_periods=1).mean()})
        stats = [(xv, *_band(g[metric], band)) for xv, g in sub.groupby(x)]
        xs, mu, lo, hi = (np.array(c, dtype=float) for c in zip(*stats))
        n = int(sub[seed_col].nunique()) if seed_col else 1
        curves.append({"name": str(name), "xs": xs, "mu": mu, "lo": lo, "hi": hi, "n": n})
    # identical lines: a later curve with the same points as an earlier one is its copy
    copy_of, cluster = _copies([c["xs"] for c in curves], [c["mu"] for c in curves])
    banded = []
    for i, c in enumerate(curves):
        single = len(c["xs"]) == 1
        marker = "o" if len(c["xs"]) <= 30 else None
        extra = ", 1 step" if single else ""
        if i in copy_of:
            base = copy_of[i]
            members = cluster[base]
            pos, m = members.index(i), len(members)
            style = dict(ls=_dashed(pos, m), lw=2.2,
                         marker=marker, markersize=5 + 2.5 * pos, fillstyle="none", markeredgewidth=1.2)
            lab = f"{c['name']} = {curves[base]['name']} (identical; {_seeds(c['n'])}{extra})"
        else:
            style = dict(ls="-", lw=1.8 if i in cluster and len(cluster[i]) > 1 else 1.6, marker=marker,
                         markersize=6 if single else 3.5)
            lab = f"{c['name']} ({_seeds(c['n'])}{extra})"
        if colors and c["name"] in colors:
            style["color"] = colors[c["name"]]
        (line,) = ax.plot(c["xs"], c["mu"], label=lab, **style)
        if i in copy_of:
            _mark_copy(line)
        if metric in SHARE_METRICS:  # the mean of shares stays in [0, 1]; so does its band
            c["lo"], c["hi"] = np.clip(c["lo"], 0, 1), np.clip(c["hi"], 0, 1)
        if band is not None and c["n"] >= 2 and i not in copy_of and not single:
            ax.fill_between(c["xs"], c["lo"], c["hi"], color=line.get_color(), alpha=0.2, lw=0)
            banded.append("band")
        elif band is not None and c["n"] >= 2 and single and i not in copy_of and np.isfinite(c["lo"]).all():
            ax.errorbar(c["xs"], c["mu"], yerr=[c["mu"] - c["lo"], c["hi"] - c["mu"]], fmt="none",
                        ecolor=line.get_color(), capsize=3)
            banded.append("error bar")
    if not curves:
        ax.text(0.5, 0.5, f"no {axis_label(metric)} logged", transform=ax.transAxes, ha="center", va="center")
    values = np.concatenate([c["mu"] for c in curves]) if curves else np.array([])
    values = values[np.isfinite(values)]
    if len(values) and np.all(values == 0):
        ax.text(0.5, 0.62, "all zero", transform=ax.transAxes, ha="center", va="center", fontsize=12,
                color="#666666")
    one_step = bool(curves) and all(len(c["xs"]) == 1 for c in curves)
    if one_step:
        xv = sorted({float(c["xs"][0]) for c in curves})
        ax.set_xticks(xv)
        ax.set_xlim(xv[0] - 1, xv[-1] + 1)
        ax.text(0.5, 0.02, "only 1 step logged: points, not curves", transform=ax.transAxes, ha="center",
                va="bottom", fontsize=8, color="#444444", bbox=dict(facecolor="white", edgecolor="none", alpha=0.8))
    if pd.api.types.is_integer_dtype(df[x]) and not one_step:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(metric))
    if band is None:
        note = "mean over seeds, no band"
    elif banded:
        kinds = " and ".join(sorted(set(banded)))  # a one-step line gets an error bar, not a band
        note = f"{kinds}: {_BAND_WORDS[band]} over seeds; n in the legend"
    else:
        note = "1 seed per line: no band"
    ax.set_title(f"{title or axis_label(metric)}\n({note})", fontsize=9)
    _legend_outside(ax)
    ax.grid(alpha=0.3)
    return fig


def metric_grid(runs: Any, metrics: Sequence[str], *, by: str = "label", band: str | None = "ci",
                x: str = "step", smooth: int = 1, ncol: int = 2, title: str | None = None):
    """:func:`learning_curves` of several metrics in one figure (missing metrics are listed in an
    error, not skipped). When every panel has the same legend it is drawn once, right of the grid;
    otherwise (e.g. lines identical in one metric only) each panel keeps its own, outside it."""
    import matplotlib.pyplot as plt

    df = runs_frame(runs)
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise ValueError(f"metrics {missing} not in the run metrics; available: {sorted(df.columns)}")
    if not metrics:
        raise ValueError("metrics is empty")
    ncol = min(ncol, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol + 2.2, 3.4 * nrow), squeeze=False, layout="constrained")
    used = list(axes.flat)[: len(metrics)]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # one colour per method across panels (a panel where some method has no data would otherwise shift them)
    colors = {str(k): cycle[i % len(cycle)] for i, k in enumerate(dict.fromkeys(df[by].tolist()))}
    for ax, m in zip(used, metrics):
        learning_curves(df, m, by=by, band=band, x=x, smooth=smooth, ax=ax, title=axis_label(m), colors=colors)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    legends = [tuple(t.get_text() for t in ax.get_legend().get_texts()) if ax.get_legend() else () for ax in used]
    if len(set(legends)) == 1 and legends[0]:
        handles, labels = _handles(used[0])
        for ax in used:
            ax.get_legend().remove()
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def summary_bars(df: pd.DataFrame, x: str, y: str, *, hue: str | None = None,
                 err: str | tuple[str, str] | None = None, err_label: str | None = None, n: str | None = None,
                 ax=None, title: str | None = None, ylabel: str | None = None,
                 bounds: tuple[float, float] | None = None):
    """Grouped bar chart of a summary table: bars of ``y`` per ``x`` (one colour per ``hue``).

    Error bars: ``err`` a column of half-widths, or a pair of columns ``(lo, hi)`` with the
    interval's bounds (``err_label`` says what the interval is; it goes in the title). Without
    ``err``, rows sharing an (x, hue) are averaged and the error bar is the 95% CI of their mean
    (``runs.mean_ci``) when there are ≥ 2 of them. Each bar is labelled with its value (and
    ``n=``: column ``n`` if given, else the number of rows averaged when > 1); NaN bars read
    "n/a"; a chart whose bars are all zero says "all zero" on a 0–1 axis instead of a ±0.05 one.
    ``bounds``: the range the values live in (default (0, 1) for :data:`SHARE_METRICS`): error bars
    are clipped to it.
    Axis labels are words (:func:`axis_label`), the legend sits outside the axes."""
    pair = isinstance(err, (tuple, list))
    if pair and len(err) != 2:
        raise ValueError(f"err must be a column or a (lo, hi) pair of columns, got {err!r}")
    err_cols = list(err) if pair else ([err] if err else [])
    cols = [c for c in (x, y, hue, n) if c is not None] + err_cols
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the table; available: {sorted(df.columns)}")
    keys = [x] + ([hue] if hue else [])
    rows = []
    for k, g in df.groupby(keys, sort=False):
        k = k if isinstance(k, tuple) else (k,)
        mu, lo, hi = _band(g[y], "ci")
        if pair:
            lo, hi = float(g[err_cols[0]].mean()), float(g[err_cols[1]].mean())
        elif err:
            e = float(g[err].mean())
            lo, hi = mu - e, mu + e
        count = int(g[n].sum()) if n else len(g)
        rows.append((*k, mu, lo, hi, count))
    agg = pd.DataFrame(rows, columns=keys + ["_mu", "_lo", "_hi", "_n"])
    if bounds is None and y in SHARE_METRICS:
        bounds = (0.0, 1.0)
    if bounds is not None:
        agg["_lo"], agg["_hi"] = agg["_lo"].clip(*bounds), agg["_hi"].clip(*bounds)
    xs = list(dict.fromkeys(agg[x]))
    hues = list(dict.fromkeys(agg[hue])) if hue else [None]
    if ax is None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(2.2 + 0.8 * len(xs) * max(1, len(hues)) ** 0.5 + (1.8 if hue else 0), 3.6),
                               layout="constrained")
    fig = ax.figure
    w = 0.8 / len(hues)
    mus = agg["_mu"].to_numpy(dtype=float)
    finite = np.isfinite(mus)
    all_zero = bool(finite.any()) and bool(np.all(mus[finite] == 0))
    drawn_err = False
    for h_i, h in enumerate(hues):
        sub = agg if h is None else agg[agg[hue] == h]
        pos = [xs.index(v) + (h_i - (len(hues) - 1) / 2) * w for v in sub[x]]
        mu = sub["_mu"].to_numpy(dtype=float)
        lo_e = np.nan_to_num(mu - sub["_lo"].to_numpy(dtype=float))
        hi_e = np.nan_to_num(sub["_hi"].to_numpy(dtype=float) - mu)
        yerr = np.vstack([lo_e, hi_e]) if (lo_e.any() or hi_e.any()) else None  # no caps on single values
        drawn_err = drawn_err or yerr is not None
        bars = ax.bar(pos, np.nan_to_num(mu), w, yerr=yerr, capsize=3, label=None if h is None else str(h))
        show_n = n is not None or (sub["_n"] > 1).any()
        texts = []
        for v, c in zip(mu, sub["_n"]):
            t = "n/a" if not np.isfinite(v) else format(v, ".3g")
            texts.append(t + (f"\nn={c}" if show_n else ""))
        if len(agg) <= 30:
            ax.bar_label(bars, labels=texts, fontsize=7, padding=2)
    if all_zero:
        ax.set_ylim(0, 1)
        ax.text(0.5, 0.6, "all zero", transform=ax.transAxes, ha="center", va="center", fontsize=12, color="#666666")
    else:
        ax.margins(y=0.15)
    names = [str(v) for v in xs]
    slanted = max(map(len, names), default=0) > 4  # short names (K = 1, 2, 3) stay upright
    ax.set_xticks(range(len(xs)), names, rotation=30 if slanted else 0, ha="right" if slanted else "center", fontsize=8)
    ax.set_xlabel(axis_label(x), fontsize=8)
    ax.set_ylabel(ylabel or axis_label(y))
    if hue:
        _legend_outside(ax, title=axis_label(hue))
    if not drawn_err:  # never name an interval that is not drawn
        bars_note = "no error bars: one value per bar" if (pair or err) and (agg["_n"] <= 1).all() else (
            "no error bars: zero-width or unknown intervals" if (pair or err) else "")
    elif pair or err:
        bars_note = err_label or ("error bars: " + (f"{err_cols[0]} to {err_cols[1]}" if pair else f"± {err}"))
    else:
        bars_note = "error bars: 95% CI of the mean over the n rows"
    ax.set_title((title or axis_label(y)) + (f"\n({bars_note})" if bars_note else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return fig


def grid_heatmap(df: pd.DataFrame, x: str, y: str, value: str, *, ax=None, title: str | None = None,
                 cmap: str = "viridis", fmt: str = ".3g"):
    """Heatmap of ``value`` over a two-parameter grid (e.g. λ × ρ), one cell per (x, y) row of ``df``
    (several rows per cell are averaged), the value written in each cell; axes and colour bar
    labelled in words (:func:`axis_label`)."""
    missing = [c for c in (x, y, value) if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the table; available: {sorted(df.columns)}")
    piv = df.pivot_table(index=y, columns=x, values=value, aggfunc="mean", dropna=False)
    fig, ax = _new_ax(ax, (1.5 + 0.9 * piv.shape[1], 1.2 + 0.6 * piv.shape[0]))
    im = ax.imshow(piv.to_numpy(dtype=float), cmap=cmap, aspect="auto", origin="lower")
    ax.set_xticks(range(piv.shape[1]), [f"{v:g}" if isinstance(v, float) else str(v) for v in piv.columns])
    ax.set_yticks(range(piv.shape[0]), [f"{v:g}" if isinstance(v, float) else str(v) for v in piv.index])
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    for i in range(piv.shape[0]):
        for j in range(piv.shape[1]):
            v = piv.iat[i, j]
            bright = not pd.isna(v) and im.norm(v) > 0.6  # dark text on the bright end of the colour map
            ax.text(j, i, "n/a" if pd.isna(v) else format(v, fmt), ha="center", va="center", fontsize=8,
                    color="black" if bright else "white")
    ax.set_title(title or axis_label(value), fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=axis_label(value))
    return fig


# ------------------------------------------------------------------------------------------ credit
def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of ``scores`` for boolean ``labels``: (fpr, tpr, auc) — ``diagnostics.roc_curve``, whose
    area is ``diagnostics.auc`` (one AUC in the lab)."""
    from ibpo_lab.diagnostics import roc_curve as _roc

    return _roc(_to_numpy(scores, "scores"), labels)


def roc_plot(df: pd.DataFrame, *, score: str = "advantage", label: str = "correct", by: str = "estimator",
             ax=None, title: str = "step credit vs ground-truth step labels"):
    """ROC curves, one per ``by`` group, of how well ``score`` ranks steps with ``label`` True above
    the rest (AUC and n steps in the legend, outside the axes; 0.5 = no information). Groups
    whose steps are all of one label have no ROC and are listed in the legend as such."""
    from matplotlib.lines import Line2D

    for c in (score, label, by):
        if c not in df.columns:
            raise ValueError(f"column {c!r} not in the table; available: {sorted(df.columns)}")
    fig, ax = _new_ax(ax, (6.4, 4))
    skipped, rocs = [], []
    for name, g in df.groupby(by, sort=False):
        y = g[label].astype(bool)
        if y.all() or not y.any():
            skipped.append(str(name))
            continue
        fpr, tpr, auc = roc_curve(g[score], y)
        rocs.append((str(name), np.asarray(fpr, float), np.asarray(tpr, float), auc, len(g)))
    copy_of, cluster = _copies([r[1] for r in rocs], [r[2] for r in rocs])  # e.g. grpo = dr_grpo = rloo
    for i, (name, fpr, tpr, auc, n) in enumerate(rocs):
        if i in copy_of:
            members = cluster[copy_of[i]]
            (line,) = ax.plot(fpr, tpr, ls=_dashed(members.index(i), len(members)), lw=2.0,
                              label=f"{name} = {rocs[copy_of[i]][0]} (identical; AUC {auc:.2f}, n={n} steps)")
            _mark_copy(line)
        else:
            ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUC {auc:.2f}, n={n} steps)")
    ax.plot([0, 1], [0, 1], color="#aaaaaa", ls="--", lw=1, label="no information (AUC 0.5)")
    for name in skipped:
        ax.add_line(Line2D([], [], color="none", label=f"{name}: no ROC (one label only)"))
    ax.set_xlabel("false positive rate (wrong steps ranked as correct)")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=10)
    _legend_outside(ax)
    return fig


def step_credit_plot(df: pd.DataFrame, *, value: str = "advantage", label: str = "correct", by: str = "estimator",
                     ax=None, title: str = "per-step advantage by ground-truth step label"):
    """Per ``by`` group, the distribution of step advantages on correct vs wrong steps (box plots
    side by side, n steps of each kind under the group's name): good credit puts wrong steps
    clearly below correct ones."""
    from matplotlib.patches import Patch

    for c in (value, label, by):
        if c not in df.columns:
            raise ValueError(f"column {c!r} not in the table; available: {sorted(df.columns)}")
    names = list(dict.fromkeys(df[by]))
    fig, ax = _new_ax(ax, (3.2 + 1.2 * len(names), 3.6))
    data, pos, colours, ticks = [], [], [], []
    for i, n in enumerate(names):
        g = df[df[by] == n]
        counts = []
        for j, (lab, col) in enumerate(((True, "#4c9a4c"), (False, "#c04040"))):
            v = g.loc[g[label].astype(bool) == lab, value].dropna().to_numpy(dtype=float)
            counts.append(len(v))
            data.append(v if len(v) else np.array([np.nan]))
            pos.append(i + (j - 0.5) * 0.35)
            colours.append(col)
        ticks.append(f"{n}\n({counts[0]} correct / {counts[1]} wrong)")
    bp = ax.boxplot(data, positions=pos, widths=0.3, patch_artist=True, showfliers=False)
    for patch, c in zip(bp["boxes"], colours):
        patch.set_facecolor(c)
        patch.set_alpha(0.6)
    ax.axhline(0, color="#999999", lw=0.8)
    ax.set_xticks(range(len(names)), ticks, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(axis_label(value))
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[Patch(facecolor="#4c9a4c", alpha=0.6, label="correct steps"),
                       Patch(facecolor="#c04040", alpha=0.6, label="wrong steps")],
              loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7, frameon=False)
    return fig


# ------------------------------------------------------------------------------------------ explorer
def _step_files(run_dir: Path) -> dict[int, Path]:
    from ibpo_lab.runs import trajectory_files

    return trajectory_files(run_dir)


def load_trajectories(run_dir: str | Path, step: int | None = None) -> pd.DataFrame:
    """The trajectories a run logged at ``step`` (default: the last logged step), one row each
    (``runs.RunRecord.trajectories``; columns ``runs.TRAJECTORY_HELP``)."""
    from ibpo_lab.runs import load_run

    rec = load_run(run_dir)
    steps = rec.steps_with_trajectories()
    if not steps:
        raise ValueError(f"run_dir: {run_dir} has no trajectories/step_*.parquet files")
    return rec.trajectories(steps[-1] if step is None else step)


def run_tokenizer(run_dir: str | Path):
    """The tokenizer of a run's policy (``runs.RunRecord.tokenizer``), for decoding logged token ids;
    None when the folder has no config or the tokenizer cannot be loaded offline."""
    from ibpo_lab.runs import load_run

    try:
        return load_run(run_dir).tokenizer()
    except ValueError:
        return None


def run_step_labeler(run_dir: str | Path) -> Callable[[str, str], list[bool] | None] | None:
    """``labeler(prompt, response) -> step labels`` for a run's task (``runs.RunRecord.step_labeler``);
    None when the folder has no readable config or the task cannot be built offline."""
    from ibpo_lab.runs import load_run

    try:
        return load_run(run_dir).step_labeler()
    except ValueError:
        return None


def _col(row: Mapping, *names, default=None):
    for n in names:
        if n in row and row[n] is not None and not (isinstance(row[n], float) and math.isnan(row[n])):
            return row[n]
    return default


def trajectory_view(frame: pd.DataFrame, traj: int, tokenizer=None, labeler=None, *,
                    vmax: float | None = None) -> dict[str, Any]:
    """Every static view of one logged trajectory (the explorer shows exactly these):

    ``tokens`` HTML coloured by advantage (symmetric scale ±``vmax``; default: this trajectory's
    max |advantage| on trained tokens), ``diff`` HTML of its repair (if it was repaired), ``steps``
    HTML of its step labels, ``heatmap`` Figure of its group's divergence matrix (rows labelled
    ``traj (R=reward)``, this trajectory outlined). ``frame``: :func:`load_trajectories` output;
    ``traj``: the row's ``traj`` value (or index); ``labeler``: ``(prompt, response) -> step labels``
    (:func:`run_step_labeler`) when the frame has no ``step_labels`` column. Token texts come from
    decoding the whole sequence (:func:`_decode_each`), so byte-level BPE text shows no ``�``.
    """
    from ibpo_lab.diff import divergence_matrix

    if "kind" in frame.columns:  # train.py logs repaired trajectories as extra rows; show the sampled ones
        frame = frame[frame["kind"] == "policy"]
    if "traj" in frame.columns:
        rows = frame[frame["traj"] == traj]
        if rows.empty:
            raise ValueError(f"traj {traj} not in this step; available: {frame['traj'].tolist()[:50]}")
        row = rows.iloc[0].to_dict()
    else:
        if not 0 <= traj < len(frame):
            raise ValueError(f"traj {traj} out of range for {len(frame)} rows")
        row = frame.iloc[traj].to_dict()
    ids = list(_col(row, "response_ids", default=[]))
    toks = _col(row, "tokens", "response_tokens")
    text = _col(row, "response")
    if toks is not None:
        toks = list(toks)
    elif tokenizer is None and isinstance(text, str) and len(text) == len(ids):
        toks = list(text)  # a character-level policy (the tiny one): token i is character i
    else:
        toks = _decode_each(ids, tokenizer)
    adv = _col(row, "advantages", "advantage")
    adv = np.zeros(len(toks)) if adv is None or np.ndim(adv) == 0 else np.asarray(adv, dtype=float)
    mask = _col(row, "response_mask", "mask")
    edited = _col(row, "edit_mask", "edited")
    reward = _col(row, "reward", default=math.nan)
    group = _col(row, "group", default=-1)
    out: dict[str, Any] = {}
    out["tokens"] = token_html(toks, adv[: len(toks)], mask=mask, edited=edited, vmax=vmax,
                               title=f"traj {traj} · group {group} · reward {reward:g}")
    failed_text = _col(row, "response")
    repaired = _col(row, "repaired_ids", "repaired_response_ids")
    repaired_text = _col(row, "repaired_response", "repair")
    if repaired is not None and len(repaired):
        out["diff"] = repair_diff_html(ids, list(repaired), tokenizer, title="repair")
    elif repaired_text is not None and failed_text is not None:
        out["diff"] = repair_diff_html(str(failed_text), str(repaired_text), tokenizer, title="repair")
    else:
        out["diff"] = HTML("<div><i>no repair for this trajectory (it was correct, or no repair succeeded)</i></div>")
    spans = _col(row, "step_spans")
    labels = _col(row, "step_labels")
    if labels is None and labeler is not None and isinstance(_col(row, "prompt"), str) and isinstance(text, str):
        labels = labeler(row["prompt"], text)
    if spans is not None and len(spans):
        steps = ["".join(toks[int(a):int(b)]) for a, b in spans]
        labs = None if labels is None else [None if v is None else bool(v) for v in labels]
        if labs is not None and len(labs) != len(steps):
            labs = None  # label and span counts disagree: show the steps unlabelled rather than misaligned
        out["steps"] = step_labels_html(steps, labs, title="steps")
    else:
        out["steps"] = HTML("<div><i>no step spans logged</i></div>")
    if "group" in frame.columns and "response_ids" in frame.columns:
        grp = frame[frame["group"] == group]
        names = grp["traj"].tolist() if "traj" in grp else list(range(len(grp)))
        rewards = grp["reward"].tolist() if "reward" in grp else [math.nan] * len(grp)
        M = divergence_matrix([list(x) for x in grp["response_ids"]])
        fig = divergence_heatmap(M, labels=[f"{t} (R={r:g})" for t, r in zip(names, rewards)],
                                 highlight=names.index(traj) if traj in names else None,
                                 title=f"group {group}: shared prefix")
        out["heatmap"] = fig
    return out


def _max_abs_advantage(frame: pd.DataFrame) -> float:
    """max |advantage| over the trained tokens (``response_mask``) of every sampled trajectory in
    ``frame`` (one step): the explorer's colour scale, so one colour is one credit across the step."""
    if "kind" in frame.columns:
        frame = frame[frame["kind"] == "policy"]
    best = 0.0
    for row in frame.to_dict("records"):
        adv = _col(row, "advantages", "advantage")
        if adv is None or np.ndim(adv) == 0:
            continue
        a = np.abs(np.asarray(adv, dtype=float).reshape(-1))
        m = _col(row, "response_mask", "mask")
        if m is not None:
            a = a[np.asarray(m, dtype=bool).reshape(-1)[: len(a)]]
        best = max(best, float(np.max(a, initial=0.0)))
    return best


def _figure_png(fig) -> bytes:
    """A figure as PNG bytes (for an ``ipywidgets.Image``: shown the same under any matplotlib backend)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _first_line(text: Any, n: int = 40) -> str:
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= n else line[: n - 1] + "…"


def explorer(run_dir: str | Path, tokenizer=None, *, scale: str = "step"):
    """Interactive explorer of logged trajectories: pick run → step → prompt (group) → trajectory
    and see its tokens coloured by advantage, its repair diff, its step labels and its group's
    divergence heatmap. ``run_dir``: one run folder, or a folder of run folders. -> ipywidgets.VBox.

    One function draws every panel from the current selection. A change upstream refreshes the
    choices below it (keeping each one's value where the new choices still have it, else the
    first; a new run keeps the step when it was logged there) and then redraws everything once, so
    no panel keeps showing the previous run/step/prompt even when a dropdown's value stays the same.
    ``scale``: the colour scale of the tokens, symmetric around 0: ``"step"`` (default) = max
    |advantage| over the trained tokens of the step's sampled trajectories, so one colour means
    one credit across the trajectories and prompts of a step; ``"trajectory"`` = the selected
    trajectory's own max |advantage| (stronger contrast, not comparable across trajectories).
    The panels are :func:`trajectory_view`'s static views; the returned box has ``controls``
    (run, step, prompt, trajectory dropdowns), ``views`` (header, tokens, diff, steps, heatmap) and
    ``selection()`` (the current choice as a dict)."""
    import ipywidgets as W
    import matplotlib.pyplot as plt

    if scale not in ("step", "trajectory"):
        raise ValueError(f"scale: expected 'step' or 'trajectory', got {scale!r}")
    root = Path(run_dir)
    if not root.is_dir():
        raise ValueError(f"run_dir: {root} is not a directory")
    runs = [root] if (root / "trajectories").is_dir() else sorted(
        p for p in root.rglob("*") if p.is_dir() and (p / "trajectories").is_dir()
    )
    runs = [r for r in runs if _step_files(r)]
    if not runs:
        raise ValueError(f"run_dir: no run with trajectories/step_*.parquet under {root}")
    names = {r: (str(r.relative_to(root)) if r != root else r.name) for r in runs}
    run_dd = W.Dropdown(options=[(names[r], r) for r in runs], description="run")
    step_dd = W.Dropdown(description="step")
    group_dd = W.Dropdown(description="prompt")
    traj_dd = W.Dropdown(description="trajectory")
    for dd in (run_dd, step_dd, group_dd, traj_dd):
        dd.add_class(f"ibpo-explorer-{dd.description}")  # stable hooks for a browser (and its test)
    head = W.HTML()
    out_tokens, out_diff, out_steps = W.HTML(), W.HTML(), W.HTML()
    out_heat = W.Image(format="png")
    for w, name in ((head, "header"), (out_tokens, "tokens"), (out_diff, "diff"), (out_steps, "steps"),
                    (out_heat, "heatmap")):
        w.add_class(f"ibpo-explorer-{name}")
    state: dict[str, Any] = {"busy": False}

    def choose(dd, options: list, keep: bool = True, default_last: bool = False) -> None:
        """New options for ``dd``; its value stays when still offered, else the first (or last)."""
        values = [o[1] if isinstance(o, tuple) else o for o in options]
        old = dd.value
        dd.options = options
        dd.value = old if keep and old in values else (values[-1] if default_last else values[0])

    def refresh(level: str) -> None:
        """Refresh the choices below ``level`` (run, step, prompt, trajectory), then draw once."""
        state["busy"] = True  # the dropdowns' own observers stay quiet while we set them
        try:
            if level == "run":
                state["tokenizer"] = tokenizer if tokenizer is not None else run_tokenizer(run_dd.value)
                state["labeler"] = run_step_labeler(run_dd.value)
                choose(step_dd, sorted(_step_files(run_dd.value)), keep=step_dd.value is not None,
                       default_last=True)
            if level in ("run", "step"):
                frame = load_trajectories(run_dd.value, step_dd.value)
                if "kind" in frame.columns:
                    frame = frame[frame["kind"] == "policy"]
                state["frame"] = frame
                state["step_scale"] = _max_abs_advantage(frame)
                opts = []
                for g in (sorted(frame["group"].unique().tolist()) if "group" in frame else [0]):
                    sub = frame[frame["group"] == g] if "group" in frame else frame
                    label = f"{g}"
                    if "prompt" in sub and len(sub):
                        label += f": {_first_line(sub['prompt'].iloc[0])}"
                    if "reward" in sub and len(sub):
                        label += f" (mean R={float(sub['reward'].mean()):.2g})"
                    opts.append((label, g))
                choose(group_dd, opts)
            if level in ("run", "step", "prompt"):
                frame = state["frame"]
                sub = frame[frame["group"] == group_dd.value] if "group" in frame else frame
                trajs = sub["traj"].tolist() if "traj" in sub else list(range(len(sub)))
                rewards = sub["reward"].tolist() if "reward" in sub else [math.nan] * len(sub)
                choose(traj_dd, [(f"{t} (R={r:g})", t) for t, r in zip(trajs, rewards)])
        finally:
            state["busy"] = False
        render()

    def selection() -> dict[str, Any]:
        return {"run": run_dd.value, "step": step_dd.value, "prompt": group_dd.value, "trajectory": traj_dd.value}

    def render() -> None:
        """Draw every panel from the current selection."""
        frame, t = state["frame"], traj_dd.value
        rows = frame[frame["traj"] == t] if "traj" in frame else frame.iloc[[t]]
        vmax = state["step_scale"] if scale == "step" else _max_abs_advantage(rows)
        try:
            views = trajectory_view(frame, t, state["tokenizer"], state["labeler"], vmax=vmax)
        except Exception as e:  # show the problem in the panel rather than in the invisible widget log
            head.value = HTML(f'<div style="color:#a00000"><b>cannot show this trajectory:</b> '
                              f"{_html.escape(f'{type(e).__name__}: {e}')}</div>")
            out_tokens.value = out_diff.value = out_steps.value = ""
            out_heat.layout.display = "none"
            return
        out_tokens.value, out_diff.value, out_steps.value = views["tokens"], views["diff"], views["steps"]
        fig = views.get("heatmap")
        if fig is not None:
            out_heat.value = _figure_png(fig)
            plt.close(fig)
            out_heat.layout.display = None
        else:
            out_heat.layout.display = "none"
        # the header last: when it names the selection, every panel above has been sent
        reward = _col(rows.iloc[0].to_dict(), "reward", default=math.nan)
        how = (f"max |advantage| over step {step_dd.value}" if scale == "step"
               else f"max |advantage| of trajectory {t}")
        head.value = HTML(
            f'<div class="ibpo-selection">{_html.escape(names[run_dd.value])} · step {step_dd.value} · '
            f"prompt {group_dd.value} · trajectory {t} · reward {reward:g} · colour scale "
            f'±<span class="ibpo-scale">{vmax:.3g}</span> '
            f"({how})</div>"
        )

    def on(level: str):
        def handler(change) -> None:
            if not state["busy"] and change["new"] is not None:
                refresh(level) if level != "trajectory" else render()
        return handler

    run_dd.observe(on("run"), "value")
    step_dd.observe(on("step"), "value")
    group_dd.observe(on("prompt"), "value")
    traj_dd.observe(on("trajectory"), "value")
    refresh("run")
    box = W.VBox([
        W.HBox([run_dd, step_dd, group_dd, traj_dd], layout=W.Layout(flex_flow="row wrap")),
        head,
        W.HBox([W.VBox([W.HTML("<b>tokens by advantage</b>"), out_tokens, W.HTML("<b>repair</b>"), out_diff],
                       layout=W.Layout(width="60%")),
                W.VBox([W.HTML("<b>step labels</b>"), out_steps,
                        W.HTML("<b>divergence heatmap</b> (▶ / red outline: the selected trajectory)"), out_heat],
                       layout=W.Layout(width="40%"))]),
    ])
    box.add_class("ibpo-explorer")
    box.views = {"header": head, "tokens": out_tokens, "diff": out_diff, "steps": out_steps, "heatmap": out_heat}
    box.controls = {"run": run_dd, "step": step_dd, "prompt": group_dd, "trajectory": traj_dd}
    box.selection = selection
    return box
