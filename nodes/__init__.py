"""The ComfyUI node layer: the only package that imports ComfyUI. It stays thin."""

from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

logger = logging.getLogger(__name__)


class FewStepExtension(ComfyExtension):
    """Registers the pack's V3 nodes."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []
