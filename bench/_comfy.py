"""Drive ComfyUI's built-in samplers and schedulers with an exact denoiser (benchmark only).

ComfyUI is imported from ``COMFYUI_PATH`` in CPU mode. Its sampler functions are called
directly (``KSAMPLER.sampler_function`` with its ``extra_options``), with ``model`` a thin object
that evaluates the exact denoiser and exposes the attributes the samplers look up
(``model.inner_model.inner_model.model_sampling`` and
``model.inner_model.model_patcher.get_model_object("model_sampling")``). Schedules come from
``comfy.samplers.calculate_sigmas`` on a real ``ModelSampling*`` object, with KSampler's
discard-penultimate-sigma rule applied to the samplers that use it.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

#: samplers that need a CFG guider (post-CFG hook for the unconditional prediction)
NEEDS_GUIDER = ("_cfg_pp",)
#: NFE set at run time by tolerances, not by the schedule
ADAPTIVE = ("dpm_adaptive",)
#: samplers that inject noise with their default options (pathwise error is not their goal)
STOCHASTIC = (
    "euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "res_multistep_ancestral", "er_sde",
    "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
)
#: deterministic configurations of stochastic samplers reachable through ComfyUI's sampler nodes
ODE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp_2m_sde(eta=0)": ("dpmpp_2m_sde", {"eta": 0.0}),
    "dpmpp_2m_sde_heun(eta=0)": ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}),
    "dpmpp_3m_sde(eta=0)": ("dpmpp_3m_sde", {"eta": 0.0}),
    "dpmpp_2s_ancestral(eta=0)": ("dpmpp_2s_ancestral", {"eta": 0.0}),
    "dpmpp_sde(eta=0)": ("dpmpp_sde", {"eta": 0.0}),
    # SamplerER_SDE with solver_type "ODE": s_noise 0 and the noise scaler x ** (eta + 1) at eta 0
    "er_sde(ode)": ("er_sde", {"s_noise": 0.0, "noise_scaler": lambda x: x, "max_stage": 3}),
    # SamplerSASolver with eta 0: tau = 0 everywhere (its node's default orders, predictor 3, corrector 4)
    "sa_solver(eta=0)": ("sa_solver", {"tau_func": lambda sigma: 0.0, "s_noise": 0.0}),
    "sa_solver_pece(eta=0)": ("sa_solver_pece", {"tau_func": lambda sigma: 0.0, "s_noise": 0.0}),
}


def import_comfy() -> Any | None:
    """Import ComfyUI in CPU mode from ``COMFYUI_PATH``; None when it is not set.

    A ``COMFYUI_PATH`` that is set but unusable (not a checkout, or its requirements missing) stops
    the benchmark with a message rather than dropping ComfyUI's rows from the tables silently.
    """
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        return None
    if not (Path(root) / "comfy").is_dir():
        raise SystemExit(f"COMFYUI_PATH={root} is not a ComfyUI checkout (no comfy/ folder in it); "
                         "point it at one, or unset it to run without ComfyUI's rows")
    if root not in sys.path:
        sys.path.insert(0, root)
    # imported by name: this benchmark is the one place outside nodes/ that drives ComfyUI, and
    # only when asked to (COMFYUI_PATH); the pack itself never imports it
    try:
        cli_args = importlib.import_module("comfy.cli_args")
        cli_args.args.cpu = True  # what `main.py --cpu` sets, before the device probe
        for name in ("comfy.model_management", "comfy.model_sampling", "comfy.samplers",
                     "comfy.k_diffusion.sampling"):
            importlib.import_module(name)
    except ImportError as exc:
        raise SystemExit(f"ComfyUI at COMFYUI_PATH={root} cannot be imported here ({exc}); check that it "
                         "is a whole ComfyUI checkout with its requirements installed in this Python "
                         "(pip install -r requirements.txt there), or unset COMFYUI_PATH") from None
    return sys.modules["comfy"]


def model_sampling_for(comfy: Any, range_preset: Any) -> Any:
    """A ComfyUI ``ModelSampling`` object for one of :data:`RANGE_PRESETS`."""
    ms_mod = comfy.model_sampling
    if range_preset.family == "eps":
        cls = type("MS", (ms_mod.ModelSamplingDiscrete, ms_mod.EPS), {})
        return cls()
    if range_preset.family == "edm":
        cls = type("MS", (ms_mod.ModelSamplingContinuousEDM, ms_mod.EPS), {})
        ms = cls()
        ms.set_parameters(range_preset.sigma_min, range_preset.sigma_max, 1.0)
        return ms
    if range_preset.family == "flow":
        cls = type("MS", (ms_mod.ModelSamplingDiscreteFlow, ms_mod.CONST), {})
        ms = cls()
        ms.set_parameters(shift=range_preset.shift)
        return ms
    raise ValueError(f"no ComfyUI model sampling for family {range_preset.family!r}")


class _Patcher:
    def __init__(self, ms: Any) -> None:
        self._ms = ms

    def get_model_object(self, name: str) -> Any:
        if name != "model_sampling":
            raise KeyError(name)
        return self._ms


class _Inner:
    def __init__(self, ms: Any) -> None:
        self.inner_model = type("BaseModel", (), {"model_sampling": ms})()
        self.model_patcher = _Patcher(ms)


@dataclass
class ComfyModel:
    """``model(x, sigma, **extra_args)`` for ComfyUI's samplers around a denoiser callable."""

    denoiser: Any
    model_sampling: Any
    inner_model: Any = field(init=False)

    def __post_init__(self) -> None:
        self.inner_model = _Inner(self.model_sampling)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor:
        return self.denoiser(x, sigma, **extra_args)


