"""Our sampler functions as ComfyUI ``SAMPLER`` objects, and the named solver presets.

:func:`comfy_sampler_function` is the function a ``comfy.samplers.KSAMPLER`` calls. It finds
the model's ``model_sampling`` (respecting object patches), builds the
:class:`~..samplers.parameterization.Parameterization` once per run and calls the core sampler
of the chosen solver family. Inpainting masks, previews/progress (``callback``) and
``disable`` are handled by ``KSAMPLER`` and passed through unchanged.

:data:`PRESETS` is the single table behind the KSampler dropdown names (``fewstep_<name>``)
and the NFE-first plan node.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import comfy.samplers
import torch

from ..samplers.adaptive import sample_dpmpp_adaptive
from ..samplers.fitted import sample_fitted_multistep
from ..samplers.multistep import sample_dpmpp_multistep
from ..samplers.schedules import FEWSTEP_WINDOW, SKIP_WINDOW
from ..samplers.singlestep import sample_dpmpp_singlestep
from ._comfy_sampling import parameterization_for_denoiser

logger = logging.getLogger(__name__)

SolverFamily = Literal["multistep", "singlestep", "adaptive"]
SOLVER_FAMILIES: tuple[str, ...] = get_args(SolverFamily)

_SAMPLERS: dict[str, Callable[..., Any]] = {
    "multistep": sample_dpmpp_multistep,
    "singlestep": sample_dpmpp_singlestep,
    "adaptive": sample_dpmpp_adaptive,
}
#: solvers that only run with the result of a calibration (not in the presets or the NFE planner)
_CALIBRATED_SAMPLERS: dict[str, Callable[..., Any]] = {"fitted": sample_fitted_multistep}

__all__ = [
    "NEUTRAL_OPTIONS",
    "PRESETS",
    "PRESET_NAMES",
    "SKIP_START_MAX_CFG",
    "SOLVER_FAMILIES",
    "Preset",
    "SolverFamily",
    "comfy_sampler_function",
    "guidance_scale",
    "make_fitted_sampler",
    "make_sampler",
    "normalize_options",
    "supported_options",
]


@dataclass(frozen=True)
class Preset:
    """A named DPM-Solver++ configuration (paper names; Lu et al. 2022, arXiv 2211.01095)."""

    solver: SolverFamily
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    label: str = ""  # the method's short name where the solver and order alone do not give it
    #: schedule name -> FewStep Schedule widget values the preset is meant to run with
    schedule_options: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @property
    def order(self) -> int:
        return int(self.options.get("order", 2))


PRESETS: dict[str, Preset] = {
    "dpmpp_2m": Preset("multistep", {"order": 2}, "DPM-Solver++(2M), deterministic, lower order final"),
    "dpmpp_3m": Preset("multistep", {"order": 3}, "DPM-Solver++(3M), deterministic, lower order final"),
    "dpmpp_2m_sde": Preset("multistep", {"order": 2, "eta": 1.0}, "SDE-DPM-Solver++(2M), eta 1",
                           "SDE-DPM-Solver++(2M), eta 1"),
    "dpmpp_3m_sde": Preset("multistep", {"order": 3, "eta": 1.0}, "SDE-DPM-Solver++(3M), eta 1",
                           "SDE-DPM-Solver++(3M), eta 1"),
    "dpmpp_2s": Preset("singlestep", {"order": 2}, "DPM-Solver++(2S), 2 model calls per step"),
    "dpmpp_3s": Preset("singlestep", {"order": 3}, "DPM-Solver++(3S), 3 model calls per step"),
    "unipc_bh2": Preset(
        "multistep",
        {"order": 3, "corrector": "bh2"},
        "DPM-Solver++(3M) predictor with the UniC-bh2 corrector (Zhao et al. 2023, arXiv 2302.04867)",
        "DPM-Solver++(3M) + UniC-bh2",
    ),
    "dpmpp_2m_fast": Preset(
        "multistep",
        {"order": 2, "corrector": "bh2", "final_order": 4, "final_weights": "gaussian",
         "first_step": "gaussian"},
        "the few-step preset: DPM-Solver++(2M) with the UniC-bh2 corrector, a first step exact for "
        "Gaussian data of the model's sigma_data and an order-4 last step with Gaussian-fitted weights; "
        "use it with the fewstep_window scheduler at 5-10 steps",
        "DPM-Solver++(2M) + UniC-bh2 + gaussian first step + order-4 last step (gaussian weights)",
        {"logsnr_window": FEWSTEP_WINDOW},
    ),
    "dpmpp_2m_fast_skip": Preset(
        "multistep",
        {"order": 2, "corrector": "bh2", "final_order": 4, "final_weights": "gaussian", "first_step": "skip"},
        "the few-step preset without the model call at the first sigma (first_step skip: N steps cost "
        "N-1 calls, the data mean is solved from the next call), for sampling without or with moderate "
        "guidance (cfg up to about 5; guidance-distilled models at cfg 1); use it with the "
        "fewstep_skip_window scheduler at 5-11 steps",
        "DPM-Solver++(2M) + UniC-bh2 + skip start + order-4 last step (gaussian weights)",
        {"logsnr_window": SKIP_WINDOW},
    ),
}
PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)

NEUTRAL_OPTIONS: dict[str, Any] = {
    "eta": 0.0, "corrector": "none", "final_order": 1, "second_step": "log_snr", "first_step": "ddim",
}
"""Options that change the method: refused (not dropped) by a solver without them."""


def supported_options(solver: SolverFamily) -> frozenset[str]:
    """Keyword options the core sampler of ``solver`` accepts (beyond the k-diffusion arguments)."""
    if solver not in _SAMPLERS:
        raise ValueError(f"solver family must be one of {SOLVER_FAMILIES}, got {solver!r}")
    params = inspect.signature(_SAMPLERS[solver]).parameters
    base = {"model", "x", "sigmas", "extra_args", "callback", "disable"}
    return frozenset(name for name, p in params.items() if name not in base and p.kind is not p.VAR_KEYWORD)


def normalize_options(
    solver: SolverFamily, options: Mapping[str, Any]
) -> tuple[SolverFamily, dict[str, Any]]:
    """Drop the options ``solver`` does not take, or refuse them when they would change the result.

    * ``eta``, ``corrector`` and ``final_order`` change the method; a solver without them refuses
      a non-neutral value (``eta > 0``, a corrector, ``final_order > 1``) with ``ValueError``.
    * Other options only tune a policy another solver does not have (``lower_order_final``,
      ``euler_at_final``, ``solver_type`` for adaptive, ...) and are dropped.

    Dropped options are logged at DEBUG level.
    """
    options = dict(options)
    accepted = supported_options(solver)
    for key in sorted(set(options) - accepted):
        value = options.pop(key)
        if key in NEUTRAL_OPTIONS and value != NEUTRAL_OPTIONS[key]:
            raise ValueError(
                f"the {solver} solver does not support {key}={value!r}; use the multistep solver"
            )
        logger.debug("FewStep: option %s=%r does not apply to the %s solver", key, value, solver)
    return solver, options


def comfy_sampler_function(
    model: Any,
    x: Any,
    sigmas: Any,
    extra_args: dict | None = None,
    callback: Callable | None = None,
    disable: bool | None = None,
    *,
    solver: SolverFamily = "multistep",
    **options: Any,
) -> Any:
    """k-diffusion sampler function for ``comfy.samplers.KSAMPLER``: our ``solver`` on ComfyUI's model.

    The model's parameterisation is read from the denoiser unless ``parameterization`` is
    given in ``options``.
    """
    if len(sigmas) <= 1:
        return x
    calibrated = options.pop("calibrated_sigmas", None)
    if calibrated is not None:
        options["orders"] = orders_for_part(sigmas, calibrated, options["orders"])
    planned = options.pop("planned_sigmas", None)
    if planned is not None:  # an NFE plan's orders: its own sigmas or a part of them
        part = _part_orders(sigmas, planned, options["orders"])
        if part is None:
            logger.info("FewStep: these sigmas are not the NFE plan's (or a SplitSigmas part of them); the "
                        "%d steps run as the sampler node runs them: the preset's order on each, first "
                        "order on the last", len(sigmas) - 1)
            options.pop("orders")
        else:
            options["orders"] = part
    if options.get("parameterization") is None:
        options["parameterization"] = parameterization_for_denoiser(model)
    if solver == "multistep":
        options.setdefault("history_source", history_source(model))
        if options.get("first_step") == "skip":
            scale = guidance_scale(model)
            if scale is not None and scale > SKIP_START_MAX_CFG:
                logger.info("FewStep: first_step skip is made for cfg up to about 5; with the guider's cfg %g "
                            "(above %g) the run takes the gaussian first step instead, with a model call at "
                            "the first sigma (%d calls for %d steps)", scale, SKIP_START_MAX_CFG,
                            len(sigmas) - 1, len(sigmas) - 1)
                options["first_step"] = "gaussian"
    function = _SAMPLERS.get(solver) or _CALIBRATED_SAMPLERS[solver]
    return function(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)


#: above this classifier-free guidance scale ``first_step="skip"`` falls back to ``gaussian``: on the
#: guided mixtures of ``bench/guidance_check.py`` the skip start is several times worse on some
#: problems from cfg 7 and blows up from cfg 8 (up to 79x at 4 calls, 3x at 5; 562x at cfg 12)
SKIP_START_MAX_CFG = 7.0


def guidance_scale(model: Any) -> float | None:
    """The largest classifier-free guidance scale of ComfyUI's guider behind the denoiser
    (``cfg``, and ``cfg1`` / ``cfg2`` of the dual-CFG guider), or None when there is none to read."""
    guider = getattr(model, "inner_model", None)
    scales = [getattr(guider, name, None) for name in ("cfg", "cfg1", "cfg2")]
    scales = [float(v) for v in scales if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return max(scales) if scales else None


def history_source(model: Any) -> str:
    """What makes the model outputs of a run, as a key for :mod:`..samplers.history`: the model
    (its weights object, weight patches and object patches), the guider's cfg and the
    conditioning (shape and strided values of each cross-attention tensor). A split schedule's
    second part resumes the first part's history only with the same key, so a refiner never
    extrapolates through the base model's predictions. '' when the denoiser is not ComfyUI's (no
    key, any history matches)."""
    guider = getattr(model, "inner_model", None)
    patcher = getattr(guider, "model_patcher", None)
    if patcher is None:
        return ""
    parts = [str(id(getattr(patcher, "model", patcher))), str(getattr(patcher, "patches_uuid", "")),
             repr(getattr(guider, "cfg", None))]
    # object patches (a ModelSampling node's model_sampling, a patched module) by identity
    object_patches = getattr(patcher, "object_patches", None) or {}
    parts += [f"{name}:{id(obj)}" for name, obj in sorted(object_patches.items())]
    for name, conds in sorted((getattr(guider, "original_conds", None) or {}).items()):
        for cond in conds or ():
            tensor = cond.get("cross_attn") if isinstance(cond, dict) else None
            if isinstance(tensor, torch.Tensor):
                flat = tensor.detach().reshape(-1)
                probe = flat[:: max(1, flat.numel() // 16)][:16].float().cpu().tolist()
                parts.append(f"{name}:{tuple(tensor.shape)}:{probe}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def make_sampler(solver: SolverFamily, options: Mapping[str, Any]) -> comfy.samplers.KSAMPLER:
    """A ComfyUI ``SAMPLER`` running ``solver`` with ``options`` (after :func:`normalize_options`)."""
    solver, options = normalize_options(solver, options)
    return comfy.samplers.KSAMPLER(comfy_sampler_function, extra_options={"solver": solver, **options})


def _part_orders(sigmas: Any, bound: list[float], orders: list[int]) -> list[int] | None:
    """The per-interval ``orders`` of the schedule ``bound`` for ``sigmas`` when they are the whole
    schedule or its first or last part (SplitSigmas); None otherwise."""
    values = [float(s) for s in sigmas]
    n = len(values) - 1  # intervals

    def same(part: list[float]) -> bool:
        return len(part) == len(values) and all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-8)
                                                for a, b in zip(values, part))

    if same(bound[-len(values):]):
        return list(orders[len(orders) - n:])
    if same(bound[:len(values)]):
        return list(orders[:n])
    return None


def orders_for_part(sigmas: Any, calibrated: list[float], orders: list[int]) -> list[int]:
    """The per-interval orders of a calibrated singlestep schedule for ``sigmas``: the whole schedule,
    or its first or last part (SplitSigmas); anything else raises with what to connect."""
    part = _part_orders(sigmas, calibrated, orders)
    if part is not None:
        return part
    values = [float(s) for s in sigmas]
    raise ValueError(
        "this singlestep sampler was calibrated for the sigmas "
        f"[{', '.join(f'{v:.5g}' for v in calibrated)}] but got [{', '.join(f'{v:.5g}' for v in values)}]. "
        "Connect the SIGMAS of the same FewStep Calibrate Steps / Load Schedule node (whole, or split with "
        "SplitSigmas), or calibrate a multistep preset, which runs on any sigmas."
    )


def make_calibrated_singlestep_sampler(options: Mapping[str, Any], orders: list[int],
                                       sigmas: list[float]) -> comfy.samplers.KSAMPLER:
    """A ComfyUI ``SAMPLER`` for a calibrated singlestep schedule: its per-interval orders, bound to
    the calibrated sigmas (or a part of them, :func:`orders_for_part`)."""
    solver, options = normalize_options("singlestep", options)
    return comfy.samplers.KSAMPLER(comfy_sampler_function, extra_options={
        "solver": solver, **options, "orders": list(orders), "calibrated_sigmas": [float(v) for v in sigmas]})


def make_planned_singlestep_sampler(options: Mapping[str, Any], orders: list[int],
                                    sigmas: list[float]) -> comfy.samplers.KSAMPLER:
    """A ComfyUI ``SAMPLER`` for an NFE plan's singlestep schedule: the plan's per-interval orders on
    its own sigmas or a SplitSigmas part of them; on any other sigmas the sampler node's default
    (the preset's order on every step, first order on the last)."""
    solver, options = normalize_options("singlestep", options)
    return comfy.samplers.KSAMPLER(comfy_sampler_function, extra_options={
        "solver": solver, **options, "orders": list(orders), "planned_sigmas": [float(v) for v in sigmas]})


def make_fitted_sampler(coefficients: list[list[float]], sigmas: list[float], history: int,
                        first_prediction: torch.Tensor | None = None) -> comfy.samplers.KSAMPLER:
    """A ComfyUI ``SAMPLER`` for a fitted solver: its coefficients (and a mean first step's
    prediction), bound to the sigmas they were fitted on."""
    return comfy.samplers.KSAMPLER(comfy_sampler_function, extra_options={
        "solver": "fitted", "coefficients": [list(row) for row in coefficients], "fitted_sigmas": list(sigmas),
        "history": int(history), "first_prediction": first_prediction})
