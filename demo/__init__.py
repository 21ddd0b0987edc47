"""A self-contained demo: a tiny pixel-space EDM teacher and a sampler comparison on it.

``python -m comfyui_fewstep demo`` samples the bundled teacher (an 8x8 digits model,
about 0.38 M parameters, trained by ``tools/train_tiny_teacher.py``) from fixed noise with
the pack's DPM-Solver++ samplers and with Euler/Heun baselines at several NFE budgets,
and writes a sample grid, an error-vs-NFE plot and a table. No ComfyUI, no downloads.

:func:`load_teacher` returns the teacher as a denoiser with the sampler model contract
``denoiser(x, sigma_batch) -> denoised`` (VE form ``x = x0 + sigma * eps``).
"""

from __future__ import annotations

from .network import EDMDenoiser, TinyUNetConfig
from .teacher import WEIGHTS_PATH, load_teacher

__all__ = ["WEIGHTS_PATH", "EDMDenoiser", "TinyUNetConfig", "load_teacher"]
