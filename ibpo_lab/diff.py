"""Trajectory diffing for IBPO's token credit: Levenshtein edit masks, divergence and the step prefix trie.

IBPO gives token credit only where a failed trajectory and its repair differ: the failed
response ``a`` is aligned to the repaired response ``b`` with a Levenshtein alignment
(rapidfuzz, C speed) and every token of ``a`` that is deleted or replaced is *changed*,
every token of ``b`` that is inserted or a replacement is *inserted* (IOP trains those).
The same module measures where the trajectories of a group first diverge (token and step
granularity) and builds the step-level prefix trie that the prefix-tree estimator and the
heatmaps read.

All functions take token ids as lists, tuples, numpy arrays or torch tensors of integers
(1-D); anything else is a ``ValueError`` naming the argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import numpy as np
import pandas as pd
from rapidfuzz.distance import Levenshtein

__all__ = [
    "Opcode",
    "as_token_array",
    "opcodes",
    "edit_blocks",
    "edit_masks",
    "apply_opcodes",
    "edit_distance",
    "first_divergence",
    "divergence_matrix",
    "step_keys",
    "first_step_divergence",
    "step_divergence_matrix",
    "PrefixTrie",
    "build_prefix_trie",
]

#: one alignment block, difflib style: ``(tag, a_start, a_end, b_start, b_end)`` with tag in
#: ``"equal"``, ``"replace"``, ``"delete"``, ``"insert"``; ``a[a_start:a_end]`` becomes ``b[b_start:b_end]``.
Opcode = tuple[str, int, int, int, int]


# --------------------------------------------------------------------------- input checking
def as_token_array(x: Any, name: str = "token_ids") -> np.ndarray:
    """Token ids as a 1-D int64 numpy array.

    Accepts lists/tuples of ints, integer numpy arrays and integer torch tensors (any device).
    Raises ``ValueError`` (naming ``name``) for anything not 1-D or not integer.
    """
    if type(x).__module__.startswith("torch"):
        # duck-typed so this module never imports torch
        if getattr(x, "is_floating_point", lambda: False)() or getattr(x, "is_complex", lambda: False)():
            raise ValueError(f"{name} must hold integer token ids, got a tensor of dtype {x.dtype}")
        x = x.detach().cpu().numpy()
    if isinstance(x, (str, bytes)):
        raise ValueError(f"{name} must be a 1-D sequence of integer token ids, got {type(x).__name__}")
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a 1-D sequence of integer token ids ({e})") from e
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- alignment
def opcodes(a: Any, b: Any) -> list[Opcode]:
    """Levenshtein alignment of ``a`` to ``b`` as difflib-style blocks covering both sequences.

    a [n], b [m] -> list of ``(tag, i1, i2, j1, j2)``; the ``equal`` blocks pair up equal tokens
    one-to-one, in order; the other blocks are the minimal edits (unit costs). Symmetric:
    ``opcodes(b, a)`` is ``opcodes(a, b)`` with the roles (and insert/delete) swapped.
    """
    a_l, b_l = as_token_array(a, "a").tolist(), as_token_array(b, "b").tolist()
    # Several alignments can be optimal; always solve in one canonical order and invert, so
    # swapping a and b swaps the roles exactly (edit_masks(b, a) == edit_masks(a, b)[::-1]).
    if (len(a_l), a_l) <= (len(b_l), b_l):
        ops = Levenshtein.opcodes(a_l, b_l)
        return [(op.tag, op.src_start, op.src_end, op.dest_start, op.dest_end) for op in ops]
    inverse = {"equal": "equal", "replace": "replace", "delete": "insert", "insert": "delete"}
    ops = Levenshtein.opcodes(b_l, a_l)
    return [(inverse[op.tag], op.dest_start, op.dest_end, op.src_start, op.src_end) for op in ops]


def edit_blocks(a: Any, b: Any) -> list[Opcode]:
    """The non-``equal`` blocks of :func:`opcodes`, in order (the edits IOP grafts one by one)."""
    return [op for op in opcodes(a, b) if op[0] != "equal"]


def _check_ops(ops: Sequence[Opcode], n: int, m: int) -> None:
    ia = ib = 0
    for op in ops:
        tag, i1, i2, j1, j2 = op
        if tag not in ("equal", "replace", "delete", "insert") or i1 != ia or j1 != ib or i2 < i1 or j2 < j1:
            raise ValueError(f"ops: block {op} does not continue the alignment at a[{ia}], b[{ib}]")
        ia, ib = i2, j2
    if (ia, ib) != (n, m):
        raise ValueError(f"ops: blocks end at a[{ia}], b[{ib}] but the sequences have lengths {n}, {m}")


def edit_masks(
    a: Any, b: Any, upto: int | None = None, ops: Sequence[Opcode] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Which tokens a minimal Levenshtein edit of ``a`` into ``b`` touches.

    a [n], b [m] -> (changed_in_a bool[n], inserted_in_b bool[m]):
    ``changed_in_a[i]`` iff token i of ``a`` is deleted or replaced; ``inserted_in_b[j]`` iff
    token j of ``b`` is inserted or a replacement. Unmarked tokens pair up one-to-one, in order,
    and are equal. ``upto=K`` marks only the first K edit blocks (IBPO/IOP truncation to the
    first edits); None marks all. ``ops``: the alignment from :func:`opcodes` when the caller
    already has it (computed if None), as in :func:`apply_opcodes`.
    """
    a_arr, b_arr = as_token_array(a, "a"), as_token_array(b, "b")
    if upto is not None and (not isinstance(upto, (int, np.integer)) or upto < 0):
        raise ValueError(f"upto must be a non-negative int or None, got {upto!r}")
    if ops is None:
        ops = opcodes(a_arr, b_arr)
    else:
        _check_ops(ops, len(a_arr), len(b_arr))
    changed = np.zeros(len(a_arr), dtype=bool)
    inserted = np.zeros(len(b_arr), dtype=bool)
    k = 0
    # one python step per alignment block (at most 2·edits+1), not per token
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            continue
        if upto is not None and k >= upto:
            break
        changed[i1:i2] = True
        inserted[j1:j2] = True
        k += 1
    return changed, inserted


