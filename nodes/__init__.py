"""The ComfyUI node layer: the only package that imports ComfyUI. It stays thin.

The node classes live in one module per domain; :class:`FewStepExtension` lists them. Node ids
all start with ``FewStep`` and are frozen (saved workflows reference them).
"""

from __future__ import annotations

import logging

from ._api import ComfyExtension, io
from .cuda_graph_nodes import FewStepCUDAGraph
from .calibration_nodes import FewStepCalibrateSchedule, FewStepLoadSchedule
from .ksampler_presets import register_ksampler_presets
from .sampler_nodes import FewStepDPMSolverSampler
from .schedule_nodes import FewStepNFEPlan, FewStepSchedule
from .student_nodes import FewStepEDMGenerator, FewStepStudentLoader, FewStepStudentSample

logger = logging.getLogger(__name__)

__all__ = ["FewStepExtension", "node_list"]


def node_list() -> list[type[io.ComfyNode]]:
    """Every node class of the pack (one line per node or node module)."""
    return [
        FewStepDPMSolverSampler,
        FewStepSchedule,
        FewStepNFEPlan,
        FewStepCUDAGraph,
        FewStepCalibrateSchedule, FewStepLoadSchedule,
        FewStepStudentLoader, FewStepStudentSample,
        FewStepEDMGenerator,
    ]


class FewStepExtension(ComfyExtension):
    """Registers the pack's V3 nodes, and the ``fewstep_*`` KSampler dropdown presets.

    ComfyUI 0.3.64 never calls ``on_load``, so the (idempotent, append-only) preset
    registration runs on the node-list path; a failure there is logged and leaves the nodes
    working.
    """

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        try:
            register_ksampler_presets()
        except Exception:
            logger.exception("FewStep: could not add the KSampler dropdown presets; the nodes still work")
        return node_list()
