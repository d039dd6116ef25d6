"""Benchmark 3b — speed of IBPO's token alignment: ``diff.edit_masks`` throughput against trajectory
length (to 8k tokens) and group size (to 64).

A failed trajectory and its repair differ by a local edit, so the pairs here are a random token
sequence and a copy with a few edit blocks (``edit_rate`` of the tokens changed, in ``blocks``
places); a second column aligns two unrelated sequences, the worst case for Levenshtein.
Per group, compare-and-correct aligns every failed trajectory with its repair (G alignments when
all fail); ``most_similar`` reference selection also compares every sibling pair (G(G−1)/2).

    python -m benchmarks.alignment            # writes benchmarks/results/alignment.{md,png}
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pandas as pd

from benchmarks.common import Report, cli_main, median_time

NAME = "alignment"
LENGTHS = (64, 256, 1024, 2048, 4096, 8192)
GROUP_SIZES = (4, 8, 16, 32, 64)
QUICK_LENGTHS = (16, 64)
QUICK_GROUP_SIZES = (2, 4)


def repair_pair(n: int, rng: np.random.Generator, vocab: int = 32_000, edit_rate: float = 0.05,
                blocks: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A length-``n`` token sequence and a repair of it: ``blocks`` edit blocks (replacements,
    insertions and deletions) touching about ``edit_rate·n`` tokens in all."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    a = rng.integers(0, vocab, size=n)
    b = a.tolist()
    per_block = max(1, int(round(edit_rate * n / blocks)))
    # edit from the back so earlier positions stay valid
    for pos in sorted(rng.choice(n, size=min(blocks, n), replace=False).tolist(), reverse=True):
        kind = rng.integers(3)
        span = min(per_block, n - pos)
        new = rng.integers(0, vocab, size=span).tolist()
        if kind == 0:  # replace
            b[pos : pos + span] = new
        elif kind == 1:  # insert
            b[pos:pos] = new
        else:  # delete
            del b[pos : pos + span]
    return a, np.asarray(b, dtype=np.int64)


def time_lengths(lengths: Sequence[int], repeats: int, seed: int = 0) -> pd.DataFrame:
    """Median time of one ``edit_masks`` call per length, for a local repair and for unrelated sequences."""
    from ibpo_lab.diff import edit_masks

    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        a, b = repair_pair(n, rng)
        t_rep = median_time(lambda: edit_masks(a, b), repeats)
        c = rng.integers(0, 32_000, size=n)
        t_rand = median_time(lambda: edit_masks(a, c), max(1, repeats // 2))
        changed, _ = edit_masks(a, b)
        rows.append({
            "tokens": n, "edited tokens": int(changed.sum()), "ms / pair (repair)": 1e3 * t_rep,
            "Mtok/s (repair)": 2 * n / t_rep / 1e6, "ms / pair (unrelated)": 1e3 * t_rand,
            "Mtok/s (unrelated)": 2 * n / t_rand / 1e6,
        })
    return pd.DataFrame(rows)


def time_groups(group_sizes: Sequence[int], length: int, repeats: int, seed: int = 1) -> pd.DataFrame:
    """Per group of G length-``length`` trajectories: G failed→repair ``edit_masks`` calls, and all
    G(G−1)/2 sibling pairs (``most_similar`` reference selection's ``edit_distance``)."""
    from ibpo_lab.diff import edit_distance, edit_masks

    rng = np.random.default_rng(seed)
    rows = []
    for G in group_sizes:
        pairs = [repair_pair(length, rng) for _ in range(G)]
        sibs = [p[0] for p in pairs]

        def repairs():
            for a, b in pairs:
                edit_masks(a, b)

        def siblings():
            for i in range(G):
                for j in range(i + 1, G):
                    edit_distance(sibs[i], sibs[j])

        t_rep = median_time(repairs, repeats)
        t_sib = median_time(siblings, max(1, repeats // 2))
        rows.append({
            "group size": G, "tokens each": length, "ms / group (G repairs)": 1e3 * t_rep,
            "pairs/s (repairs)": G / t_rep, "ms / group (all sibling pairs)": 1e3 * t_sib,
            "pairs/s (siblings)": (G * (G - 1) / 2) / t_sib if G > 1 else float("nan"),
        })
    return pd.DataFrame(rows)


def time_divergence(group_size: int, length: int, repeats: int, seed: int = 2) -> pd.DataFrame:
    """Median time of one ``divergence_matrix`` over a group of ``group_size`` trajectories of up to
    ``length`` tokens that share random-length prefixes (the step/token divergence heatmaps' input)."""
    from ibpo_lab.diff import divergence_matrix

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 50_000, length)
    seqs = []
    for _ in range(group_size):
        s = base.copy()
        cut = int(rng.integers(0, length))
        s[cut:] = rng.integers(0, 50_000, length - cut)
        seqs.append(s[: int(rng.integers(length // 2, length + 1))])
    t = median_time(lambda: divergence_matrix(seqs), repeats)
    return pd.DataFrame([{"group size": group_size, "max tokens": length, "ms / divergence_matrix": 1e3 * t}])


def figure(by_len: pd.DataFrame, by_group: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].loglog(by_len["tokens"], by_len["ms / pair (repair)"], "o-", label="local repair")
    ax[0].loglog(by_len["tokens"], by_len["ms / pair (unrelated)"], "s--", label="unrelated sequences")
    ax[0].set(xlabel="trajectory length (tokens)", ylabel="ms per edit_masks call", title="vs length")
    ax[0].legend()
    ax[1].loglog(by_group["group size"], by_group["ms / group (G repairs)"], "o-", label="G failed→repair")
    ax[1].loglog(by_group["group size"], by_group["ms / group (all sibling pairs)"], "s--", label="all sibling pairs")
    ax[1].set(xlabel="group size G", ylabel="ms per group", title=f"vs group size ({int(by_group['tokens each'][0])} tokens)")
    ax[1].set_xticks(list(by_group["group size"]), [str(int(g)) for g in by_group["group size"]])
    ax[1].minorticks_off()
    ax[1].legend()
    fig.suptitle("diff.edit_masks alignment cost (rapidfuzz Levenshtein)")
    fig.tight_layout()
    return fig


def run(quick: bool = False, repeats: int | None = None, group_length: int = 512) -> Report:
    t0 = time.perf_counter()
    lengths = QUICK_LENGTHS if quick else LENGTHS
    groups = QUICK_GROUP_SIZES if quick else GROUP_SIZES
    reps = repeats or (2 if quick else 7)
    gl = 32 if quick else group_length
    by_len = time_lengths(lengths, reps)
    by_group = time_groups(groups, gl, reps)
    by_div = time_divergence(4 if quick else 64, 64 if quick else 8192, reps)
    longest = by_len.iloc[-1]
    rep = Report(name=NAME, title="Alignment throughput of diff.edit_masks",
                 setup={"repeats (median of)": reps, "vocab": 32_000, "edit rate": 0.05, "edit blocks": 3})
    rep.tables += [("edit_masks vs trajectory length", by_len), ("edit_masks vs group size", by_group),
                   ("divergence_matrix of one group", by_div)]
    rep.figure = figure(by_len, by_group)
    rep.notes.append(
        f"a local repair of a {int(longest['tokens'])}-token trajectory aligns in {longest['ms / pair (repair)']:.2f} ms "
        f"({longest['Mtok/s (repair)']:.1f} M tokens/s); two unrelated sequences of that length take "
        f"{longest['ms / pair (unrelated)']:.2f} ms")
    biggest = by_group.iloc[-1]
    rep.notes.append(
        f"a group of {int(biggest['group size'])} trajectories of {gl} tokens: {biggest['ms / group (G repairs)']:.2f} ms "
        f"for its {int(biggest['group size'])} failed→repair alignments, {biggest['ms / group (all sibling pairs)']:.1f} ms "
        "for all sibling pairs (only most_similar reference selection needs those)")
    rep.seconds = time.perf_counter() - t0
    return rep


def main(argv: Sequence[str] | None = None) -> Report:
    return cli_main(run, "alignment", __doc__, argv)


if __name__ == "__main__":
    main()
