"""CUDA-graph capture and replay of a diffusion model's forward pass (pure PyTorch).

* ``signature``: input trees to hashable keys plus tensor leaves, and weight fingerprints;
* ``capture``: the backend that records and replays ``torch.cuda.CUDAGraph``s;
* ``cache``: the per-model LRU of captured graphs (one memory pool, a negative cache);
* ``verify``: the first-replay parity check against eager;
* ``eligibility``: when a call must stay eager, and why;
* ``attention``: SDPA without the cuDNN kernel, for capture;
* ``graphed``: ``GraphedForward``, which ties them together per call.

Nothing here knows about ComfyUI; ``nodes/cuda_graph_nodes.py`` adapts a ModelPatcher.
"""

from .capture import CUDA_GRAPH_BACKEND, CapturedGraph, CudaGraphBackend, GraphBackend
from .eligibility import ATTENTION_POLICIES, AttentionPolicy, ModelFacts, ineligible_reason, pin_sdpa_backends
from .graphed import GraphedForward, GraphStats
from .signature import UnsupportedInput, flatten, parameter_fingerprint, unflatten

__all__ = [
    "ATTENTION_POLICIES",
    "CUDA_GRAPH_BACKEND",
    "AttentionPolicy",
    "CapturedGraph",
    "CudaGraphBackend",
    "GraphBackend",
    "GraphStats",
    "GraphedForward",
    "ModelFacts",
    "UnsupportedInput",
    "flatten",
    "ineligible_reason",
    "parameter_fingerprint",
    "pin_sdpa_backends",
    "unflatten",
]
