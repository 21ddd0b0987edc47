"""Distilled-student loader node: a file in, a correctly sampled MODEL + SAMPLER + SIGMAS out.

The logic (detection, recipes, key conversion, samplers) lives in ``distill_loaders``; this module
only turns a recipe into ComfyUI objects: an object-patched ``model_sampling`` (prediction type,
schedule and the first-step noise scale), a ``KSAMPLER`` for the recipe's step rule, and SIGMAS.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import comfy.lora
import comfy.lora_convert
import comfy.model_sampling
import comfy.samplers
import comfy.sd
import folder_paths
import torch

from ..distill_loaders.detect import Detection, detect, detect_contents, lora_module_names
from ..distill_loaders.errors import StudentLoadError, command
from ..distill_loaders.inspect import format_report
from ..distill_loaders.keys import LCM_EMBEDDING_NAMES, lcm_embedding_name, lora_to_kohya
from ..distill_loaders.lcm_guidance import GuidedTimeEmbedding
from ..distill_loaders.load import check_finite, check_lora_base, load_weights, to_ldm_unet
from ..distill_loaders.recipes import DDPM_TIMESTEPS, ddpm_sigma, recipe_sigmas
from ..distill_loaders.safetensors_header import FileContents, read_contents
from ..distill_loaders.specs import Recipe, get_recipe, parse_timesteps, recipe_names, with_tcd_eta, with_timesteps
from ..distill_loaders.stream import placeholder_state_dict, read_tensor, stream_into
from ..distill_loaders.student_samplers import sample_renoise, sample_tcd
from ._api import io

logger = logging.getLogger(__name__)

__all__ = [
    "FewStepEDMGenerator",
    "FewStepStudentLoader",
    "FewStepStudentSample",
    "LoadedStudent",
    "apply_student_lora",
    "base_sampling_mismatch",
    "generate_edm_images",
    "load_student",
    "load_student_model",
    "sample_student",
    "student_model_sampling",
    "student_sampler",
]

FOLDERS = ("checkpoints", "diffusion_models", "loras")
_COMFY_ARCH = {"SD15": "sd15", "SD20": "sd21", "SD21UnclipL": "sd21", "SD21UnclipH": "sd21", "SDXL": "sdxl"}


def student_model_sampling(recipe: Recipe, model_config):
    """A ``model_sampling`` object for the recipe: schedule class x prediction mix-in, with the
    first-step noise scale of :func:`~..distill_loaders.recipes.first_step_noise_scale`."""
    ms = comfy.model_sampling
    if recipe.prediction == "flow_reversed":

        class ReversedFlow(ms.CONST):
            """InstaFlow/2-RF/SCFlow velocity points noise -> data: ``x0 = x + sigma v``."""

            def calculate_denoised(self, sigma, model_output, model_input):
                return super().calculate_denoised(sigma, -model_output, model_input)

        class StudentFlow(ms.ModelSamplingDiscreteFlow, ReversedFlow):
            pass

        obj = StudentFlow(model_config)
        obj.set_parameters(shift=1.0, multiplier=1000)
        return obj
    if recipe.prediction == "lcm":
        from comfy_extras.nodes_model_advanced import LCM, ModelSamplingDiscreteDistilled

        base, pred = ModelSamplingDiscreteDistilled, LCM
    elif recipe.prediction == "x0":
        base, pred = ms.ModelSamplingDiscrete, ms.X0
    elif recipe.prediction == "eps":
        base, pred = ms.ModelSamplingDiscrete, ms.EPS
    elif recipe.prediction == "v":
        base, pred = ms.ModelSamplingDiscrete, ms.V_PREDICTION
    else:
        raise StudentLoadError(
            None,
            f"recipe {recipe.name!r} ({recipe.prediction}) is not a latent UNet recipe.",
            "EDM pixel generators are not loaded by this node.",
        )
    unit = recipe.first_noise == "unit"

    class StudentSampling(base, pred):
        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            # unit: from an empty latent the UNet sees unit-variance noise at any first sigma (DMD2
            # @399, Hyper @800); an image latent (img2img, denoise < 1) is noised as ComfyUI does.
            # ddpm: add_noise(0, z, t), i.e. sigma * z (SiD-LSG @625).
            if unit and not bool(torch.count_nonzero(latent_image)):
                max_denoise = True
            elif not unit:
                max_denoise = False
            return super().noise_scaling(sigma, noise, latent_image, max_denoise=max_denoise)

    if recipe.x0_abar is None or pred is not ms.EPS:
        return StudentSampling(model_config)
    abar, sigma_first = recipe.x0_abar, float(recipe_sigmas(recipe)[0])

    class StudentSamplingX0Abar(StudentSampling):
        def calculate_denoised(self, sigma, model_output, model_input):
            # At the recipe's first sigma: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) with the
            # student's own abar; x_t = model_input / sqrt(1 + sigma^2) is the network's input.
            denoised = super().calculate_denoised(sigma, model_output, model_input)
            s = sigma.reshape(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
            first = torch.isclose(s, torch.full_like(s, sigma_first), rtol=1e-4)
            if not bool(first.any()):
                return denoised
            x_t = model_input / torch.sqrt(s * s + 1.0)
            own = (x_t - math.sqrt(1.0 - abar) * model_output) / math.sqrt(abar)
            return torch.where(first, own, denoised)

    return StudentSamplingX0Abar(model_config)


def student_sampler(recipe: Recipe):
    """The ``SAMPLER`` for the recipe's step rule."""
    rule = recipe.step_rule
    if rule == "euler":
        return comfy.samplers.ksampler("euler")
    if rule == "ancestral":
        return comfy.samplers.ksampler("euler_ancestral", {"eta": 1.0, "s_noise": 1.0})
    if rule == "renoise":
        return comfy.samplers.KSAMPLER(sample_renoise)
    if rule == "tcd":
        return comfy.samplers.KSAMPLER(sample_tcd, extra_options={"eta": recipe.eta})
    raise StudentLoadError(
        None,
        f"recipe {recipe.name!r} uses step rule {rule!r}, which needs the EDM generator.",
        "EDM pixel generators are not loaded by this node.",
    )


