"""Tell what a model file is — layout, base architecture, student and recipe — from its header.

Only names, shapes, dtypes, safetensors metadata and the file name are used (see
:mod:`.safetensors_header`); the weights are never read. Every conclusion carries the reason it
was drawn from, so a loader can report *why* it chose a recipe.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from .errors import StudentLoadError
from .keys import LCM_EMBEDDING_NAMES, LDM_PREFIX, diffusers_unet_shapes, lcm_embedding_name, ldm_unet_shapes
from .safetensors_header import FileContents, read_contents
from .specs import EDM_ARCHS, RECIPES, Recipe, get_recipe

__all__ = ["LAYOUTS", "Detection", "Layout", "detect", "detect_contents", "lora_module_names"]

logger = logging.getLogger(__name__)

Layout = Literal["ldm_checkpoint", "ldm_unet", "diffusers_unet", "lora_kohya", "lora_diffusers", "edm"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
_LORA_SUFFIX = re.compile(
    r"\.(lora_down|lora_up|lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)"
    r"(\.[^.]+)?\.weight$|\.alpha$|\.dora_scale$"
    r"|_lora\.(down|up)\.weight$"  # diffusers attention-processor LoRA: attn2.processor.to_k_lora.down.weight
)
_TE_PREFIXES = ("lora_te", "text_encoder", "te_", "te1_", "te2_", "lora_te1_", "lora_te2_")


@dataclass
class Detection:
    """The verdict on one file; ``reasons`` explain each field."""

    path: str
    container: str
    layout: str
    arch: str | None
    recipe: str | None
    confidence: Literal["certain", "likely", "none"]
    reasons: list[str] = field(default_factory=list)
    dtypes: dict[str, int] = field(default_factory=dict)
    parameters: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    lora_rank: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: what named the recipe: "file name", "folder name", "metadata", "config", "keys" or ""
    decided_by: str = ""

    @property
    def is_lora(self) -> bool:
        return self.layout.startswith("lora")

    def to_json(self) -> dict:
        recipe = RECIPES.get(self.recipe) if self.recipe else None
        out = {k: v for k, v in self.__dict__.items() if k != "metadata"}
        out["metadata_keys"] = sorted(self.metadata)
        out["prediction"] = recipe.prediction if recipe else None
        out["student"] = recipe.student if recipe else None
        return out


def _layout(c: FileContents) -> str:
    names = c.tensors
    if c.metadata.get("fewstep_format") == "edm" or any(
        k.startswith(("map_layer0", "model.map_layer0")) for k in names
    ):
        return "edm"
    if any(k.startswith(("lora_unet_", "lora_te")) for k in names):
        return "lora_kohya"
    if any(_LORA_SUFFIX.search(k) for k in names):
        return "lora_diffusers"
    if LDM_PREFIX + "input_blocks.0.0.weight" in names:
        whole = any(k.startswith(("first_stage_model.", "cond_stage_model.", "conditioner.")) for k in names)
        return "ldm_checkpoint" if whole else "ldm_unet"
    if "input_blocks.0.0.weight" in names:
        return "ldm_unet"
    if "conv_in.weight" in names:
        return "diffusers_unet"
    raise StudentLoadError(
        c.path,
        f"unknown architecture: none of the UNet, LoRA or EDM layouts matches its {len(names)} tensors "
        f"(first names: {', '.join(sorted(names)[:3])}).",
        "this loader handles SD1.5 / SD2.1 / SDXL UNets, their LoRAs and converted EDM generators; "
        "load other models with ComfyUI's own loaders.",
    )


def _unet_arch(c: FileContents, reasons: list[str]) -> str:
    ctx = linear = adm = None
    for k, info in c.tensors.items():
        if ctx is None and k.endswith("attn2.to_k.weight") and len(info.shape) == 2:
            ctx = info.shape[1]
        if linear is None and k.endswith("proj_in.weight"):
            linear = len(info.shape) == 2
        if adm is None and k.endswith(("add_embedding.linear_1.weight", "label_emb.0.0.weight")):
            adm = info.shape[1]
    found = f"cross-attention width {ctx}, {'linear' if linear else 'conv'} proj_in, extra embedding {adm}"
    if ctx == 768 and linear is False and adm is None:
        arch = "sd15"
    elif ctx == 1024 and linear and adm is None:
        arch = "sd21"
    elif ctx == 2048 and linear and adm == 2816:
        arch = "sdxl"
    else:
        raise StudentLoadError(
            c.path,
            f"unknown UNet architecture ({found}).",
            "supported bases are SD1.5, SD2.1 and SDXL; use ComfyUI's loaders for others.",
        )
    reasons.append(f"arch {arch}: {found}")
    return arch


def lora_module_names(names) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Group LoRA tensor names by target module: ``({unet module: [tensor names]}, {text-encoder
    module: [tensor names]})``."""
    modules: dict[str, list[str]] = {}
    text: dict[str, list[str]] = {}
    for k in names:
        m = _LORA_SUFFIX.search(k)
        module = k[: m.start()] if m else k
        if k.startswith(_TE_PREFIXES):
            text.setdefault(module, []).append(k)
            continue
        for prefix in ("base_model.model.", "unet.", "lora_unet_", "diffusion_model."):
            module = module.removeprefix(prefix)
        modules.setdefault(module, []).append(k)
    return modules, text


