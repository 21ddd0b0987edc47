"""SIGMAS nodes: the pack's step schedules, and the NFE-first plan (SAMPLER + SIGMAS)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..samplers.budget import steps_for_nfe
from ..samplers.schedules import (
    AYS_MODELS,
    FEWSTEP_WINDOW,
    GITS_COEFFS,
    SCHEDULE_DEFAULTS,
    SCHEDULE_NAMES,
    get_sigmas,
)
from ._api import CATEGORY_PLANS, CATEGORY_SCHEDULERS, io, ui
from ._comfy_sampler import (
    PRESET_NAMES, PRESETS, SKIP_START_MAX_CFG, make_planned_singlestep_sampler, make_sampler,
)
from ._comfy_sampling import parameterization_for_model

logger = logging.getLogger(__name__)

__all__ = ["FewStepNFEPlan", "FewStepSchedule", "schedule_options", "sigmas_for_model"]

_SCHEDULE_TOOLTIP = (
    "How the noise levels of the steps are spaced. logsnr_uniform: equal steps in the half "
    "log-SNR (DPM-Solver's choice, good for few steps); logsnr_window: the same over the log-SNR "
    "window that matters at 4-10 steps (the few-step preset's); time_uniform / time_quadratic: "
    "equal steps in the model's time (on flow models such as SD3 or Flux the best at 2-3 steps); "
    "karras / exponential / polyexponential: k-diffusion's range schedules; ays / gits: "
    "published tables for SD 1.5 / SDXL / SVD; custom: your own list."
)


def schedule_options(
    schedule: str,
    rho: float = 0.0,
    table_model: str = "auto",
    gits_coeff: float = 1.2,
    custom_sigmas: str = "",
    sigma_min: float = 0.0,
    sigma_max: float = 0.0,
    lambda_start: float = 0.0,
    sigma_end: float = 0.0,
) -> dict[str, Any]:
    """The keyword options of ``samplers.schedules.get_sigmas(schedule, ...)`` from node widgets.

    Widgets that do not apply to ``schedule`` are ignored; ``rho = 0``, ``sigma_min/max = 0``
    and ``lambda_start / sigma_end = 0`` mean "the schedule's / model's default".
    """
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULE_NAMES}")
    accepted = SCHEDULE_DEFAULTS[schedule]
    params: dict[str, Any] = {}
    if "rho" in accepted and rho > 0.0:
        params["rho"] = float(rho)
    if "model" in accepted:
        params["model"] = table_model
    if "coeff" in accepted:
        params["coeff"] = float(gits_coeff)
    if "sigmas" in accepted:
        params["sigmas"] = custom_sigmas
    if "lambda_start" in accepted and lambda_start != 0.0:
        params["lambda_start"] = float(lambda_start)
    if "sigma_end" in accepted and sigma_end > 0.0:
        params["sigma_end"] = float(sigma_end)
    if sigma_min > 0.0:
        params["sigma_min"] = float(sigma_min)
    if sigma_max > 0.0:
        params["sigma_max"] = float(sigma_max)
    return params


def sigmas_for_model(
    model: Any, schedule: str, steps: int | None, denoise: float = 1.0, **widgets: Any
) -> torch.Tensor:
    """SIGMAS for a ComfyUI ``MODEL``: the schedule on the model's (patched) parameterisation."""
    parameterization = parameterization_for_model(model)
    return get_sigmas(schedule, steps, parameterization, denoise, **schedule_options(schedule, **widgets))


