"""Formatting shared by the evaluation reports (:mod:`nnunet_semi.evaluation`) and the benchmark report
(:mod:`nnunet_semi.benchmark.report`): markdown tables, ``mean ± std`` over the finite values, p-values and
durations."""
from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Sequence

import numpy as np


def is_finite(value) -> bool:
    """True for a real, non-NaN, finite number."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def finite(values: Iterable) -> np.ndarray:
    """The finite ones of ``values`` as a float array."""
    arr = np.asarray([float(v) for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def mean_std(values: Iterable) -> Dict[str, float]:
    """``{"mean", "std", "n"}`` over the finite values (std with ddof 0, like ``np.std`` in the papers'
    scripts); NaN and n = 0 when there is none."""
    v = finite(values)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def format_mean_std(stat: Mapping[str, float], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± std"`` of a ``{"mean", "std", "n"}`` entry; ``"n/a"`` when there is no value."""
    if not stat or not stat.get("n") or not is_finite(stat.get("mean")):
        return "n/a"
    mean = stat["mean"] * scale
    if abs(mean) < 0.5 * 10 ** -digits:  # no "-0.00"
        mean = 0.0
    return f"{mean:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def format_difference(diff: Mapping[str, float], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± std"`` of a paired difference (``{"mean_diff", "std_diff", "n"}``, as
    :func:`nnunet_semi.evaluation.evaluate.paired_difference` returns it)."""
    return format_mean_std({"mean": diff["mean_diff"], "std": diff["std_diff"], "n": diff["n"]}, scale, digits)


def format_p(p) -> str:
    """A p-value with 3 significant digits (exponent notation below 0.001); ``"n/a"`` when there is none."""
    if not is_finite(p):
        return "n/a"
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def fmt_seconds(s: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"2 h 07 min"``."""
    s = float(s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def markdown_rows(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table: the header row, the ``|---|`` rule and one line per row (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = ["is_finite", "finite", "mean_std", "format_mean_std", "format_difference", "format_p", "fmt_seconds", "markdown_rows"]
