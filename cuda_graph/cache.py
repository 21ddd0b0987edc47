"""An LRU cache of captured graphs for one model, with a negative cache and one memory pool.

Graphs of one model share a memory pool: safe because every graph's static inputs and outputs
stay referenced while it is cached, outputs are copied out right after each replay, and replays
never overlap (PyTorch notes, "Graph memory management"; stable-fast relies on the same three
conditions). The cache is bounded by a count, so memory stays bounded however many
signatures a workflow produces; an evicted graph is released at once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .capture import CapturedGraph

__all__ = ["GraphCache", "GraphEntry"]


@dataclass
class GraphEntry:
    """A captured graph, the static input buffers it reads and how it mutates input lists."""

    graph: CapturedGraph
    static_leaves: list[torch.Tensor]
    output_spec: Hashable
    static_outputs: list[torch.Tensor]
    list_consumption: list[int] = field(default_factory=list)
    replays: int = 0

    def release(self) -> None:
        self.graph.release()
        self.static_leaves = []
        self.static_outputs = []


class GraphCache:
    """``signature -> GraphEntry`` in least-recently-used order, at most ``max_entries`` long.

    ``failed`` remembers signatures whose capture or verification failed, with the reason, so
    they are not retried until the cache is cleared (a weight change clears it).
    """

    def __init__(self, max_entries: int) -> None:
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, GraphEntry] = OrderedDict()
        self.failed: dict[Hashable, str] = {}
        self.pool: Any = None
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        """Cached signatures, least recently used first."""
        return list(self._entries)

    def get(self, key: Hashable) -> GraphEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def make_room(self) -> int:
        """Release least recently used graphs until one more fits; return how many went."""
        released = 0
        while len(self._entries) >= self.max_entries:
            _, entry = self._entries.popitem(last=False)
            entry.release()
            released += 1
        self.evictions += released
        return released

    def put(self, key: Hashable, entry: GraphEntry) -> None:
        if key in self._entries:
            self._entries.pop(key).release()
        self.make_room()
        self._entries[key] = entry

    def discard(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry.release()

    def clear(self) -> int:
        """Release every graph, forget failures and the pool; return how many graphs went."""
        count = len(self._entries)
        while self._entries:
            _, entry = self._entries.popitem(last=False)
            entry.release()
        self.failed.clear()
        self.pool = None
        return count

    @property
    def nbytes(self) -> int:
        """Device memory attributed to the cached graphs at capture time."""
        return sum(e.graph.nbytes for e in self._entries.values())