def _model_arch(model) -> str | None:
    return _COMFY_ARCH.get(type(model.model.model_config).__name__)


def base_sampling_mismatch(model) -> str | None:
    """How the base model's sampling differs from what LoRA students are distilled on (eps
    prediction on SD's discrete noise schedule, sigma up to ~14.6), or None when it does not.

    The student's recipe replaces the base's ``model_sampling``; on a v-prediction,
    zero-terminal-SNR, EDM or flow base that would sample the network as something it is not.
    """
    ms = comfy.model_sampling
    sampling = model.get_model_object("model_sampling")
    kind = type(sampling)
    if kind.calculate_denoised is not ms.EPS.calculate_denoised:
        names = {ms.V_PREDICTION: "a v-prediction model", ms.EDM: "an EDM model",
                 ms.X0: "an x0-prediction model", ms.CONST: "a flow (CONST) model"}
        found = next((names[c] for c in kind.__mro__ if c in names), None)
        return f"it is {found}" if found else f"its prediction is patched ({kind.__name__})"
    if not isinstance(sampling, ms.ModelSamplingDiscrete):
        return f"it samples with {kind.__name__}, not SD's discrete noise schedule"
    sigma_max, expected = float(sampling.sigma_max), ddpm_sigma(DDPM_TIMESTEPS - 1)
    if getattr(sampling, "zsnr", False) or not math.isclose(sigma_max, expected, rel_tol=0.01):
        zsnr = " (zero terminal SNR)" if getattr(sampling, "zsnr", False) else ""
        return f"its noise schedule reaches sigma {sigma_max:.4g}{zsnr}, not SD's {expected:.4g}"
    return None


