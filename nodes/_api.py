"""The single import point for ComfyUI's node API, so that a later version pin is one line.

The pack uses the V3 schema API (``comfy_api.latest``, ComfyUI >= 0.3.64). Every other module
of ``nodes/`` imports ``io``/``ui``/``ComfyExtension`` from here, never from ``comfy_api``
directly.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io, ui

NODE_ID_PREFIX = "FewStep"
"""Every node id of the pack starts with this; node ids are frozen once released."""

CATEGORY_SAMPLERS = "sampling/custom_sampling/samplers"
CATEGORY_SCHEDULERS = "sampling/custom_sampling/schedulers"
CATEGORY_PLANS = "sampling/custom_sampling"

__all__ = [
    "CATEGORY_PLANS",
    "CATEGORY_SAMPLERS",
    "CATEGORY_SCHEDULERS",
    "NODE_ID_PREFIX",
    "ComfyExtension",
    "io",
    "ui",
]