def _lora_arch(c: FileContents, reasons: list[str]) -> tuple[str, int | None]:
    ctx = rank = None
    for k, info in c.tensors.items():
        flat = k.replace(".", "_")
        down = any(s in k for s in ("lora_down", "lora_A", "lora.down", "lora_linear_layer.down"))
        if down and rank is None and len(info.shape) >= 2:
            rank = info.shape[0]
        to_k = "attn2_to_k" in flat or "attn2_processor_to_k" in flat
        if down and to_k and not k.startswith(_TE_PREFIXES):
            ctx = info.shape[1]
            break
    arch = {768: "sd15", 1024: "sd21", 2048: "sdxl"}.get(ctx)
    if arch is None:
        raise StudentLoadError(
            c.path,
            f"cannot tell the LoRA's base model (cross-attention input width {ctx}).",
            "use a LoRA for SD1.5, SD2.1 or SDXL, or load it with ComfyUI's LoraLoader.",
        )
    reasons.append(f"arch {arch}: LoRA attn2.to_k input width {ctx}, rank {rank}")
    return arch, rank


def _edm_arch(c: FileContents, reasons: list[str]) -> str:
    arch = c.metadata.get("fewstep_arch") or c.config.get("arch")
    if arch not in EDM_ARCHS:
        arch = "edm_dhariwal" if any(k.endswith("out_conv.weight") for k in c.tensors) else "edm_songunet"
        reasons.append(f"arch {arch}: from key names")
    else:
        reasons.append(f"arch {arch}: from the converter's metadata")
    return arch


def _edm_recipe(c: FileContents, arch: str, reasons: list[str]) -> tuple[str, str, str]:
    """SiD or DMD2 for an EDM generator: both are EDM networks with the same key layout, so the
    evidence is where the file came from. SiD publishes EDM persistence pickles (``ema`` holding an
    ``EDMPrecond`` module; our converter records the class as ``fewstep_root_class``) and has SongUNet
    students; DMD2 publishes its ImageNet-64 DhariwalUNet as a plain ``EDMPrecond`` state dict
    (``pytorch_model.bin``, names under ``model.``)."""
    name = c.path.name.lower()
    root_class = c.metadata.get("fewstep_root_class", "")
    if arch == "edm_songunet":
        why = "a SongUNet generator (DMD2 has none; SiD's CIFAR-10/FFHQ/AFHQ students are SongUNets)"
        recipe, confidence = "sid_edm_1step", "certain"
    elif "dmd2" in name:
        why, recipe, confidence = "file name says DMD2", "dmd2_imagenet_1step", "certain"
    elif re.search(r"(^|[^a-z])sida?([^a-z]|$)", name):
        why, recipe, confidence = "file name says SiD", "sid_edm_1step", "certain"
    elif root_class:
        why = f"converted from a pickled {root_class.split(':')[-1]} module, SiD's format (EDM persistence)"
        recipe, confidence = "sid_edm_1step", "likely"
    elif "fewstep_converted_from" in c.metadata or any(k.startswith("model.map_layer0") for k in c.tensors):
        why = "a plain state dict, not a pickled module: DMD2's ImageNet-64 format (EDMPrecond)"
        recipe, confidence = "dmd2_imagenet_1step", "likely"
    else:
        why = "EDM generator with nothing that tells SiD from DMD2; assuming SiD (sigma_init 2.5)"
        recipe, confidence = "sid_edm_1step", "likely"
    reasons.append(f"recipe {recipe}: {why}")
    if confidence != "certain":
        other = "dmd2_imagenet_1step" if recipe == "sid_edm_1step" else "sid_edm_1step"
        if arch in RECIPES[other].archs:
            reasons.append(f"recipe: if this is the other student ({other}), set the EDM generator's "
                           f"sigma_init to {RECIPES[other].sigma_init:g}")
    return recipe, confidence, "file name" if why.startswith("file name") else "keys"