def apply_student_lora(model, det: Detection, lora_sd: dict, strength: float):
    """Apply a LoRA student to ``model`` (a clone); raises unless every UNet LoRA module lands."""
    check_lora_base(det, _model_arch(model))
    mismatch = base_sampling_mismatch(model)
    if mismatch is not None:
        raise StudentLoadError(
            det.path,
            f"the base model does not sample as this LoRA's recipe expects: {mismatch}. LoRA students are "
            "distilled on eps-prediction SD/SDXL bases, and the recipe would replace the base's own "
            "sampling, so the images would be wrong.",
            "connect the base without its ModelSampling patch (a v-prediction or zero-terminal-SNR "
            "fine-tune cannot run this recipe), or apply the file with LoraLoaderModelOnly and sample "
            "with the base's own sampling, off-recipe.",
        )
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    lora_sd, _ = lora_to_kohya(lora_sd)  # ComfyUI maps kohya names for every SD UNet module
    lora_sd = comfy.lora_convert.convert_lora(lora_sd)
    loaded = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    patched = model.clone()
    applied = set(patched.add_patches(loaded, strength))
    modules, text = lora_module_names(lora_sd)
    missing = len(modules) - len(applied)
    if not applied:
        raise StudentLoadError(
            det.path,
            "none of the LoRA's keys match the model.",
            "check that the LoRA is for this base model.",
        )
    if missing > 0:
        raise StudentLoadError(
            det.path,
            f"{missing} of {len(modules)} LoRA modules found no weight in the model.",
            "the LoRA is for a different base or layout; pick a matching LoRA.",
        )
    if text:
        logger.warning("FewStep student: %s also has %d text-encoder LoRA modules, which this loader does not "
                       "apply (it patches the UNet); load the file with LoraLoader as well for the text encoder",
                       Path(det.path).name, len(text))
    return patched, len(applied), len(text)


def _check_unet_keys(det: Detection) -> None:
    """Refuse a UNet file with missing or wrongly shaped weights before ComfyUI builds anything:
    ComfyUI would leave a missing weight uninitialised (finite garbage) or build the wrong model."""
    problems = []
    if det.missing:
        problems.append(f"{len(det.missing)} weights are missing (e.g. {', '.join(det.missing[:3])})")
    if det.mismatched:
        problems.append(f"{len(det.mismatched)} have the wrong shape (e.g. {'; '.join(det.mismatched[:2])})")
    if problems:
        raise StudentLoadError(
            det.path,
            f"this is not a complete {det.arch} UNet: " + " and ".join(problems) + ".",
            "the file is truncated, damaged or for another architecture: download or convert it again "
            f"({command('inspect FILE')} lists every key).",
        )


def _unet_from_state_dict(det: Detection, ldm_sd: dict, model_options: dict):
    for name in LCM_EMBEDDING_NAMES:  # no slot in ComfyUI's UNet; patched in afterwards
        ldm_sd.pop(name, None)
    model = comfy.sd.load_diffusion_model_state_dict(ldm_sd, model_options=model_options)
    if model is None:
        raise StudentLoadError(
            det.path,
            "ComfyUI did not recognise the converted UNet.",
            f"report the inspect output ({command('inspect FILE')}).",
        )
    return model


