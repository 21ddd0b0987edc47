"""Graph-capture backends: the only code that touches ``torch.cuda.CUDAGraph``.

The rest of the package talks to a backend through two small protocols, so the cache,
signature, invalidation and fallback logic runs (and is tested) without a GPU:

* ``GraphBackend.capture(body, device=..., warmup=..., pool=...)`` runs ``body`` a few
  times eagerly, then records one more run of it and returns a ``CapturedGraph``;
* ``CapturedGraph.replay()`` re-executes the recorded work, refreshing ``.output`` (the
  tensors ``body`` returned while being recorded) in place; ``release()`` frees it.

``body`` reads only static input buffers, so replaying it after copying new data into those
buffers computes the forward pass of the new data (PyTorch notes, "CUDA Graphs": whole-network
capture with static inputs and outputs).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch

__all__ = ["CUDA_GRAPH_BACKEND", "CapturedGraph", "CudaGraphBackend", "GraphBackend"]

logger = logging.getLogger(__name__)

# one capture per process at a time: a second capture (or any un-captured CUDA work from another
# thread) during a capture corrupts it (NVIDIA CUDA Graphs guide, "Constraints")
_CAPTURE_LOCK = threading.Lock()


class CapturedGraph(Protocol):
    output: Any
    nbytes: int

    def replay(self) -> None: ...

    def release(self) -> None: ...


class GraphBackend(Protocol):
    name: str

    def unavailable_reason(self, device: torch.device) -> str | None:
        """Why graphs cannot run on ``device`` right now, or None."""

    def new_pool(self, device: torch.device) -> Any:
        """A memory-pool handle that several graphs of one model may share."""

    def capture(self, body: Callable[[], Any], *, device: torch.device, warmup: int, pool: Any) -> CapturedGraph:
        """Warm ``body`` up ``warmup`` times, record one run, return the graph."""

    def trim(self, device: torch.device) -> None:
        """Return freed graph memory to the device (after graphs were released)."""


class _CudaGraph:
    """One recorded ``torch.cuda.CUDAGraph`` plus the output tensors it writes."""

    def __init__(self, graph: torch.cuda.CUDAGraph, output: Any, nbytes: int) -> None:
        self.graph: torch.cuda.CUDAGraph | None = graph
        self.output = output
        self.nbytes = nbytes

    def replay(self) -> None:
        if self.graph is None:
            raise RuntimeError("replay of a released CUDA graph")
        self.graph.replay()

    def release(self) -> None:
        if self.graph is not None:
            self.graph.reset()
        self.graph = None
        self.output = None


class CudaGraphBackend:
    """Real capture with ``torch.cuda.CUDAGraph``.

    Warm-up and capture run on one dedicated stream per device (cuBLAS/cuDNN handles and
    workspaces are per stream, so warming up elsewhere lets them be created mid-capture), under
    a process-wide lock, with ``capture_error_mode="global"`` so stray CUDA work from another
    thread fails the capture instead of corrupting it. Replays run on the caller's stream,
    which also orders them after the input copies and before the output copies.
    """

    name = "cuda"

    def __init__(self) -> None:
        self._streams: dict[int, torch.cuda.Stream] = {}
        self.broken_reason: str | None = None

    def unavailable_reason(self, device: torch.device) -> str | None:
        if self.broken_reason is not None:
            return self.broken_reason
        if device.type != "cuda":
            return f"the model runs on {device.type!r}; CUDA graphs need a CUDA device"
        if not torch.cuda.is_available():
            return "this PyTorch build has no CUDA support"
        return None

    def new_pool(self, device: torch.device) -> Any:
        with torch.cuda.device(device):
            return torch.cuda.graph_pool_handle()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream(device=index)
        return self._streams[index]

    def capture(self, body: Callable[[], Any], *, device: torch.device, warmup: int, pool: Any) -> CapturedGraph:
        stream = self._stream(device)
        with _CAPTURE_LOCK, torch.cuda.device(device):
            torch.cuda.synchronize(device)
            free_before = torch.cuda.mem_get_info(device)[0]
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    body()
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            body_error: BaseException | None = None
            try:
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="global"):
                    try:
                        output = body()
                    except BaseException as e:  # noqa: BLE001 - re-raised below, after the capture ends
                        body_error = e
            except BaseException as end_error:
                # ending a capture whose body failed raises its own error ("operation failed due to
                # a previous error during capture"), which would hide the body's: report the body's
                self._after_failure(graph, device)
                if body_error is not None:
                    raise body_error from end_error
                raise
            if body_error is not None:
                self._after_failure(graph, device)
                raise body_error
            torch.cuda.current_stream(device).wait_stream(stream)
            torch.cuda.synchronize(device)
            nbytes = max(0, free_before - torch.cuda.mem_get_info(device)[0])
        return _CudaGraph(graph, output, nbytes)

    def _after_failure(self, graph: torch.cuda.CUDAGraph, device: torch.device) -> None:
        """Free a failed capture; mark the backend broken if the CUDA context is poisoned."""
        with contextlib.suppress(Exception):
            graph.reset()
        del graph
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception as e:  # a sticky error (e.g. an illegal memory access) poisons the context
            self.broken_reason = f"the CUDA context reported {type(e).__name__} ({e}); restart ComfyUI"
            logger.error("CUDA graph: %s", self.broken_reason)

    def trim(self, device: torch.device) -> None:
        if device.type == "cuda" and torch.cuda.is_available():
            with torch.cuda.device(device):
                torch.cuda.empty_cache()


CUDA_GRAPH_BACKEND = CudaGraphBackend()
