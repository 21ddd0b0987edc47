"""Multistep history carried across split schedules (SplitSigmas, refiner hand-off, denoise < 1).

A multistep solver needs the model outputs of its last ``order - 1`` steps. When a schedule is
split into two sampler runs, the second run normally restarts at first order. This module keeps
the end state of the last runs that stopped at a non-zero sigma, in a module-level LRU (in CPU
memory, at most :data:`MAX_ENTRIES` entries and :data:`MAX_BYTES` bytes; each entry holds the
output, at most ``order`` model outputs and the state one step earlier, for the UniC correction
at the split), so a run whose input ``x`` and first sigma match a stored end state resumes with
that history and keeps its order. A run whose input is not among them (the first part ran in
another process, the latent was saved and loaded, or many other split runs came in between)
starts at first order, as ComfyUI's samplers always do, and logs it.

Matching: ComfyUI round-trips the latent between the two runs (``process_latent_out`` /
``process_latent_in``, and for flow models ``inverse_noise_scaling`` divides by ``1 - sigma`` at the
end of the first run while the second run's ``noise_scaling`` multiplies by it again), and may move
it to another device. The values agree to float32 rounding, not bit for bit, so an entry matches
when shape, sigma and algorithm agree, a few strided probe values agree, and finally the whole
tensor agrees within ``rtol=1e-5`` (relative to its largest magnitude).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

logger = logging.getLogger(__name__)

__all__ = ["MAX_BYTES", "MAX_ENTRIES", "MultistepHistory", "clear", "lookup", "store"]

MAX_ENTRIES = 32
#: CPU memory the stored end states may take together (a 1024x1024 SDXL latent is 256 KiB)
MAX_BYTES = 256 * 2**20
_PROBES = 16
_RTOL = 1e-5


@dataclass(frozen=True)
class MultistepHistory:
    """End state of a multistep run.

    Attributes:
        x: the run's output (``(B, ...)``, on its device).
        sigma: the sigma of ``x`` (the run's last sigma, > 0).
        algorithm: ``"dpmsolver++"`` or ``"dpmsolver"`` (which prediction ``outputs`` hold).
        outputs: the last model outputs, newest first.
        lambdas: their half log-SNRs, newest first.
        x_prev: the state at the start of the run's last step (for the UniC correction of ``x``,
            which the unsplit run applies after its model call at ``x``); None if not kept.
        sigma_prev: the sigma of ``x_prev``.
        last_order: the order of the run's last step.
        steps: the steps taken so far along the split schedule (this run's and the runs' it
            resumed), for the lower-order-final rule of the last part.
        source: who made ``outputs`` (the caller's key for the model, its patches, the
            conditioning and cfg): a run with another source does not resume this history. A
            refiner's predictions are not the base model's, so extrapolating through the base
            model's outputs would add an error a first-order restart does not have.
    """

    x: torch.Tensor
    sigma: float
    algorithm: str
    outputs: tuple[torch.Tensor, ...]
    lambdas: tuple[float, ...]
    x_prev: torch.Tensor | None = None
    sigma_prev: float = math.nan
    last_order: int = 0
    steps: int = 0
    source: str = ""


_entries: OrderedDict[int, MultistepHistory] = OrderedDict()
_lock = threading.Lock()
_next_key = 0


def _probe(x: torch.Tensor) -> torch.Tensor:
    """A few strided values of ``x`` as a float64 CPU tensor (one small device-to-host copy)."""
    flat = x.detach().reshape(-1)
    step = max(1, flat.numel() // _PROBES)
    return flat[::step][:_PROBES].to("cpu", torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=_RTOL, atol=_RTOL * max(scale, 1e-12)))


def _on_cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to("cpu")


def _nbytes(entry: MultistepHistory) -> int:
    tensors = [entry.x, *entry.outputs] + ([entry.x_prev] if entry.x_prev is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def store(entry: MultistepHistory) -> None:
    """Remember ``entry`` (copied to CPU memory); the least recently used entries are dropped
    beyond :data:`MAX_ENTRIES` entries or :data:`MAX_BYTES` bytes."""
    global _next_key
    if not (entry.sigma > 0.0 and math.isfinite(entry.sigma)) or not entry.outputs:
        return
    entry = replace(entry, x=_on_cpu(entry.x), outputs=tuple(_on_cpu(o) for o in entry.outputs),
                    x_prev=_on_cpu(entry.x_prev))
    with _lock:
        _entries[_next_key] = entry
        _next_key += 1
        total = sum(_nbytes(e) for e in _entries.values())
        while _entries and (len(_entries) > MAX_ENTRIES or total > MAX_BYTES):
            _, dropped = _entries.popitem(last=False)
            total -= _nbytes(dropped)


def lookup(x: torch.Tensor, sigma: float, algorithm: str, source: str = "") -> MultistepHistory | None:
    """The stored end state whose output equals ``x`` at ``sigma`` (and algorithm) and that came
    from the same ``source``, else None (logged when only the source differs).

    The returned history's tensors are moved to ``x``'s device and dtype.
    """
    with _lock:
        candidates = [
            (key, e)
            for key, e in _entries.items()
            if e.x.shape == x.shape
            and e.algorithm == algorithm
            and math.isclose(e.sigma, sigma, rel_tol=1e-6)
        ]
    if not candidates:
        return None
    probe = _probe(x)
    for key, entry in reversed(candidates):
        if not _close(probe, _probe(entry.x)):
            continue
        if not _close(x.detach().to("cpu", torch.float32), entry.x.to(torch.float32)):
            continue
        if entry.source != source:
            logger.info("multistep sampler: the run that ended at this latent used another model, "
                        "conditioning or cfg (e.g. a base model before a refiner); its model outputs are not "
                        "this model's history, so this part starts at first order")
            return None
        with _lock:
            if key in _entries:
                _entries.move_to_end(key)
        return MultistepHistory(
            x=entry.x,
            sigma=entry.sigma,
            algorithm=entry.algorithm,
            outputs=tuple(o.to(device=x.device, dtype=x.dtype) for o in entry.outputs),
            lambdas=entry.lambdas,
            x_prev=None if entry.x_prev is None else entry.x_prev.to(device=x.device, dtype=x.dtype),
            sigma_prev=entry.sigma_prev,
            last_order=entry.last_order,
            steps=entry.steps,
            source=entry.source,
        )
    return None


def clear() -> None:
    """Forget every stored end state."""
    with _lock:
        _entries.clear()
