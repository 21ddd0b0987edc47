"""A real ComfyUI server loads the pack: no import failure, nodes served with tooltips, prompts run.

The server is the session's ``comfy_server`` (``tests/conftest.py``, ``tests/_comfy_server.py``):
a temporary base directory whose ``custom_nodes`` holds a link to this checkout, every other
custom node disabled, a free loopback port, bounded waits throughout.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfy

PACK = "ComfyUI-FewStep"
RUN_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def our_node_ids(comfy):
    from comfyui_fewstep.nodes import node_list

    return [cls.GET_SCHEMA().node_id for cls in node_list()]


def test_pack_imports_without_errors(comfy_server):
    log = comfy_server.log_text()
    bad = [
        line
        for line in log.splitlines()
        if ("IMPORT FAILED" in line or "Cannot import" in line) and PACK in line
    ]
    assert not bad, "\n".join(bad)
    assert "ComfyUI-FewStep: the nodes failed to load" not in log
    assert "Traceback" not in log.split("Import times for custom nodes")[-1].split("Starting server")[0]


def test_every_node_is_served_with_tooltips(comfy_server, our_node_ids):
    info = comfy_server.get("/object_info")
    for node_id in our_node_ids:
        assert node_id in info, node_id
        node = info[node_id]
        assert node["python_module"] == f"custom_nodes.{PACK}"
        assert node["description"]
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name}"
        assert node["output_tooltips"] and all(node["output_tooltips"]), node_id


def test_ksampler_dropdowns_show_the_presets(comfy_server):
    from comfyui_fewstep.nodes.ksampler_presets import SAMPLER_PRESETS, SCHEDULER_PRESETS

    ksampler = comfy_server.get("/object_info/KSampler")["KSampler"]["input"]["required"]
    samplers, schedulers = ksampler["sampler_name"][0], ksampler["scheduler"][0]
    assert set(SAMPLER_PRESETS) <= set(samplers) and set(SCHEDULER_PRESETS) <= set(schedulers)
    assert samplers[:3] == ["euler", "euler_cfg_pp", "euler_ancestral"]  # built-ins first, unchanged
    select = comfy_server.get("/object_info/KSamplerSelect")["KSamplerSelect"]["input"]["required"]
    assert set(SAMPLER_PRESETS) <= set(select["sampler_name"][0])


@pytest.fixture(scope="module")
def sampler_defaults(comfy_server) -> dict:
    """The served default of every FewStep DPM-Solver++ Sampler widget."""
    node = comfy_server.get("/object_info/FewStepDPMSolverSampler")["FewStepDPMSolverSampler"]
    specs = {**node["input"]["required"], **node["input"].get("optional", {})}
    return {name: spec[1]["default"] for name, spec in specs.items()}


def _sampler_prompt(defaults: dict, **widgets) -> dict:
    """The sampler node on its defaults but for ``widgets``, its SAMPLER shown by PreviewAny."""
    return {
        "1": {"class_type": "FewStepDPMSolverSampler", "inputs": {**defaults, **widgets}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }


def test_a_prompt_with_our_node_executes(comfy_server, sampler_defaults):
    status, body = comfy_server.queue(_sampler_prompt(sampler_defaults, order=3, corrector="bh2"))
    assert status == 200, body
    entry = comfy_server.wait_for(body["prompt_id"], RUN_TIMEOUT_S)
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_invalid_combination_is_rejected_with_our_message(comfy_server, sampler_defaults):
    status, body = comfy_server.queue(_sampler_prompt(sampler_defaults, solver="adaptive", order=1))
    assert status == 400
    errors = body["node_errors"]["1"]["errors"]
    assert any("order to 2 or 3" in (e.get("details", "") + e.get("message", "")) for e in errors), errors
