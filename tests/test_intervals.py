"""One interval function for tables and figures (runs.mean_ci: Student-t from scipy) and the Wilson
interval for proportions (runs.proportion_ci). Expected values are derived by hand below."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from ibpo_lab import runs as R
from ibpo_lab import viz


def test_mean_ci_uses_the_t_quantile_at_every_n():
    # three seeds 1, 2, 3: s = 1, t_{0.975, 2} = 4.302653 (printed tables)
    m, lo, hi = R.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6) and m - lo == pytest.approx(hi - m)
    # 40 values: the old table jumped to 1.96 past 31 values; t_{0.975, 39} = 2.022691
    x = [float(i % 2) for i in range(40)]  # mean 0.5, s = sqrt(10/39)
    m, lo, hi = R.mean_ci(x)
    assert hi - m == pytest.approx(2.022691 * math.sqrt(10 / 39) / math.sqrt(40), rel=1e-6)
    # a 90% interval: t_{0.95, 2} = 2.919986
    assert R.mean_ci([1.0, 2.0, 3.0], confidence=0.9)[2] - 2.0 == pytest.approx(2.919986 / math.sqrt(3), rel=1e-6)
    with pytest.raises(ValueError, match="confidence"):
        R.mean_ci([1.0, 2.0], confidence=95)


def test_mean_ci_without_scipy_gives_the_same_t_quantile(monkeypatch):
    """The GPU machine has no scipy and train.evaluate calls mean_ci: the exact integer-df series
    (A&S 26.7.3-4) must give scipy's quantile. Printed-table values first (hand-checkable), then
    scipy's own at many df and levels."""
    stats = pytest.importorskip("scipy.stats")
    import sys

    want = {(0.95, 1): 12.706205, (0.95, 2): 4.302653, (0.9, 2): 2.919986, (0.95, 39): 2.022691, (0.99, 4): 4.604095}
    grid = [(c, df) for c in (0.5, 0.9, 0.95, 0.99, 0.999) for df in [*range(1, 41), 99, 100, 1001]]
    ref = {k: float(stats.t.ppf(0.5 + k[0] / 2, k[1])) for k in grid}
    monkeypatch.setitem(sys.modules, "scipy", None)  # `from scipy import stats` now raises ImportError
    with pytest.raises(ImportError):
        from scipy import stats as _  # noqa: F401
    for (c, df), t in want.items():
        assert R._t_quantile(c, df) == pytest.approx(t, abs=1e-6)
    for (c, df), t in ref.items():
        assert R._t_quantile(c, df) == pytest.approx(t, rel=1e-9), (c, df)
    m, lo, hi = R.mean_ci([1.0, 2.0, 3.0])
    assert hi - m == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)


def test_figure_band_is_the_table_interval():
    # the example: three seeds; the band of a learning curve equals the interval of the table
    v = [0.2, 0.35, 0.5]
    assert viz._band(pd.Series(v), "ci") == pytest.approx(R.mean_ci(v))


def test_proportion_ci_is_wilson_and_stays_in_the_unit_interval():
    z2 = 1.959964 ** 2
    # 0 of 10: [0, z²/(n+z²)]
    p, lo, hi = R.proportion_ci(0, 10)
    assert p == 0.0 and lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(z2 / (10 + z2), rel=1e-5)
    # 3 of 10: centre (k + z²/2)/(n + z²), half-width z/(n + z²)·sqrt(k(n-k)/n + z²/4)
    p, lo, hi = R.proportion_ci(3, 10)
    c = (3 + z2 / 2) / (10 + z2)
    h = math.sqrt(z2) / (10 + z2) * math.sqrt(3 * 7 / 10 + z2 / 4)
    assert p == 0.3 and lo == pytest.approx(c - h, rel=1e-5) and hi == pytest.approx(c + h, rel=1e-5)
    # all correct: the t interval collapses to a point, Wilson does not, and stays <= 1
    _, lo, hi = R.proportion_ci(5, 5)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(5 / (5 + z2), rel=1e-5)
    assert all(math.isnan(v) for v in R.proportion_ci(0, 0))
    with pytest.raises(ValueError, match="successes"):
        R.proportion_ci(4, 3)
