"""``GraphedForward``: run a forward pass by replaying captured graphs, or eagerly with a reason.

Per call (CUDA-graph research notes, design checklist items 3-8, 10):

1. a caller-supplied reason to stay eager (see ``eligibility``) runs the call eagerly, logged
   once per reason per run; the next eligible call uses graphs again;
2. a change of the caller's weight key (patch uuid, loaded size, parameter addresses) releases
   every graph of the model; graphs are then recaptured lazily;
3. the inputs are flattened to a signature; a cached graph for it gets the new input data
   copied into its static buffers, is replayed, and its outputs are cloned out (a later replay
   overwrites the static outputs);
4. a new signature is captured from static copies of the inputs: warm-up runs, one recorded
   run, one replay; with ``verify`` the replay is compared with the eager forward and a
   mismatch drops the graph. Capture or verification failures are remembered for the
   signature, logged once, and that call runs eagerly; nothing the capture allocated is kept.

Lists in the inputs that the forward shortens (ComfyUI's ``apply_control`` pops ControlNet
residuals) are shortened the same way after a replay, as the eager call would have done.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import GraphCache, GraphEntry
from .capture import GraphBackend
from .signature import UnsupportedInput, flatten, list_lengths, lists_in, unflatten
from .verify import compare_outputs

__all__ = ["GraphStats", "GraphedForward"]

logger = logging.getLogger(__name__)

#: set while this thread warms up or records a graph: a model call made from inside that forward
#: (a patch that runs another wrapped model) runs eagerly, and so becomes part of the outer graph,
#: instead of waiting for the process-wide capture lock its own thread holds
_CAPTURING = threading.local()
OUT_OF_MEMORY = "capture ran out of device memory"
NESTED_REASON = "called from inside another graph's capture (a nested model call); it is part of that graph"

Forward = Callable[[Any], Any]


@dataclass
class GraphStats:
    captures: int = 0
    replays: int = 0
    capture_failures: int = 0
    verify_failures: int = 0
    invalidations: int = 0
    eager_calls: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        eager = sum(self.eager_calls.values())
        return (
            f"{self.captures} captures, {self.replays} replays, {eager} eager calls, "
            f"{self.capture_failures} capture failures, {self.verify_failures} verification failures, "
            f"{self.invalidations} weight invalidations"
        )


class GraphedForward:
    """Graph cache and replay logic for one model's forward pass (backend-agnostic)."""

    def __init__(
        self,
        backend: GraphBackend,
        *,
        max_graphs: int = 4,
        warmup: int = 2,
        verify: bool = True,
        tolerance: float = 1e-3,
        label: str = "diffusion model",
    ) -> None:
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
        self.backend = backend
        self.cache = GraphCache(max_graphs)
        self.warmup = warmup
        self.verify = verify
        self.tolerance = float(tolerance)
        self.label = label
        self.stats = GraphStats()
        self._weights: Hashable = None
        self._logged: set[str] = set()

    # ------------------------------------------------------------------ bookkeeping
    def new_run(self) -> None:
        """Start a new sampling run: every fallback reason may be logged once again, and a
        signature whose capture ran out of memory may try again (memory may be free now)."""
        self._logged.clear()
        for key in [k for k, reason in self.cache.failed.items() if reason.startswith(OUT_OF_MEMORY)]:
            del self.cache.failed[key]

    def release_all(self, device: torch.device | None = None, why: str = "") -> int:
        """Release every graph (model unloaded, weights changed); return how many went."""
        count = self.cache.clear()
        if count and device is not None:
            self.backend.trim(device)
        if count:
            logger.info("CUDA graph (%s): released %d graph(s)%s", self.label, count, f": {why}" if why else "")
        return count

    def _log_once(self, level: int, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            logger.log(level, "CUDA graph (%s): %s", self.label, message)

    def _eager(self, forward: Forward, inputs: Any, reason: str, level: int = logging.INFO) -> Any:
        self.stats.eager_calls[reason] += 1
        self._log_once(level, f"running eagerly: {reason}")
        return forward(inputs)

    # ------------------------------------------------------------------ the call
    def __call__(
        self,
        forward: Forward,
        inputs: Any,
        *,
        device: torch.device,
        key_extra: Hashable = (),
        weights: Hashable = None,
        blocked: str | None = None,
        capture_forward: Forward | None = None,
        capture_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> Any:
        """``forward(inputs)``, from a graph when possible.

        ``forward`` runs eagerly; ``capture_forward`` (default ``forward``) is what gets
        recorded. ``key_extra`` joins the input signature (host-side state that changes the
        captured work); ``weights`` identifies the weight state; ``blocked`` forces eager.
        """
        if blocked is not None:
            return self._eager(forward, inputs, blocked)
        if getattr(_CAPTURING, "active", False):
            return self._eager(forward, inputs, NESTED_REASON)
        try:
            device = torch.device(device)
            reason = self.backend.unavailable_reason(device)
            if reason is not None:
                return self._eager(forward, inputs, reason)
            if weights != self._weights:
                if len(self.cache) or self.cache.failed:
                    self.stats.invalidations += 1
                    self.release_all(device, "the weights changed")
                self._weights = weights
            try:
                spec, leaves = flatten(inputs)
            except UnsupportedInput as e:
                return self._eager(forward, inputs, str(e))
            key = (spec, key_extra)
            failed = self.cache.failed.get(key)
            if failed is not None:
                return self._eager(forward, inputs, failed, logging.WARNING)
            entry = self.cache.get(key)
        except Exception as e:  # our own bookkeeping must never break sampling
            logger.exception("CUDA graph (%s): internal error, running eagerly", self.label)
            return self._eager(forward, inputs, f"internal error {type(e).__name__}: {e}", logging.WARNING)
        if entry is not None:
            try:
                return self._replay(entry, leaves, inputs)
            except Exception as e:
                self.cache.discard(key)
                reason = f"replay failed ({type(e).__name__}: {e}); this input signature stays eager"
                self.cache.failed[key] = reason
                return self._eager(forward, inputs, reason, logging.WARNING)
        return self._capture(forward, capture_forward or forward, inputs, key, spec, leaves, device, capture_context)

    def _replay(self, entry: GraphEntry, leaves: list[torch.Tensor], inputs: Any) -> Any:
        with torch.inference_mode():
            for static, new in zip(entry.static_leaves, leaves):
                static.copy_(new)
            entry.graph.replay()
        outputs = [t.clone() for t in entry.static_outputs]
        # only once nothing can fail: an eager fallback after a failed replay needs the lists whole
        entry.replays += 1
        self.stats.replays += 1
        for lst, consumed in zip(lists_in(inputs), entry.list_consumption):
            if consumed > 0:
                del lst[max(0, len(lst) - consumed):]
        return unflatten(entry.output_spec, outputs)

    def _capture(
        self,
        forward: Forward,
        capture_forward: Forward,
        inputs: Any,
        key: Hashable,
        spec: Hashable,
        leaves: list[torch.Tensor],
        device: torch.device,
        capture_context: Callable[[], contextlib.AbstractContextManager] | None,
    ) -> Any:
        consumption: list[int] = []

        def body() -> Any:
            tree = unflatten(spec, static)
            before = list_lengths(tree)
            out = capture_forward(tree)
            consumption[:] = [b - a for b, a in zip(before, list_lengths(tree))]
            return out

        graph = None
        try:
            self.cache.make_room()  # free the least recently used graph before allocating more
            with torch.inference_mode():
                static = [t.clone(memory_format=torch.preserve_format) for t in leaves]
                if self.cache.pool is None:
                    self.cache.pool = self.backend.new_pool(device)
                _CAPTURING.active = True
                try:
                    with capture_context() if capture_context is not None else contextlib.nullcontext():
                        graph = self.backend.capture(body, device=device, warmup=self.warmup,
                                                     pool=self.cache.pool)
                finally:
                    _CAPTURING.active = False
                output_spec, static_outputs = flatten(graph.output, "output")
                for buffer, leaf in zip(static, leaves):  # the warm-ups may have written to them
                    buffer.copy_(leaf)
                graph.replay()
            graph_out = [t.clone() for t in static_outputs]
        except Exception as e:
            if graph is not None:
                graph.release()
            static = []
            self.stats.capture_failures += 1
            if isinstance(e, torch.OutOfMemoryError):
                reason = f"{OUT_OF_MEMORY} ({e}); this input signature runs eagerly until the next run"
            else:
                reason = f"capture failed ({type(e).__name__}: {e}); this input signature stays eager"
            self.cache.failed[key] = reason
            logger.debug("CUDA graph capture failure", exc_info=True)
            return self._eager(forward, inputs, reason, logging.WARNING)
        self.stats.captures += 1
        entry = GraphEntry(graph, static, output_spec, static_outputs, list(consumption), replays=1)
        self.stats.replays += 1
        if self.verify:
            eager_out = forward(inputs)  # consumes the caller's lists exactly as eager does
            result = compare_outputs(graph_out, flatten(eager_out, "output")[1], self.tolerance)
            if not result.ok:
                entry.release()
                self.stats.verify_failures += 1
                reason = f"graph output differs from eager ({result.reason}); this input signature stays eager"
                self.cache.failed[key] = reason
                self.stats.eager_calls[reason] += 1
                self._log_once(logging.WARNING, f"running eagerly: {reason}")
                return eager_out
        else:
            for lst, consumed in zip(lists_in(inputs), entry.list_consumption):
                if consumed > 0:
                    del lst[max(0, len(lst) - consumed):]
        self.cache.put(key, entry)
        logger.info(
            "CUDA graph (%s): captured signature %d of at most %d (%.1f MiB at capture)",
            self.label, len(self.cache), self.cache.max_entries, graph.nbytes / 2**20,
        )
        return unflatten(output_spec, graph_out)
