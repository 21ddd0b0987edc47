"""Load a student's weights (safely) and bring them into the layout ComfyUI's UNet uses.

No pickle code is ever run: safetensors are memory-mapped, torch files go through
``torch.load(weights_only=True)``. Diffusers UNets are renamed to LDM names zero-copy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .detect import LDM_PREFIX, Detection, detect_contents
from .errors import StudentLoadError
from .keys import convert_diffusers_to_ldm
from .safetensors_header import FileContents, load_torch_state_dict, read_contents, resolve_model_path
from .stream import NONFINITE_BITS, all_finite

__all__ = ["check_finite", "check_lora_base", "load_student", "load_weights", "to_ldm_unet"]


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a model file or diffusers folder, on CPU, without executing pickle code."""
    weights, _ = resolve_model_path(path)
    if weights.suffix.lower() in (".safetensors", ".sft"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:  # read_contents normally catches these first
            raise StudentLoadError(
                weights,
                f"the safetensors file cannot be read ({e}).",
                "the file is corrupt: download it again.",
            ) from None
    return load_torch_state_dict(weights)


def _tensor_finite(t: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or Inf."""
    if t.element_size() == 1 and t.dtype in NONFINITE_BITS:  # float8: no min/max kernels, check the bits
        return all_finite(t.detach().cpu().contiguous().view(torch.uint8).numpy(), t.dtype)
    try:
        lo, hi = torch.aminmax(t)  # NaN propagates, +-Inf shows at an end; far faster than isfinite on CPU
    except (NotImplementedError, RuntimeError):  # a dtype without kernels on this device
        return bool(torch.isfinite(t.float()).all())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def check_finite(state_dict: dict[str, torch.Tensor], path: str | Path | None, limit: int = 5) -> None:
    """Raise :class:`StudentLoadError` naming the tensors that hold NaN or Inf."""
    bad = []
    for k, t in state_dict.items():
        if t.is_floating_point() and t.device.type != "meta" and t.numel() and not _tensor_finite(t):
            bad.append(k)
    if bad:
        shown = ", ".join(bad[:limit]) + (f" (+{len(bad) - limit} more)" if len(bad) > limit else "")
        raise StudentLoadError(
            path,
            f"{len(bad)} weight tensor(s) contain NaN or Inf: {shown}.",
            "the file is damaged or was saved from a diverged training run; "
            "download it again or use another checkpoint.",
        )


def check_lora_base(det: Detection, model_arch: str | None) -> None:
    """Raise when a LoRA's base architecture differs from the model it is applied to."""
    if model_arch is not None and det.arch != model_arch:
        raise StudentLoadError(
            det.path,
            f"this LoRA is for {det.arch} but the model it is applied to is {model_arch}.",
            f"connect a {det.arch} model, or pick a LoRA made for {model_arch}.",
        )


def to_ldm_unet(det: Detection, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet weights under bare LDM names (no ``model.diffusion_model.`` prefix), zero-copy."""
    if det.layout == "diffusers_unet":
        converted, _ = convert_diffusers_to_ldm(state_dict, det.arch)
        return converted
    if det.layout in ("ldm_unet", "ldm_checkpoint"):
        if LDM_PREFIX + "input_blocks.0.0.weight" in state_dict:
            n = len(LDM_PREFIX)
            return {k[n:]: v for k, v in state_dict.items() if k.startswith(LDM_PREFIX)}
        return state_dict
    raise StudentLoadError(
        det.path,
        f"a {det.layout} file holds no UNet.",
        "load LoRAs onto a base model; EDM generators go to the EDM generator node.",
    )


def load_student(
    path: str | Path, override: str | None = None, check_nan: bool = True
) -> tuple[Detection, dict[str, torch.Tensor]]:
    """Detect (header only), then load the weights and check them. Returns ``(detection, state_dict)``
    where ``state_dict`` is the file's tensors as stored."""
    contents: FileContents = read_contents(path)
    det = detect_contents(contents, override)
    sd = load_weights(path)
    if check_nan:
        check_finite(sd, det.path)
    return det, sd
