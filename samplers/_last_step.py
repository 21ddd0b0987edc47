"""Checks shared by the weight rules of the last step to ``sigma = 0`` (:mod:`.final_adams`,
:mod:`.final_gaussian`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["sigma_ratios"]


def sigma_ratios(sigma_bars: Sequence[float], rule: str) -> list[float]:
    """``u_j = sigma_bar_j / sigma_s`` for the VE sigmas of the last calls, newest first, checked:
    ``sigma_s`` finite and positive, the others finite and increasing into the past. ``rule`` names
    the caller in the error message."""
    if not sigma_bars:
        raise ValueError(f"{rule} needs at least one sigma")
    s = float(sigma_bars[0])
    if not (s > 0.0 and math.isfinite(s)):
        raise ValueError(f"{rule} needs a finite positive last sigma, got {s!r}")
    u = [float(v) / s for v in sigma_bars]
    if any(not (b > a and math.isfinite(b)) for a, b in zip(u, u[1:])):
        raise ValueError(f"{rule} needs finite sigmas increasing into the past, got {sigma_bars!r}")
    return u
