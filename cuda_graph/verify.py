"""First-replay parity check: a new graph's output against the eager forward on the same inputs.

Graphs fail silently (a kernel launched on the legacy stream escapes capture and the replay
returns stale buffers; a weight that moved is read from its old address), so the first replay
of every new signature is compared with eager. The rule: no NaN/Inf that eager does not have
at the same place, and ``max|graph - eager| <= tolerance * max|eager|``. Bitwise equality is
the normal outcome when the same kernels run; the tolerance admits a different attention
kernel chosen under capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ParityResult", "compare_outputs"]


@dataclass(frozen=True)
class ParityResult:
    ok: bool
    max_abs_error: float
    reference_max_abs: float
    reason: str = ""


def compare_outputs(graph: list[torch.Tensor], eager: list[torch.Tensor], tolerance: float) -> ParityResult:
    """Compare two lists of output tensors (``flatten`` leaves of the forward's output)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    if len(graph) != len(eager):
        return ParityResult(False, float("inf"), 0.0, f"{len(graph)} graph outputs against {len(eager)} eager")
    worst, ref_max = 0.0, 0.0
    for i, (g, e) in enumerate(zip(graph, eager)):
        if g.shape != e.shape or g.dtype != e.dtype:
            return ParityResult(
                False, float("inf"), 0.0,
                f"output {i}: graph {tuple(g.shape)} {g.dtype} against eager {tuple(e.shape)} {e.dtype}",
            )
        g64, e64 = g.detach().double(), e.detach().double()
        g_bad, e_bad = ~torch.isfinite(g64), ~torch.isfinite(e64)
        if not torch.equal(g_bad, e_bad):
            return ParityResult(False, float("inf"), 0.0, f"output {i}: non-finite values where eager has none")
        finite = ~e_bad
        if finite.any():
            worst = max(worst, (g64[finite] - e64[finite]).abs().max().item())
            ref_max = max(ref_max, e64[finite].abs().max().item())
    bound = tolerance * max(ref_max, torch.finfo(torch.float32).tiny)
    if worst > bound:
        return ParityResult(
            False, worst, ref_max,
            f"max |graph - eager| = {worst:.3g} exceeds {tolerance:g} x max |eager| = {bound:.3g}",
        )
    return ParityResult(True, worst, ref_max)
