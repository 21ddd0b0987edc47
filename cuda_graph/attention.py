"""Multi-head attention on PyTorch SDPA with the cuDNN kernel excluded, for use under capture.

ComfyUI wraps every SDPA call in ``sdpa_kernel([CUDNN, FLASH, EFFICIENT, MATH],
set_priority=True)``, which overrides any outer backend choice. cuDNN attention faulted under
CUDA graphs for non-causal key lengths above 1024 in cuDNN 9.13-9.14 (NVIDIA
TransformerEngine#2344), exactly SD1.5's 4096-token self-attention, and an illegal memory
access poisons the CUDA context. This function is handed to the model as an attention
override during capture only, so the recorded graph uses flash / memory-efficient / math.

Layouts (ComfyUI's attention convention): ``q, k, v`` are ``(B, N, heads * d)``, or
``(B, heads, N, d)`` with ``skip_reshape``; the output is ``(B, N, heads * d)``, or
``(B, heads, N, d)`` with ``skip_output_reshape``. ``mask`` broadcasts to ``(B, heads, Nq, Nk)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["sdpa_without_cudnn"]


def _backends() -> list:
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_without_cudnn(
    func: Callable[..., Any] | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    attn_precision: Any = None,
    skip_reshape: bool = False,
    skip_output_reshape: bool = False,
    **kwargs: Any,
) -> torch.Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017, eq. 1) without the cuDNN kernel.

    ``func`` (the attention function being overridden) and ``attn_precision`` are accepted
    for signature compatibility and ignored: SDPA computes in the input dtype with float32
    accumulation on every kernel it may pick here.
    """
    from torch.nn.attention import sdpa_kernel

    if skip_reshape:
        b, _, _, d = q.shape
    else:
        b, _, inner = q.shape
        d = inner // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    with sdpa_kernel(_backends()):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(b, -1, heads * d)