# (regex on the lower-case file name, recipe, or a callable (arch, name) -> recipe)
def _name_rules(arch: str, name: str, is_lora: bool) -> tuple[str | None, str]:
    n = name.lower()
    steps = re.search(r"(\d+)[-_ ]?steps?", n)
    k = int(steps.group(1)) if steps else None
    if "dmd2" in n:
        if arch == "sdxl":
            return ("dmd2_sdxl_1step" if k == 1 else "dmd2_sdxl_4step"), "file name says DMD2"
        if arch == "sd15":
            return "dmd2_sd15_1step", "file name says DMD2"
    if re.search(r"(^|[^a-z])dmd([^a-z0-9]|$)", n) and arch == "sd15":
        return "dmd_sd15_1step", "file name says DMD"
    if ("sid" in n and "lsg" in n) or "t625" in n:
        return f"sid_lsg_{arch}_1step", "file name says SiD-LSG / t625"
    if "scflow" in n:
        return "scflow_sd15_1step", "file name says SCFlow"
    if "instaflow" in n:
        return "instaflow_sd15_1step", "file name says InstaFlow"
    if "2_rectified" in n or "2rf" in n or "rectified_flow" in n:
        return "rectified_flow_2_sd15", "file name says 2-rectified flow"
    if "turbo" in n:
        return ("sdxl_turbo_sdxl" if arch == "sdxl" else "sd_turbo_sd21"), "file name says Turbo"
    if "lightning" in n:
        if "x0" in n or k == 1:
            return "sdxl_lightning_1step_x0", "file name says Lightning 1-step x0"
        if k in (2, 4, 8):
            return f"sdxl_lightning_{k}step", f"file name says Lightning {k}-step"
    if "hyper" in n:
        if "cfg" in n and k in (8, 12):
            return f"hyper_{k}step_cfg_lora", f"file name says Hyper-SD {k}-step CFG-preserved LoRA"
        if k == 1 and not is_lora:
            return "hyper_sdxl_1step_unet", "file name says Hyper-SD 1-step UNet"
        if k == 1:
            return "hyper_1step_lora_tcd", "file name says Hyper-SD 1-step (unified, TCD) LoRA"
        if k in (2, 4, 8):
            return f"hyper_{k}step_lora", f"file name says Hyper-SD {k}-step LoRA"
    if "pcm" in n:
        if "lcmlike" in n:
            return "lcm_lora", "file name says PCM LCM-like LoRA"
        kind = "normalcfg" if "normalcfg" in n else "smallcfg"
        if k and f"pcm_{kind}_{k}step" in RECIPES:
            return f"pcm_{kind}_{k}step", f"file name says PCM {kind} {k}-phase"
    if "tcd" in n:
        return "tcd_lora", "file name says TCD"
    if "lcm" in n:
        return ("lcm_lora" if is_lora else "lcm"), "file name says LCM"
    if "swiftbrush" in n:
        return "swiftbrush_sd21_1step", "file name says SwiftBrush"
    return None, ""


def _choose_recipe(c: FileContents, layout: str, arch: str, reasons: list[str],
                   override: str | None = None) -> tuple[str | None, str, str]:
    """The recipe, the confidence in it, and what named it (see :attr:`Detection.decided_by`)."""
    is_lora = layout.startswith("lora")
    meta = c.metadata.get("fewstep_recipe")
    if meta in RECIPES and arch in RECIPES[meta].archs:
        reasons.append(f"recipe {meta}: from the file's metadata (fewstep_recipe)")
        return meta, "certain", "metadata"
    if meta in RECIPES and not override:
        raise StudentLoadError(
            c.path,
            f"the file's metadata names recipe {meta!r} (fewstep_recipe), which is for "
            f"{'/'.join(RECIPES[meta].archs)}, but the file is a {arch} model.",
            f"set the recipe override to a recipe for {arch}, or convert the file again with the "
            "right --recipe (or none).",
        )
    if meta:
        known = f"is not for a {arch} model" if meta in RECIPES else "is not known to this version"
        reasons.append(f"note: the file's metadata names recipe {meta!r}, which {known}; ignored")
    if layout == "edm":
        return _edm_recipe(c, arch, reasons)
    texts = [("file name", c.path.name), ("folder name", c.path.parent.name),
             ("folder name", c.path.parent.parent.name), ("config", c.config.get("_name_or_path", ""))]
    title_keys = ("modelspec.title", "ss_output_name", "name", "title")
    texts += [("metadata", v) for k, v in c.metadata.items() if k in title_keys]
    # a converted pickle keeps its original name, which still says what it is after a rename
    if "fewstep_converted_from" in c.metadata:
        texts.append(("converted", c.metadata["fewstep_converted_from"]))
    for source, text in texts:
        recipe, why = _name_rules(arch, str(text), is_lora)
        if recipe and recipe in RECIPES and arch in RECIPES[recipe].archs:
            where = {"config": "the diffusers config's _name_or_path",
                     "metadata": "the file's metadata title",
                     "converted": "the name of the pickle it was converted from"}.get(source, source)
            source = "metadata" if source == "converted" else source
            why = why.replace("file name", where, 1)
            reasons.append(f"recipe {recipe}: {why} ({text!r})")
            return recipe, "certain", source
    embedding = lcm_embedding_name(c.tensors)
    if embedding or c.config.get("time_cond_proj_dim"):
        reasons.append(f"recipe lcm: the UNet has LCM's guidance embedding ({embedding or 'time_cond_proj_dim'})")
        return "lcm", "likely", "keys"
    reasons.append("recipe: nothing in the file name, metadata or keys identifies the student")
    return None, "none", ""


