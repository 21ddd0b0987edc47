"""SAMPLER node: the DPM-Solver++ family with every option of the core samplers."""

from __future__ import annotations

import logging
from typing import Any

from ..samplers._coefficients import THIRD_ORDER_WEIGHTS
from ..samplers.adaptive import ATOL as ADAPTIVE_ATOL
from ..samplers.adaptive import RTOL as ADAPTIVE_RTOL
from ..samplers.correction import CORRECTION_KINDS, make_x0_correction
from ..samplers.final_adams import FINAL_WEIGHTS, MAX_FINAL_ORDER
from ..samplers.flow_step import SECOND_STEPS
from ..samplers.gaussian_start import FIRST_STEPS
from ..samplers.multistep import combination_problem
from ..samplers.singlestep import ALGORITHMS, FINAL_STEPS, SOLVER_TYPES
from ..samplers.unipc import CORRECTOR_VARIANTS
from ._api import CATEGORY_SAMPLERS, io
from ._comfy_sampler import NEUTRAL_OPTIONS, SOLVER_FAMILIES, make_sampler, supported_options

logger = logging.getLogger(__name__)

__all__ = ["FewStepDPMSolverSampler", "check_sampler_options", "sampler_options"]


#: largest eta the sampler node takes (its widget's maximum; the API is checked against it too)
ETA_MAX = 10.0


def check_sampler_options(
    solver: Any = None,
    order: Any = None,
    eta: Any = None,
    corrector: Any = None,
    prediction: Any = None,
    final_order: Any = None,
    second_step: Any = None,
    first_step: Any = None,
) -> str | None:
    """Why a combination of widgets cannot run, or None. ``None`` values (linked inputs) pass."""
    if solver is not None and solver not in SOLVER_FAMILIES:
        return f"solver {solver!r} is not one of {list(SOLVER_FAMILIES)}"
    if order is not None and (isinstance(order, bool) or order not in (1, 2, 3, 4)):
        return f"order must be 1, 2, 3 or 4, got {order!r}"
    if solver == "singlestep" and order == 4:
        return "the singlestep solver has orders 1-3 (2S, 3S); use order 3, or the multistep solver for order 4"
    if solver == "adaptive" and order is not None and order not in (2, 3):
        return "the adaptive solver has order 2 (DPM-Solver++12) or 3 (DPM-Solver++23); set order to 2 or 3"
    if eta is not None and not 0.0 <= eta <= ETA_MAX:
        return f"eta must be between 0 and {ETA_MAX:g}, got {eta!r}"
    if corrector is not None and corrector not in CORRECTOR_VARIANTS:
        return f"corrector {corrector!r} is not one of {list(CORRECTOR_VARIANTS)}"
    if final_order is not None and (
        isinstance(final_order, bool) or final_order not in range(1, MAX_FINAL_ORDER + 1)
    ):
        return f"final_order must be an integer from 1 to {MAX_FINAL_ORDER}, got {final_order!r}"
    start_options = (("second_step", second_step, SECOND_STEPS), ("first_step", first_step, FIRST_STEPS))
    for name, value, allowed in start_options:
        if value is not None and value not in allowed:
            return f"{name} {value!r} is not one of {list(allowed)}"
    if solver in SOLVER_FAMILIES:
        accepted = supported_options(solver)
        if eta is not None and eta > 0.0 and "eta" not in accepted:
            return f"eta > 0 (SDE-DPM-Solver++) needs the multistep solver, not {solver}; set eta to 0"
        if corrector not in (None, "none") and "corrector" not in accepted:
            return f"the UniC corrector needs the multistep solver, not {solver}; set corrector to none"
        if final_order not in (None, 1) and "final_order" not in accepted:
            return f"final_order > 1 needs the multistep solver, not {solver}; set final_order to 1"
        for name, value, _ in start_options:
            if value not in (None, NEUTRAL_OPTIONS[name]) and name not in accepted:
                return (f"{name} {value!r} needs the multistep solver, not {solver}; "
                        f"set {name} to {NEUTRAL_OPTIONS[name]}")
    if solver == "multistep" and None not in (order, eta, corrector, prediction):
        final = 1 if final_order is None else final_order
        return combination_problem(order, prediction, eta, corrector, final,
                                   second_step or NEUTRAL_OPTIONS["second_step"],
                                   first_step or NEUTRAL_OPTIONS["first_step"])
    return None


