"""Nodes for per-model calibrated schedules: calibrate (with a cache) and load saved schedules.

The calibration itself is :func:`..samplers.calibration.calibrate`; it runs inside ComfyUI's own
sampling path (guider, model loading, conditioning, CFG) as the sampler function of a
``KSAMPLER``, so the teacher sees exactly the denoiser a real run sees. Results are stored as JSON
with :class:`..samplers.schedule_store.ScheduleStore` under ComfyUI's user directory
(``<user>/fewstep_schedules``; the cache in its ``cache/`` sub-folder).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch

from ..samplers.calibration import (DEFAULTS, MIN_REFINE_SEEDS, TEACHER_ENDS, CalibrationError, SolverSpec,
                                    calibrate, expected_calls)
from ..samplers.fitted import HISTORY
from ..samplers.fitted_refine import fd_step_for
from ..samplers.parameterization import Parameterization
from ..samplers.schedule_store import (FINGERPRINT_VERSION, ScheduleRecord, ScheduleStore, cache_key,
                                      model_fingerprint, object_fingerprint)
from ._api import CATEGORY_SCHEDULERS, io, ui
from ._comfy_sampler import (
    PRESETS,
    comfy_sampler_function,
    make_calibrated_singlestep_sampler,
    make_fitted_sampler,
    make_sampler,
)
from ._comfy_sampling import parameterization_for_model

logger = logging.getLogger(__name__)

__all__ = ["CALIBRATION_PRESETS", "FITTED_PRESET", "FewStepCalibrateSchedule", "FewStepLoadSchedule",
           "check_record_fits_model", "model_hash", "sampler_for_record", "schedule_store"]

#: 2M with per-step coefficients fitted together with the schedule (``samplers/fitted.py``)
FITTED_PRESET = "dpmpp_2m_fitted"
#: the same with a mean first step: no model call at sigma_max, one more step for the same NFE
FITTED_MEAN_PRESET = "dpmpp_2m_fitted_mean_start"
#: the fitted solvers, then the deterministic presets (an SDE solver has no single trajectory to match)
CALIBRATION_PRESETS: tuple[str, ...] = (
    FITTED_PRESET, FITTED_MEAN_PRESET,
    *(k for k, p in PRESETS.items() if float(p.options.get("eta", 0.0)) == 0.0))
STORE_FOLDER = "fewstep_schedules"
#: Samples per model call while calibrating: the seeds are run in chunks of this size, so a large
#: calibration batch (up to 256 seeds) needs no more memory per call than a batch of 16 images.
CALIBRATION_CHUNK = 16
#: most refinement iterations the node offers (the refinement stops earlier once it gains nothing)
REFINE_MAX = 50


def schedule_store() -> ScheduleStore:
    """The store under ComfyUI's user directory."""
    return ScheduleStore(Path(folder_paths.get_user_directory()) / STORE_FOLDER)


def model_hash(model: Any) -> str:
    """Fingerprint of a ComfyUI ``MODEL``: of its denoiser, not of a patcher object.

    The base weights are sampled as they are on disk: ComfyUI patches the weights of the loaded
    clone in place and keeps the originals in ``backup`` (shared by all clones), so those are
    read where present. Everything else that changes the denoiser is hashed by content: the
    weight patches (LoRA), object patches (e.g. a replaced ``model_sampling``), the model options
    (wrappers, attention and CFG patches) and the model sampling object. The same graph hashes
    the same in every session, before and after it ran.
    """
    backup = getattr(model, "backup", None) or {}
    weights = ((name, backup[name].weight if name in backup else param)
               for name, param in model.model.named_parameters())
    denoiser = {"patches": getattr(model, "patches", {}), "object_patches": getattr(model, "object_patches", {}),
                "weight_wrapper_patches": getattr(model, "weight_wrapper_patches", {}),
                "model_options": getattr(model, "model_options", {}),
                "model_sampling": model.get_model_object("model_sampling")}
    return model_fingerprint(weights, extra=object_fingerprint(denoiser))


