"""Node layer: schemas, frozen ids and inputs, tooltips, combo sets, validation messages."""

from __future__ import annotations

import asyncio
from typing import get_args

import pytest

pytestmark = pytest.mark.comfy

# Saved workflows reference node ids and input names: changing one is a breaking change and
# must be a deliberate edit here.
FROZEN_INPUTS = {
    "FewStepDPMSolverSampler": [
        "solver",
        "order",
        "solver_type",
        "prediction",
        "lower_order_final",
        "lower_order_final_steps",
        "euler_at_final",
        "final_step",
        "eta",
        "s_noise",
        "corrector",
        "thresholding",
        "threshold_percentile",
        "threshold_max",
        "third_order",
        "atol",
        "rtol",
        "final_order",  # appended: older workflows keep their widget order
        "final_weights",
        "second_step",
        "first_step",
    ],
    "FewStepSchedule": [
        "model",
        "schedule",
        "steps",
        "denoise",
        "rho",
        "table_model",
        "gits_coeff",
        "custom_sigmas",
        "sigma_min",
        "sigma_max",
        "lambda_start",  # appended
        "sigma_end",
    ],
    "FewStepNFEPlan": ["model", "preset", "nfe", "schedule", "cfg", "denoise"],
}


@pytest.fixture(scope="module")
def pack(comfy):
    from comfyui_fewstep import nodes

    return nodes


@pytest.fixture(scope="module")
def schemas(pack):
    return {cls.GET_SCHEMA().node_id: (cls, cls.GET_SCHEMA()) for cls in pack.node_list()}


def _combo(schema, input_id):
    (inp,) = [i for i in schema.inputs if i.id == input_id]
    return list(inp.options)


def test_extension_lists_every_node_once(pack):
    listed = asyncio.run(pack.FewStepExtension().get_node_list())
    ids = [cls.GET_SCHEMA().node_id for cls in listed]
    assert len(ids) == len(set(ids))
    assert all(i.startswith("FewStep") for i in ids), ids
    assert set(FROZEN_INPUTS) <= set(ids)


def test_frozen_node_ids_and_input_names(schemas):
    for node_id, inputs in FROZEN_INPUTS.items():
        _, schema = schemas[node_id]
        assert [i.id for i in schema.inputs] == inputs, node_id


def test_every_input_and_output_has_a_tooltip(schemas):
    for node_id, (cls, schema) in schemas.items():
        assert schema.description, node_id
        assert schema.display_name and schema.category, node_id
        for inp in schema.inputs:
            assert inp.tooltip and len(inp.tooltip) > 10, f"{node_id}.{inp.id}"
        for out in schema.outputs:
            assert out.tooltip, f"{node_id} output {out.id}"
        info = cls.GET_NODE_INFO_V1()  # what /object_info serves
        assert all(t for t in info["output_tooltips"]), node_id


def test_combo_options_are_the_core_literal_sets(schemas):
    from comfyui_fewstep.nodes._comfy_sampler import PRESET_NAMES, SOLVER_FAMILIES
    from comfyui_fewstep.samplers import _coefficients, budget, correction, schedules, singlestep, unipc

    # one source of truth: the sets the samplers define agree with each other ...
    assert SOLVER_FAMILIES == budget.SOLVER_KINDS
    assert singlestep.SOLVER_TYPES == _coefficients.SOLVER_TYPES
    assert singlestep.ALGORITHMS == _coefficients.ALGORITHMS
    assert singlestep.FINAL_STEPS == _coefficients.FINAL_STEPS == budget.FINAL_STEPS
    # ... and the widgets show exactly them
    _, sampler = schemas["FewStepDPMSolverSampler"]
    assert _combo(sampler, "solver") == list(SOLVER_FAMILIES)
    assert _combo(sampler, "solver_type") == list(get_args(_coefficients.SolverType))
    assert _combo(sampler, "prediction") == list(get_args(_coefficients.Algorithm))
    assert _combo(sampler, "final_step") == list(get_args(_coefficients.FinalStep))
    assert _combo(sampler, "corrector") == list(get_args(unipc.CorrectorVariant))
    assert _combo(sampler, "thresholding") == list(get_args(correction.CorrectionKind))
    _, schedule = schemas["FewStepSchedule"]
    assert _combo(schedule, "schedule") == list(get_args(schedules.ScheduleName))
    assert _combo(schedule, "table_model") == list(get_args(schedules.AysModel))
    _, plan = schemas["FewStepNFEPlan"]
    assert _combo(plan, "preset") == list(PRESET_NAMES)
    assert _combo(plan, "schedule") == [s for s in schedules.SCHEDULE_NAMES if s != "custom"]


