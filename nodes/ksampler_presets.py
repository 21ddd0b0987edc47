"""``fewstep_*`` names in the plain KSampler / KSamplerSelect / BasicScheduler dropdowns.

ComfyUI 0.3.64 has no registration API for samplers or schedulers; its dropdowns read module
lists (``comfy.samplers.SAMPLER_NAMES`` is ``KSampler.SAMPLERS``, ``SCHEDULER_NAMES`` is
``KSampler.SCHEDULERS``) and resolve a sampler name through
``comfy.k_diffusion.sampling.sample_<name>`` and a scheduler name through
``comfy.samplers.SCHEDULER_HANDLERS``. :func:`register_ksampler_presets` adds our prefixed names
there in the only safe way:

* append-only and in place (the list objects are never rebound, so every dropdown that holds
  a reference sees the names);
* idempotent (a second call adds nothing);
* never shadowing: a name that already exists and is not ours is left alone (and logged).

The pack's SAMPLER/SIGMAS nodes do not need this; it only makes the presets usable from the
stock KSampler. Saved workflows using a ``fewstep_*`` name fail validation where the pack is not
installed. Set the environment variable ``FEWSTEP_KSAMPLER_PRESETS=0`` to skip it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import comfy.k_diffusion.sampling as k_diffusion_sampling
import comfy.samplers

from ..samplers.schedules import FEWSTEP_WINDOW, SKIP_WINDOW, get_sigmas
from ._comfy_sampler import PRESETS, comfy_sampler_function
from ._comfy_sampling import parameterization_from_model_sampling

logger = logging.getLogger(__name__)

PREFIX = "fewstep_"
ENV_SWITCH = "FEWSTEP_KSAMPLER_PRESETS"

SAMPLER_PRESETS: dict[str, str] = {PREFIX + name: name for name in PRESETS}
"""KSampler sampler name -> preset name in :data:`._comfy_sampler.PRESETS`."""

SCHEDULER_PRESETS: dict[str, str] = {
    PREFIX + "logsnr": "logsnr_uniform",
    PREFIX + "window": "logsnr_window",
    PREFIX + "skip_window": "logsnr_window",
    PREFIX + "time_uniform": "time_uniform",
    PREFIX + "time_quadratic": "time_quadratic",
    PREFIX + "ays": "ays",
    PREFIX + "gits": "gits",
}
"""KSampler scheduler name -> schedule name in ``samplers.schedules``."""

SCHEDULER_OPTIONS: dict[str, dict[str, float]] = {
    PREFIX + "window": FEWSTEP_WINDOW,
    PREFIX + "skip_window": SKIP_WINDOW,
}
"""Options of a KSampler scheduler preset: ``fewstep_window`` is the few-step preset's window
(for ``fewstep_dpmpp_2m_fast``; see ``samplers.schedules.FEWSTEP_WINDOW``), ``fewstep_skip_window``
that of the preset without the first call (``fewstep_dpmpp_2m_fast_skip``, whose N steps cost N-1
calls; ``samplers.schedules.SKIP_WINDOW``)."""

_MARK = "_fewstep_preset"

__all__ = ["PREFIX", "SAMPLER_PRESETS", "SCHEDULER_PRESETS", "register_ksampler_presets"]


def _sampler_function(preset: str) -> Callable[..., Any]:
    spec = PRESETS[preset]

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return comfy_sampler_function(
            model,
            x,
            sigmas,
            extra_args=extra_args,
            callback=callback,
            disable=disable,
            solver=spec.solver,
            **{**spec.options, **options},
        )

    sample.__name__ = sample.__qualname__ = f"sample_{PREFIX}{preset}"
    sample.__doc__ = f"FewStep preset {preset!r}: {spec.description}."
    setattr(sample, _MARK, preset)
    return sample


def _scheduler_function(schedule: str, options: dict[str, float] | None = None) -> Callable[..., Any]:
    options = dict(options or {})

    def scheduler(model_sampling, steps):
        parameterization = parameterization_from_model_sampling(model_sampling)
        return get_sigmas(schedule, int(steps), parameterization, **options)

    scheduler.__name__ = scheduler.__qualname__ = f"{PREFIX}{schedule}_scheduler"
    setattr(scheduler, _MARK, schedule)
    return scheduler


def _is_ours(obj: Any) -> bool:
    return getattr(obj, _MARK, None) is not None


def _append(names: list, name: str) -> None:
    if name not in names:
        names.append(name)


def register_ksampler_presets() -> list[str]:
    """Add the ``fewstep_*`` samplers and schedulers to ComfyUI's lists; return the names added now.

    Safe to call any number of times (see the module docstring).
    """
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        logger.info("FewStep: %s is off; the KSampler dropdown presets are not registered", ENV_SWITCH)
        return []
    added: list[str] = []
    sampler_lists = [comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES]
    if comfy.samplers.KSampler.SAMPLERS is not comfy.samplers.SAMPLER_NAMES:  # another pack rebound it
        sampler_lists.append(comfy.samplers.KSampler.SAMPLERS)
    for name, preset in SAMPLER_PRESETS.items():
        attr = "sample_" + name
        existing = getattr(k_diffusion_sampling, attr, None)
        if existing is not None and not _is_ours(existing):
            logger.warning(
                "FewStep: sampler name %r is taken by another implementation; not registering it", name
            )
            continue
        if existing is None:
            setattr(k_diffusion_sampling, attr, _sampler_function(preset))
        if any(name not in names for names in sampler_lists):
            added.append(name)
        for names in sampler_lists:
            _append(names, name)

    handlers = comfy.samplers.SCHEDULER_HANDLERS
    scheduler_lists = [comfy.samplers.SCHEDULER_NAMES]
    if comfy.samplers.KSampler.SCHEDULERS is not comfy.samplers.SCHEDULER_NAMES:
        scheduler_lists.append(comfy.samplers.KSampler.SCHEDULERS)
    for name, schedule in SCHEDULER_PRESETS.items():
        existing = handlers.get(name)
        if existing is not None and not _is_ours(existing.handler):
            logger.warning(
                "FewStep: scheduler name %r is taken by another implementation; not registering it", name
            )
            continue
        if existing is None:
            handlers[name] = comfy.samplers.SchedulerHandler(
                _scheduler_function(schedule, SCHEDULER_OPTIONS.get(name)), use_ms=True
            )
        if any(name not in names for names in scheduler_lists):
            added.append(name)
        for names in scheduler_lists:
            _append(names, name)
    if added:
        logger.info("FewStep: added KSampler presets %s", ", ".join(added))
    return added