def _stream_unet(contents: FileContents, det: Detection, model_options: dict, check_weights: bool):
    """A UNet safetensors file -> ComfyUI model, with one copy of the weights in RAM.

    ComfyUI builds the model from zero-stride placeholders (shapes and dtypes only), then every
    weight is read from the file straight into its parameter (see ``distill_loaders.stream``).
    """
    model = _unet_from_state_dict(det, to_ldm_unet(det, placeholder_state_dict(contents)), model_options)
    params = model.model.diffusion_model.state_dict(keep_vars=True)
    ldm_to_file = to_ldm_unet(det, {name: name for name in contents.tensors})
    targets = {name: params[ldm] for ldm, name in ldm_to_file.items() if ldm in params}
    unused = sorted(ldm for ldm in ldm_to_file if ldm not in params and ldm not in LCM_EMBEDDING_NAMES)
    if unused:
        logger.warning("FewStep student: %d tensors have no slot in the model: %s", len(unused), unused[:5])
    unfilled = sorted(set(params) - set(ldm_to_file))
    if unfilled:  # a parameter the file does not fill would keep uninitialised memory
        raise StudentLoadError(
            det.path,
            f"{len(unfilled)} UNet weights are not in the file (e.g. {', '.join(unfilled[:3])}).",
            "the file is incomplete: download or convert it again.",
        )
    stream_into(contents, targets, check_finite=check_weights)
    return model


@dataclass
class LoadedStudent:
    """What the loader node outputs, plus the recipe it used (after the timesteps / eta inputs)."""

    model: Any
    clip: Any
    vae: Any
    sampler: Any
    sigmas: torch.Tensor
    info: str
    recipe: Recipe


@dataclass
class _SharedLoad:
    """Weak references to what one load of a file built (the model before the recipe's patches).

    A recipe's model is a clone of that model, and a clone keeps its parent alive, so the entry
    lives exactly as long as some loader output does: two loader nodes on one file (one student at
    1 and at 4 steps) then share one copy of the weights, and nothing is kept after ComfyUI drops
    the outputs."""

    model: weakref.ref
    clip: weakref.ref | None
    vae: weakref.ref | None
    cond_proj: torch.Tensor | None

    def get(self) -> tuple[Any, Any, Any, torch.Tensor | None] | None:
        model = self.model()
        clip, vae = (None if r is None else r() for r in (self.clip, self.vae))
        if model is None or (self.clip is not None and clip is None) or (self.vae is not None and vae is None):
            return None
        return model, clip, vae, self.cond_proj


_SHARED: dict[tuple, _SharedLoad] = {}


def _share_key(path: str | Path, det: Detection, model_options: dict, check_weights: bool) -> tuple | None:
    """What the weights of a (non-LoRA) load depend on: the file as it is now, how it was read."""
    if det.is_lora:
        return None
    stat = Path(path).stat()
    options = repr(sorted(model_options.items(), key=lambda kv: kv[0]))
    return (str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, det.layout, det.arch,
            bool(check_weights), options)


def _shared(key: tuple | None) -> tuple[Any, Any, Any, torch.Tensor | None] | None:
    entry = _SHARED.get(key) if key is not None else None
    return None if entry is None else entry.get()


def _share(key: tuple, model: Any, clip: Any, vae: Any, cond_proj: torch.Tensor | None) -> None:
    """Register a load under ``key``; the entry goes when its model does."""

    def forget(_: weakref.ref) -> None:
        if _SHARED.get(key) is entry:
            del _SHARED[key]

    entry = _SharedLoad(weakref.ref(model, forget), None if clip is None else weakref.ref(clip),
                        None if vae is None else weakref.ref(vae), cond_proj)
    _SHARED[key] = entry


def load_student_model(*args: Any, **kwargs: Any):
    """:func:`load_student` as the tuple ``(model, clip, vae, sampler, sigmas, info)``."""
    s = load_student(*args, **kwargs)
    return s.model, s.clip, s.vae, s.sampler, s.sigmas, s.info


