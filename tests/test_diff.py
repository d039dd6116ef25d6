"""Tests for ibpo_lab.diff: edit masks, opcodes, divergence and the step prefix trie."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ibpo_lab.diff import (
    PrefixTrie,
    apply_opcodes,
    as_token_array,
    build_prefix_trie,
    divergence_matrix,
    edit_blocks,
    edit_distance,
    edit_masks,
    first_divergence,
    first_step_divergence,
    opcodes,
    step_divergence_matrix,
    step_keys,
)

# small alphabets make shared runs (and so non-trivial alignments) likely
tokens = st.lists(st.integers(0, 4), max_size=30)
FAST = settings(max_examples=100, deadline=None)


def _levenshtein(a, b) -> int:
    """Textbook O(n·m) DP: the reference the rapidfuzz alignment must match in cost."""
    d = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(b) + 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (a[i - 1] != b[j - 1]))
    return d[-1]


# --------------------------------------------------------------------------- edit masks
def test_edit_masks_known_example():
    a = [7, 1, 2, 3, 9]
    b = [7, 1, 5, 3, 9, 4]
    changed, inserted = edit_masks(a, b)
    assert changed.dtype == bool and inserted.dtype == bool
    assert changed.tolist() == [False, False, True, False, False]
    assert inserted.tolist() == [False, False, True, False, False, True]


def test_edit_masks_pure_deletion_and_insertion():
    changed, inserted = edit_masks([1, 2, 3], [])
    assert changed.all() and inserted.shape == (0,)
    changed, inserted = edit_masks([], [1, 2])
    assert changed.shape == (0,) and inserted.all()


@FAST
@given(tokens, tokens)
def test_edit_masks_unchanged_tokens_pair_up(a, b):
    changed, inserted = edit_masks(a, b)
    assert changed.shape == (len(a),) and inserted.shape == (len(b),)
    kept_a = np.asarray(a, dtype=np.int64)[~changed]
    kept_b = np.asarray(b, dtype=np.int64)[~inserted]
    # same count, same tokens, same order
    assert kept_a.tolist() == kept_b.tolist()


@FAST
@given(tokens, tokens)
def test_edit_masks_are_minimal(a, b):
    """Unchanged tokens form a common subsequence; a Levenshtein alignment keeps at least
    max(n, m) - distance of them (each edit touches at most one token per side)."""
    changed, inserted = edit_masks(a, b)
    dist = _levenshtein(a, b)
    assert edit_distance(a, b, normalized=False) == dist
    assert int((~changed).sum()) >= max(len(a), len(b)) - dist
    assert int(changed.sum()) <= dist and int(inserted.sum()) <= dist


@FAST
@given(tokens)
def test_edit_masks_identity_is_all_false(a):
    changed, inserted = edit_masks(a, a)
    assert not changed.any() and not inserted.any()


@FAST
@given(tokens, tokens)
def test_edit_masks_swap_roles(a, b):
    changed_ab, inserted_ab = edit_masks(a, b)
    changed_ba, inserted_ba = edit_masks(b, a)
    # several alignments can be optimal; the module picks the same one either way round
    assert changed_ab.tolist() == inserted_ba.tolist()
    assert inserted_ab.tolist() == changed_ba.tolist()


@FAST
@given(tokens, tokens)
def test_opcodes_cover_and_reconstruct(a, b):
    ops = opcodes(a, b)
    ia = ib = 0
    for tag, i1, i2, j1, j2 in ops:
        assert (i1, j1) == (ia, ib)
        if tag == "equal":
            assert a[i1:i2] == b[j1:j2]
        ia, ib = i2, j2
    assert (ia, ib) == (len(a), len(b))
    assert apply_opcodes(a, b, ops).tolist() == list(b)
    assert apply_opcodes(a, b, ops, upto=0).tolist() == list(a)


@FAST
@given(tokens, tokens, st.integers(0, 6))
def test_apply_first_k_edits_is_consistent_with_masks(a, b, k):
    grafted = apply_opcodes(a, b, upto=k)
    changed_k, inserted_k = edit_masks(a, b, upto=k)
    n_blocks = len(edit_blocks(a, b))
    # after grafting the first k edits, the remaining distance to b is the rest of the edits
    assert _levenshtein(grafted.tolist(), b) <= _levenshtein(a, b)
    if k >= n_blocks:
        assert grafted.tolist() == list(b)
        full = edit_masks(a, b)
        assert changed_k.tolist() == full[0].tolist() and inserted_k.tolist() == full[1].tolist()
    # the grafted sequence is a's untouched tokens plus b's inserted ones
    assert len(grafted) == len(a) - int(changed_k.sum()) + int(inserted_k.sum())


def test_apply_opcodes_partial_graft():
    a = [1, 2, 3, 4, 5, 6]
    b = [1, 9, 3, 4, 8, 6]
    assert apply_opcodes(a, b, upto=1).tolist() == [1, 9, 3, 4, 5, 6]
    changed, inserted = edit_masks(a, b, upto=1)
    assert np.flatnonzero(changed).tolist() == [1] and np.flatnonzero(inserted).tolist() == [1]


def test_apply_opcodes_rejects_foreign_ops():
    ops = opcodes([1, 2, 3], [1, 3])
    with pytest.raises(ValueError, match="ops"):
        apply_opcodes([1, 2, 3, 4], [1, 3], ops)
    with pytest.raises(ValueError, match="upto"):
        apply_opcodes([1, 2], [1, 3], upto=-1)


def test_edit_masks_follow_the_given_ops():
    a, b = [1, 2, 3], [2, 3, 4]
    changed, inserted = edit_masks(a, b)  # minimal: delete the 1, insert the 4
    assert changed.tolist() == [True, False, False] and inserted.tolist() == [False, False, True]
    # a valid but non-minimal alignment: replace everything; the masks are the given alignment's
    changed, inserted = edit_masks(a, b, ops=[("replace", 0, 3, 0, 3)])
    assert changed.all() and inserted.all()
    same = edit_masks(a, b, upto=1, ops=opcodes(a, b))
    assert same[0].tolist() == [True, False, False] and not same[1].any()


def test_edit_masks_rejects_foreign_ops():
    with pytest.raises(ValueError, match="ops"):
        edit_masks([1, 2, 3, 4], [1, 3], ops=opcodes([1, 2, 3], [1, 3]))


def test_edit_distance_normalized():
    assert edit_distance([], []) == 0.0
    assert edit_distance([1, 2, 3, 4], [1, 2, 3, 5]) == pytest.approx(0.25)
    assert edit_distance([1, 2], [3, 4, 5], normalized=False) == 3.0


# --------------------------------------------------------------------------- input types
@pytest.mark.parametrize(
    "convert",
    [list, tuple, np.array, lambda x: np.array(x, dtype=np.int32), lambda x: torch.tensor(x)],
)
def test_accepts_lists_arrays_tensors(convert):
    a, b = [5, 6, 7, 8], [5, 0, 7, 8]
    changed, inserted = edit_masks(convert(a), convert(b))
    assert changed.tolist() == [False, True, False, False]
    assert first_divergence(convert(a), convert(b)) == 1


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 3), dtype=np.int64), [1.5, 2.0], torch.tensor([1.0, 2.0]), np.array([True, False]), "abc", 3,
     [[1, 2], [3, 4]], [1, None]],
)
def test_rejects_non_1d_non_integer(bad):
    with pytest.raises(ValueError, match="a"):
        edit_masks(bad, [1, 2])
    with pytest.raises(ValueError, match="seqs\\[1\\]"):
        divergence_matrix([[1, 2], bad])


def test_as_token_array_empty_and_dtype():
    assert as_token_array([]).dtype == np.int64
    assert as_token_array(np.array([], dtype=float)).shape == (0,)


# --------------------------------------------------------------------------- divergence
def _lcp(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@FAST
@given(tokens, tokens)
def test_first_divergence_matches_bruteforce(a, b):
    assert first_divergence(a, b) == _lcp(a, b)


@FAST
@given(st.lists(st.lists(st.integers(0, 2), max_size=12), min_size=1, max_size=8))
def test_divergence_matrix_matches_pairwise(seqs):
    M = divergence_matrix(seqs)
    G = len(seqs)
    assert M.shape == (G, G) and np.issubdtype(M.dtype, np.integer)
    assert (M == M.T).all()
    assert np.diag(M).tolist() == [len(s) for s in seqs]
    for i, j in itertools.product(range(G), repeat=2):
        assert M[i, j] == _lcp(seqs[i], seqs[j])


def test_divergence_matrix_padding_value_is_not_a_match():
    # padding is 0, so a sequence ending where the other continues with 0 must still stop
    M = divergence_matrix([[0, 0], [0, 0, 0], [0]])
    assert M.tolist() == [[2, 2, 1], [2, 3, 1], [1, 1, 1]]
    assert divergence_matrix([]).shape == (0, 0)
    assert divergence_matrix([[], []]).tolist() == [[0, 0], [0, 0]]


def test_divergence_matrix_large_group():
    # the size a real group has (64 trajectories, up to 8k tokens, shared prefixes of any length);
    # its speed is measured by `python -m benchmarks.alignment` (no wall-clock limit in a unit test)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 50_000, 8192)
    seqs = []
    for g in range(64):
        s = base.copy()
        cut = rng.integers(0, 8192)
        s[cut:] = rng.integers(0, 50_000, 8192 - cut)
        seqs.append(s[: rng.integers(4000, 8193)])
    M = divergence_matrix(seqs)
    assert (M == M.T).all() and M.diagonal().tolist() == [len(s) for s in seqs]
    for i, j in [(0, 1), (5, 40), (63, 2)]:
        assert M[i, j] == first_divergence(seqs[i], seqs[j])


def test_step_keys_and_step_divergence():
    ids = [1, 2, 3, 4, 5]
    keys = step_keys(ids, [(0, 2), (2, 3), (3, 5)])
    assert keys == [(1, 2), (3,), (4, 5)]
    with pytest.raises(ValueError, match="spans\\[1\\]"):
        step_keys(ids, [(0, 2), (2, 9)])
    seqs = [["a", "b", "c"], ["a", "b"], ["a", "x", "c"], []]
    M = step_divergence_matrix(seqs)
    assert M.tolist() == [[3, 2, 1, 0], [2, 2, 1, 0], [1, 1, 3, 0], [0, 0, 0, 0]]


@FAST
@given(st.lists(st.lists(st.sampled_from(["p", "q", (1, 2)]), max_size=6), min_size=1, max_size=6))
def test_step_divergence_matches_pairwise(seqs):
    M = step_divergence_matrix(seqs)
    for i, j in itertools.product(range(len(seqs)), repeat=2):
        assert M[i, j] == _lcp(seqs[i], seqs[j]) == first_step_divergence(seqs[i], seqs[j])


# --------------------------------------------------------------------------- prefix trie
def test_prefix_trie_small_group():
    trie = build_prefix_trie([["a", "b"], ["a", "c"], ["a", "b", "d"], ["z"]], [1.0, 0.0, 1.0, 0.0])
    assert isinstance(trie, PrefixTrie)
    assert trie.parent[0] == -1 and trie.count[0] == 4 and trie.mean[0] == pytest.approx(0.5)
    a = trie.paths[0][0]
    assert trie.paths[1][0] == a == trie.paths[2][0]
    assert trie.count[a] == 3 and trie.mean[a] == pytest.approx(2 / 3)
    assert sorted(trie.children(0)) == sorted({a, trie.paths[3][0]})
    assert trie.paths[0][1] == trie.paths[2][1]  # "a","b" shared
    assert trie.mean[trie.paths[0][1]] == pytest.approx(1.0)
    df = trie.to_dataframe()
    assert len(df) == trie.n_nodes == 6
    assert set(["node", "parent", "depth", "count", "mean", "reward_sum"]) <= set(df.columns)
    assert trie.edges().shape == (5, 2)
    assert sorted(trie.leaves()) == sorted([trie.paths[1][-1], trie.paths[2][-1], trie.paths[3][-1]])


@FAST
@given(
    st.lists(st.lists(st.integers(0, 2), max_size=5), min_size=1, max_size=8).flatmap(
        lambda seqs: st.tuples(st.just(seqs), st.lists(st.sampled_from([0.0, 1.0, 0.5]), min_size=len(seqs), max_size=len(seqs)))
    )
)
def test_prefix_trie_matches_bruteforce(args):
    seqs, rewards = args
    trie = build_prefix_trie(seqs, rewards)
    r = np.asarray(rewards)
    G = len(seqs)
    assert trie.count[0] == G and trie.mean[0] == pytest.approx(r.mean())
    # one node per distinct non-empty prefix
    prefixes = {tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)}
    assert trie.n_nodes == len(prefixes) + 1
    for i, s in enumerate(seqs):
        assert len(trie.paths[i]) == len(s)
        for k, node in enumerate(trie.paths[i]):
            prefix = tuple(s[: k + 1])
            who = [j for j, t in enumerate(seqs) if tuple(t[: k + 1]) == prefix]
            assert trie.count[node] == len(who)
            assert trie.mean[node] == pytest.approx(r[who].mean())
            assert trie.reward_sum[node] == pytest.approx(r[who].sum())
            assert trie.depth[node] == k + 1
            assert trie.parent[node] == (trie.paths[i][k - 1] if k else 0)
            assert sorted(trie.members[node].tolist()) == who
    # a node's count is the sum of its children's counts plus the trajectories ending there
    ends = np.bincount([p[-1] if p else 0 for p in trie.paths], minlength=trie.n_nodes)
    child_sum = np.bincount(trie.parent[1:], weights=trie.count[1:], minlength=trie.n_nodes)
    assert (trie.count == child_sum + ends).all()


def test_prefix_trie_accepts_token_step_keys():
    ids = [[1, 2, 3, 4], [1, 2, 9]]
    spans = [[(0, 2), (2, 4)], [(0, 2), (2, 3)]]
    trie = build_prefix_trie([step_keys(i, s) for i, s in zip(ids, spans)], torch.tensor([1.0, 0.0]))
    assert trie.paths[0][0] == trie.paths[1][0] and trie.paths[0][1] != trie.paths[1][1]


def test_prefix_trie_rejects_bad_input():
    with pytest.raises(ValueError, match="rewards"):
        build_prefix_trie([["a"], ["b"]], [1.0])
    with pytest.raises(ValueError, match="rewards"):
        build_prefix_trie([["a"]], [float("nan")])
    with pytest.raises(ValueError, match="step_seqs"):
        build_prefix_trie([], [])
    with pytest.raises(ValueError, match="unhashable"):
        build_prefix_trie([[["a"]]], [1.0])
    with pytest.raises(ValueError, match="node"):
        build_prefix_trie([["a"]], [1.0]).children(5)


# --------------------------------------------------------------------------- alignment shape and credit
# (written against the survivors of `scripts/mutation.sh diff`: each states a property, not a line)
def _check_block_shapes(ops, a, b):
    for tag, i1, i2, j1, j2 in ops:
        if tag == "insert":  # tokens only in b: nothing of a is consumed
            assert i1 == i2 and j2 > j1, (tag, i1, i2, j1, j2)
        elif tag == "delete":  # tokens only in a: nothing of b is produced
            assert j1 == j2 and i2 > i1, (tag, i1, i2, j1, j2)
        elif tag == "replace":
            assert i2 > i1 and j2 > j1, (tag, i1, i2, j1, j2)
        else:
            assert tag == "equal" and list(a[i1:i2]) == list(b[j1:j2]), (tag, i1, i2, j1, j2)


@FAST
@given(tokens, tokens)
def test_opcode_tags_fit_their_blocks_in_both_directions(a, b):
    # the a<->b solve is canonicalised, so one of the two directions goes through the inverted
    # path: insert/delete labels must be swapped there, or IOP grafts and IBPO credit flip
    fwd, bwd = opcodes(a, b), opcodes(b, a)
    _check_block_shapes(fwd, a, b)
    _check_block_shapes(bwd, b, a)
    swap = {"insert": "delete", "delete": "insert", "replace": "replace", "equal": "equal"}
    assert bwd == [(swap[t], j1, j2, i1, i2) for t, i1, i2, j1, j2 in fwd]
    # the masks those tags imply: a token of a is changed iff a replace/delete block covers it
    changed, inserted = edit_masks(a, b)
    assert changed.sum() == sum(i2 - i1 for t, i1, i2, _, _ in fwd if t in ("replace", "delete"))
    assert inserted.sum() == sum(j2 - j1 for t, _, _, j1, j2 in fwd if t in ("replace", "insert"))
    blocks = edit_blocks(a, b)
    assert all(t != "equal" for t, *_ in blocks)
    assert len(blocks) == sum(t != "equal" for t, *_ in fwd)


@pytest.mark.parametrize("swap", [False, True])
def test_pure_insertion_and_deletion_repairs_give_one_sided_credit(swap):
    # a repair that only inserts tokens blames no token of the failed response (IBPO's changed
    # mask is empty) and marks exactly the new tokens for IOP; a repair that only deletes blames
    # exactly the removed tokens and inserts nothing. Both lengths orders are checked, so both
    # alignment directions (a shorter / a longer) are exercised.
    short, long_ = [4, 5, 6, 7], [4, 5, 9, 9, 6, 7]
    a, b = (long_, short) if swap else (short, long_)
    changed, inserted = edit_masks(a, b)
    extra = [False, False, True, True, False, False]
    if swap:  # failed response had two stray tokens; the repair deletes them
        assert changed.tolist() == extra and not inserted.any()
        assert [t for t, *_ in edit_blocks(a, b)] == ["delete"]
    else:  # failed response missed two tokens; the repair inserts them
        assert not changed.any() and inserted.tolist() == extra
        assert [t for t, *_ in edit_blocks(a, b)] == ["insert"]
    assert edit_blocks(a, a) == [] and edit_blocks(b, b) == []


@pytest.mark.parametrize(
    "ops",
    [
        [("swap", 0, 3, 0, 2)],  # unknown tag, positions fine
        [("equal", 0, 1, 0, 1), ("replace", 2, 3, 1, 2)],  # skips a[1] only
        [("equal", 0, 1, 0, 1), ("insert", 1, 1, 2, 2), ("delete", 1, 3, 2, 2)],  # skips b[1] only
        [("replace", 0, 2, 0, 2), ("delete", 2, 3, 2, 1), ("insert", 3, 3, 1, 2)],  # b runs backwards
        [("replace", 0, 2, 0, 1), ("delete", 2, 1, 1, 1), ("replace", 1, 3, 1, 2)],  # a runs backwards
    ],
)
def test_each_broken_alignment_rule_alone_is_rejected(ops):
    a, b = [1, 2, 3], [1, 5]
    for call in (lambda: edit_masks(a, b, ops=ops), lambda: apply_opcodes(a, b, ops)):
        with pytest.raises(ValueError, match=r"^ops: block .* does not continue the alignment at a\[\d+\], b\[\d+\]$"):
            call()


def test_upto_must_be_a_non_negative_int():
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match=r"^upto must be a non-negative int or None, got"):
            edit_masks([1, 2], [1, 3], upto=bad)


def test_graft_of_the_first_k_edits_by_hand():
    # three one-token replacements at positions 1, 3, 5; grafting K of them takes b up to the K-th
    a, b = [1, 2, 3, 4, 5, 6], [1, 9, 3, 8, 5, 7]
    assert apply_opcodes(a, b, upto=0).tolist() == a
    assert apply_opcodes(a, b, upto=1).tolist() == [1, 9, 3, 4, 5, 6]
    assert apply_opcodes(a, b, upto=2).tolist() == [1, 9, 3, 8, 5, 6]
    assert apply_opcodes(a, b, upto=3).tolist() == b == apply_opcodes(a, b).tolist()
    assert edit_masks(a, b, upto=2)[0].tolist() == [False, True, False, True, False, False]


def test_empty_graft_is_an_int64_token_array():
    out = apply_opcodes([], [])
    assert out.shape == (0,) and out.dtype == np.int64


# --------------------------------------------------------------------------- errors name the argument
@pytest.mark.parametrize(
    "fn",
    [opcodes, edit_blocks, edit_masks, apply_opcodes, edit_distance, first_divergence],
    ids=lambda f: f.__name__,
)
def test_errors_name_the_bad_argument(fn):
    with pytest.raises(ValueError, match=r"^a must hold integer token ids"):
        fn([1.5, 2.0], [1, 2])
    with pytest.raises(ValueError, match=r"^b must hold integer token ids"):
        fn([1, 2], [1.5, 2.0])


def test_as_token_array_error_messages():
    with pytest.raises(ValueError, match=r"^token_ids must be a 1-D sequence of integer token ids, got str$"):
        as_token_array("abc")
    with pytest.raises(ValueError, match=r"^token_ids must be a 1-D sequence of integer token ids \("):
        as_token_array([[1, 2], [3]])  # ragged: numpy cannot make an array of it
    # float/complex tensors are refused before numpy sees them (a grad-tracking tensor would
    # otherwise raise torch's own RuntimeError from .numpy())
    with pytest.raises(ValueError, match=r"^x must hold integer token ids, got a tensor of dtype torch.float32$"):
        as_token_array(torch.ones(3, requires_grad=True), "x")
    with pytest.raises(ValueError, match=r"^x must hold integer token ids, got a tensor of dtype torch.complex64$"):
        as_token_array(torch.ones(3, dtype=torch.complex64), "x")
    with pytest.raises(ValueError, match=r"^token_ids must be 1-D"):
        step_keys([[1, 2]], [(0, 1)])


def test_step_keys_edges():
    assert step_keys([1, 2, 3], [(0, 2), (2, 2), (2, 3)]) == [(1, 2), (), (3,)]  # an empty span is allowed
    with pytest.raises(ValueError, match=r"^spans\[1\] must be a \(start, end\) pair, got 'ab'$"):
        step_keys([1, 2, 3], [(0, 1), "ab"])
    with pytest.raises(ValueError, match=r"^spans\[0\] = \(2, 4\) is outside a sequence of 3 tokens$"):
        step_keys([1, 2, 3], [(2, 4)])


def test_step_sequence_errors_name_the_trajectory():
    with pytest.raises(ValueError, match=r"^step_seqs\[1\] must be a sequence of step keys, got str$"):
        step_divergence_matrix([["a"], "ab"])
    with pytest.raises(ValueError, match=r"^step_seqs\[0\] must be a sequence of hashable step keys \("):
        first_step_divergence([["a"]], ["b"])


# --------------------------------------------------------------------------- prefix trie, exact structure
def test_prefix_trie_structure_by_hand():
    # trajectories: (x, y), (x, z), (w): nodes 0 root, 1 x, 2 x.y, 3 x.z, 4 w (creation order)
    trie = build_prefix_trie([["x", "y"], ["x", "z"], ["w"]], [1.0, 0.0, 0.5])
    assert trie.keys == [None, "x", "y", "z", "w"]
    assert trie.parent.tolist() == [-1, 0, 1, 1, 0] and trie.depth.tolist() == [0, 1, 2, 2, 1]
    assert trie.branching().tolist() == [2, 2, 0, 0, 0]
    assert [len(trie.children(v)) for v in range(5)] == [2, 2, 0, 0, 0]
    assert trie.edges().tolist() == [[0, 1], [1, 2], [1, 3], [0, 4]]
    assert trie.paths == [[1, 2], [1, 3], [4]]
    for arr, dtype in ((trie.parent, np.int64), (trie.depth, np.int64), (trie.count, np.int64),
                       (trie.reward_sum, np.float64), (trie.edges(), np.int64), (trie.branching(), np.int64)):
        assert arr.dtype == dtype
    assert all(m.dtype == np.int64 for m in trie.members)
    df = trie.to_dataframe()
    assert list(df.columns) == ["node", "parent", "depth", "count", "reward_sum", "mean", "n_children", "key"]
    assert df["n_children"].tolist() == [2, 2, 0, 0, 0] and df["key"].tolist()[1:] == ["x", "y", "z", "w"]
    with pytest.raises(ValueError, match=r"^node 5 out of range for a trie of 5 nodes$"):
        trie.children(5)  # one past the last node


def test_prefix_trie_with_one_and_two_nodes():
    root_only = build_prefix_trie([[]], [1.0])
    assert root_only.n_nodes == 1 and root_only.branching().tolist() == [0]
    assert root_only.branching().dtype == np.int64
    assert root_only.edges().shape == (0, 2) and root_only.edges().dtype == np.int64
    one_step = build_prefix_trie([["s"]], [1.0])
    assert one_step.branching().tolist() == [1, 0] and one_step.edges().tolist() == [[0, 1]]


def test_prefix_trie_reward_inputs():
    # a grad-tracking tensor (a policy's reward head) and a [G, 1] column are G rewards too
    trie = build_prefix_trie([["a"], ["b"]], torch.tensor([1.0, 0.0], requires_grad=True))
    assert trie.mean.tolist() == [0.5, 1.0, 0.0]
    assert build_prefix_trie([["a"], ["b"]], [[1.0], [0.0]]).mean.tolist() == [0.5, 1.0, 0.0]
    assert build_prefix_trie([["a"], ["b"]], [[1.0, 0.0]]).mean.tolist() == [0.5, 1.0, 0.0]  # a [1, G] row
    with pytest.raises(ValueError, match=r"^rewards must be G numbers \("):
        build_prefix_trie([["a"]], ["high"])
    with pytest.raises(ValueError, match=r"^step_seqs must be a sequence of step sequences, got a string$"):
        build_prefix_trie("ab", [1.0, 0.0])
    with pytest.raises(ValueError, match=r"^step_seqs is empty: a prefix trie needs at least one trajectory$"):
        build_prefix_trie([], [])
    with pytest.raises(ValueError, match=r"^rewards must be finite$"):
        build_prefix_trie([["a"]], [float("inf")])
    with pytest.raises(ValueError, match=r"^step_seqs\[1\] must be a sequence of step keys, got str$"):
        build_prefix_trie([["a"], "b"], [1.0, 0.0])