@dataclass(frozen=True)
class ComfySampler:
    name: str
    base: str
    options: dict[str, Any]
    stochastic: bool


def sampler_list(comfy: Any, include_stochastic: bool = False) -> tuple[list[ComfySampler], list[str]]:
    """Every built-in sampler the benchmark drives, and the names it skips (with reasons)."""
    names = list(comfy.samplers.SAMPLER_NAMES)
    out: list[ComfySampler] = []
    skipped: list[str] = []
    stochastic: list[str] = []
    for name in names:
        if name == "ddim":
            continue  # = euler (random inpaint noise only)
        if any(tag in name for tag in NEEDS_GUIDER):
            skipped.append(f"{name} (needs a CFG guider)")
            continue
        if name in ADAPTIVE:
            skipped.append(f"{name} (NFE set by tolerances, not by the schedule)")
            continue
        if name in STOCHASTIC and not include_stochastic:
            stochastic.append(name)
            continue
        out.append(ComfySampler(name, name, {}, name in STOCHASTIC))
    if stochastic:
        skipped.append(
            "the stochastic samplers with their default noise (" + ", ".join(stochastic) + "; pathwise "
            "error against the ODE solution is not what they optimise; the deterministic configurations "
            "that ComfyUI's sampler nodes offer are run: eta=0 for the DPM-Solver++ SDE samplers and "
            "SA-Solver, solver type ODE for ER-SDE)"
        )
    for label, (base, options) in ODE_VARIANTS.items():
        out.append(ComfySampler(label, base, options, False))
    return out, skipped


def scheduler_names(comfy: Any) -> list[str]:
    return list(comfy.samplers.SCHEDULER_NAMES)


def comfy_sigmas(comfy: Any, ms: Any, scheduler: str, steps: int, sampler: str) -> torch.Tensor:
    """KSampler's schedule: ``calculate_sigmas`` plus the discard-penultimate rule."""
    discard = sampler in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps + 1 if discard else steps).cpu()
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def start_state(
    ms: Any, sigmas: torch.Tensor, x_start: torch.Tensor, noise: torch.Tensor | None
) -> torch.Tensor:
    """The state a run on a ComfyUI schedule starts from, for trajectories that start at ``x_start``.

    Every run starts from the exact marginal sample ``x_start`` at the model's ``sigma_max``. One
    ComfyUI scheduler, ``ddim_uniform``, starts lower (at the first of its strided timesteps: 5.1
    for SD1.5 at 5 steps, 0.80 for flow with shift 1). There KSampler starts from
    ``model_sampling.noise_scaling(sigmas[0], noise, empty latent)``: the same noise scaled to that
    sigma, without data content. A schedule that starts below ``sigma_max`` gets that state, built
    from the trajectory's own noise, so its result is the one ComfyUI gives for the same seed.
    """
    sigma0 = sigmas[:1].to(torch.float64)
    if float(sigma0) >= float(ms.sigma_max) * (1.0 - 1e-5):
        return x_start
    if noise is None:
        raise ValueError("a schedule that starts below sigma_max needs the trajectories' noise "
                         "(Problem.noise)")
    eps = noise.to(torch.float64)
    return ms.noise_scaling(sigma0, eps, torch.zeros_like(eps), max_denoise=False).to(x_start.dtype)


def sampler_function(comfy: Any, sampler: ComfySampler):
    """``(fn, extra_options)`` of ComfyUI's KSAMPLER for a sampler entry."""
    ks = comfy.samplers.sampler_object(sampler.base)
    options = dict(ks.extra_options)
    options.update(sampler.options)
    return ks.sampler_function, options
