"""ComfyUI ``model_sampling`` -> the samplers' :class:`Parameterization`.

ComfyUI describes a model's prediction type and noise schedule by one ``model_sampling``
object (``comfy.model_sampling``; a schedule class mixed with a prediction class). What a
sampler needs from it is the coordinate system ``x`` lives in, which is fixed by the
prediction class's ``noise_scaling``:

================================================  =========  =================================
prediction class (``comfy.model_sampling``)       ``kind``   ``x`` handed to the sampler
================================================  =========  =================================
``EPS``, ``V_PREDICTION``, ``EDM``, ``X0``,       ``"ve"``   ``x0 + sigma * eps``
``IMG_TO_IMG`` (and subclasses: LCM, zero-SNR)
``CONST`` (SD3, Flux, Wan, AuraFlow, ...)         ``"flow"`` ``(1 - sigma) x0 + sigma * eps``
``COSMOS_RFLOW``                                  ``"ve"``   ``x0 + sigma * eps`` (its
                                                             ``noise_scaling`` is VE; the
                                                             flow map lives in the network
                                                             preconditioning only)
anything else                                     probed     ``noise_scaling`` is evaluated
                                                             once and matched to one of the
                                                             two forms, else ``ValueError``
================================================  =========  =================================

For schedules defined on the model's timestep grid (time-uniform, AYS, GITS, ``simple``-like)
the model's sigma table is passed on as ``timestep_sigmas`` when it is a discrete timestep
table (``ModelSamplingDiscrete`` and subclasses, discrete flow, Flux). Continuous-time EDM/V
schedules (``ModelSamplingContinuousEDM``/``ContinuousV``/``CosmosRFlow``) have no such grid
(their ``sigmas`` buffer is only a log-linear helper) and get ``timestep_sigmas=None``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import comfy.model_sampling as cms
import torch

from ..samplers.parameterization import Parameterization

logger = logging.getLogger(__name__)

__all__ = [
    "model_sampling_from_denoiser",
    "parameterization_for_denoiser",
    "parameterization_for_model",
    "parameterization_from_model_sampling",
]

_warned_probe: set[str] = set()


def _family(model_sampling: Any) -> tuple[str, str] | None:
    """(kind, family) from the prediction mix-in, or None when the class is not a core one."""
    if isinstance(model_sampling, cms.CONST):
        return "flow", "flow"
    if isinstance(model_sampling, cms.X0):  # IMG_TO_IMG is an X0
        return "ve", "x0"
    if isinstance(model_sampling, cms.EDM):  # EDM subclasses V_PREDICTION: test it first
        return "ve", "edm"
    if isinstance(model_sampling, cms.V_PREDICTION):
        return "ve", "v"
    if isinstance(model_sampling, cms.EPS):
        return "ve", "eps"
    if isinstance(model_sampling, cms.COSMOS_RFLOW):
        return "ve", "edm"
    return None


def _probe_kind(model_sampling: Any) -> str:
    """Infer ``"ve"``/``"flow"`` from ``noise_scaling`` for a prediction class we do not know."""
    name = type(model_sampling).__qualname__
    noise_scaling = getattr(model_sampling, "noise_scaling", None)
    if noise_scaling is None:
        raise ValueError(
            f"model_sampling {name!r} has no noise_scaling(); FewStep samplers support ComfyUI's "
            "EPS, V_PREDICTION, EDM, X0, IMG_TO_IMG, CONST and COSMOS_RFLOW prediction types"
        )
    sigma = 0.25
    with torch.no_grad():
        s = torch.full((1,), sigma, dtype=torch.float32)
        noise_coef = float(noise_scaling(s, torch.ones(1, 1), torch.zeros(1, 1), max_denoise=False).item())
        data_coef = float(noise_scaling(s, torch.zeros(1, 1), torch.ones(1, 1), max_denoise=False).item())
    if math.isclose(noise_coef, sigma, rel_tol=1e-5):
        if math.isclose(data_coef, 1.0, rel_tol=1e-5):
            kind = "ve"
        elif math.isclose(data_coef, 1.0 - sigma, rel_tol=1e-5):
            kind = "flow"
        else:
            kind = ""
    else:
        kind = ""
    if not kind:
        raise ValueError(
            f"model_sampling {name!r} scales noise as x = {data_coef:g} * x0 + {noise_coef:g} * eps at "
            f"sigma={sigma}; FewStep samplers need x = x0 + sigma * eps (VE) or "
            "x = (1 - sigma) * x0 + sigma * eps (flow). Use a core sampler for this model, or patch "
            "its model_sampling with a ModelSampling* node."
        )
    if name not in _warned_probe:
        _warned_probe.add(name)
        logger.warning(
            "FewStep: model_sampling %r is not a core ComfyUI prediction type; its noise_scaling "
            "matches the %s form, so the samplers use that",
            name,
            kind,
        )
    return kind


def _timestep_table(model_sampling: Any) -> tuple[float, ...] | None:
    """The model's sigma per integer timestep (ascending), or None for continuous-time schedules."""
    if isinstance(model_sampling, cms.ModelSamplingContinuousEDM):  # includes ContinuousV, CosmosRFlow
        return None
    sigmas = getattr(model_sampling, "sigmas", None)
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        return None
    table = sigmas.detach().to("cpu", torch.float64)
    if not bool((table[1:] > table[:-1]).all()) or not bool(table[0] > 0):
        return None  # not a one-to-one timestep table (Stable Cascade's has flat stretches): continuous time
    return tuple(table.tolist())