def sampler_options(
    *,
    order: int,
    solver_type: str,
    prediction: str,
    lower_order_final: bool,
    lower_order_final_steps: int,
    euler_at_final: bool,
    final_step: str,
    eta: float,
    s_noise: float,
    corrector: str,
    thresholding: str,
    threshold_percentile: float,
    threshold_max: float,
    third_order: str = "taylor",
    atol: float = ADAPTIVE_ATOL,
    rtol: float = ADAPTIVE_RTOL,
    final_order: int = 1,
    final_weights: str = "adams",
    second_step: str = "log_snr",
    first_step: str = "ddim",
) -> dict[str, Any]:
    """Core sampler keyword options from the node's widgets (each solver keeps those it takes)."""
    return {
        "final_order": int(final_order),
        "final_weights": final_weights,
        "second_step": second_step,
        "first_step": first_step,
        "atol": float(atol),
        "rtol": float(rtol),
        "third_order": third_order,
        "order": int(order),
        "solver_type": solver_type,
        "algorithm": prediction,
        "lower_order_final": bool(lower_order_final),
        "lower_order_final_steps": int(lower_order_final_steps),
        "euler_at_final": bool(euler_at_final),
        "final_step": final_step,
        "eta": float(eta),
        "s_noise": float(s_noise),
        "corrector": corrector,
        "x0_correction": make_x0_correction(thresholding, threshold_percentile, threshold_max),
    }