def _spec(preset: str) -> SolverSpec:
    if preset not in CALIBRATION_PRESETS:
        raise ValueError(f"preset {preset!r} cannot be calibrated; use one of {CALIBRATION_PRESETS}")
    if preset == FITTED_PRESET:
        return SolverSpec("fitted", {"history": HISTORY}, preset)
    if preset == FITTED_MEAN_PRESET:
        return SolverSpec("fitted", {"history": HISTORY, "first_step": "mean"}, preset)
    p = PRESETS[preset]
    return SolverSpec(p.solver, dict(p.options), preset)  # type: ignore[arg-type]


def runs_as_plain_2m(record: ScheduleRecord) -> bool:
    """A fitted schedule whose coefficients were removed (e.g. to edit its sigmas) runs as 2M."""
    return record.solver.get("solver") == "fitted" and record.coefficients is None


def sampler_for_record(record: ScheduleRecord) -> Any:
    """The SAMPLER a stored schedule was calibrated for (2M for a file that names no solver, and
    for a fitted schedule without its coefficients: the fitted update with every weight 0)."""
    solver = record.solver.get("solver") or "multistep"
    options = dict(record.solver.get("options") or {})
    if runs_as_plain_2m(record):
        return make_sampler("multistep", {"order": 2})
    if solver == "fitted":
        return make_fitted_sampler(record.coefficients, record.sigmas, int(options.get("history", HISTORY)),
                                   record.first_prediction_tensor())
    if solver not in ("multistep", "singlestep"):
        raise ValueError(f"unknown solver {solver!r} in the schedule file; expected multistep, singlestep or fitted")
    if solver == "singlestep":
        return make_calibrated_singlestep_sampler(options, list(record.orders), list(record.sigmas))
    return make_sampler(solver, options or {"order": 2})


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype a ComfyUI ``MODEL``'s diffusion model computes in (its manual cast dtype, if any)."""
    inner = model.model
    return getattr(inner, "manual_cast_dtype", None) or inner.get_dtype()