def apply_opcodes(a: Any, b: Any, ops: Sequence[Opcode] | None = None, upto: int | None = None) -> np.ndarray:
    """Apply the first ``upto`` edit blocks of the alignment ``a -> b`` to ``a``.

    a [n], b [m], ops from :func:`opcodes` (computed if None) -> int64 array. ``upto=None``
    applies every edit and returns ``b``; ``upto=0`` returns ``a``; in between it is IOP's
    "graft of the first K edits": b's tokens up to the K-th edit, a's tokens after it.
    """
    a_arr, b_arr = as_token_array(a, "a"), as_token_array(b, "b")
    if ops is None:
        ops = opcodes(a_arr, b_arr)
    _check_ops(ops, len(a_arr), len(b_arr))
    if upto is not None and (not isinstance(upto, (int, np.integer)) or upto < 0):
        raise ValueError(f"upto must be a non-negative int or None, got {upto!r}")
    pieces: list[np.ndarray] = []
    k = 0
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            pieces.append(a_arr[i1:i2])
            continue
        apply = upto is None or k < upto
        pieces.append(b_arr[j1:j2] if apply else a_arr[i1:i2])
        k += 1
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def edit_distance(a: Any, b: Any, normalized: bool = True) -> float:
    """Levenshtein distance between two token sequences (unit costs).

    ``normalized=True`` divides by ``max(len(a), len(b))`` (0 for two empty sequences), so the
    value lies in [0, 1].
    """
    a_l, b_l = as_token_array(a, "a").tolist(), as_token_array(b, "b").tolist()
    if normalized:
        return float(Levenshtein.normalized_distance(a_l, b_l))
    return float(Levenshtein.distance(a_l, b_l))


# --------------------------------------------------------------------------- divergence
def first_divergence(a: Any, b: Any) -> int:
    """Length of the common prefix of ``a`` and ``b`` (the first position where they differ)."""
    a_arr, b_arr = as_token_array(a, "a"), as_token_array(b, "b")
    n = min(len(a_arr), len(b_arr))
    diff = np.flatnonzero(a_arr[:n] != b_arr[:n])
    return int(diff[0]) if diff.size else n


