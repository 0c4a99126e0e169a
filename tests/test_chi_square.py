"""The sampling tests' chi-square test against scipy's figures (scipy 1.16,
``scipy.stats.chi2.sf`` and ``scipy.stats.chisquare``, written down here)."""

import math
import random

import pytest
from chi_square import chi2_sf, chi_square_pvalue, chisquare, upper_gamma

# (x, degrees of freedom, scipy.stats.chi2.sf(x, dof))
SCIPY_SF = [
    (0.5, 1, 0.47950012218695337),
    (3.84, 1, 0.05004352124870519),
    (10.0, 1, 0.001565402258002549),
    (1.0, 2, 0.6065306597126334),
    (7.0, 3, 0.07189777249646509),
    (20.0, 5, 0.0012497305630313773),
    (5.0, 10, 0.8911780189141513),
    (40.0, 10, 1.694474393006737e-05),
    (100.0, 30, 1.8568023365102314e-09),
    (200.0, 124, 1.8141258732334488e-05),
    (150.0, 215, 0.9997570330248439),
    (400.0, 215, 2.83466632955947e-13),
    (0.0, 4, 1.0),
    (0.001, 3, 0.9999915920809419),
]


@pytest.mark.parametrize("x, dof, want", SCIPY_SF)
def test_survival_function_equals_scipy(x, dof, want):
    assert math.isclose(chi2_sf(x, dof), want, rel_tol=1e-9), (chi2_sf(x, dof), want)


def test_closed_forms_and_a_wrong_dof():
    # Q(1, x) = exp(-x); with 2 degrees of freedom the survival is exp(-x / 2).
    for x in (0.1, 1.0, 7.5, 60.0):
        assert math.isclose(upper_gamma(1.0, x), math.exp(-x), rel_tol=1e-12)
    # Control: one degree of freedom off is far from scipy's figure.
    assert not math.isclose(chi2_sf(40.0, 11), 1.694474393006737e-05, rel_tol=1e-3)


def test_statistic_equals_scipy_and_refuses_bad_input():
    stat, p = chisquare([10, 20, 30, 40], [25, 25, 25, 25])
    assert stat == 20.0 and math.isclose(p, 0.00016974243555282632, rel_tol=1e-9)
    with pytest.raises(ValueError, match="totals differ"):
        chisquare([10, 20], [10, 10])
    with pytest.raises(ValueError, match="cells"):
        chisquare([10], [10])


def test_pvalue_accepts_the_distribution_and_rejects_another():
    """Draws from ``exact`` pass; draws from a shifted distribution fail."""
    exact = {0: 0.5, 1: 0.3, 2: 0.15, 3: 0.04, 4: 0.01}
    other = {0: 0.45, 1: 0.33, 2: 0.15, 3: 0.05, 4: 0.02}
    rng, n = random.Random(0), 5000

    def counts(dist):
        drawn = rng.choices(list(dist), weights=list(dist.values()), k=n)
        return {s: drawn.count(s) for s in dist}

    assert chi_square_pvalue(counts(exact), exact, n) > 1e-3
    assert chi_square_pvalue(counts(other), exact, n) < 1e-6  # control
