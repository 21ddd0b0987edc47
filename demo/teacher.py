"""Load and save the bundled tiny teacher (weights + JSON config in one safetensors file).

The file stores the EMA weights of :class:`.network.EDMDenoiser` and, in the
safetensors header metadata, ``"format"`` (:data:`FORMAT`), ``"config"`` (the
:class:`.network.TinyUNetConfig` as JSON) and ``"training_command"``. Loading never
unpickles anything.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .network import EDMDenoiser, TinyUNetConfig

__all__ = ["FORMAT", "WEIGHTS_PATH", "load_teacher", "read_metadata", "save_teacher"]

logger = logging.getLogger(__name__)

FORMAT = "comfyui_fewstep.demo.tiny_teacher/1"
WEIGHTS_PATH = Path(__file__).resolve().parent / "tiny_teacher.safetensors"


def read_metadata(path: str | Path = WEIGHTS_PATH) -> dict[str, str]:
    """The safetensors header metadata of a teacher file (``format``, ``config``, ...)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tiny teacher weights not found at {path}; reinstall the package or train them with "
            "`python tools/train_tiny_teacher.py`"
        )
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_teacher(denoiser: EDMDenoiser, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``denoiser``'s weights (float32) and config to ``path`` (safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in denoiser.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(denoiser.config.to_dict(), sort_keys=True)}
    meta.update(metadata or {})
    save_file(tensors, str(path), metadata=meta)
    return path


def load_teacher(
    path: str | Path | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> EDMDenoiser:
    """The bundled (or given) tiny EDM teacher, in eval mode with gradients off.

    The result follows the sampler model contract: ``denoiser(x, sigma_batch) -> denoised``
    in the VE form ``x = x0 + sigma * eps``, for ``x`` of shape ``(B, 1, 8, 8)`` (see
    ``denoiser.config``), ``sigma`` in ``[denoiser.sigma_min, denoiser.sigma_max]``
    (0.002 .. 80) and images in ``[-1, 1]``.
    """
    path = Path(WEIGHTS_PATH if path is None else path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a tiny-teacher file: format {meta.get('format')!r}, expected {FORMAT!r}"
        )
    config = TinyUNetConfig.from_dict(json.loads(meta["config"]))
    denoiser = EDMDenoiser(config)
    denoiser.load_state_dict(load_file(str(path)), strict=True)
    denoiser.requires_grad_(False).eval()
    logger.debug("loaded tiny teacher from %s", path)
    return denoiser.to(device=device, dtype=dtype)