def test_widget_defaults_match_the_sampler_defaults(schemas):
    import inspect

    from comfyui_fewstep.samplers.multistep import sample_dpmpp_multistep

    params = inspect.signature(sample_dpmpp_multistep).parameters
    _, sampler = schemas["FewStepDPMSolverSampler"]
    defaults = {i.id: i.default for i in sampler.inputs}
    for widget, option in [
        ("order", "order"),
        ("solver_type", "solver_type"),
        ("prediction", "algorithm"),
        ("lower_order_final", "lower_order_final"),
        ("lower_order_final_steps", "lower_order_final_steps"),
        ("euler_at_final", "euler_at_final"),
        ("final_step", "final_step"),
        ("eta", "eta"),
        ("s_noise", "s_noise"),
        ("corrector", "corrector"),
        ("third_order", "third_order"),
        ("final_order", "final_order"),
        ("final_weights", "final_weights"),
    ]:
        assert defaults[widget] == params[option].default, widget


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"solver": "multistep", "order": 3, "eta": 1.0, "corrector": "bh2"}, None),
        ({"solver": "singlestep", "order": 3, "eta": 0.0, "corrector": "none"}, None),
        ({"solver": "adaptive", "order": 1, "eta": 0.0, "corrector": "none"}, "order to 2 or 3"),
        ({"solver": "singlestep", "order": 2, "eta": 0.5, "corrector": "none"}, "set eta to 0"),
        ({"solver": "adaptive", "order": 3, "eta": 0.0, "corrector": "bh1"}, "set corrector to none"),
        ({"solver": "multistep", "order": 5, "eta": 0.0, "corrector": "none"}, "order must be 1, 2, 3 or 4"),
        ({"solver": "singlestep", "order": 4, "eta": 0.0, "corrector": "none"}, "singlestep solver has orders 1-3"),
        ({"solver": "bogus", "order": 2, "eta": 0.0, "corrector": "none"}, "not one of"),
        ({"solver": None, "order": None, "eta": None, "corrector": None}, None),  # linked inputs
        # the API skips the widgets' ranges: eta is checked against the widget's as well
        ({"solver": "multistep", "order": 2, "eta": 50.0, "corrector": "none"}, "eta must be between 0 and 10"),
        ({"solver": "multistep", "order": 2, "eta": float("nan"), "corrector": "none"}, "eta must be between"),
        # combinations the multistep solver refuses are refused when the workflow is queued
        ({"solver": "multistep", "order": 3, "eta": 1.0, "corrector": "bh2", "prediction": "dpmsolver++"},
         "UniC corrector works on the deterministic"),
        ({"solver": "multistep", "order": 4, "eta": 0.5, "corrector": "none", "prediction": "dpmsolver++"},
         "order 4 (exponential Adams-Bashforth)"),
        ({"solver": "multistep", "order": 4, "eta": 0.0, "corrector": "none", "prediction": "dpmsolver"},
         "order 4 (exponential Adams-Bashforth)"),
        ({"solver": "multistep", "order": 2, "eta": 0.5, "corrector": "none", "prediction": "dpmsolver"},
         "needs algorithm='dpmsolver++'"),
        ({"solver": "multistep", "order": 4, "eta": 0.0, "corrector": "bh2", "prediction": "dpmsolver++"},
         None),
        # the Adams last step: multistep ODE only, order 1-4
        ({"solver": "multistep", "order": 2, "eta": 0.0, "corrector": "bh2", "prediction": "dpmsolver++",
          "final_order": 4}, None),
        ({"solver": "multistep", "order": 2, "eta": 1.0, "corrector": "none", "prediction": "dpmsolver++",
          "final_order": 2}, "needs the deterministic solver"),
        ({"solver": "singlestep", "order": 2, "eta": 0.0, "corrector": "none", "final_order": 3},
         "final_order > 1 needs the multistep solver"),
        ({"solver": "adaptive", "order": 2, "eta": 0.0, "corrector": "none", "final_order": 1}, None),
        ({"solver": "multistep", "order": 2, "eta": 0.0, "corrector": "none", "final_order": 5},
         "final_order must be an integer from 1 to 4"),
        # the flow second step: multistep, deterministic data prediction only
        ({"solver": "multistep", "order": 2, "eta": 0.0, "corrector": "bh2", "prediction": "dpmsolver++",
          "second_step": "flow"}, None),
        ({"solver": "multistep", "order": 2, "eta": 1.0, "corrector": "none", "prediction": "dpmsolver++",
          "second_step": "flow"}, "deterministic data-prediction solver only"),
        ({"solver": "multistep", "order": 2, "eta": 0.0, "corrector": "none", "prediction": "dpmsolver",
          "second_step": "flow"}, "deterministic data-prediction solver only"),
        ({"solver": "singlestep", "order": 2, "eta": 0.0, "corrector": "none", "second_step": "flow"},
         "second_step 'flow' needs the multistep solver"),
        ({"solver": "adaptive", "order": 2, "eta": 0.0, "corrector": "none", "second_step": "log_snr"}, None),
        ({"solver": "multistep", "order": 2, "eta": 0.0, "corrector": "none", "second_step": "tau"},
         "second_step 'tau' is not one of"),
        # the gaussian first step: multistep, deterministic data prediction only
        ({"solver": "multistep", "order": 2, "eta": 0.0, "corrector": "bh2", "prediction": "dpmsolver++",
          "first_step": "gaussian"}, None),
        ({"solver": "multistep", "order": 2, "eta": 1.0, "corrector": "none", "prediction": "dpmsolver++",
          "first_step": "gaussian"}, "deterministic data-prediction solver only"),
        ({"solver": "singlestep", "order": 2, "eta": 0.0, "corrector": "none", "first_step": "gaussian"},
         "first_step 'gaussian' needs the multistep solver"),
        ({"solver": "adaptive", "order": 2, "eta": 0.0, "corrector": "none", "first_step": "ddim"}, None),
        ({"solver": "multistep", "order": 2, "eta": 0.0, "corrector": "none", "first_step": "exact"},
         "first_step 'exact' is not one of"),
    ],
)
def test_sampler_validation_messages(schemas, inputs, message):
    cls, _ = schemas["FewStepDPMSolverSampler"]
    result = cls.validate_inputs(**inputs)
    if message is None:
        assert result is True
    else:
        assert isinstance(result, str) and message in result