def parameterization_from_model_sampling(model_sampling: Any) -> Parameterization:
    """Build the :class:`Parameterization` for a ComfyUI ``model_sampling`` object.

    Raises:
        ValueError: the object's noise scaling is neither the VE nor the flow form, or its
            sigma range is not usable (``0 < sigma_min < sigma_max``).
    """
    found = _family(model_sampling)
    if found is None:
        kind = _probe_kind(model_sampling)
        family = "flow" if kind == "flow" else "eps"
    else:
        kind, family = found
    try:
        sigma_min = float(model_sampling.sigma_min)
        sigma_max = float(model_sampling.sigma_max)
    except (AttributeError, TypeError) as e:
        raise ValueError(
            f"model_sampling {type(model_sampling).__qualname__!r} has no numeric sigma_min/sigma_max"
        ) from e
    if kind == "flow":
        sigma_max = min(sigma_max, 1.0)
    if not 0.0 < sigma_min < sigma_max:
        raise ValueError(
            f"the model's noise levels collapse to one value (sigma_min {sigma_min:.6g}, sigma_max "
            f"{sigma_max:.6g}), so no schedule can step from noise to data: its ModelSampling settings (a "
            "flow shift, max_shift / base_shift and the image size, or a sigma range) are extreme. Lower "
            "the shift, or check the ModelSampling node's values."
        )
    return Parameterization(kind, sigma_min, sigma_max, family, _timestep_table(model_sampling),
                            _sigma_data(model_sampling))


def _sigma_data(model_sampling: Any) -> float:
    """The data's standard deviation the model was built for (``sigma_data``: 0.5 for EDM-style
    pixel models, 1 for latents scaled to unit variance; ComfyUI's flow objects have none, and 1
    is their latents' scale too)."""
    try:
        value = float(getattr(model_sampling, "sigma_data", 1.0))
    except (TypeError, ValueError):
        return 1.0
    return value if value > 0.0 and math.isfinite(value) else 1.0


def parameterization_for_model(model: Any) -> Parameterization:
    """The :class:`Parameterization` of a ComfyUI ``MODEL`` (a ``ModelPatcher``).

    Reads ``model_sampling`` through ``get_model_object`` so that object patches (the
    ``ModelSampling*`` nodes, student loaders) are respected.
    """
    return parameterization_from_model_sampling(model.get_model_object("model_sampling"))


def model_sampling_from_denoiser(model: Any) -> Any:
    """``model_sampling`` of the denoiser a ComfyUI ``KSAMPLER`` hands to a sampler function.

    That denoiser is ``KSamplerX0Inpaint``; its ``inner_model`` is the guider, whose
    ``model_patcher`` holds the (possibly object-patched) ``model_sampling``.
    """
    try:
        patcher = model.inner_model.model_patcher
    except AttributeError as e:
        raise TypeError(
            f"cannot find the ComfyUI model behind {type(model).__qualname__!r}: FewStep sampler "
            "functions run inside ComfyUI's KSAMPLER (model.inner_model.model_patcher); outside "
            "ComfyUI pass parameterization=... explicitly"
        ) from e
    return patcher.get_model_object("model_sampling")


def parameterization_for_denoiser(model: Any) -> Parameterization:
    """:func:`parameterization_from_model_sampling` for the denoiser of a sampler function."""
    return parameterization_from_model_sampling(model_sampling_from_denoiser(model))
