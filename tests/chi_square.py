"""Pearson's chi-square goodness-of-fit test, in plain Python.

The sampling tests judge a sampler's counts against the exact distribution with it.
It needs no scipy, so they also run on the GPU machine, which has none.
"""

import math

_EPS, _TINY, _ITERS = 1e-15, 1e-300, 10_000


def upper_gamma(a: float, x: float) -> float:
    """The regularized upper incomplete gamma function Q(a, x) = Γ(a, x) / Γ(a).

    A series for P = 1 - Q below x = a + 1, a continued fraction (modified Lentz)
    for Q above, so small tails keep their relative precision.

    Example: ``upper_gamma(1.0, 2.0)`` is ``exp(-2)``, 0.1353...
    """
    if a <= 0 or x < 0:
        raise ValueError(f"upper_gamma needs a > 0 and x >= 0, got a={a}, x={x}")
    if x == 0:
        return 1.0
    log_front = a * math.log(x) - x - math.lgamma(a)  # log(x^a e^-x / Γ(a))
    if x < a + 1:
        term = total = 1.0 / a
        for n in range(1, _ITERS):
            term *= x / (a + n)
            total += term
            if abs(term) < abs(total) * _EPS:
                return 1.0 - total * math.exp(log_front)
    else:
        b = x + 1 - a
        c, d = 1 / _TINY, 1 / b
        f = d
        for n in range(1, _ITERS):
            an = -n * (n - a)
            b += 2
            d = an * d + b
            d = _TINY if abs(d) < _TINY else d
            c = b + an / c
            c = _TINY if abs(c) < _TINY else c
            d = 1 / d
            f *= d * c
            if abs(d * c - 1) < _EPS:
                return f * math.exp(log_front)
    raise ArithmeticError(f"upper_gamma({a}, {x}) did not converge")


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for X chi-square distributed with ``dof`` degrees of freedom."""
    return upper_gamma(dof / 2, x / 2)


def chisquare(observed, expected) -> tuple:
    """Pearson's statistic and its p-value, ``len(observed) - 1`` degrees of freedom
    (as ``scipy.stats.chisquare``; the totals must agree, to float32's rounding).

    Example: ``chisquare([10, 20, 30, 40], [25] * 4)`` is ``(20.0, 0.00016974...)``.
    """
    observed, expected = [float(o) for o in observed], [float(e) for e in expected]
    if len(observed) != len(expected) or len(observed) < 2:
        raise ValueError(f"{len(observed)} observed and {len(expected)} expected cells")
    if not math.isclose(sum(observed), sum(expected), rel_tol=1e-6):
        raise ValueError(f"totals differ: {sum(observed)} observed, {sum(expected)} expected")
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return stat, chi2_sf(stat, len(observed) - 1)


def chi_square_pvalue(counts: dict, exact: dict, n: int) -> float:
    """Goodness of fit of ``counts`` (outcome -> count) to ``exact`` (outcome ->
    probability), ``n`` samples; cells expected below 5 times are pooled."""
    observed, expected, pool_o, pool_e = [], [], 0, 0.0
    for s, p in exact.items():
        if p * n >= 5:
            observed.append(counts.get(s, 0))
            expected.append(p * n)
        else:
            pool_o += counts.get(s, 0)
            pool_e += p * n
    if pool_e > 0:  # (no pool when every cell is expected 5 times or more)
        observed.append(pool_o)
        expected.append(pool_e)
    scale = sum(observed) / sum(expected)
    return chisquare(observed, [e * scale for e in expected])[1]
