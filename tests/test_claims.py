"""claims: verdicts, the intervals (hand-derived), claim rows, the Wilson accuracy table."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ibpo_lab import claims
from ibpo_lab.runs import proportion_ci


def test_verdict_reads_the_interval_against_the_claimed_side():
    assert claims.verdict(0.01, 0.2, "higher") == "resolved"
    assert claims.verdict(-0.2, 0.1, "higher") == "not resolved at this size"
    assert claims.verdict(-0.3, -0.1, "higher") == "opposite at this size"
    assert claims.verdict(0.5, 0.9, "lower", null=1.0) == "resolved"
    assert claims.verdict(1.1, 1.4, "lower", null=1.0) == "opposite at this size"
    assert claims.verdict(math.nan, math.nan, "higher") == "not resolved at this size"
    with pytest.raises(ValueError, match="expect"):
        claims.verdict(0, 1, "more")


def test_paired_difference_is_a_t_interval_over_pairs_and_none_below_three():
    # differences 1, 2, 3: mean 2, sd 1, t(2) = 4.303 -> half-width 4.303 / sqrt(3) = 2.4843
    d, lo, hi = claims.paired_difference([0, 0, 0], [1, 2, 3])
    assert d == pytest.approx(2.0) and lo == pytest.approx(2 - 2.4843, abs=1e-3) and hi == pytest.approx(2 + 2.4843, abs=1e-3)
    d, lo, hi = claims.paired_difference([0, 0], [1, 2])  # two seeds: a mean, no interval
    assert d == pytest.approx(1.5) and math.isnan(lo) and math.isnan(hi)
    d, lo, hi = claims.paired_difference([0, 0, 0, math.nan], [1, 2, 3, 5])  # a NaN pair is dropped
    assert d == pytest.approx(2.0)
    with pytest.raises(ValueError, match="values of a"):
        claims.paired_difference([1], [1, 2])


def test_ratio_interval_is_the_exponentiated_log_t_interval():
    # ratios 0.5, 0.5, 0.5: log ratios identical -> geometric mean 0.5 and a zero-width interval
    r, lo, hi = claims.ratio_interval([2, 4, 8], [1, 2, 4])
    assert r == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    # ratios 1/e, 1, e: log ratios -1, 0, 1 -> mean 0 (ratio 1), half-width 4.303 / sqrt(3) = 2.4843
    r, lo, hi = claims.ratio_interval([1, 1, 1], [math.exp(-1), 1, math.e])
    assert r == pytest.approx(1.0) and lo == pytest.approx(math.exp(-2.4843), rel=1e-3)
    assert hi == pytest.approx(math.exp(2.4843), rel=1e-3)
    with pytest.raises(ValueError, match="> 0"):
        claims.ratio_interval([1, 0, 1], [1, 1, 1])


def test_bootstrap_difference_over_units():
    same = pd.DataFrame({"x": [0.25] * 12})
    est, lo, hi = claims.bootstrap_difference(same, lambda d: float(d.x.mean()))
    assert est == lo == hi == 0.25  # no spread between units: every resample gives the same mean
    spread = pd.DataFrame({"x": [0.0] * 10 + [1.0] * 10})
    est, lo, hi = claims.bootstrap_difference(spread, lambda d: float(d.x.mean()), n_boot=500)
    assert est == 0.5 and 0.2 < lo < 0.5 < hi < 0.8
    est, lo, hi = claims.bootstrap_difference(spread.head(5), lambda d: float(d.x.mean()))
    assert math.isnan(lo)  # too few units to resample


def test_wilson_interval_hand_values():
    # 0 of 10: p = 0, upper = (z²/2n + z·sqrt(z²/4n²)) / (1 + z²/n) = 2·0.19208 / 1.38416 = 0.27754
    p, lo, hi = proportion_ci(0, 10)
    assert p == 0 and lo == 0 and hi == pytest.approx(0.27754, abs=1e-4)
    p, lo, hi = proportion_ci(10, 10)  # symmetric: 1 - 0.27754
    assert p == 1 and hi == 1 and lo == pytest.approx(1 - 0.27754, abs=1e-4)
    assert math.isnan(proportion_ci(0, 0)[0])
    with pytest.raises(ValueError, match="successes"):
        proportion_ci(3, 2)


def test_claim_rows_round_trip_and_display(tmp_path):
    row = claims.claim("03_x", "b beats a", "auc", "grpo", "ibpo", 0.79, 0.84, 0.05, 0.01, 0.09, expect="higher",
                       n=claims.size(4, 8, 8), interval="t over 4 seeds (paired)")
    assert row["verdict"] == "resolved" and row["n"] == "4 seeds × 8 prompts × 8 samples"
    nan_row = claims.claim("03_x", "c", "m", "a", "b", math.nan, 1.0, 1.0, math.nan, math.nan, expect="lower",
                           n=claims.size(1), interval="none", null=1.0)
    assert nan_row["lo"] is None and nan_row["verdict"] == "not resolved at this size"
    path = claims.write_claims([row, nan_row], tmp_path)
    assert claims.read_claims(path) == [row, nan_row]
    df = claims.claims_frame([row, nan_row])
    assert df["estimate"].tolist() == ["ibpo − grpo = 0.05", "b / a = 1"]
    assert df["95% interval"].tolist() == ["[0.01, 0.09]", "no interval"]
    assert claims.write_claims([row], None) is None
    with pytest.raises(ValueError, match="verdict"):
        claims.write_claims([{"claim": "x"}], tmp_path)
    (tmp_path / "bad.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="bad.json"):
        claims.read_claims(tmp_path / "bad.json")