class FewStepDPMSolverSampler(io.ComfyNode):
    """DPM-Solver++ (multistep, singlestep or adaptive) as a SAMPLER for SamplerCustom(Advanced)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FewStepDPMSolverSampler",
            display_name="FewStep DPM-Solver++ Sampler",
            category=CATEGORY_SAMPLERS,
            description="DPM-Solver++ (Lu et al. 2022) and DPM-Solver for few-step sampling, exact for VE "
            "(SD-style) and flow (SD3/Flux-style) models. Connect to SamplerCustom(Advanced) "
            "with a SIGMAS schedule.",
            inputs=[
                io.Combo.Input(
                    "solver",
                    options=list(SOLVER_FAMILIES),
                    default="multistep",
                    tooltip="multistep: one model call per step, reuses earlier calls (2M/3M). "
                    "singlestep: 'order' calls per step (2S/3S). adaptive: picks its own "
                    "steps by error control; uses only the first and last sigma (the progress "
                    "bar follows the log-SNR covered, in as many steps as the schedule has).",
                ),
                io.Int.Input(
                    "order",
                    default=2,
                    min=1,
                    max=4,
                    tooltip="Solver order. 2 is the robust choice with guidance and at 5-10 steps; 3 "
                    "(and multistep-only 4) are more accurate at 15+ steps without (or with low) "
                    "guidance. Singlestep: 1-3. Adaptive: 2 or 3.",
                ),
                io.Combo.Input(
                    "solver_type",
                    options=list(SOLVER_TYPES),
                    default="midpoint",
                    tooltip="Second-order update: midpoint (the paper's) or heun (Taylor weights).",
                ),
                io.Combo.Input(
                    "prediction",
                    options=list(ALGORITHMS),
                    default="dpmsolver++",
                    tooltip="dpmsolver++ integrates the data prediction (best with guidance); "
                    "dpmsolver the noise prediction (the original DPM-Solver).",
                ),
                io.Boolean.Input(
                    "lower_order_final",
                    default=True,
                    tooltip="Lower the order of the last steps when there are few steps "
                    "(runs with fewer steps than lower_order_final_steps, default 10).",
                ),
                io.Int.Input(
                    "lower_order_final_steps",
                    default=10,
                    min=1,
                    max=1000,
                    tooltip="lower_order_final applies only to runs with fewer steps than this.",
                ),
                io.Boolean.Input(
                    "euler_at_final",
                    default=False,
                    tooltip="Make the last step first order (can reduce artefacts at very few steps).",
                ),
                io.Combo.Input(
                    "final_step",
                    options=list(FINAL_STEPS),
                    default="zero",
                    tooltip="zero: denoise to sigma 0 at the end. sigma_min: stop at the last "
                    "non-zero sigma and return the state there.",
                ),
                io.Float.Input(
                    "eta",
                    default=0.0,
                    min=0.0,
                    max=ETA_MAX,
                    step=0.01,
                    tooltip="0: deterministic ODE solver. > 0: SDE-DPM-Solver++ adds fresh noise "
                    "each step (1 = the paper's SDE; multistep only).",
                ),
                io.Float.Input(
                    "s_noise",
                    default=1.0,
                    min=0.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Scale of the noise added when eta > 0.",
                ),
                io.Combo.Input(
                    "corrector",
                    options=list(CORRECTOR_VARIANTS),
                    default="none",
                    tooltip="UniC corrector (UniPC, Zhao et al. 2023) after each multistep step, "
                    "no extra model calls: bh1 or bh2 (bh2 is better with guidance).",
                ),
                io.Combo.Input(
                    "thresholding",
                    options=list(CORRECTION_KINDS),
                    default="none",
                    tooltip="Correct each data prediction: clamp to +-max, or dynamic "
                    "thresholding (Imagen) for pixel-space models. Leave none for latents.",
                ),
                io.Float.Input(
                    "threshold_percentile",
                    default=0.995,
                    min=0.5,
                    max=1.0,
                    step=0.001,
                    tooltip="Dynamic thresholding: the percentile of |x0| used as the threshold.",
                ),
                io.Float.Input(
                    "threshold_max",
                    default=1.0,
                    min=0.001,
                    max=100.0,
                    step=0.01,
                    tooltip="Clamp / dynamic thresholding: the largest allowed |x0|.",
                ),
                io.Combo.Input(
                    "third_order",
                    options=list(THIRD_ORDER_WEIGHTS),
                    default="taylor",
                    optional=True,
                    tooltip="Third-order multistep weight. taylor: true third order (measured). "
                    "official: the published code's weight (ComfyUI's dpmpp_3m_sde, diffusers), "
                    "which is only second order; choose it to reproduce those exactly.",
                ),
                io.Float.Input(
                    "atol", default=ADAPTIVE_ATOL, min=1e-6, max=1.0, step=0.0001, round=1e-6, optional=True,
                    tooltip="Adaptive solver only: absolute error tolerance per step, in the latent's units "
                    "(lower: more model calls, more accurate; the NFE used is logged).",
                ),
                io.Float.Input(
                    "rtol", default=ADAPTIVE_RTOL, min=1e-5, max=1.0, step=0.001, round=1e-5, optional=True,
                    tooltip="Adaptive solver only: relative error tolerance per step.",
                ),
                io.Int.Input(
                    "final_order",
                    default=1,
                    min=1,
                    max=MAX_FINAL_ORDER,
                    optional=True,
                    tooltip="Multistep, eta 0: order of the last step to sigma 0. 1 returns the last "
                    "prediction (as ComfyUI's samplers do). 2-4 integrate the last calls' noise "
                    "predictions instead (weights set by final_weights, no extra model call): "
                    "more accurate at 5-10 steps; 4 is the few-step preset's. At 15+ steps keep 1: "
                    "there it can amplify a trained model's own error at low noise.",
                ),
                io.Combo.Input(
                    "final_weights",
                    options=list(FINAL_WEIGHTS),
                    default="adams",
                    optional=True,
                    tooltip="final_order 3-4 only: how the last step weighs the last calls. adams: "
                    "exact when the noise prediction is a polynomial in sigma. gaussian: fitted to "
                    "how it bends to 0 below the data's finest scale (Gaussian data of every scale "
                    "above the schedule's end); more accurate at 5-10 steps; the few-step preset's.",
                ),
                io.Combo.Input(
                    "second_step",
                    options=list(SECOND_STEPS),
                    default="log_snr",
                    optional=True,
                    tooltip="Multistep, eta 0, data prediction: the variable the second step interpolates "
                    "the prediction in. log_snr: DPM-Solver++. flow: the flow-equivalent time "
                    "softplus(log-SNR), which follows how the prediction leaves the data mean at high "
                    "noise, where the sample picks its mode: fewer changes of mode and smaller worst "
                    "cases at 5-10 steps, no extra model call. Only without or with weak guidance "
                    "(cfg up to about 3, or a guidance-distilled model at cfg 1): with cfg 5 or more it "
                    "can blow up at 4-6 steps.",
                ),
                io.Combo.Input(
                    "first_step",
                    options=list(FIRST_STEPS),
                    default="ddim",
                    optional=True,
                    tooltip="Multistep, eta 0, data prediction: the first step from pure noise. ddim: "
                    "exact for a constant prediction (DPM-Solver++). gaussian: exact for Gaussian data "
                    "of the model's sigma_data, so the next model call is made nearer the true path: "
                    "fewer changes of mode at 5-10 steps, no extra model call, safe with any cfg; the "
                    "few-step preset's. With the corrector it only moves that call. skip: no model call at "
                    "the first sigma (the prediction there is nearly the data mean); the mean is solved from "
                    "the next call under the same Gaussian model, so N steps cost N-1 calls and that call "
                    "moves to where the sample picks its mode: far fewer changes of mode at 4-8 calls "
                    "(use the fewstep_skip_window scheduler / the dpmpp_2m_fast_skip preset). Without or "
                    "with moderate guidance (cfg up to about 5, or a guidance-distilled model at cfg 1) "
                    "and 5 calls or more: at 4 calls, or from cfg 7 on, it can be several times worse; "
                    "above cfg 7 the run takes the gaussian first step instead (one call more) and logs it.",
                ),
            ],
            outputs=[io.Sampler.Output(tooltip="The configured solver, for SamplerCustom(Advanced).")],
        )

    @classmethod
    def validate_inputs(cls, solver=None, order=None, eta=None, corrector=None,
                        prediction=None, final_order=None, second_step=None, first_step=None) -> bool | str:
        problem = check_sampler_options(solver, order, eta, corrector, prediction, final_order, second_step,
                                        first_step)
        return problem or True

    @classmethod
    def execute(cls, solver: str, order: int, eta: float, corrector: str, **widgets: Any) -> io.NodeOutput:
        problem = check_sampler_options(solver, order, eta, corrector, widgets.get("prediction"),
                                        widgets.get("final_order"), widgets.get("second_step"),
                                        widgets.get("first_step"))
        if problem:
            raise ValueError(problem)
        options = sampler_options(order=order, eta=eta, corrector=corrector, **widgets)
        return io.NodeOutput(make_sampler(solver, options))