def load_student(
    path: str | Path,
    recipe_name: str = "auto",
    steps: int = 0,
    model=None,
    lora_strength: float = 1.0,
    check_weights: bool = True,
    lcm_guidance: float = 8.5,
    model_options: dict | None = None,
    timesteps: str = "",
    tcd_eta: float = -1.0,
):
    """Load ``path`` as a student (see :class:`LoadedStudent`).

    ``model_options`` goes to ComfyUI's model construction as in ``UNETLoader`` (``dtype``, ...).
    ``timesteps`` (e.g. ``"999, 759, 499, 259"``) replaces the recipe's timesteps, for step-distilled
    students with their own; ``tcd_eta`` in [0, 1] replaces a TCD recipe's gamma (negative: the
    recipe's own)."""
    model_options = dict(model_options or {})
    override = None if recipe_name in ("auto", "", None) else recipe_name
    contents = read_contents(path)
    det = detect_contents(contents, override)
    if det.is_lora and model is not None:  # a LoRA for another base says so, identified or not
        check_lora_base(det, _model_arch(model))
    if det.recipe is None:
        raise StudentLoadError(
            det.path,
            "the student could not be identified from its name, metadata or keys.",
            "choose the recipe in the node's 'recipe' input (" + ", ".join(recipe_names()[:6]) + ", ...).",
        )
    if det.layout == "edm":
        raise StudentLoadError(
            det.path,
            "this is an EDM pixel-space generator.",
            "it is not a latent UNet; load it with 'EDM One-Step Generator (FewStep)'.",
        )
    recipe = get_recipe(det.recipe)
    custom = ""
    try:
        if timesteps and timesteps.strip():
            recipe = with_timesteps(recipe, parse_timesteps(timesteps))
            custom += f"\ncustom timesteps: {[int(t) for t in recipe.timesteps]}"
        if tcd_eta is not None and tcd_eta >= 0.0:
            if recipe.step_rule == "tcd":
                recipe = with_tcd_eta(recipe, tcd_eta)
                custom += f"\nTCD eta (gamma): {recipe.eta:g}"
            else:
                custom += f"\ntcd_eta ignored: the {recipe.name} recipe uses the {recipe.step_rule} step rule"
        sigmas = recipe_sigmas(recipe, steps or None).float()  # before any weights are read
    except ValueError as exc:
        raise StudentLoadError(det.path, str(exc), "fix the loader's steps / timesteps / tcd_eta input "
                               "(steps 0 runs the recipe's own steps, or the custom timesteps given)") from exc
    if det.layout in ("ldm_unet", "diffusers_unet", "ldm_checkpoint"):
        _check_unet_keys(det)
    clip = vae = cond_proj = None
    extra = ""
    embedding = lcm_embedding_name(contents.tensors)
    key = _share_key(path, det, model_options, check_weights)
    shared = _shared(key)
    if shared is not None:
        model, clip, vae, cond_proj = shared
        extra = "\nweights: shared with another loader of this file (read once)"
    elif det.layout in ("ldm_unet", "diffusers_unet") and contents.container == "safetensors":
        model = _stream_unet(contents, det, model_options, check_weights)
        if embedding:
            cond_proj = read_tensor(contents, embedding)
    else:
        sd = load_weights(path)
        if check_weights:
            check_finite(sd, det.path)
        if det.is_lora:
            if model is None:
                raise StudentLoadError(
                    det.path, "this file is a LoRA.", "connect the base MODEL to the loader's 'model' input."
                )
            model, n, n_text = apply_student_lora(model, det, sd, lora_strength)
            extra = f"\nLoRA: {n} modules patched at strength {lora_strength:g}"
            if n_text:
                extra += (f"; {n_text} text-encoder modules not applied (load the file with LoraLoader too "
                          "for the CLIP part)")
        elif det.layout == "ldm_checkpoint":
            cond_proj = sd.pop(embedding) if embedding else None
            model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(
                sd,
                output_vae=True,
                output_clip=True,
                embedding_directory=folder_paths.get_folder_paths("embeddings"),
                model_options=model_options,
            )
        else:
            cond_proj = sd.get(embedding) if embedding else None
            model = _unet_from_state_dict(det, to_ldm_unet(det, sd), model_options)
    if shared is None and key is not None:
        _share(key, model, clip, vae, cond_proj)
    model = model.clone()
    model.add_object_patch("model_sampling", student_model_sampling(recipe, model.model.model_config))
    if cond_proj is not None:  # full LCM: put back the w-embedding ComfyUI's UNet has no slot for
        time_embed = model.get_model_object("diffusion_model.time_embed")
        model.add_object_patch(
            "diffusion_model.time_embed", GuidedTimeEmbedding(time_embed, cond_proj, lcm_guidance)
        )
        extra += f"\nLCM guidance embedding: w = {lcm_guidance:g} (time_embedding.cond_proj kept)"
    info = format_report(det, recipe=recipe, steps=steps or None) + extra + custom
    logger.info("FewStep student: %s -> %s (%s)", Path(det.path).name, recipe.name, "; ".join(det.reasons))
    return LoadedStudent(model, clip, vae, student_sampler(recipe), sigmas, info, recipe)