def _schedule_inputs() -> list:
    return [
        io.Float.Input(
            "rho",
            default=0.0,
            min=0.0,
            max=100.0,
            step=0.1,
            round=0.001,
            tooltip="karras / polyexponential: the rho exponent. 0 uses the schedule's "
            "default (karras 7, polyexponential 1). Ignored by other schedules.",
        ),
        io.Combo.Input(
            "table_model",
            options=list(AYS_MODELS),
            default="auto",
            tooltip="ays: which published table to use. auto picks sd15 for SD-style discrete "
            "models and svd for continuous-time (EDM, SVD) models. Ignored by other schedules.",
        ),
        io.Float.Input(
            "gits_coeff",
            default=1.2,
            min=min(GITS_COEFFS),
            max=max(GITS_COEFFS),
            step=0.05,
            round=0.01,
            tooltip="gits: the table set (larger spends more steps at high noise). "
            "Ignored by other schedules.",
        ),
        io.String.Input(
            "custom_sigmas",
            default="",
            multiline=True,
            placeholder="14.61, 4.0, 1.2, 0.3, 0",
            tooltip="custom: a decreasing list of sigmas, comma or space separated, used as given "
            "(its length sets the steps; denoise < 1 keeps the list's last steps); a final 0 is added "
            "if missing. Ignored by other schedules.",
        ),
        io.Float.Input(
            "sigma_min",
            default=0.0,
            min=0.0,
            max=10000.0,
            step=0.001,
            round=0.0001,
            tooltip="Override the model's smallest sigma (0 keeps the model's).",
        ),
        io.Float.Input(
            "sigma_max",
            default=0.0,
            min=0.0,
            max=10000.0,
            step=0.01,
            round=0.0001,
            tooltip="Override the model's largest sigma (0 keeps the model's; flow models: <= 1).",
        ),
    ]


def _window_inputs() -> list:
    return [
        io.Float.Input(
            "lambda_start",
            default=0.0,
            min=-20.0,
            max=0.0,
            step=0.05,
            round=0.001,
            optional=True,
            tooltip="logsnr_window: the half log-SNR where the uniform steps start (0: the default "
            f"{SCHEDULE_DEFAULTS['logsnr_window']['lambda_start']}; with the sampler's final_order 4, "
            f"{FEWSTEP_WINDOW['lambda_start']}). Earlier: fewer changed compositions, larger steps. "
            "Ignored by other schedules.",
        ),
        io.Float.Input(
            "sigma_end",
            default=0.0,
            min=0.0,
            max=100.0,
            step=0.001,
            round=0.0001,
            optional=True,
            tooltip="logsnr_window: the (VE) sigma where the steps end (0: the default "
            f"{SCHEDULE_DEFAULTS['logsnr_window']['sigma_end']}; with the sampler's final_order 4, "
            f"{FEWSTEP_WINDOW['sigma_end']}). Never below the model's sigma_min. Ignored by other schedules.",
        ),
    ]


def _check_schedule_widgets(schedule: Any, steps: Any) -> bool | str:
    if schedule is not None and schedule not in SCHEDULE_NAMES:
        return f"schedule {schedule!r} is not one of {list(SCHEDULE_NAMES)}"
    if steps is not None:
        if not isinstance(steps, int) or steps < 0 or steps > 10000:
            return f"steps must be an integer in 0..10000, got {steps!r}"
        if steps == 0 and schedule not in (None, "custom"):
            return "steps = 0 (use the list's own step count) is only for the custom schedule"
    return True


