"""Ramp-up / ramp-down schedules for unsupervised loss weights and thresholds.

All functions take the current step and a length in the same unit (iterations here) and return a
factor in [0, 1]. ``sigmoid_rampup`` is the schedule of Laine & Aila / Mean Teacher / UA-MT /
CrossMatch: exp(-5 (1 - t/L)^2), with t clipped to L.
"""
from __future__ import annotations

import math


def sigmoid_rampup(step: float, length: float) -> float:
    if length <= 0:
        return 1.0
    t = min(max(float(step), 0.0), float(length)) / float(length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def linear_rampup(step: float, length: float) -> float:
    if length <= 0:
        return 1.0
    return float(min(max(float(step), 0.0), float(length)) / float(length))


def cosine_rampdown(step: float, length: float) -> float:
    if length <= 0:
        return 1.0
    t = min(max(float(step), 0.0), float(length))
    return float(0.5 * (math.cos(math.pi * t / length) + 1.0))


RAMPS = {"sigmoid": sigmoid_rampup, "linear": linear_rampup, "none": lambda step, length: 1.0}


def ramp(kind: str, step: float, length: float) -> float:
    """``kind`` is one of 'sigmoid', 'linear', 'none'."""
    try:
        fn = RAMPS[kind]
    except KeyError:
        raise ValueError(f"unknown ramp-up '{kind}', choose one of {sorted(RAMPS)}") from None
    return fn(step, length)