def _compare(c: FileContents, layout: str, arch: str, det: Detection) -> None:
    if layout in ("diffusers_unet",):
        expected, prefix = diffusers_unet_shapes(arch), ""
    elif layout in ("ldm_checkpoint", "ldm_unet"):
        expected = ldm_unet_shapes(arch)
        prefix = LDM_PREFIX if LDM_PREFIX + "input_blocks.0.0.weight" in c.tensors else ""
    else:
        return
    have = {k[len(prefix) :]: v for k, v in c.tensors.items() if k.startswith(prefix)}
    extras = {n for n in LCM_EMBEDDING_NAMES if not n.startswith(LDM_PREFIX)}
    det.missing = sorted(k for k in expected if k not in have)
    det.unexpected = sorted(k for k in have if k not in expected and k not in extras)
    det.mismatched = sorted(
        f"{k}: {list(have[k].shape)} (expected {list(s)})"
        for k, s in expected.items()
        if k in have and tuple(have[k].shape) != tuple(s)
    )


def detect_contents(c: FileContents, override: str | None = None) -> Detection:
    """Detect layout, architecture and recipe of already-read file contents (see :func:`detect`)."""
    reasons: list[str] = []
    layout = _layout(c)
    reasons.append(f"layout {layout}")
    rank = None
    if layout == "edm":
        arch = _edm_arch(c, reasons)
    elif layout.startswith("lora"):
        arch, rank = _lora_arch(c, reasons)
    else:
        arch = _unet_arch(c, reasons)
    recipe, confidence, decided_by = _choose_recipe(c, layout, arch, reasons, override)
    det = Detection(
        str(c.path),
        c.container,
        layout,
        arch,
        recipe,
        confidence,
        reasons,
        lora_rank=rank,
        metadata=dict(c.metadata),
        decided_by=decided_by,
    )
    det.dtypes = dict(Counter(t.dtype for t in c.tensors.values()))
    total = 0
    for t in c.tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        total += n
    det.parameters = total
    _compare(c, layout, arch, det)
    if override:
        _apply_override(c, det, get_recipe(override))
    return det


def _apply_override(c: FileContents, det: Detection, recipe: Recipe) -> None:
    if det.arch not in recipe.archs:
        raise StudentLoadError(
            c.path,
            f"recipe {recipe.name!r} is for {'/'.join(recipe.archs)} but the file is a {det.arch} model.",
            f"pick a recipe for {det.arch} or leave the override on 'auto'.",
        )
    detected = RECIPES.get(det.recipe) if det.recipe else None
    clash = detected is not None and det.confidence == "certain" and detected.prediction != recipe.prediction
    if clash and det.decided_by == "file name":
        # the file's own name is the user's label: an override against it is more likely a slip
        raise StudentLoadError(
            c.path,
            f"recipe {recipe.name!r} expects {recipe.prediction} prediction but the file was identified as "
            f"{detected.name!r} ({detected.prediction} prediction; {det.reasons[-1]}).",
            f"use {detected.name!r} (or 'auto'), or rename the file if the detection is wrong.",
        )
    if clash:
        # a folder, a config or metadata name can be wrong for this file, and only the override can say so
        det.reasons.append(
            f"note: the override {recipe.name} ({recipe.prediction} prediction) contradicts "
            f"{detected.name} ({detected.prediction} prediction), named by the {det.decided_by}; "
            "check that the override is right"
        )
        logger.warning("%s: %s", c.path.name, det.reasons[-1])
    if recipe.is_lora != det.is_lora:
        det.reasons.append(
            f"note: recipe {recipe.name} is written for a {'LoRA' if recipe.is_lora else 'full model'}"
        )
    if detected and detected.name != recipe.name:
        det.reasons.append(f"override: {recipe.name} replaces the detected {detected.name}")
    else:
        det.reasons.append(f"override: {recipe.name}")
    det.recipe, det.confidence = recipe.name, "certain"


def detect(path: str | Path, override: str | None = None) -> Detection:
    """Read ``path``'s header and detect what it is; ``override`` forces a recipe (checked for
    consistency with the file). Raises :class:`StudentLoadError` on unreadable or unknown files."""
    return detect_contents(read_contents(path), override)
