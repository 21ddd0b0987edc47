"""x0-correction hooks applied to every data prediction (DPM-Solver++'s ``correcting_x0_fn``).

* ``clamp``: ``x0 <- clamp(x0, -max_value, max_value)``.
* ``dynamic_threshold``: Imagen's dynamic thresholding (Saharia et al. 2022, arXiv 2205.11487,
  §2.3), as used with DPM-Solver++ for pixel-space models (Lu et al. 2022, arXiv 2211.01095,
  §5): per sample, ``s = max(quantile(|x0|, percentile), max_value)`` and
  ``x0 <- clamp(x0, -s, s) * max_value / s``. With ``max_value = 1`` this is the paper's rule.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from ._loop import X0Correction

CorrectionKind = Literal["none", "clamp", "dynamic_threshold"]
CORRECTION_KINDS: tuple[str, ...] = get_args(CorrectionKind)

__all__ = ["CORRECTION_KINDS", "CorrectionKind", "dynamic_threshold", "make_x0_correction"]


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding of a batch of data predictions (Saharia et al. 2022, §2.3)."""
    flat = x0.detach().abs().reshape(x0.shape[0], -1).float()
    s = torch.quantile(flat, percentile, dim=1).clamp(min=max_value).to(x0.dtype)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return torch.maximum(torch.minimum(x0, s), -s) * (max_value / s)


def make_x0_correction(
    kind: CorrectionKind = "none", percentile: float = 0.995, max_value: float = 1.0
) -> X0Correction | None:
    """Build the hook for ``kind``; ``None`` for ``"none"``."""
    if kind not in CORRECTION_KINDS:
        raise ValueError(f"x0 correction must be one of {CORRECTION_KINDS}, got {kind!r}")
    if not (0.0 < percentile <= 1.0):
        raise ValueError(f"thresholding percentile must be in (0, 1], got {percentile!r}")
    if not max_value > 0.0:
        raise ValueError(f"thresholding max value must be > 0, got {max_value!r}")
    if kind == "none":
        return None
    if kind == "clamp":
        return lambda x0, sigma: x0.clamp(-max_value, max_value)
    return lambda x0, sigma: dynamic_threshold(x0, percentile, max_value)
