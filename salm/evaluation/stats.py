"""Accuracy statistics: Wilson score intervals and ensemble-vs-best-member deltas.

Evaluation subsets are small (hundreds of questions), so every accuracy is reported with a confidence
interval.  The Wilson interval is used instead of the normal approximation because it stays inside
[0, 1] and keeps sensible width at accuracies near 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["wilson_interval", "accuracy_summary", "improvement_over_best"]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (z=1.96 gives ~95% coverage).

    ``n == 0`` returns ``(0.0, 1.0)``: with no observations every accuracy is plausible.
    Raises ValueError for impossible counts, which would otherwise hide a bookkeeping bug.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if z <= 0:
        raise ValueError(f"z must be positive, got {z}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    # Exact bounds at the extremes (the formula gives them up to rounding error).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def accuracy_summary(correct: Iterable[bool], z: float = 1.96) -> dict[str, float | int]:
    """``{accuracy, n, correct, ci_low, ci_high}`` for a list of per-example correctness flags.

    An empty list gives accuracy 0.0 with the uninformative interval (0.0, 1.0) rather than NaN, so the
    result always serialises to JSON; check ``n`` before interpreting it.
    """
    flags = [bool(c) for c in correct]
    n = len(flags)
    k = sum(flags)
    low, high = wilson_interval(k, n, z)
    return {"accuracy": k / n if n else 0.0, "n": n, "correct": k, "ci_low": low, "ci_high": high}


def improvement_over_best(ensemble_acc: float, member_accs: Mapping[str, float]) -> dict[str, float | str]:
    """Compare the ensemble with its strongest member: ``{best_member, best_member_accuracy, delta}``.

    ``delta = ensemble_acc - best_member_accuracy``; positive means the ensemble beats every member.
    Ties between members go to the alphabetically first name so the report is deterministic.
    """
    if not member_accs:
        raise ValueError("member_accs is empty: an ensemble needs at least one member to compare against")
    best_name, best_acc = min(member_accs.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "best_member": best_name,
        "best_member_accuracy": float(best_acc),
        "delta": float(ensemble_acc) - float(best_acc),
    }