def _pad(seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    L = int(lens.max()) if len(seqs) else 0
    X = np.zeros((len(seqs), L), dtype=np.int64)
    for i, s in enumerate(seqs):
        X[i, : len(s)] = s
    return X, lens


def _lcp_matrix(X: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """X [G, L] padded int rows, lens [G] -> [G, G] common-prefix lengths."""
    G, L = X.shape
    out = np.zeros((G, G), dtype=np.int64)
    if G == 0 or L == 0:
        return out
    pos = np.arange(L)
    out[np.arange(G), np.arange(G)] = lens
    # one vectorised comparison of row i with the rows after it: G python steps, never G²·L;
    # positions past the shorter length count as a mismatch, so padding never matches
    for i in range(G - 1):
        rest = X[i + 1 :]
        minlen = np.minimum(lens[i], lens[i + 1 :])
        neq = (rest != X[i]) | (pos[None, :] >= minlen[:, None])
        first = np.where(neq.any(axis=1), neq.argmax(axis=1), L)
        out[i, i + 1 :] = first
        out[i + 1 :, i] = first
    return out


def divergence_matrix(seqs: Sequence[Any]) -> np.ndarray:
    """Pairwise first-divergence positions of a group of token sequences.

    G sequences -> int64 [G, G] with ``M[i, j] = first_divergence(seqs[i], seqs[j])``;
    symmetric, diagonal = lengths.
    """
    arrs = [as_token_array(s, f"seqs[{i}]") for i, s in enumerate(seqs)]
    return _lcp_matrix(*_pad(arrs))


def step_keys(token_ids: Any, spans: Sequence[tuple[int, int]]) -> list[tuple[int, ...]]:
    """The token ids of each step, as hashable tuples (the step identity used by the trie).

    token_ids [n], spans ``[(start, end), ...]`` -> one tuple per span.
    """
    ids = as_token_array(token_ids, "token_ids")
    out = []
    for k, span in enumerate(spans):
        try:
            s, e = (int(v) for v in span)
        except (TypeError, ValueError) as err:
            raise ValueError(f"spans[{k}] must be a (start, end) pair, got {span!r}") from err
        if not 0 <= s <= e <= len(ids):
            raise ValueError(f"spans[{k}] = ({s}, {e}) is outside a sequence of {len(ids)} tokens")
        out.append(tuple(ids[s:e].tolist()))
    return out


def _encode_steps(step_seqs: Sequence[Sequence[Hashable]]) -> list[np.ndarray]:
    # each distinct step key gets one integer id, so step sequences compare like token sequences
    vocab: dict[Hashable, int] = {}
    out = []
    for i, seq in enumerate(step_seqs):
        if isinstance(seq, (str, bytes)):
            raise ValueError(f"step_seqs[{i}] must be a sequence of step keys, got {type(seq).__name__}")
        try:
            out.append(np.array([vocab.setdefault(k, len(vocab)) for k in seq], dtype=np.int64))
        except TypeError as e:
            raise ValueError(f"step_seqs[{i}] must be a sequence of hashable step keys ({e})") from e
    return out


def first_step_divergence(a_steps: Sequence[Hashable], b_steps: Sequence[Hashable]) -> int:
    """Number of leading steps two trajectories share (step keys compared with ==)."""
    a_ids, b_ids = _encode_steps([a_steps, b_steps])
    return first_divergence(a_ids, b_ids)


def step_divergence_matrix(step_seqs: Sequence[Sequence[Hashable]]) -> np.ndarray:
    """Pairwise number of shared leading steps. G step sequences -> int64 [G, G], diagonal = n_steps."""
    return _lcp_matrix(*_pad(_encode_steps(step_seqs)))


# --------------------------------------------------------------------------- prefix trie
@dataclass
class PrefixTrie:
    """Step-level prefix trie of a group: node = a shared step prefix.

    N nodes; node 0 is the root (empty prefix, every trajectory, mean = group mean reward).
    parent      int64 [N]  parent node, -1 for the root
    depth       int64 [N]  number of steps in the prefix (root 0)
    count       int64 [N]  trajectories whose step sequence starts with this prefix
    reward_sum  float64 [N]  sum of their rewards
    mean        float64 [N]  reward_sum / count (the prefix's Monte-Carlo value)
    keys        N step keys (the last step of the prefix; None for the root)
    paths       per trajectory, the node id of each of its steps (root excluded)
    members     per node, the trajectory indices passing through it (int64 arrays)
    """

    parent: np.ndarray
    depth: np.ndarray
    count: np.ndarray
    reward_sum: np.ndarray
    mean: np.ndarray
    keys: list[Hashable | None]
    paths: list[list[int]]
    members: list[np.ndarray] = field(repr=False)

    @property
    def n_nodes(self) -> int:
        return len(self.parent)

    def children(self, node: int) -> list[int]:
        """Child node ids of ``node``, in creation order."""
        if not 0 <= int(node) < self.n_nodes:
            raise ValueError(f"node {node} out of range for a trie of {self.n_nodes} nodes")
        return np.flatnonzero(self.parent == int(node)).tolist()

    def edges(self) -> np.ndarray:
        """int64 [N-1, 2] of (parent, child) pairs, for drawing."""
        child = np.arange(1, self.n_nodes)
        return np.stack([self.parent[1:], child], axis=1) if len(child) else np.zeros((0, 2), dtype=np.int64)

    def leaves(self) -> list[int]:
        """Nodes without children."""
        has_child = np.zeros(self.n_nodes, dtype=bool)
        has_child[self.parent[self.parent >= 0]] = True
        return np.flatnonzero(~has_child).tolist()

    def branching(self) -> np.ndarray:
        """int64 [N] number of children per node (where the group's trajectories split)."""
        return np.bincount(self.parent[1:], minlength=self.n_nodes) if self.n_nodes > 1 else np.zeros(1, dtype=np.int64)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per node: node, parent, depth, count, reward_sum, mean, n_children, key."""
        return pd.DataFrame(
            {
                "node": np.arange(self.n_nodes),
                "parent": self.parent,
                "depth": self.depth,
                "count": self.count,
                "reward_sum": self.reward_sum,
                "mean": self.mean,
                "n_children": self.branching(),
                "key": self.keys,
            }
        )


def build_prefix_trie(step_seqs: Sequence[Sequence[Hashable]], rewards: Any) -> PrefixTrie:
    """Prefix trie of a group's step sequences with per-node counts and mean rewards.

    step_seqs: G sequences of hashable step keys (e.g. :func:`step_keys`), rewards [G] ->
    :class:`PrefixTrie`. Linear in the total number of steps.
    """
    if type(rewards).__module__.startswith("torch"):
        rewards = rewards.detach().cpu().numpy()
    try:
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"rewards must be G numbers ({e})") from e
    if isinstance(step_seqs, (str, bytes)):
        raise ValueError("step_seqs must be a sequence of step sequences, got a string")
    G = len(step_seqs)
    if G == 0:
        raise ValueError("step_seqs is empty: a prefix trie needs at least one trajectory")
    if len(r) != G:
        raise ValueError(f"rewards has {len(r)} entries but step_seqs has {G} trajectories")
    if not np.all(np.isfinite(r)):
        raise ValueError("rewards must be finite")
    index: dict[tuple[int, Hashable], int] = {}
    parent, depth, keys = [-1], [0], [None]
    members: list[list[int]] = [list(range(G))]
    paths: list[list[int]] = []
    # a dict walk per step: linear in total steps, and step keys are arbitrary hashables
    for i, seq in enumerate(step_seqs):
        if isinstance(seq, (str, bytes)):
            raise ValueError(f"step_seqs[{i}] must be a sequence of step keys, got {type(seq).__name__}")
        node, path = 0, []
        for key in seq:
            try:
                child = index.get((node, key))
            except TypeError as e:
                raise ValueError(f"step_seqs[{i}] holds an unhashable step key {key!r}") from e
            if child is None:
                child = len(parent)
                index[(node, key)] = child
                parent.append(node)
                depth.append(depth[node] + 1)
                keys.append(key)
                members.append([])
            members[child].append(i)
            path.append(child)
            node = child
        paths.append(path)
    member_arrs = [np.asarray(m, dtype=np.int64) for m in members]
    count = np.array([len(m) for m in member_arrs], dtype=np.int64)
    reward_sum = np.array([r[m].sum() for m in member_arrs], dtype=np.float64)
    mean = reward_sum / count  # every node has count >= 1 (it was created by a trajectory)
    return PrefixTrie(
        parent=np.asarray(parent, dtype=np.int64),
        depth=np.asarray(depth, dtype=np.int64),
        count=count,
        reward_sum=reward_sum,
        mean=mean,
        keys=keys,
        paths=paths,
        members=member_arrs,
    )
