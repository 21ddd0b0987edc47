"""A capture backend that emulates CUDA-graph semantics on any device, for tests and debugging.

``capture`` runs the warm-ups and one recording run, then fills the recorded outputs with NaN
(a real recording executes nothing, so the outputs hold garbage until the first replay);
``replay`` re-runs the recorded body, which reads only the static input buffers, and copies its
result into those same output tensors. Everything around the backend (signatures, static
buffers, copy-in, copy-out, LRU, invalidation, parity check, list consumption) therefore runs
exactly as with ``torch.cuda.CUDAGraph``, and the counters show what was captured and replayed.
It is never used by the node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .signature import flatten

__all__ = ["EmulatedGraph", "EmulatedGraphBackend"]


class EmulatedGraph:
    def __init__(self, backend: EmulatedGraphBackend, body: Callable[[], Any], output: Any) -> None:
        self.backend, self.body, self.output = backend, body, output
        self.nbytes = sum(t.numel() * t.element_size() for t in flatten(output, "output")[1])
        self.released = False

    def replay(self) -> None:
        if self.released:
            raise RuntimeError("replay of a released graph")
        self.backend.replays += 1
        fresh = flatten(self.body(), "output")[1]
        for static, new in zip(flatten(self.output, "output")[1], fresh):
            static.copy_(new)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.backend.releases += 1
        self.output = None


class EmulatedGraphBackend:
    """Counts ``captures``, ``warmups``, ``replays``, ``releases`` and ``pools``."""

    name = "emulated"

    def __init__(self) -> None:
        self.captures = self.warmups = self.replays = self.releases = self.pools = 0
        self.graphs: list[EmulatedGraph] = []

    def unavailable_reason(self, device: torch.device) -> str | None:
        return None

    def new_pool(self, device: torch.device) -> Any:
        self.pools += 1
        return object()

    def record(self, body: Callable[[], Any]) -> EmulatedGraph:
        output = body()
        for t in flatten(output, "output")[1]:
            if t.is_floating_point():
                t.fill_(float("nan"))
        return EmulatedGraph(self, body, output)

    def capture(self, body: Callable[[], Any], *, device: torch.device, warmup: int, pool: Any) -> EmulatedGraph:
        for _ in range(warmup):
            body()
            self.warmups += 1
        graph = self.record(body)
        self.captures += 1
        self.graphs.append(graph)
        return graph

    def trim(self, device: torch.device) -> None:
        pass