def test_schedule_validation_messages(schemas):
    cls, _ = schemas["FewStepSchedule"]
    assert cls.validate_inputs(schedule="karras", steps=4) is True
    assert cls.validate_inputs(schedule="custom", steps=0) is True
    assert "custom" in cls.validate_inputs(schedule="karras", steps=0)
    assert "not one of" in cls.validate_inputs(schedule="nope", steps=4)


def test_sampler_node_builds_ksampler_with_options(schemas, comfy):
    import comfy.samplers

    cls, _ = schemas["FewStepDPMSolverSampler"]
    out = cls.execute(
        solver="multistep",
        order=3,
        solver_type="heun",
        prediction="dpmsolver++",
        lower_order_final=False,
        lower_order_final_steps=10,
        euler_at_final=False,
        final_step="zero",
        eta=0.5,
        s_noise=1.0,
        corrector="none",
        thresholding="clamp",
        threshold_percentile=0.995,
        threshold_max=1.0,
    )
    sampler = out.result[0]
    assert isinstance(sampler, comfy.samplers.KSAMPLER)
    opts = sampler.extra_options
    assert opts["solver"] == "multistep" and opts["order"] == 3 and opts["eta"] == 0.5
    assert opts["solver_type"] == "heun" and opts["lower_order_final"] is False
    import torch

    assert torch.equal(
        opts["x0_correction"](torch.tensor([-3.0, 0.5, 2.0]), 1.0), torch.tensor([-1.0, 0.5, 1.0])
    )
    # singlestep drops multistep-only policies, and refuses method-changing ones at run time too
    single = cls.execute(
        solver="singlestep",
        order=2,
        solver_type="midpoint",
        prediction="dpmsolver++",
        lower_order_final=False,
        lower_order_final_steps=10,
        euler_at_final=True,
        final_step="zero",
        eta=0.0,
        s_noise=1.0,
        corrector="none",
        thresholding="none",
        threshold_percentile=0.995,
        threshold_max=1.0,
    ).result[0]
    assert "lower_order_final" not in single.extra_options and "eta" not in single.extra_options
    with pytest.raises(ValueError, match="eta"):
        cls.execute(
            solver="adaptive",
            order=3,
            solver_type="midpoint",
            prediction="dpmsolver++",
            lower_order_final=True,
            lower_order_final_steps=10,
            euler_at_final=False,
            final_step="zero",
            eta=1.0,
            s_noise=1.0,
            corrector="none",
            thresholding="none",
            threshold_percentile=0.995,
            threshold_max=1.0,
        )


def test_plan_for_budget_spends_exactly_the_budget(comfy):
    from comfyui_fewstep.samplers.budget import steps_for_nfe

    for solver, order in [("multistep", 2), ("multistep", 3), ("singlestep", 2), ("singlestep", 3)]:
        for nfe in range(1, 13):
            plan = steps_for_nfe(solver, nfe, order)
            assert plan.nfe == nfe
            if solver == "singlestep":
                assert sum(plan.orders) == nfe and plan.orders[-1] == 1 and plan.steps == len(plan.orders)
                assert max(plan.orders) <= order
            else:
                assert plan.steps == nfe


def test_history_source_tells_models_patches_cfg_and_conditioning_apart(comfy):
    """The key a split schedule's parts must share to resume a multistep history."""
    from types import SimpleNamespace

    import torch

    from comfyui_fewstep.nodes._comfy_sampler import history_source

    base, refiner = object(), object()
    text = torch.randn(1, 77, 8)

    sampling = object()

    def denoiser(model=base, uuid="u1", cfg=7.0, cond=text, ms=sampling):
        patcher = SimpleNamespace(model=model, patches_uuid=uuid, object_patches={"model_sampling": ms})
        guider = SimpleNamespace(model_patcher=patcher, cfg=cfg,
                                 original_conds={"positive": [{"cross_attn": cond, "uuid": object()}]})
        return SimpleNamespace(inner_model=guider)

    key = history_source(denoiser())
    assert key == history_source(denoiser(cond=text.clone()))  # the same prompt, processed again
    for other in (denoiser(model=refiner), denoiser(uuid="u2"), denoiser(cfg=4.0), denoiser(ms=object()),
                  denoiser(cond=torch.randn(1, 77, 8))):
        assert history_source(other) != key
    assert history_source(SimpleNamespace()) == ""
