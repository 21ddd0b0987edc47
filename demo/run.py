"""The demo run: every preset at every NFE budget from the same noise, against a reference.

The reference is the same ODE solved accurately (3M DPM-Solver++ with many steps); a
sampler's error at a budget is the per-sample RMSE of its result to the reference, in
pixel units of ``[-1, 1]`` images, reduced by the median over samples.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..samplers.parameterization import Parameterization
from .network import EDMDenoiser
from .presets import PRESETS, Preset, run_preset

__all__ = ["DemoResult", "fixed_noise", "reference_samples", "rmse_per_sample", "run_demo"]

logger = logging.getLogger(__name__)

REFERENCE = Preset("reference (dpmpp_3m)", "multistep", order=3)


@dataclass
class DemoResult:
    """Samples, errors and call counts of one demo run, indexed ``[preset][nfe]``."""

    nfes: list[int]
    presets: list[Preset]
    reference: Tensor
    reference_steps: int
    schedule: str
    samples: dict[str, dict[int, Tensor]] = field(default_factory=dict)
    errors: dict[str, dict[int, float]] = field(default_factory=dict)
    calls: dict[str, dict[int, int]] = field(default_factory=dict)
    seconds: float = 0.0


def fixed_noise(n: int, shape: Sequence[int], seed: int) -> Tensor:
    """Unit-variance starting noise ``(n, *shape)`` from a CPU generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, *shape), generator=gen, dtype=torch.float32)


def rmse_per_sample(x: Tensor, ref: Tensor) -> Tensor:
    """Root-mean-square difference per sample, ``(B,)``, computed in float64."""
    diff = (x.to(torch.float64) - ref.to(torch.float64)).flatten(1)
    return diff.square().mean(dim=1).sqrt()


def parameterization_of(denoiser: EDMDenoiser) -> Parameterization:
    """The VE parameterisation with the teacher's sigma range (EDM: 0.002 .. 80)."""
    return Parameterization("ve", denoiser.sigma_min, denoiser.sigma_max, family="edm",
                            sigma_data=denoiser.sigma_data)


def reference_samples(
    denoiser: EDMDenoiser, noise: Tensor, steps: int = 200, schedule: str = "karras"
) -> Tensor:
    """The ODE solution from ``noise``: 3M DPM-Solver++ with ``steps`` steps."""
    out, _ = run_preset(REFERENCE, denoiser, noise, steps, parameterization_of(denoiser), schedule)
    return out


def run_demo(
    denoiser: EDMDenoiser,
    nfes: Sequence[int],
    presets: Sequence[Preset] = PRESETS,
    samples: int = 64,
    seed: int = 0,
    schedule: str = "karras",
    reference_steps: int = 200,
    on_progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run every preset at every budget in ``nfes`` from the same seeded noise.

    ``on_progress(label)`` is called after each finished run (the reference included), so
    a caller can drive a progress bar over ``1 + len(presets) * len(nfes)`` units.
    """
    start = time.perf_counter()
    cfg = denoiser.config
    noise = fixed_noise(samples, (cfg.channels, cfg.resolution, cfg.resolution), seed)
    p = parameterization_of(denoiser)
    reference = reference_samples(denoiser, noise, reference_steps, schedule)
    if on_progress is not None:
        on_progress("reference")
    result = DemoResult(list(nfes), list(presets), reference, reference_steps, schedule)
    for preset in presets:
        result.samples[preset.name], result.errors[preset.name], result.calls[preset.name] = {}, {}, {}
        for nfe in nfes:
            x, calls = run_preset(preset, denoiser, noise, nfe, p, schedule)
            result.samples[preset.name][nfe] = x
            result.errors[preset.name][nfe] = float(rmse_per_sample(x, reference).median())
            result.calls[preset.name][nfe] = calls
            if on_progress is not None:
                on_progress(f"{preset.name} nfe={nfe}")
    result.seconds = time.perf_counter() - start
    logger.debug("demo sampling took %.1fs", result.seconds)
    return result