def _file_options() -> list[str]:
    out = []
    for folder in FOLDERS:
        if folder in folder_paths.folder_names_and_paths:  # 'diffusion_models' is 'unet' before 0.3
            out += [f"{folder}/{name}" for name in folder_paths.get_filename_list(folder)]
    return out


def _resolve(option: str) -> str:
    folder, _, name = option.partition("/")
    if folder not in FOLDERS:
        raise StudentLoadError(
            option, f"unknown model folder {folder!r}.", f"pick a file from {', '.join(FOLDERS)}."
        )
    return folder_paths.get_full_path_or_raise(folder, name)


class FewStepStudentLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepStudentLoader",
            display_name="Load Distilled Student (FewStep)",
            category="loaders",
            description="Load a one-/few-step distilled student (DMD2, SiD-LSG, Turbo, Lightning, Hyper-SD, LCM, "
            "TCD, PCM, InstaFlow/SCFlow, SwiftBrush) and get the model, sampler and sigmas of its "
            "published recipe. LoRA students are applied to the connected model.",
            inputs=[
                io.Combo.Input(
                    "model_file",
                    options=_file_options(),
                    tooltip="a student file from checkpoints/, diffusion_models/ (unet/) or loras/",
                ),
                io.Combo.Input(
                    "recipe",
                    options=["auto", *recipe_names()],
                    default="auto",
                    tooltip="'auto' detects from file name, metadata and keys; pick one when it cannot.",
                ),
                io.Int.Input(
                    "steps",
                    default=0,
                    min=0,
                    max=64,
                    tooltip="0 = the step count the student was distilled for",
                ),
                io.Model.Input("model", optional=True, tooltip="the base model a LoRA student is applied to"),
                io.Float.Input(
                    "lora_strength",
                    default=1.0,
                    min=-4.0,
                    max=4.0,
                    step=0.05,
                    tooltip="strength of a LoRA student (ignored for full models)",
                ),
                io.Boolean.Input(
                    "check_weights",
                    default=True,
                    tooltip="refuse files whose weights contain NaN/Inf (reads every weight once)",
                ),
                io.Float.Input(
                    "lcm_guidance",
                    default=8.5,
                    min=1.0,
                    max=20.0,
                    step=0.1,
                    tooltip="guidance w of full LCM models' built-in w-embedding (not CFG; LCM uses 3-13)",
                ),
                io.String.Input(
                    "timesteps",
                    default="",
                    optional=True,
                    tooltip="optional: the student's own DDPM timesteps, e.g. '999, 759, 499, 259' (step-distilled "
                    "students such as SnapFusion: recipe step_distilled_eps / _v); empty = the recipe's",
                ),
                io.Float.Input(
                    "tcd_eta",
                    default=-1.0,
                    min=-1.0,
                    max=1.0,
                    step=0.05,
                    optional=True,
                    tooltip="TCD recipes: gamma in [0, 1] (0 deterministic, higher adds fresh noise; lower it for "
                    "more steps); -1 = the recipe's own",
                ),
            ],
            outputs=[
                io.Model.Output(
                    tooltip="the student, with the recipe's prediction type and first-step noise scale"
                ),
                io.Sampler.Output(
                    tooltip="the recipe's sampler (Euler, Euler-ancestral, LCM-style re-noise or TCD)"
                ),
                io.Sigmas.Output(
                    tooltip="the recipe's noise levels (use with SamplerCustom, cfg as in recipe_info)"
                ),
                io.Clip.Output(
                    tooltip="text encoder of a single-file checkpoint (empty for UNet/LoRA files)"
                ),
                io.Vae.Output(tooltip="VAE of a single-file checkpoint (empty for UNet/LoRA files)"),
                io.String.Output(
                    display_name="recipe_info",
                    tooltip="which recipe was used and why (file name, metadata, keys, shapes)",
                ),
                io.Float.Output(display_name="cfg", tooltip="the recipe's CFG scale (1 = off), for SamplerCustom"),
            ],
        )

    @classmethod
    def execute(
        cls,
        model_file,
        recipe="auto",
        steps=0,
        model=None,
        lora_strength=1.0,
        check_weights=True,
        lcm_guidance=8.5,
        timesteps="",
        tcd_eta=-1.0,
    ):
        s = load_student(_resolve(model_file), recipe, steps, model, lora_strength, check_weights, lcm_guidance,
                         timesteps=timesteps, tcd_eta=tcd_eta)
        return io.NodeOutput(s.model, s.sampler, s.sigmas, s.clip, s.vae, s.info, float(s.recipe.cfg))