class FewStepSchedule(io.ComfyNode):
    """SIGMAS from one of the pack's schedules, computed on the model's own parameterisation."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepSchedule",
            display_name="FewStep Schedule",
            category=CATEGORY_SCHEDULERS,
            description="Noise levels (SIGMAS) for few-step sampling, computed from the model's own "
            "noise schedule (VE or flow). Connect to SamplerCustom(Advanced).",
            inputs=[
                io.Model.Input(
                    "model", tooltip="The model; its prediction type and sigma range set the schedule."
                ),
                io.Combo.Input(
                    "schedule",
                    options=list(SCHEDULE_NAMES),
                    default="logsnr_uniform",
                    tooltip=_SCHEDULE_TOOLTIP,
                ),
                io.Int.Input(
                    "steps",
                    default=8,
                    min=0,
                    max=10000,
                    tooltip="Number of steps. With a multistep solver each step is one model call. "
                    "Ignored by custom: the list sets the steps.",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Less than 1 keeps only the last part of a longer schedule "
                    "(img2img); 0 returns no steps.",
                ),
                *_schedule_inputs(),
                *_window_inputs(),
            ],
            outputs=[io.Sigmas.Output(tooltip="Decreasing noise levels ending in 0, one step per interval.")],
        )

    @classmethod
    def validate_inputs(cls, schedule=None, steps=None) -> bool | str:
        return _check_schedule_widgets(schedule, steps)

    @classmethod
    def execute(
        cls,
        model,
        schedule,
        steps,
        denoise,
        rho=0.0,
        table_model="auto",
        gits_coeff=1.2,
        custom_sigmas="",
        sigma_min=0.0,
        sigma_max=0.0,
        lambda_start=0.0,
        sigma_end=0.0,
    ) -> io.NodeOutput:
        sigmas = sigmas_for_model(
            model,
            schedule,
            None if steps == 0 or schedule == "custom" else steps,  # a custom list sets its own steps
            denoise,
            rho=rho,
            table_model=table_model,
            gits_coeff=gits_coeff,
            custom_sigmas=custom_sigmas,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            lambda_start=lambda_start,
            sigma_end=sigma_end,
        )
        return io.NodeOutput(sigmas)


class FewStepNFEPlan(io.ComfyNode):
    """Budget-first set-up: pick a solver preset and a number of model calls, get SAMPLER + SIGMAS."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepNFEPlan",
            display_name="FewStep NFE Plan",
            category=CATEGORY_PLANS,
            description="Give a budget of model calls (NFE); get the matching sampler and schedule. "
            "Single-step solvers spend several calls per step, so the step count is derived.",
            inputs=[
                io.Model.Input("model", tooltip="The model; its noise schedule sets the sigmas."),
                io.Combo.Input(
                    "preset",
                    options=list(PRESET_NAMES),
                    default="dpmpp_2m",
                    tooltip="Solver: " + "; ".join(f"{k}: {p.description}" for k, p in PRESETS.items()),
                ),
                io.Int.Input(
                    "nfe",
                    default=8,
                    min=1,
                    max=1000,
                    tooltip="Budget: number of model calls (NFE) for the whole run.",
                ),
                io.Combo.Input(
                    "schedule",
                    options=[s for s in SCHEDULE_NAMES if s != "custom"],
                    default="logsnr_uniform",
                    tooltip=_SCHEDULE_TOOLTIP,
                ),
                io.Float.Input(
                    "cfg",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Only for the displayed cost: the cfg you use in the guider. "
                    "cfg != 1 doubles the network work per model call.",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Less than 1 keeps only the last part of a longer schedule (img2img).",
                ),
            ],
            outputs=[
                io.Sampler.Output("sampler", tooltip="The solver, for SamplerCustom(Advanced)."),
                io.Sigmas.Output("sigmas", tooltip="The schedule with the step count that fits the budget."),
                io.String.Output(
                    "plan",
                    display_name="plan",
                    tooltip="Steps, model calls and network evaluations of this plan.",
                ),
            ],
        )

    @classmethod
    def execute(cls, model, preset, nfe, schedule, cfg, denoise=1.0) -> io.NodeOutput:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {PRESET_NAMES}")
        spec = PRESETS[preset]
        # the skip start saves the call at sigma_max, except where the sampler does not skip: one call,
        # a run that starts lower (denoise < 1), a cfg above its limit (._comfy_sampler)
        no_skip = None
        if spec.options.get("first_step") == "skip":
            if int(nfe) < 2:
                no_skip = "one call: no step to skip"
            elif float(denoise) < 1.0:
                no_skip = "denoise below 1 starts below the first sigma: no call to skip"
            elif float(cfg) > SKIP_START_MAX_CFG:
                no_skip = (f"cfg {float(cfg):g} is above {SKIP_START_MAX_CFG:g}: the gaussian first step, "
                           "with a call at the first sigma")
        skip = spec.options.get("first_step") == "skip" and no_skip is None
        plan = steps_for_nfe(spec.solver, int(nfe), spec.order, skip_start=skip)
        # a preset may come with its own schedule options (the few-step preset's window)
        window = spec.schedule_options.get(schedule, {})
        sigmas = sigmas_for_model(model, schedule, plan.steps, denoise, **window)
        if spec.solver == "singlestep" and len(sigmas) > 1:
            sampler = make_planned_singlestep_sampler(spec.options, list(plan.orders), sigmas.tolist())
        else:
            sampler = make_sampler(spec.solver, spec.options)
        if len(sigmas) < 2:  # denoise 0: nothing to sample, and the sampler returns the latent as it is
            text = (f"{preset}: denoise {float(denoise):g} leaves no step: 0 model calls "
                    "(the latent is returned as it is)")
        else:
            text = f"{preset}: {plan.summary(cfg, spec.label)}"
            if no_skip:
                text += f"; {no_skip}"
        logger.info("FewStep plan: %s", text)
        return io.NodeOutput(sampler, sigmas, text, ui=ui.PreviewText(text))
