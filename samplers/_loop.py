"""Shared plumbing of the sampler loops: model evaluation, NFE counting, callbacks.

Every solver evaluates the model through :class:`ModelEvaluator`, which applies the
x0-correction hook to each data prediction, counts model evaluations (NFE) and stops
sampling with :class:`NonFiniteModelOutputError` when the model returns NaN or inf, naming
the step and the sigma, instead of letting a black or noise image through.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "Denoiser",
    "ModelEvaluator",
    "NonFiniteModelOutputError",
    "X0Correction",
    "emit_callback",
    "log_lowered_order",
    "progress",
    "sigma_list",
]


class Denoiser(Protocol):
    """The model contract: ``model(x, sigma_batch, **extra_args) -> denoised`` (the x0 prediction)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor: ...


X0Correction = Callable[[torch.Tensor, float], torch.Tensor]
"""``correct(denoised, sigma) -> denoised``, applied to every data prediction."""


class NonFiniteModelOutputError(RuntimeError):
    """The model returned NaN or inf; sampling stopped at the named step."""

    def __init__(self, step: int, sigma: float, total_steps: int) -> None:
        self.step, self.sigma, self.total_steps = step, sigma, total_steps
        super().__init__(
            f"the model returned NaN/inf at step {step + 1} of {total_steps} (sigma={sigma:.6g}); "
            "sampling stopped instead of producing a black or noise image. Common causes: fp16 "
            "overflow (try bf16/fp32 or --force-upcast-attention), a broken LoRA or checkpoint, or a "
            "cfg/sigma far outside what the model was trained on."
        )


class ModelEvaluator:
    """Calls the model once per evaluation, with x0 correction, NFE count and a finiteness check.

    Args:
        model: the denoiser.
        extra_args: passed through untouched (ComfyUI puts ``model_options``, ``seed``,
            ``denoise_mask`` there).
        x0_correction: optional hook applied to every data prediction; with a ``denoise_mask``
            in ``extra_args`` (inpainting) only where the mask is 1, so the kept region is exact.
        total_steps: number of steps of the run, for error messages.
        check_finite: check each output for NaN/inf (one reduction and host sync per call).
    """

    def __init__(
        self,
        model: Denoiser,
        extra_args: Mapping[str, Any] | None = None,
        x0_correction: X0Correction | None = None,
        total_steps: int = 0,
        check_finite: bool = True,
    ) -> None:
        self.model = model
        self.extra_args = dict(extra_args or {})
        self.x0_correction = x0_correction
        self.total_steps = total_steps
        self.check_finite = check_finite
        self.nfe = 0

    def __call__(self, x: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        """Return the (corrected) data prediction at ``sigma`` for step index ``step``."""
        sigma_batch = x.new_full((x.shape[0],), float(sigma))
        denoised = self.model(x, sigma_batch, **self.extra_args)
        self.nfe += 1
        if self.check_finite and not bool(torch.isfinite(denoised).all()):
            raise NonFiniteModelOutputError(step, float(sigma), self.total_steps)
        if self.x0_correction is not None:
            corrected = self.x0_correction(denoised, float(sigma))
            mask = self.extra_args.get("denoise_mask")
            # inpainting: ComfyUI has already put the kept region (mask 0) into the prediction; the
            # correction applies where the model generates, so the kept pixels stay as they are
            denoised = corrected if mask is None else torch.lerp(denoised, corrected, mask.to(denoised))
        return denoised

    def finish(self, x0: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
        """A final sample ``x0`` that a solver computed instead of returning the last prediction
        ``denoised`` (made at ``sigma``): the x0 correction is applied to it as to a prediction, and
        with an inpainting mask the kept region (mask 0) is taken from ``denoised``, where ComfyUI
        has put the source latent, so it stays exact."""
        if self.x0_correction is not None:
            x0 = self.x0_correction(x0, float(sigma))
        mask = self.extra_args.get("denoise_mask")
        return x0 if mask is None else torch.lerp(denoised, x0, mask.to(x0))


def sigma_list(sigmas: torch.Tensor, parameterization: Any = None) -> list[float]:
    """The schedule as host float64 values, validated: 1-D, non-negative, strictly decreasing,
    and within [0, 1] for a flow model (``parameterization.kind == "flow"``).

    One device-to-host copy per run; the loops then branch on Python floats only.
    """
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D tensor, got shape {tuple(sigmas.shape)}")
    values = [float(s) for s in sigmas.detach().to("cpu", torch.float64)]
    if any(not 0.0 <= s < math.inf for s in values):
        raise ValueError(f"sigmas must be non-negative and finite, got {values}")
    for a, b in zip(values, values[1:]):
        if b == a and b > 0.0:
            raise ValueError(
                f"sigma {a:.6g} appears twice in a row: the scheduler made more steps than the model has "
                "distinct noise levels (an LCM model has 50). Use fewer steps or another scheduler."
            )
        if not b < a:
            raise ValueError(
                "sigmas must be strictly decreasing (a SIGMAS schedule from high noise to low); "
                f"got {a:.6g} followed by {b:.6g}. Check the schedule node, or use a FlipSigmas node."
            )
    if getattr(parameterization, "kind", None) == "flow" and values and values[0] > 1.0:
        raise ValueError(
            f"a flow model's sigmas lie in [0, 1], got sigmas[0]={values[0]!r}: this schedule was made for "
            "another model family. Build the SIGMAS from this model (e.g. a scheduler node fed with the same MODEL)."
        )
    return values


def check_final_step(values: list[float], final_step: str, sigma_max: float) -> None:
    """Refuse ``final_step="sigma_min"`` on a schedule from pure noise whose only step ends at 0
    (``[sigma_max, 0]``): it stops at the last non-zero sigma, which is the first, so the sampler
    would return its input noise as if it were a result. The last part of a split schedule
    (``[sigma, 0]`` below ``sigma_max``) returns its input at ``sigma`` as the unsplit run does."""
    if final_step == "sigma_min" and len(values) == 2 and values[-1] == 0.0:
        if values[0] >= sigma_max * (1.0 - 1e-5):
            raise ValueError(
                f"final_step='sigma_min' stops at the last non-zero sigma, and this schedule {values} has no "
                f"other than its first: the sampler would return its input noise at sigma {values[0]:.6g}. "
                "Use final_step='zero' for a one-step schedule, or a schedule with more steps."
            )
        logger.info("final_step='sigma_min' on the schedule %s: no step to run, the input is returned",
                    values)


def log_lowered_order(solver: str, order: int, reached: int, n_steps: int) -> None:
    """Log (INFO) that a run's schedule is too short for the requested order: the documented
    automatic lowering (first steps and the final step to 0 are lower order)."""
    if reached < order:
        logger.info("%s: %d step(s) reach order %d at most, not %d; use more steps for the full order",
                    solver, n_steps, reached, order)


def emit_callback(
    callback: Callable[[dict[str, Any]], None] | None,
    i: int,
    x: torch.Tensor,
    sigma: float,
    denoised: torch.Tensor,
    sigmas: torch.Tensor,
) -> None:
    """Send k-diffusion's per-step callback dict (ComfyUI maps it to previews and the progress bar)."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})


def progress(n: int, disable: bool | None) -> range | Any:
    """``range(n)`` wrapped in tqdm when it is installed and not disabled."""
    if disable:
        return range(n)
    try:
        from tqdm.auto import trange
    except ImportError:
        return range(n)
    return trange(n, disable=disable)