def sample_student(
    model, sampler, sigmas, positive, negative, latent: dict, seed: int, cfg: float = 1.0
) -> dict:
    """``SamplerCustom`` with noise on, for a loaded student: one call of ``comfy.sample.sample_custom``."""
    import comfy.sample
    import comfy.utils
    import latent_preview

    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    out = dict(latent)
    out["samples"] = comfy.sample.sample_custom(
        model,
        noise,
        cfg,
        sampler,
        sigmas,
        positive,
        negative,
        samples,
        noise_mask=latent.get("noise_mask"),
        callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
        seed=seed,
    )
    return out


class FewStepStudentSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepStudentSample",
            display_name="Sample Distilled Student (FewStep)",
            category="sampling",
            description="Run a loaded student with its recipe: connect MODEL, SAMPLER and SIGMAS from "
            "'Load Distilled Student (FewStep)'. The same as SamplerCustom with noise on, in one node.",
            inputs=[
                io.Model.Input("model", tooltip="the student from the loader"),
                io.Sampler.Input("sampler", tooltip="the recipe's sampler from the loader"),
                io.Sigmas.Input("sigmas", tooltip="the recipe's noise levels from the loader"),
                io.Conditioning.Input("positive", tooltip="the prompt's conditioning (CLIP Text Encode)"),
                io.Conditioning.Input("negative", tooltip="only used when cfg > 1"),
                io.Latent.Input(
                    "latent_image", tooltip="e.g. Empty Latent Image at the student's resolution"
                ),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="seed of the starting noise and of any re-noising"),
                io.Float.Input(
                    "cfg",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="1 for most students (guidance is distilled in); see the loader's recipe_info",
                ),
            ],
            outputs=[io.Latent.Output(tooltip="the sampled latent; decode it with the student's VAE")],
        )

    @classmethod
    def execute(cls, model, sampler, sigmas, positive, negative, latent_image, seed=0, cfg=1.0):
        return io.NodeOutput(
            sample_student(model, sampler, sigmas, positive, negative, latent_image, seed, cfg)
        )


