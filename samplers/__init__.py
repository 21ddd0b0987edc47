"""DPM-Solver++ family samplers and step schedules, in pure PyTorch.

Notation
--------
ComfyUI (like k-diffusion) describes every model by one noise level ``sigma`` and hands a
sampler the state ``x`` in the model's own coordinates:

* VE form (eps, v, x0, EDM models): ``x = x0 + sigma * eps``; ``alpha_t = 1``, ``sigma_t = sigma``.
  A discrete DDPM/VP model with cumulative ``abar`` has ``sigma = sqrt((1 - abar) / abar)``.
* Flow form (rectified flow, ComfyUI's CONST): ``x = (1 - sigma) x0 + sigma eps``;
  ``alpha_t = 1 - sigma``, ``sigma_t = sigma``.

``lambda_t = log(alpha_t / sigma_t)`` is the half log-SNR (Lu et al. 2022, arXiv 2206.00927,
eq. 3.2); it increases towards the data. A step from ``s`` to ``t`` has
``h = lambda_t - lambda_s > 0``; multistep solvers use the ratios ``r_i = h_{i} / h`` of
earlier step sizes to the current one, singlestep solvers place intermediate points at
``lambda_s + r1 h`` (and ``r2 h``). ``denoised`` (``D``, ``x0``) is the model's data
prediction ``model(x, sigma)``; DPM-Solver++ integrates the ODE in that prediction
(arXiv 2211.01095), DPM-Solver in the noise prediction ``eps = (x - alpha_t D) / sigma_t``.

Sampler functions follow k-diffusion's contract:
``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)`` where
``model(x, sigma_batch, **extra_args)`` returns ``denoised`` and ``sigmas`` is a descending
1-D tensor, usually ending in 0. NFE (number of function evaluations) is the number of
``model`` calls; classifier-free guidance doubles the network work per call.
A singlestep outer step of order k costs k NFE (the step to sigma = 0 is first order and costs
one); the adaptive solver reports its NFE (``info`` dict and an INFO log line).
"""

from __future__ import annotations

from .parameterization import MODEL_FAMILIES, ModelFamily, Parameterization, for_family
from .phi import h_phi, phi
from .multistep import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m,
    sample_dpmpp_3m_sde,
    sample_dpmpp_multistep,
)
from .singlestep import sample_dpmpp_singlestep, singlestep_orders
from .adaptive import sample_dpmpp_adaptive
from .budget import StepPlan, effective_nfe, steps_for_nfe
from .schedules import SCHEDULE_DEFAULTS, SCHEDULE_NAMES, get_sigmas

__all__ = [
    "MODEL_FAMILIES",
    "ModelFamily",
    "Parameterization",
    "for_family",
    "h_phi",
    "phi",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_multistep",
    "sample_dpmpp_singlestep",
    "singlestep_orders",
    "sample_dpmpp_adaptive",
    "SCHEDULE_DEFAULTS",
    "SCHEDULE_NAMES",
    "StepPlan",
    "effective_nfe",
    "get_sigmas",
    "steps_for_nfe",
]
