"""A high-order last step to ``sigma = 0``: Adams-Bashforth on the noise prediction in VE sigma.

A multistep DPM-Solver++ run that ends at ``sigma = 0`` makes its last step first order: the step
from the last model call at ``sigma_s`` to ``lambda = +inf`` is infinite in log-SNR, so no
polynomial in ``lambda`` can be extrapolated over it, and the solver returns the data prediction
``D_s`` (k-diffusion and ComfyUI do the same). At few steps that last jump is a large part of the
error: the last call sits well above the data's finest scale.

In the VE variables ``x_bar = x / alpha_t`` and ``sigma_bar = sigma_t / alpha_t`` (k-diffusion's
sigma) the probability-flow ODE is ``d x_bar / d sigma_bar = eps``, with the noise prediction
``eps = (x_bar - D) / sigma_bar`` (Karras et al. 2022, arXiv 2206.00364, eq. 4 with
``s(t) = 1``). Along a trajectory ``eps`` is smooth in ``sigma_bar`` down to 0, so the last step is

    x_bar(0) = x_bar_s - integral_0^sigma_s eps(sigma_bar) d sigma_bar
             ~ x_bar_s - sum_j w_j eps_j,

with ``eps`` replaced by its polynomial interpolant through the last ``k`` model calls
(``sigma_bar_0 = sigma_s`` the newest) and integrated exactly: a variable-step Adams-Bashforth
step of order ``k`` in ``sigma_bar`` (iPNDM's and DEIS's variable, Zhang and Chen 2023, arXiv
2204.13902; here only for the last step, where the log-SNR form has nothing to extrapolate
over). With ``u_j = sigma_bar_j / sigma_s`` the weights are ``w_j = sigma_s omega_j`` where
``sum_j omega_j u_j^q = 1 / (q + 1)`` for ``q = 0..k-1`` (the moments of ``u^q`` on [0, 1]). The
step needs no model call. For ``k = 1`` it is the usual ``x_bar(0) = D_s``; a constant ``eps``
(a region whose prediction does not change, such as the kept region of an inpainting mask) is
integrated exactly at every order.

With ``weights="gaussian"`` the same step uses the weights of :mod:`.final_gaussian` instead,
fitted to the curve the noise prediction follows on Gaussian data of every scale above the
schedule's end (better at 5-10 steps, where the last call sits near the data's finest scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from ._last_step import sigma_ratios
from .final_gaussian import final_gaussian_weights
from .parameterization import Parameterization
from .unipc import solve_linear

__all__ = ["FINAL_WEIGHTS", "MAX_FINAL_ORDER", "FinalAdamsStep", "FinalWeights", "final_adams_weights"]

#: highest order of the last step (four model calls: the benchmark's best on held-out problems)
MAX_FINAL_ORDER = 4

FinalWeights = Literal["adams", "gaussian"]
#: the last step's weights: Adams-Bashforth (this module) or fitted to Gaussian data (:mod:`.final_gaussian`)
FINAL_WEIGHTS: tuple[str, ...] = get_args(FinalWeights)


def final_adams_weights(sigma_bars: Sequence[float]) -> tuple[float, ...]:
    """Weights ``w_j`` of ``eps_j`` in ``integral_0^sigma_s p(sigma_bar) d sigma_bar``.

    ``p`` interpolates the noise predictions at ``sigma_bars`` (VE sigmas, newest first:
    ``sigma_bars[0] = sigma_s``, the others larger and distinct). Solves ``sum_j omega_j u_j^q =
    1 / (q + 1)`` with ``u_j = sigma_bar_j / sigma_s`` (float64) and returns ``sigma_s omega_j``.
    """
    u = sigma_ratios(sigma_bars, "final_adams_weights")
    s = float(sigma_bars[0])
    k = len(u)
    vandermonde = [[uj**q for uj in u] for q in range(k)]
    moments = [1.0 / (q + 1) for q in range(k)]
    return tuple(s * w for w in solve_linear(vandermonde, moments))


class FinalAdamsStep:
    """Collects the noise predictions of a run and takes its last step to ``sigma = 0``.

    Keeps at most ``order`` predictions (one latent-sized tensor each, float32 or wider). A model
    call at a flow model's ``sigma = 1`` (``alpha = 0``, infinite VE sigma) is not used.
    """

    def __init__(
        self, order: int, parameterization: Parameterization, weights: FinalWeights = "adams"
    ) -> None:
        if isinstance(order, bool) or order not in range(1, MAX_FINAL_ORDER + 1):
            raise ValueError(f"final_order must be an integer from 1 to {MAX_FINAL_ORDER}, got {order!r}")
        if weights not in FINAL_WEIGHTS:
            raise ValueError(f"final_weights must be one of {FINAL_WEIGHTS}, got {weights!r}")
        self.order = order
        self.weights = weights
        self.p = parameterization
        self.sigma_bars: list[float] = []  # newest first
        self.eps: list[torch.Tensor] = []

    def record(self, x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> None:
        """Store ``eps = (x / alpha - D) / sigma_bar`` of a model call at ``sigma`` (state ``x``)."""
        alpha = self.p.alpha(sigma)
        if self.order == 1 or not alpha > 0.0 or not sigma > 0.0:
            return
        sigma_bar = sigma / alpha
        dtype = torch.promote_types(x.dtype, torch.float32)  # float32 or wider; no float64 on MPS
        eps = (x.to(dtype) / alpha - denoised.to(dtype)) / sigma_bar
        self.sigma_bars = [sigma_bar, *self.sigma_bars][: self.order]
        self.eps = [eps, *self.eps][: self.order]

    def step(self, x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
        """``x_bar(0)`` from the state ``x`` at ``sigma`` (the last recorded call), in ``x``'s dtype.

        Falls back to the data prediction ``denoised`` when ``sigma`` is not the last recorded call.
        """
        alpha = self.p.alpha(sigma)
        if not self.sigma_bars or alpha <= 0.0 or self.sigma_bars[0] != sigma / alpha:
            return denoised
        rule = final_gaussian_weights if self.weights == "gaussian" else final_adams_weights
        weights = rule(self.sigma_bars)
        out = x.to(self.eps[0].dtype) / alpha
        for w, eps in zip(weights, self.eps):
            out.sub_(eps, alpha=w)
        return out.to(x.dtype)
