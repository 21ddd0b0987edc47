"""Synthetic model files with real key layouts, for tests and bug reports.

Files written by :func:`write_safetensors` carry the real names, shapes and dtypes; their data is
either given tensors or zeros written as a *sparse* file (no disk blocks used, instant even for
full-size UNets), which is all that header-level detection reads.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from .keys import diffusers_unet_shapes, ldm_unet_shapes

__all__ = [
    "kohya_lora_shapes",
    "peft_lora_shapes",
    "processor_lora_shapes",
    "unet_shapes",
    "write_safetensors",
]

_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
)


def unet_shapes(arch: str, layout: str) -> dict[str, tuple[int, ...]]:
    """UNet parameter shapes in ``diffusers``, ``ldm_unet`` (bare LDM names) or ``ldm_checkpoint``
    (``model.diffusion_model.`` plus a few VAE and text-encoder names) layout."""
    if layout == "diffusers":
        return diffusers_unet_shapes(arch)
    shapes = ldm_unet_shapes(arch)
    if layout == "ldm_unet":
        return shapes
    out = {"model.diffusion_model." + k: v for k, v in shapes.items()}
    out["first_stage_model.decoder.conv_out.weight"] = (3, 128, 3, 3)
    te = "conditioner.embedders.0.transformer." if arch == "sdxl" else "cond_stage_model.transformer."
    out[te + "text_model.final_layer_norm.weight"] = (768,)
    return out


def kohya_lora_shapes(arch: str, rank: int = 64, with_alpha: bool = True) -> dict[str, tuple[int, ...]]:
    """kohya-style LoRA over diffusers module names (``lora_unet_<path_with_underscores>``), as DMD2 ships."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in diffusers_unet_shapes(arch).items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is None or not module.endswith(_LORA_TARGETS) or len(shape) < 2:
            continue
        key = "lora_unet_" + module.replace(".", "_")
        if len(shape) == 4:
            out[key + ".lora_down.weight"] = (rank, shape[1], shape[2], shape[3])
            out[key + ".lora_up.weight"] = (shape[0], rank, 1, 1)
        else:
            out[key + ".lora_down.weight"] = (rank, shape[1])
            out[key + ".lora_up.weight"] = (shape[0], rank)
        if with_alpha:
            out[key + ".alpha"] = ()
    return out


def peft_lora_shapes(arch: str, rank: int = 64) -> dict[str, tuple[int, ...]]:
    """diffusers/PEFT LoRA on the attention projections (``unet.<module>.lora_A/B.weight``)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in diffusers_unet_shapes(arch).items():
        if name.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")):
            module = "unet." + name[: -len(".weight")]
            out[module + ".lora_A.weight"] = (rank, shape[1])
            out[module + ".lora_B.weight"] = (shape[0], rank)
    return out


def processor_lora_shapes(arch: str, rank: int = 64) -> dict[str, tuple[int, ...]]:
    """diffusers attention-processor LoRA (``unet.<attention>.processor.to_q_lora.down.weight``),
    the layout of early diffusers LoRA training scripts."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in diffusers_unet_shapes(arch).items():
        for proj, short in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out.0", "to_out")):
            if name.endswith(f".{proj}.weight"):
                head = "unet." + name[: -len(f".{proj}.weight")]
                out[f"{head}.processor.{short}_lora.down.weight"] = (rank, shape[1])
                out[f"{head}.processor.{short}_lora.up.weight"] = (shape[0], rank)
    return out


def write_safetensors(
    path: str | Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: str = "F16",
    metadata: dict[str, str] | None = None,
    tensors: dict | None = None,
) -> Path:
    """Write a valid safetensors file: ``tensors`` (name -> torch tensor) are stored as given,
    every other name in ``shapes`` as zeros of ``dtype`` in a sparse region."""
    import torch

    tensors = tensors or {}
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs: list[tuple[int, bytes]] = []
    offset = 0
    names = list(dict.fromkeys([*shapes, *tensors]))
    for name in names:
        if name in tensors:
            t = tensors[name].contiguous()
            dt = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[t.dtype]
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            shape = list(t.shape)
            blobs.append((offset, raw))
            nbytes = len(raw)
        else:
            dt, shape = dtype, list(shapes[name])
            n = 1
            for d in shape:
                n *= d
            nbytes = n * _BYTES[dt]
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        base = f.tell()
        for where, raw in blobs:
            f.seek(base + where)
            f.write(raw)
        f.truncate(base + offset)
    return path
