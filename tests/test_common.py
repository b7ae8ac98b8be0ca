"""The paired comparison every experiment reports, against values worked out by hand."""

import math

import pytest

from music.experiments.common import fmt_p, fmt_paired, paired_comparison

T_975_2 = 4.302653  # Student t, 97.5 % quantile, 2 degrees of freedom (tables)


def test_paired_difference_interval_and_exact_wilcoxon_by_hand():
    # differences 0.10, 0.15, 0.20: mean 0.15, sample std 0.05, interval 0.15 ± t(0.975, 2) * 0.05 / sqrt(3);
    # all three positive: the exact two-sided signed-rank p is 2 * (1/2)^3 = 0.25
    result = paired_comparison([0.5, 0.6, 0.7], [0.4, 0.45, 0.5])
    half = T_975_2 * 0.05 / math.sqrt(3)
    assert result["n"] == 3 and result["mean_diff"] == pytest.approx(0.15) and result["std_diff"] == pytest.approx(0.05)
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(0.15 - half, abs=1e-6), pytest.approx(0.15 + half, abs=1e-6))
    assert result["p_wilcoxon"] == pytest.approx(0.25)
    assert (result["wins"], result["losses"], result["ties"]) == (3, 0, 0)
    assert fmt_paired(result) == "+15.0 [+2.6, +27.4] pp, p = 0.25 (3 seeds)"
    # five seeds all one way: the smallest p the exact test can give, 2/2^5
    assert paired_comparison([1, 2, 3, 4, 5], [0] * 5)["p_wilcoxon"] == pytest.approx(0.0625)


def test_zero_and_tied_differences_follow_wilcoxons_rule_exactly():
    # differences 1, 1, 2, 0, -3: the zero is dropped; ranks of |d| 1.5, 1.5, 3, 4 and R+ = 6. Of the 16 sign
    # assignments, 6 give R+ >= 6 (6, 7, 7, 8.5, 8.5, 10), so p = 2 * 6/16 = 0.75
    result = paired_comparison([1, 1, 2, 0, -3], [0, 0, 0, 0, 0])
    assert result["p_wilcoxon"] == pytest.approx(0.75)
    assert (result["wins"], result["losses"], result["ties"]) == (3, 1, 1) and result["mean_diff"] == pytest.approx(0.2)
    # float noise is no difference: 0.6 - 0.5 and 0.5 - 0.4 tie, 0.3 - 0.3 is a tie
    noisy = paired_comparison([0.6, 0.5, 0.3], [0.5, 0.4, 0.3])
    assert (noisy["wins"], noisy["ties"]) == (2, 1)


def test_nothing_to_test_is_said_not_crashed():
    same = paired_comparison([0.7, 0.8, 0.9], [0.7, 0.8, 0.9])  # all differences zero
    assert same["p_wilcoxon"] is None and same["ties"] == 3 and same["ci_low"] == same["ci_high"] == 0.0
    assert fmt_paired(same) == "+0.0 [+0.0, +0.0] pp, p n/a (3 seeds)"
    one = paired_comparison([0.9], [0.8])
    assert one["n"] == 1 and one["p_wilcoxon"] is None and math.isnan(one["ci_low"]) and math.isnan(one["std_diff"])
    assert fmt_paired(one) == "+10.0 pp (1 seed: no interval, p n/a)"
    none = paired_comparison([], [])
    assert none["n"] == 0 and fmt_paired(none) == "n/a"
    # a pair with an undefined side is left out
    assert paired_comparison([0.5, float("nan"), 0.7, None], [0.4, 0.1, 0.5, 0.2])["n"] == 2
    with pytest.raises(ValueError, match="got 2 and 3"):
        paired_comparison([1, 2], [1, 2, 3])


def test_p_values_are_written_to_their_precision():
    assert fmt_p(0.0625) == "p = 0.0625" and fmt_p(0.0004) == "p < 0.001" and fmt_p(None) == "p n/a"
    assert fmt_paired(paired_comparison([3, 4], [1, 1]), scale=1, digits=2, unit="", count="cells") == \
        "+2.50 [-3.85, +8.85], p = 0.5 (2 cells)"