def generate_edm_images(
    path: str | Path,
    seed: int = 0,
    batch_size: int = 1,
    class_label: int = -1,
    sigma_init: float = 0.0,
    recipe_name: str = "auto",
):
    """Run a converted EDM one-step generator; returns ``(images [B,H,W,C] in [0,1], info)``."""
    import comfy.model_management
    import torch

    from ..distill_loaders.edm_networks import (
        build_edm_network,
        edm_config_from_state_dict,
        generate_one_step,
        strip_precond_prefix,
    )

    override = None if recipe_name in ("auto", "", None) else recipe_name
    det = detect(path, override)
    if det.layout != "edm":
        raise StudentLoadError(
            det.path,
            f"this is a {det.layout} file, not an EDM pixel generator.",
            "load latent students with 'Load Distilled Student (FewStep)'.",
        )
    sd = strip_precond_prefix(load_weights(path))
    check_finite(sd, det.path)
    recipe = get_recipe(det.recipe)
    try:
        arch, kwargs = edm_config_from_state_dict(sd)
        net = build_edm_network(arch, **kwargs)
    except (KeyError, ValueError, IndexError, TypeError) as e:  # incomplete or another EDM layout
        missing = f"no {e}" if isinstance(e, KeyError) else str(e)[:300]
        raise StudentLoadError(
            det.path,
            f"not a complete SiD/DMD2 EDM generator ({missing}); only the DDPM++ (SongUNet) and ADM "
            "(DhariwalUNet) layouts load.",
            f"check that the download is complete, or re-convert the pickle with {command('convert FILE')}.",
        ) from None
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise StudentLoadError(
            det.path,
            f"the weights do not fit the {arch} network read from their shapes ({str(e)[:300]}).",
            f"re-convert the pickle with {command('convert FILE')}.",
        ) from None
    device = comfy.model_management.get_torch_device()
    net = net.to(device).eval()
    g = torch.Generator().manual_seed(seed)
    c, r = kwargs["in_channels"], kwargs["img_resolution"]
    z = torch.randn(batch_size, c, r, r, generator=g).to(device)
    labels = None
    if kwargs["label_dim"]:
        idx = (
            torch.randint(kwargs["label_dim"], (batch_size,), generator=g)
            if class_label < 0
            else torch.full((batch_size,), class_label % kwargs["label_dim"])
        )
        labels = torch.nn.functional.one_hot(idx, kwargs["label_dim"]).float().to(device)
    sigma = sigma_init or float(recipe.sigma_init)
    x = generate_one_step(net, z, sigma, labels)
    images = ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).float().cpu()
    info = format_report(det) + f"\nnetwork: {arch} {kwargs}\nsigma_init: {sigma:g}"
    return images, info


class FewStepEDMGenerator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepEDMGenerator",
            display_name="EDM One-Step Generator (FewStep)",
            category="sampling",
            description="Run a one-step EDM pixel generator (SiD, DMD2-ImageNet) converted with "
            "'python -m comfyui_fewstep convert': x0 = G(sigma_init z, sigma_init). No VAE.",
            inputs=[
                io.Combo.Input(
                    "model_file",
                    options=[o for o in _file_options() if not o.startswith("loras/")],
                    tooltip="a converted generator (.safetensors) from checkpoints/ or diffusion_models/",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="seed of the input noise (and of random class labels)",
                ),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="number of images to generate"),
                io.Int.Input(
                    "class_label",
                    default=-1,
                    min=-1,
                    max=100000,
                    tooltip="class index for class-conditional generators; -1 draws random classes",
                ),
                io.Float.Input(
                    "sigma_init",
                    default=0.0,
                    min=0.0,
                    max=1000.0,
                    step=0.01,
                    tooltip="starting noise level; 0 uses the recipe's (SiD 2.5, DMD2-ImageNet 80)",
                ),
            ],
            outputs=[
                io.Image.Output(tooltip="generated images in [0, 1]"),
                io.String.Output(display_name="recipe_info", tooltip="detected network, recipe and why"),
            ],
        )

    @classmethod
    def execute(cls, model_file, seed=0, batch_size=4, class_label=-1, sigma_init=0.0):
        images, info = generate_edm_images(_resolve(model_file), seed, batch_size, class_label, sigma_init)
        return io.NodeOutput(images, info)
