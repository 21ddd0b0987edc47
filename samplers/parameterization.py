"""Diffusion parameterisations: ComfyUI's sigma mapped to (alpha_t, sigma_t, lambda_t).

ComfyUI hands a sampler ``x`` in one of two coordinate systems (see the package
docstring for the full notation):

* **VE form** (``eps``, ``v``, ``x0``, ``edm`` models, zero-terminal-SNR included):
  ``x = x0 + sigma * eps``. In these coordinates ``alpha_t = 1`` and ``sigma_t = sigma``.
  A VP model with ``abar`` is the same process rescaled by ``sqrt(abar)``, with
  ``sigma = sqrt((1 - abar) / abar)``; DPM-Solver++ with data prediction is
  invariant under that rescaling, so it runs directly in VE coordinates.
* **Flow form** (``flow``/CONST, rectified flow): ``x = (1 - sigma) x0 + sigma eps``,
  so ``alpha_t = 1 - sigma`` and ``sigma_t = sigma``.

In both, ``lambda_t = log(alpha_t / sigma_t)`` is the half log-SNR of
Lu et al. (DPM-Solver, arXiv 2206.00927, eq. 3.2). It is ``+inf`` at ``sigma = 0``
and, for flow, ``-inf`` at ``sigma = 1``; every function here returns those
limits exactly (no NaN) and the solvers treat infinite step sizes in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

ModelFamily = Literal["eps", "v", "x0", "edm", "flow"]
MODEL_FAMILIES: tuple[str, ...] = get_args(ModelFamily)

__all__ = [
    "MODEL_FAMILIES",
    "ModelFamily",
    "Parameterization",
    "discrete_vp_sigmas",
    "flow_sigmas",
    "for_family",
    "rescale_zero_terminal_snr",
]


@dataclass(frozen=True)
class Parameterization:
    """The coordinate system a sampler works in, and the model's sigma range.

    Attributes:
        kind: ``"ve"`` (``x = x0 + sigma eps``) or ``"flow"`` (``x = (1-sigma) x0 + sigma eps``).
        sigma_min: smallest non-zero sigma the model was trained on.
        sigma_max: largest sigma (the starting noise level of a full run).
        family: the model family this was built for (documentation and error messages).
        timestep_sigmas: for discrete-time models, the model's sigma at each integer
            timestep ``t = 0 .. T-1`` (ascending), used by time-based schedules.
        sigma_data: the standard deviation of the data per dimension the model was trained for
            (EDM's ``sigma_data``, Karras et al. 2022; 1 for latents scaled to unit variance,
            ComfyUI's ``model_sampling.sigma_data``). Used by ``first_step="gaussian"``.
    """

    kind: Literal["ve", "flow"]
    sigma_min: float
    sigma_max: float
    family: str = "eps"
    timestep_sigmas: tuple[float, ...] | None = None
    sigma_data: float = 1.0

    def __post_init__(self) -> None:
        if not (self.sigma_data > 0.0 and math.isfinite(self.sigma_data)):
            raise ValueError(f"Parameterization needs a finite sigma_data > 0, got {self.sigma_data!r}")
        if self.kind not in ("ve", "flow"):
            raise ValueError(f"Parameterization kind must be 've' or 'flow', got {self.kind!r}")
        if not (0.0 < self.sigma_min < self.sigma_max):
            raise ValueError(
                f"Parameterization needs 0 < sigma_min < sigma_max, got "
                f"sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}"
            )
        if self.kind == "flow" and self.sigma_max > 1.0:
            raise ValueError(f"a flow model has sigma_max <= 1, got {self.sigma_max!r}")

    # -- scalar maps (float64 host arithmetic, used for solver coefficients) --------------

    def alpha(self, sigma: float) -> float:
        """``alpha_t`` for ComfyUI's ``sigma``: 1 (VE) or ``1 - sigma`` (flow)."""
        return 1.0 if self.kind == "ve" else 1.0 - float(sigma)

    def sigma_t(self, sigma: float) -> float:
        """``sigma_t`` for ComfyUI's ``sigma`` (the same number in both forms)."""
        return float(sigma)

    def lambda_(self, sigma: float) -> float:
        """Half log-SNR ``lambda_t = log(alpha_t) - log(sigma_t)`` (Lu et al. 2022, eq. 3.2).

        Returns ``+inf`` at ``sigma = 0`` and ``-inf`` at ``sigma = 1`` for flow.
        """
        sigma = float(sigma)
        if sigma < 0.0 or math.isnan(sigma):
            raise ValueError(f"sigma must be >= 0, got {sigma!r}")
        if sigma == 0.0:
            return math.inf
        if self.kind == "ve":
            return -math.log(sigma)
        if sigma >= 1.0:
            return -math.inf
        return math.log1p(-sigma) - math.log(sigma)

    def sigma_from_lambda(self, lambda_: float) -> float:
        """Inverse of :meth:`lambda_`: ``exp(-lambda)`` (VE) or ``sigmoid(-lambda)`` (flow)."""
        lambda_ = float(lambda_)
        if lambda_ == math.inf:
            return 0.0
        if self.kind == "ve":
            return math.exp(-lambda_)
        if lambda_ == -math.inf:
            return 1.0
        # sigmoid(-lambda), written to avoid overflow for either sign
        if lambda_ >= 0:
            e = math.exp(-lambda_)
            return e / (1.0 + e)
        return 1.0 / (1.0 + math.exp(lambda_))

    @property
    def lambda_min(self) -> float:
        """Half log-SNR at ``sigma_max`` (the noisy end)."""
        return self.lambda_(self.sigma_max)

    @property
    def lambda_max(self) -> float:
        """Half log-SNR at ``sigma_min`` (the clean end)."""
        return self.lambda_(self.sigma_min)

    # -- tensor maps (for schedules and tests) ----------------------------------------------

    def lambda_tensor(self, sigma: torch.Tensor) -> torch.Tensor:
        """Elementwise :meth:`lambda_` on a tensor (float64 recommended)."""
        if self.kind == "ve":
            return -torch.log(sigma)
        return torch.log1p(-sigma) - torch.log(sigma)

    def sigma_from_lambda_tensor(self, lambda_: torch.Tensor) -> torch.Tensor:
        """Elementwise :meth:`sigma_from_lambda` on a tensor."""
        if self.kind == "ve":
            return torch.exp(-lambda_)
        return torch.sigmoid(-lambda_)

    def alpha_tensor(self, sigma: torch.Tensor) -> torch.Tensor:
        """Elementwise :meth:`alpha` on a tensor."""
        return torch.ones_like(sigma) if self.kind == "ve" else 1.0 - sigma


def discrete_vp_sigmas(
    timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear",
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """Sigmas ``sqrt((1 - abar_t) / abar_t)`` of a discrete DDPM schedule (Ho et al. 2020).

    ``scaled_linear`` is Stable Diffusion's schedule (linear in ``sqrt(beta)``; ComfyUI's
    ``"linear"`` beta_schedule name); ``linear`` is DDPM's. Returns float64, ascending in t.
    With ``zero_terminal_snr`` the schedule is rescaled as in Lin et al. 2023 (arXiv
    2305.08891, Alg. 1), keeping the last ``abar`` at the same small positive value
    ComfyUI uses so that sigma stays finite.
    """
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule must be 'scaled_linear' or 'linear', got {beta_schedule!r}")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
    if zero_terminal_snr:
        sigmas = rescale_zero_terminal_snr(sigmas)
    return sigmas


def rescale_zero_terminal_snr(sigmas: torch.Tensor, terminal_abar: float = 4.8973451890853435e-08) -> torch.Tensor:
    """Zero-terminal-SNR rescaling of a sigma table (Lin et al. 2023, arXiv 2305.08891, Alg. 1).

    ``sqrt(abar)`` is shifted so its last value is 0 and scaled so its first is unchanged; the
    last ``abar`` is then set to ``terminal_abar`` so that sigma_max is large but finite.
    """
    sigmas = sigmas.to(torch.float64)
    sqrt_abar = (1.0 / (sigmas * sigmas + 1.0)).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    abar = sqrt_abar**2
    abar[-1] = terminal_abar
    return ((1.0 - abar) / abar).sqrt()


def flow_sigmas(timesteps: int = 1000, shift: float = 1.0) -> torch.Tensor:
    """Sigmas of a discrete rectified-flow model with time shift (Esser et al. 2024, SD3 eq. 23).

    ``sigma(t) = shift * t / (1 + (shift - 1) * t)`` for ``t = 1/T .. 1``; float64, ascending.
    """
    t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
    return shift * t / (1.0 + (shift - 1.0) * t)


def for_family(
    family: ModelFamily,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    *,
    timestep_sigmas: torch.Tensor | None = None,
) -> Parameterization:
    """Build the :class:`Parameterization` for a model family.

    ``eps``, ``v`` and ``x0`` default to Stable Diffusion's discrete schedule
    (sigma 0.0292 .. 14.61), ``edm`` to EDM's range (0.002 .. 80), ``flow`` to
    shift-1 rectified flow (0.001 .. 1). A ``timestep_sigmas`` table (ascending, one
    sigma per integer timestep) sets the range when given.
    """
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {MODEL_FAMILIES}")
    table: tuple[float, ...] | None = None
    if timestep_sigmas is not None:
        ts = timestep_sigmas.detach().to("cpu", torch.float64).flatten()
        table = tuple(float(s) for s in ts)
    elif family in ("eps", "v", "x0"):
        table = tuple(float(s) for s in discrete_vp_sigmas())
    elif family == "flow":
        table = tuple(float(s) for s in flow_sigmas())
    if table is not None:
        sigma_min = table[0] if sigma_min is None else sigma_min
        sigma_max = table[-1] if sigma_max is None else sigma_max
    elif family == "edm":
        sigma_min = 0.002 if sigma_min is None else sigma_min
        sigma_max = 80.0 if sigma_max is None else sigma_max
    kind: Literal["ve", "flow"] = "flow" if family == "flow" else "ve"
    return Parameterization(kind, float(sigma_min), float(sigma_max), family, table)
