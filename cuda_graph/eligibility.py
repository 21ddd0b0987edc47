"""Per-call eligibility: can this forward pass be captured safely, and if not, why.

The checks are the conditions under which a replayed graph would compute something else than
the eager forward (CUDA-graph research notes, design checklist item 2): weights streamed from
the host inside the forward (partial / low-VRAM loading), weights re-patched during sampling
(hooks), arbitrary Python patches that may sync with the host or branch on timestep values,
attention kernels not known to be capture-safe, other wrappers that would be recorded too.
The caller gathers the facts (``ModelFacts``) cheaply per call; this module only decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

__all__ = [
    "ATTENTION_POLICIES",
    "CAPTURE_SAFE_ATTENTION",
    "AttentionPolicy",
    "ModelFacts",
    "ineligible_reason",
    "pin_sdpa_backends",
]

AttentionPolicy = Literal["auto", "sdpa_no_cudnn", "unchecked"]
"""How attention is run under capture.

* ``auto``: capture only PyTorch SDPA / basic attention; exclude the cuDNN SDPA kernel when the
  cuDNN version is in the range known to fault under graphs (9.13-9.14, NVIDIA
  TransformerEngine#2344), otherwise capture exactly what eager runs (bitwise-equal output);
* ``sdpa_no_cudnn``: capture only PyTorch SDPA / basic attention and always restrict SDPA to
  the flash, memory-efficient and math kernels;
* ``unchecked``: capture whatever attention function is active (xformers, sage, split, ...);
  keep verification on.
"""
ATTENTION_POLICIES: tuple[str, ...] = get_args(AttentionPolicy)

CAPTURE_SAFE_ATTENTION = frozenset({"attention_pytorch", "attention_basic"})

_CUDNN_BAD_UNDER_GRAPHS = (91300, 91500)  # [first bad, first good) in torch.backends.cudnn.version() form


@dataclass(frozen=True)
class ModelFacts:
    """What the caller knows about the model and this call (all cheap to read)."""

    device_type: str
    grad_enabled: bool = False
    lowvram: bool = False
    lowvram_patches: int = 0
    loaded_bytes: int | None = None
    model_bytes: int | None = None
    weight_hooks: bool = False
    patches: tuple[str, ...] = ()
    patches_replace: tuple[str, ...] = ()
    allowed_patches: frozenset[str] = field(default_factory=frozenset)
    attention_override: bool = False
    attention_name: str = "attention_pytorch"
    attention_policy: AttentionPolicy = "auto"
    inner_wrappers: int = 0
    backend_reason: str | None = None


def ineligible_reason(facts: ModelFacts) -> str | None:
    """The first reason this call must run eagerly, as a sentence for the log, or None."""
    if facts.backend_reason is not None:
        return facts.backend_reason
    if facts.grad_enabled:
        return "gradients are enabled (graphs are captured for inference only)"
    if facts.lowvram or facts.lowvram_patches > 0:
        return "the model is partially loaded (low-VRAM mode streams weights during the forward pass)"
    if facts.loaded_bytes is not None and facts.model_bytes is not None and facts.loaded_bytes < facts.model_bytes:
        return (
            f"the model is partially loaded ({facts.loaded_bytes} of {facts.model_bytes} bytes on the device); "
            "free VRAM or use a smaller batch"
        )
    if facts.weight_hooks:
        return "weight hooks are active (per-conditioning LoRA / keyframes re-patch weights during sampling)"
    blocked = sorted(set(facts.patches) - facts.allowed_patches)
    if blocked:
        return f"transformer patches {blocked} are present (arbitrary Python that a graph would freeze)"
    blocked = sorted(set(facts.patches_replace) - facts.allowed_patches)
    if blocked:
        return f"attention replacements {blocked} are present (arbitrary Python that a graph would freeze)"
    if facts.attention_override:
        return "another node set an attention override"
    if facts.inner_wrappers > 0:
        return f"{facts.inner_wrappers} other diffusion-model wrapper(s) run inside this one and would be frozen"
    if facts.attention_policy != "unchecked" and facts.attention_name not in CAPTURE_SAFE_ATTENTION:
        return (
            f"attention backend {facts.attention_name!r} is not verified under capture "
            f"(use PyTorch attention, or attention policy 'unchecked' at your own risk)"
        )
    return None


def pin_sdpa_backends(policy: AttentionPolicy, cudnn_version: int | None) -> bool:
    """Whether SDPA must exclude the cuDNN kernel while capturing, for this policy and cuDNN."""
    if policy not in ATTENTION_POLICIES:
        raise ValueError(f"attention policy {policy!r} is not one of {ATTENTION_POLICIES}")
    if policy == "sdpa_no_cudnn":
        return True
    if policy == "auto" and cudnn_version is not None:
        lo, hi = _CUDNN_BAD_UNDER_GRAPHS
        return lo <= cudnn_version < hi
    return False