def chunked(model: Any, chunk: int = CALIBRATION_CHUNK) -> Any:
    """``model(x, sigma, **extra)`` evaluated ``chunk`` samples at a time (one logical call)."""

    def call(x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        if x.shape[0] <= chunk:
            return model(x, sigma, **extra)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        parts = range(0, x.shape[0], chunk)
        return torch.cat([model(x[i:i + chunk], sigma[i:i + chunk], **extra) for i in parts])

    return call


def with_progress(model: Any, total: int) -> tuple[Any, Any]:
    """``model`` reporting each call to ComfyUI's progress bar (out of ``total``, an estimate: it
    stays below the end until ``done()``) and stopping at once when the user cancels the prompt.
    Returns ``(model, done)``."""
    bar = comfy.utils.ProgressBar(total)
    calls = 0

    def call(x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        nonlocal calls
        comfy.model_management.throw_exception_if_processing_interrupted()
        out = model(x, sigma, **extra)
        calls += 1
        bar.update_absolute(min(calls, total - 1), total)
        return out

    return call, lambda: bar.update_absolute(total, total)


def _calibrate_in_comfy(model, positive, negative, latent, spec: SolverSpec, nfe: int, seeds: int, seed: int,
                        cfg: float, grid_points: int, substeps: int, search_nfe: int, target: str = "ode",
                        refine_iterations: int = 0):
    """Run :func:`calibrate` as the sampler function of ComfyUI's guider; returns the result."""
    parameterization = parameterization_for_model(model)
    fd_step = fd_step_for(compute_dtype(model))
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"][:1])
    # seeds past the top of ComfyUI's seed range wrap around, as an unsigned 64-bit seed does
    noise = torch.cat([comfy.sample.prepare_noise(samples, (seed + k) % 2**64) for k in range(seeds)])
    latent_image = torch.zeros_like(noise)
    box: dict[str, Any] = {}

    def sampler_function(k_model, x, sigmas, extra_args=None, callback=None, disable=None):
        total = expected_calls(spec, nfe, grid_points, substeps, search_nfe, refine_iterations)
        model_call, done = with_progress(chunked(k_model), total)
        box["result"] = calibrate(model_call, x, parameterization, nfe, spec, extra_args=extra_args,
                                  grid_points=grid_points, substeps=substeps, search_nfe=search_nfe,
                                  teacher_end=target, refine_iterations=refine_iterations,
                                  refine_fd_step=fd_step)
        done()
        return x

    guider = comfy.samplers.CFGGuider(model)
    conds = {"positive": positive} if negative is None else {"positive": positive, "negative": negative}
    guider.inner_set_conds(conds)
    guider.set_cfg(cfg if negative is not None else 1.0)
    sigmas = torch.tensor([parameterization.sigma_max, 0.0], dtype=torch.float32)
    guider.sample(noise, latent_image, comfy.samplers.KSAMPLER(sampler_function), sigmas, disable_pbar=True, seed=seed)
    return box["result"], parameterization


#: what a device running out of memory raises (``torch.OutOfMemoryError`` from torch 2.5 on)
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _check_device(model: Any) -> None:
    """Refuse a device without float64 before any model call (the teacher's cache, the fit and the
    error are computed in float64 on the model's device)."""
    device = getattr(model, "load_device", None)
    if getattr(device, "type", None) == "mps":
        raise ValueError("FewStep Calibrate Steps computes in float64 on the model's device, which Apple MPS "
                         "does not support. Calibrate with ComfyUI started with --cpu (slow but once), or on "
                         "another machine, and load the saved schedule with FewStep Load Schedule to sample "
                         "with it here.")


def _memory_hint(latent_shape: list[int], seeds: int, grid_points: int) -> str:
    """What the calibration keeps in memory for these settings, and what to lower."""
    cache = 2 * grid_points * seeds * math.prod(latent_shape) * 4
    return (f"The teacher keeps 2 x grid_points x seeds latents on the model's device "
            f"({cache / 2**30:.2f} GiB for {seeds} seeds, {grid_points} grid points and latents of shape "
            f"{latent_shape}), and each model call runs up to {CALIBRATION_CHUNK} samples: lower seeds or "
            "grid_points.")


def _report(record: ScheduleRecord, cached: bool) -> str:
    cost = record.cost
    head = "cached" if cached else "calibrated"
    sig = ", ".join(f"{s:.4g}" for s in record.sigmas)
    steps = len(record.sigmas) - 1
    first = "" if record.first_prediction is None else ", the first from the calibration's mean prediction"
    refined = f" + {cost['refine_nfe']} refinement" if cost.get("refine_nfe") else ""
    return (f"{head}: {record.solver.get('label') or record.solver.get('solver')} at NFE {record.nfe} "
            f"({steps} steps{first}); "
            f"sigmas [{sig}]; calibration error {record.error:.4g} vs teacher "
            f"(target {record.settings.get('target', 'sigma_min')}); cost {cost.get('total_nfe')} model calls "
            f"on {cost.get('samples')} seeds ({cost.get('teacher_nfe')} teacher + "
            f"{cost.get('search_nfe')} search{refined}), {cost.get('seconds')} s")


class FewStepCalibrateSchedule(io.ComfyNode):
    """Calibrate steps: a schedule fitted to this model and solver at this NFE, cached per model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepCalibrateSchedule",
            display_name="FewStep Calibrate Steps",
            category=CATEGORY_SCHEDULERS,
            description="Fits the noise levels (SIGMAS) of a few-step solver to this model from a few accurate "
                        "teacher trajectories (about a thousand model calls once with the defaults; cached "
                        "by model weights and settings, so the next run is free). Outputs the matching "
                        "SAMPLER and SIGMAS.",
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate for; its weights key the cache."),
                io.Conditioning.Input("positive", tooltip="Conditioning for the calibration trajectories."),
                io.Latent.Input("latent_image", tooltip="Sets the latent size of the calibration noise (e.g. Empty Latent Image)."),
                io.Combo.Input("preset", options=list(CALIBRATION_PRESETS), default=FITTED_PRESET,
                               tooltip="The solver the schedule is fitted for (use the SAMPLER output with it). "
                                       f"{FITTED_PRESET}: 2M whose per-step coefficients are fitted with the "
                                       "schedule (its SAMPLER only runs with these SIGMAS). "
                                       f"{FITTED_MEAN_PRESET}: the same, but its first step uses the "
                                       "mean prediction of the calibration runs instead of a model call, "
                                       "so nfe calls run nfe + 1 steps (usually the most accurate at 4-5 "
                                       "calls; fitted to this prompt and latent size, so it is calibrated "
                                       "again for another prompt)."),
                io.Int.Input("nfe", default=6, min=2, max=50, tooltip="Model calls of one sampling run."),
                io.Int.Input("seeds", default=8, min=1, max=256,
                             tooltip="Calibration trajectories (batched into every model call, "
                                     f"{CALIBRATION_CHUNK} samples at a time). The refinement needs "
                                     f"at least {MIN_REFINE_SEEDS}. Memory: the teacher keeps two "
                                     "latents per seed and grid point."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="First seed of the calibration noise (seeds seed .. seed + seeds - 1)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="CFG scale used when a negative conditioning is connected."),
                io.Int.Input("grid_points", default=DEFAULTS["grid_points"], min=16, max=400,
                             tooltip="Teacher grid points (the DP chooses steps among them)."),
                io.Int.Input("substeps", default=DEFAULTS["substeps"], min=1, max=8,
                             tooltip="Teacher solver steps per grid interval (accuracy of the teacher)."),
                io.Int.Input("search_nfe", default=DEFAULTS["search_nfe"], min=0, max=10000,
                             tooltip="Budget of model calls for the local search after the DP, "
                             "shared by its two best starting schedules (0: no search). Scoring the DP "
                             "schedule and four fixed schedules, and the final fit, always run "
                             "(about 6 x nfe calls); the report counts them as search."),
                io.Boolean.Input("use_cache", default=True, tooltip="Reuse a cached schedule for the same model and settings."),
                io.String.Input("save_as", default="", tooltip="Also save the schedule under this name (loadable with FewStep Load Schedule)."),
                io.Combo.Input("target", options=list(TEACHER_ENDS), default="ode",
                               tooltip="What the schedule is fitted to reach. ode: the solution of the sampling ODE "
                                       "at noise 0, extrapolated from the model's last noise levels (removes the "
                                       "residual blur of stopping at the model's sigma_min, 0.029 on SD1.5). "
                                       "sigma_min: the model's own denoised output at its lowest noise level, "
                                       "as ComfyUI's samplers end."),
                io.Int.Input("refine_iterations", default=0, min=0, max=REFINE_MAX, optional=True,
                             tooltip="Fitted presets only: iterations of the end-to-end refinement "
                                     "(0: off). It fits the coefficients and steps together to the "
                                     "teacher's end points (Gauss-Newton, forward model calls only) and "
                                     f"needs at least {MIN_REFINE_SEEDS} seeds. Each iteration costs about "
                                     "40 (nfe 4) to 170 (nfe 8) model calls on the batch; 8 is usually "
                                     "enough."),
                io.Conditioning.Input("negative", optional=True, tooltip="Optional: negative conditioning for CFG."),
            ],
            outputs=[
                io.Sampler.Output("sampler", display_name="sampler", tooltip="The solver the schedule was fitted for."),
                io.Sigmas.Output("sigmas", display_name="sigmas", tooltip="The calibrated schedule."),
                io.String.Output("report", display_name="report", tooltip="Schedule, error and calibration cost."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, preset, nfe, seeds, seed, cfg, grid_points, substeps, search_nfe,
                use_cache=True, save_as="", target="ode", refine_iterations=0,
                negative=None) -> io.NodeOutput:
        spec = _spec(preset)
        parameterization = parameterization_for_model(model)
        shape = list(latent_image["samples"].shape[1:])
        settings = {"preset": preset, "options": dict(spec.options), "nfe": int(nfe), "seeds": int(seeds),
                    "seed": int(seed), "cfg": float(cfg) if negative is not None else 1.0,
                    "grid_points": int(grid_points), "substeps": int(substeps), "search_nfe": int(search_nfe),
                    "target": str(target), "latent_shape": shape, "parameterization": [parameterization.kind, parameterization.family,
                                                                parameterization.sigma_min, parameterization.sigma_max]}
        if refine_iterations:  # keyed only when on: schedules cached without it keep their keys
            settings["refine_iterations"] = int(refine_iterations)
        if spec.first_step == "mean":  # the mean first prediction is of this prompt: it keys the cache too
            settings["conditioning"] = object_fingerprint([positive, negative])
        store = schedule_store()
        if save_as.strip():
            store.path_for(save_as.strip())  # a bad name is refused before the model calls, not after
        mhash = model_hash(model)
        key = cache_key(mhash, settings)
        record = store.get(key) if use_cache else None
        cached = record is not None
        if record is not None:  # the key holds the current fingerprint: the record is of this model
            record.model_hash, record.fingerprint_version = mhash, FINGERPRINT_VERSION
        if record is None:
            _check_device(model)
            try:
                result, _ = _calibrate_in_comfy(model, positive, negative, latent_image, spec, int(nfe), int(seeds),
                                                int(seed), float(cfg), int(grid_points), int(substeps), int(search_nfe),
                                                str(target), int(refine_iterations))
            except CalibrationError as exc:
                raise ValueError(f"FewStep Calibrate Steps: {exc}") from exc
            except OUT_OF_MEMORY as exc:  # re-raised as the same type: ComfyUI then unloads its models
                raise OUT_OF_MEMORY(f"FewStep Calibrate Steps ran out of memory; nothing was cached. "
                                    f"{_memory_hint(shape, int(seeds), int(grid_points))} ({exc})") from exc
            if not (math.isfinite(result.error) and all(math.isfinite(s) for s in result.sigmas)):
                raise ValueError("FewStep Calibrate Steps: calibration produced no finite schedule; nothing cached")
            record = ScheduleRecord.from_result(result, mhash, settings)
            store.put(key, record)
        if save_as.strip():
            store.save(save_as.strip(), record)
        text = _report(record, cached)
        logger.info("FewStep: %s", text)
        return io.NodeOutput(sampler_for_record(record), record.sigmas_tensor(), text,
                             ui=ui.PreviewText(text))


class FewStepLoadSchedule(io.ComfyNode):
    """Load a saved (shared) calibrated schedule by name."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        names = schedule_store().names()
        return io.Schema(
            node_id="FewStepLoadSchedule",
            display_name="FewStep Load Schedule",
            category=CATEGORY_SCHEDULERS,
            description=f"Loads a schedule saved by FewStep Calibrate Steps (JSON files in the user folder "
                        f"'{STORE_FOLDER}'; copy a shared .json there).",
            inputs=[io.Combo.Input("name", options=names or [""], tooltip="Saved schedule (file name without .json)."),
                    io.Model.Input("model", optional=True,
                                   tooltip="Optional: the model you will sample. Connected, the schedule is "
                                   "checked against it (model family and sigma range must match; a schedule "
                                   "calibrated on other weights is noted in info).")],
            outputs=[io.Sigmas.Output("sigmas", display_name="sigmas", tooltip="The saved schedule."),
                     io.String.Output("info", display_name="info", tooltip="Solver, NFE and steps the schedule was made for."),
                     io.Sampler.Output("sampler", display_name="sampler", tooltip="The solver the schedule was calibrated for "
                                                          "(DPM-Solver++(2M) for a file with sigmas only).")],
        )

    @classmethod
    def fingerprint_inputs(cls, name, **_linked) -> Any:
        """The file's modification time: the node reruns when the schedule file changes. ComfyUI
        passes every input here, a connected ``model`` too; only ``name`` matters."""
        try:
            return schedule_store().find(name).stat().st_mtime
        except (ValueError, OSError):
            return ""

    @classmethod
    def execute(cls, name, model=None) -> io.NodeOutput:
        if not name:
            saved = schedule_store().names()
            if saved:  # the node was added before any schedule existed: its list was [""]
                listed = ", ".join(saved[:8]) + (", ..." if len(saved) > 8 else "")
                raise ValueError(f"no schedule chosen: pick one of the saved schedules ({listed}); "
                                 "press R in the browser to refresh the list")
            raise ValueError(f"no saved schedules yet: run FewStep Calibrate Steps with save_as set, or copy a "
                             f"schedule .json into the user folder '{STORE_FOLDER}'")
        record = schedule_store().load(name)
        options = record.solver.get("options") or {}
        label = (record.solver.get("label") or record.solver.get("solver")
                 or (f"multistep {options}" if options else "DPM-Solver++(2M)") + " (the file names no solver)")
        text = f"{name}: {label}, NFE {record.nfe}, {len(record.sigmas) - 1} steps"
        if runs_as_plain_2m(record):
            text += "\nno fitted coefficients in the file: its sigmas run with plain DPM-Solver++(2M)"
        if model is not None:
            text += check_record_fits_model(record, name, model)
        try:
            sampler = sampler_for_record(record)
            dry_run(sampler, record.sigmas)
        except (ValueError, TypeError) as exc:  # e.g. an option of the wrong type in a hand-edited file
            raise ValueError(f"schedule {name!r} ({schedule_store().find(name).name}) cannot run: {exc}. "
                             "Calibrate it again, or fix the file's 'solver' / 'orders' fields.") from exc
        return io.NodeOutput(record.sigmas_tensor(), text, sampler)


def dry_run(sampler: Any, sigmas: list[float]) -> None:
    """Run a SAMPLER's solver once on a zero model over ``sigmas`` (no model, a 1-element state):
    a schedule file whose solver fields cannot run (order 7, no orders for a singlestep schedule)
    fails here, naming the file, instead of later inside the sampler node."""
    options = dict(sampler.extra_options)
    options["parameterization"] = Parameterization("ve", 1e-9, 1e9, family="edm")
    if options.get("solver", "multistep") == "multistep":
        options["resume_history"] = False  # nothing to carry, nothing left behind
    first = options.get("first_prediction")
    state = torch.zeros(1 if first is None else first.shape, dtype=torch.float64)
    comfy_sampler_function(lambda x, sigma, **_: torch.zeros_like(x), state,
                           torch.tensor(sigmas, dtype=torch.float64), disable=True, **options)


#: relative tolerance when comparing a saved schedule's sigma range with a model's
RANGE_RTOL = 1e-3


def check_record_fits_model(record: ScheduleRecord, name: str, model: Any) -> str:
    """Raise if ``record`` was calibrated for another model family or sigma range than ``model``;
    return a note for ``info`` when only the weights differ (another checkpoint, LoRA or patch)."""
    p = parameterization_for_model(model)
    saved = list(record.settings.get("parameterization") or [])
    if saved:  # [kind, family, sigma_min, sigma_max]; files before the family was stored: [kind, min, max]
        kind, lo, hi = saved[0], float(saved[-2]), float(saved[-1])
        family = saved[1] if len(saved) == 4 else None
        same_range = math.isclose(lo, p.sigma_min, rel_tol=RANGE_RTOL) and math.isclose(hi, p.sigma_max,
                                                                                       rel_tol=RANGE_RTOL)
        if kind != p.kind or not same_range or (family is not None and family != p.family):
            raise ValueError(
                f"schedule {name!r} was calibrated for {family or kind} models with sigmas "
                f"{lo:.4g}..{hi:.4g}, "
                f"but the connected model is {p.family} with sigmas {p.sigma_min:.4g}..{p.sigma_max:.4g}. "
                "Calibrate this model with FewStep Calibrate Steps (or load a schedule made for it)."
            )
    if record.sigmas[0] > p.sigma_max * (1.0 + RANGE_RTOL):
        raise ValueError(f"schedule {name!r} starts at sigma {record.sigmas[0]:.4g}, above the connected model's "
                         f"sigma_max {p.sigma_max:.4g}: it was made for another model family, or its sigmas "
                         "were edited past the model's range")
    if record.model_hash and record.model_hash != model_hash(model):
        what = "its fitted coefficients and schedule" if record.coefficients is not None else "the schedule"
        if record.fingerprint_version != FINGERPRINT_VERSION:
            return ("\nsaved by an earlier FewStep version, whose model fingerprint may differ from this "
                    f"one's: it may or may not be this model. Calibrate again to be sure {what} fits")
        return (f"\ncalibrated on another model (other weights, LoRA or patches): {what} may not fit this one; "
                "calibrate it for best results")
    return ""
