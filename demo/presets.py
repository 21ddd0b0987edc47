"""The samplers the demo compares, each planned for a budget of model calls (NFE).

Rows of the demo's grid and table. DPM-Solver++ rows use the pack's samplers
(:mod:`..samplers`): multistep 2M / 3M and 3M with the UniC corrector of UniPC (Zhao et
al. 2023, arXiv 2302.04867; no extra calls), singlestep 3S with the DPM-Solver-fast order
allocation (Lu et al. 2022, arXiv 2206.00927, Sec. 3.4) for ``nfe - 1`` calls plus a
first-order step into sigma = 0, and DDIM as first-order
DPM-Solver++; the pack's few-step preset, and the same without the model call at sigma_max
(``first_step="skip"``, which spends the calls on one step more). Euler and Heun are ComfyUI's
baselines, from :mod:`.baselines`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ..samplers.budget import steps_for_nfe
from ..samplers.multistep import sample_dpmpp_multistep
from ..samplers.parameterization import Parameterization
from ..samplers.schedules import FEWSTEP_WINDOW, SKIP_WINDOW, get_sigmas
from ..samplers.singlestep import sample_dpmpp_singlestep
from .baselines import heun_steps_for_nfe, sample_euler, sample_heun

__all__ = ["PRESETS", "PRESET_NAMES", "Preset", "run_preset"]

PresetKind = Literal["multistep", "singlestep", "euler", "heun"]


@dataclass(frozen=True)
class Preset:
    """One sampler configuration: ``kind`` picks the driver, ``options`` go to it."""

    name: str
    kind: PresetKind
    order: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    baseline: bool = False
    schedule: str | None = None
    """A schedule of the preset's own; ``None`` uses the run's schedule."""
    schedule_options: dict[str, Any] = field(default_factory=dict)
    """Options of the preset's own schedule."""


PRESETS: tuple[Preset, ...] = (
    Preset("euler", "euler", baseline=True),
    Preset("heun", "heun", order=2, baseline=True),
    Preset("ddim", "multistep", order=1),
    Preset("dpmpp_2m", "multistep", order=2),
    Preset("dpmpp_3m", "multistep", order=3),
    Preset("dpmpp_3m_unipc", "multistep", order=3, options={"corrector": "bh2"}),
    Preset("dpmpp_3s", "singlestep", order=3),
    # the pack's few-step preset: 2M + UniC, the gaussian first step and the order-4 last step
    # (gaussian weights) on the few-step log-SNR window (docs/benchmarks.md; the NFE Plan's dpmpp_2m_fast)
    Preset("fewstep_2m_unipc", "multistep", order=2,
           options={"corrector": "bh2", "final_order": 4, "final_weights": "gaussian",
                    "first_step": "gaussian"},
           schedule="logsnr_window", schedule_options=FEWSTEP_WINDOW),
    # the same without the model call at sigma_max, on its own window (the NFE Plan's dpmpp_2m_fast_skip)
    Preset("fewstep_2m_skip", "multistep", order=2,
           options={"corrector": "bh2", "final_order": 4, "final_weights": "gaussian", "first_step": "skip"},
           schedule="logsnr_window", schedule_options=SKIP_WINDOW),
)
PRESET_NAMES: tuple[str, ...] = tuple(p.name for p in PRESETS)


def _sigmas(steps: int, schedule: str, parameterization: Parameterization, **options: Any) -> Tensor:
    return get_sigmas(schedule, steps, parameterization, **options)


def run_preset(
    preset: Preset,
    model: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    nfe: int,
    parameterization: Parameterization,
    schedule: str = "karras",
) -> tuple[Tensor, int]:
    """Sample ``model`` from ``noise`` (unit variance) with at most ``nfe`` model calls.

    Returns the samples and the number of calls actually made (Heun makes ``2 * steps - 1``,
    so an even budget leaves one call unused).
    """
    calls = 0
    options = preset.schedule_options if preset.schedule else {}
    schedule = preset.schedule or schedule

    def counted(x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        nonlocal calls
        calls += 1
        return model(x, sigma, **kwargs)

    if preset.kind == "heun":
        sigmas = _sigmas(heun_steps_for_nfe(nfe), schedule, parameterization, **options)
    elif preset.kind == "singlestep":
        orders = list(steps_for_nfe("singlestep", nfe, preset.order).orders)
        sigmas = _sigmas(len(orders), schedule, parameterization, **options)
    else:
        skip_start = preset.options.get("first_step") == "skip" and nfe > 1
        sigmas = _sigmas(steps_for_nfe("multistep", nfe, preset.order, skip_start=skip_start).steps, schedule,
                         parameterization, **options)
    x = noise * float(sigmas[0])
    with torch.no_grad():
        if preset.kind == "euler":
            out = sample_euler(counted, x, sigmas, disable=True)
        elif preset.kind == "heun":
            out = sample_heun(counted, x, sigmas, disable=True)
        elif preset.kind == "multistep":
            out = sample_dpmpp_multistep(
                counted, x, sigmas, disable=True, parameterization=parameterization,
                order=preset.order, resume_history=False, **preset.options,
            )
        else:
            out = sample_dpmpp_singlestep(
                counted, x, sigmas, disable=True, parameterization=parameterization,
                order=preset.order, orders=orders, **preset.options,
            )
    return out, calls
