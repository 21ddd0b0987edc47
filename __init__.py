"""ComfyUI-FewStep: few-step and fast sampling for ComfyUI.

This file is what ComfyUI imports when the folder sits in ``custom_nodes``. It
imports nothing from ComfyUI at module level, so the package also imports (and
its tests run) without ComfyUI. ComfyUI calls :func:`comfy_entrypoint`, which
loads the node layer lazily; a failure there is logged with its traceback and
never takes ComfyUI down.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

__all__ = ["comfy_entrypoint"]


async def comfy_entrypoint():
    """Return the pack's ``ComfyExtension`` (ComfyUI's V3 node-pack entry point)."""
    try:
        from .nodes import FewStepExtension

        return FewStepExtension()
    except Exception as exc:
        if isinstance(exc, ImportError) and (exc.name or "").startswith("comfy_api"):
            logger.error("ComfyUI-FewStep needs ComfyUI 0.3.64 or newer (its V3 node API, comfy_api.latest, "
                         "is missing here: %s). Update ComfyUI; the rest of ComfyUI is unaffected.", exc)
            return None
        logger.exception(
            "ComfyUI-FewStep: the nodes failed to load; the rest of ComfyUI is unaffected. "
            "Please report this traceback."
        )
    try:  # hand ComfyUI an empty extension so that it keeps loading quietly
        from comfy_api.latest import ComfyExtension

        class _EmptyExtension(ComfyExtension):
            async def get_node_list(self) -> list:
                return []

        return _EmptyExtension()
    except Exception:
        logger.exception("ComfyUI-FewStep: ComfyUI's V3 node API (comfy_api.latest) is not available")
        return None
