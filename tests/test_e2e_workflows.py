"""The example workflows run end to end in a real ComfyUI server on a full-size SD1.5 checkpoint.

The checkpoint is random-weight but has the exact single-file layout of SD1.5 (UNet, CLIP-L text
encoder, KL-f8 VAE; ``tools/make_test_models.py``, built once into a cache). The server is the
session's ``comfy_server`` (``tests/conftest.py``): a temporary base directory whose
``custom_nodes`` links this checkout, with every other custom node disabled; the test checkpoint
is linked into its ``models/checkpoints``.

* The checkpoint loads through ``CheckpointLoaderSimple`` as SD1.5 with no missing or
  unexpected UNet / CLIP / VAE key (ComfyUI's debug log).
* Every API-format example (``example_workflows/api``) is queued through ``POST /prompt`` with
  the test checkpoint, 64x64 images and at most 4 steps; every saved image exists, has the
  requested size and varies, with no black pixel (a NaN is cast to 0) and no numpy cast warning.
  Two paths to the same solver agree bit for bit (KSampler preset vs sampler + schedule nodes;
  CUDA Graph node on vs off, which runs eagerly on the CPU).
* Every UI-format example (``example_workflows/*.json``) uses only served node types, has the
  right number and kind of widget values for each node, consistent links, and is the same graph
  as its API-format twin.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import logging
import re
import sys
import time
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"
API_EXAMPLES = EXAMPLES / "api"
UI_ONLY_NODES = {"MarkdownNote", "Note"}  # frontend-only annotation nodes, never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_WIDGETS = {("CheckpointLoaderSimple", "ckpt_name"), ("FewStepStudentLoader", "model_file")}
CONTROL = "control_after_generate"
IMAGE_SIZE = 64  # latents 8x8: the full UNet still runs every level (down to 1x1)
MAX_STEPS = 4


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"fewstep_tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


def _ui_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.json"))


def _api_files() -> list[Path]:
    return sorted(API_EXAMPLES.glob("*.json"))


# ------------------------------------------------------------------------------------ no ComfyUI


def test_every_example_exists_in_both_formats_and_is_up_to_date():
    """The committed JSON is what ``tools/make_example_workflows.py`` writes (run it after edits)."""
    tool = _load_tool("make_example_workflows")
    rendered = tool.render()
    assert (
        {p.name for p in _ui_files()}
        == {p.name for p in _api_files()}
        == {p.name for p in rendered if p.parent == EXAMPLES}
    )
    for path, text in rendered.items():
        assert path.read_text() == text, (
            f"{path.relative_to(ROOT)} is stale: run tools/make_example_workflows.py"
        )
    readme = (EXAMPLES / "README.md").read_text()
    for path in _ui_files():
        assert path.name in readme, f"example_workflows/README.md does not list {path.name}"


def test_checkpoint_layout_has_the_sd15_sizes():
    """Key counts and parameter counts of the three parts are those of the released SD1.5 file."""
    tool = _load_tool("make_test_models")
    count = {name: sum(_numel(s) for s in shapes.values()) for name, shapes in (
        ("unet", tool.sd15_unet_shapes()), ("vae", tool.sd15_vae_shapes()), ("clip", tool.clip_l_shapes()))}  # fmt: skip
    assert len(tool.sd15_unet_shapes()) == 686 and count["unet"] == 859_520_964
    assert len(tool.sd15_vae_shapes()) == 248 and count["vae"] == 83_653_863
    assert len(tool.clip_l_shapes()) == 196 and count["clip"] == 123_060_480
    assert len(tool.sd15_checkpoint_shapes()) == 686 + 248 + 196


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------------------------------------------ the server


@pytest.fixture(scope="module")
def checkpoint_name(comfy_server) -> str:
    """The test checkpoint (built once into a cache), linked into the server's ``models/checkpoints``."""
    return comfy_server.link_model("checkpoints", _load_tool("make_test_models").cached_sd15_checkpoint())


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get("/object_info", timeout=60.0)


# ------------------------------------------------------------------------------------ API format


def patched_prompt(prompt: dict, checkpoint_name: str) -> dict:
    """The example with the test checkpoint, ``IMAGE_SIZE`` latents and at most ``MAX_STEPS`` steps."""
    prompt = copy.deepcopy(prompt)
    loaders = 0
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = checkpoint_name
            loaders += 1
        elif kind == "FewStepStudentLoader":
            inputs["model_file"] = f"checkpoints/{checkpoint_name}"
            loaders += 1
        elif kind == "EmptyLatentImage":
            inputs.update(width=IMAGE_SIZE, height=IMAGE_SIZE, batch_size=1)
        elif kind in ("KSampler", "FewStepSchedule"):
            inputs["steps"] = min(inputs["steps"], MAX_STEPS)
        elif kind == "FewStepNFEPlan":
            inputs["nfe"] = min(inputs["nfe"], MAX_STEPS)
        elif kind == "FewStepCalibrateSchedule":  # the smallest teacher and search the node accepts
            inputs.update(nfe=min(inputs["nfe"], MAX_STEPS), seeds=1, grid_points=16, substeps=1, search_nfe=8)
    assert loaders, "the example loads no model"
    return prompt


def _saved_images(output_dir: Path, prompt: dict, history: dict) -> dict[str, list]:
    """SaveImage node id -> list of images (numpy uint8 HxWx3) it wrote."""
    import numpy as np
    from PIL import Image

    images = {}
    for node_id, node in prompt.items():
        if node["class_type"] != "SaveImage":
            continue
        entries = history["outputs"].get(node_id, {}).get("images", [])
        assert entries, f"SaveImage {node_id} wrote nothing"
        images[node_id] = []
        for entry in entries:
            path = output_dir / entry["subfolder"] / entry["filename"]
            assert entry["type"] == "output" and path.is_file(), entry
            with Image.open(path) as im:
                assert im.size == (IMAGE_SIZE, IMAGE_SIZE) and im.mode == "RGB", (im.size, im.mode)
                images[node_id].append(np.asarray(im).copy())
    return images


CUDA_GRAPH_OFF = "fewstep_cuda_graph enable=False"
MEAN_START = "fewstep_calibrated_steps preset=dpmpp_2m_fitted_mean_start"
REFINED = "fewstep_calibrated_steps refine_iterations=1"
FEWSTEP_NODES = "fewstep_dpm_solver_custom_sampler few-step preset"
FEWSTEP_KSAMPLER = "fewstep_cuda_graph fewstep_dpmpp_2m_fast / fewstep_window"


def _loaders(prompt: dict) -> list:
    kinds = ("CheckpointLoaderSimple", "FewStepStudentLoader")
    return sorted(json.dumps(n, sort_keys=True) for n in prompt.values() if n["class_type"] in kinds)


def _prompts(checkpoint_name: str):
    """(name, prompt, free_first) for every API example, plus the CUDA-graph one with the node off
    and the calibration one with the mean-start preset.

    Models and cached outputs are freed only before a prompt that loads other models than the
    one before it, so examples sharing the checkpoint loader reuse ComfyUI's cached outputs.
    """
    previous = None
    for path in _api_files():
        prompt = patched_prompt(json.loads(path.read_text()), checkpoint_name)
        yield path.stem, prompt, _loaders(prompt) != previous
        previous = _loaders(prompt)
        if path.stem == "fewstep_cuda_graph":
            off = copy.deepcopy(prompt)
            (graph,) = [i for i, n in off.items() if n["class_type"] == "FewStepCUDAGraph"]
            assert off[graph]["inputs"]["enable"] is True
            off[graph]["inputs"]["enable"] = False
            yield CUDA_GRAPH_OFF, off, False
            fast = copy.deepcopy(prompt)
            (ksampler,) = [n for n in fast.values() if n["class_type"] == "KSampler"]
            ksampler["inputs"].update(sampler_name="fewstep_dpmpp_2m_fast", scheduler="fewstep_window")
            yield FEWSTEP_KSAMPLER, fast, False
        if path.stem == "fewstep_dpm_solver_custom_sampler":
            fast = copy.deepcopy(prompt)
            (sampler,) = [n for n in fast.values() if n["class_type"] == "FewStepDPMSolverSampler"]
            sampler["inputs"].update(corrector="bh2", final_order=4, final_weights="gaussian",
                                     first_step="gaussian")
            (schedule,) = [n for n in fast.values() if n["class_type"] == "FewStepSchedule"]
            schedule["inputs"].update(schedule="logsnr_window", lambda_start=-2.0, sigma_end=0.03)
            yield FEWSTEP_NODES, fast, False
        if path.stem == "fewstep_calibrated_steps":
            mean = copy.deepcopy(prompt)
            (node,) = [n for n in mean.values() if n["class_type"] == "FewStepCalibrateSchedule"]
            node["inputs"]["preset"] = "dpmpp_2m_fitted_mean_start"
            yield MEAN_START, mean, False
            refined = copy.deepcopy(mean)  # the refinement's fewest seeds, on the smallest run
            (node,) = [n for n in refined.values() if n["class_type"] == "FewStepCalibrateSchedule"]
            node["inputs"].update(nfe=2, seeds=32, refine_iterations=1)
            yield REFINED, refined, False


@pytest.fixture(scope="module")
def runs(comfy_server, checkpoint_name) -> dict[str, tuple[dict, dict, dict, str]]:
    """Every API example run once: name -> (prompt, history, images, log); images only on success."""
    out = {}
    for name, prompt, free_first in _prompts(checkpoint_name):
        started = time.monotonic()
        history, log = comfy_server.run(prompt, free_first)
        ok = history["status"]["status_str"] == "success"
        images = _saved_images(comfy_server.base / "output", prompt, history) if ok else {}
        out[name] = (prompt, history, images, log)
        logger.info("%s: %s in %.1f s", name, history["status"]["status_str"], time.monotonic() - started)
    return out


def _successful_run(runs: dict, name: str) -> tuple[dict, dict, dict, str]:
    prompt, history, images, log = runs[name]
    status = history["status"]
    assert status["status_str"] == "success", (name, status["messages"][-2:], log[-3000:])
    return prompt, history, images, log


@pytest.mark.parametrize("name", [p.stem for p in _api_files()])
@pytest.mark.comfy
@pytest.mark.slow
def test_api_example_runs_and_saves_real_images(runs, name):
    _, _, images, log = _successful_run(runs, name)
    assert "invalid value encountered" not in log  # numpy's warning when a NaN pixel is cast to uint8
    assert "Traceback" not in log
    assert images, "no SaveImage node"
    pictures = [a for group in images.values() for a in group]
    for a in pictures:  # random weights decode to mid-grey noise: std ~50, no black or white pixel
        assert a.std() > 5.0, "flat image"
        assert (a.max(axis=2) == 0).mean() < 0.01, "black pixels (NaN casts to 0)"
        assert (a.min(axis=2) == 255).mean() < 0.01, "white pixels"
    for i, a in enumerate(pictures):  # different branches (1 vs 4 student steps) give different images
        for b in pictures[i + 1 :]:
            assert (a != b).any()


@pytest.mark.comfy
@pytest.mark.slow
def test_checkpoint_loads_as_sd15_with_every_key(runs, comfy_server):
    log = comfy_server.log_text()
    assert "model_type EPS" in log
    for marker in ("unet missing", "unet unexpected", "Missing VAE keys", "Leftover VAE keys",
                   "clip unexpected", "left over keys:", "no CLIP/text encoder weights"):  # fmt: skip
        assert marker not in log, [line for line in log.splitlines() if marker in line][:2]
    # SD1.5 releases carry neither CLIP-L's logit scale nor its text projection; ComfyUI expects that.
    clip_missing = [line for line in log.splitlines() if "clip missing:" in line]
    assert clip_missing, "the checkpoint's text encoder was not loaded"
    for line in clip_missing:
        missing = set(ast.literal_eval(line.split("clip missing:", 1)[1].strip()))
        assert missing <= {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}, line


@pytest.mark.comfy
@pytest.mark.slow
def test_nfe_plan_example_reports_its_plan(runs):
    prompt, history, _, _ = _successful_run(runs, "fewstep_nfe_plan")
    (plan_node,) = [i for i, n in prompt.items() if n["class_type"] == "FewStepNFEPlan"]
    (preview,) = [i for i, n in prompt.items() if n["class_type"] == "PreviewAny"]
    text = history["outputs"][preview]["text"][0]
    assert text.startswith(prompt[plan_node]["inputs"]["preset"] + ":"), text


@pytest.mark.comfy
@pytest.mark.slow
def test_cuda_graph_example_gives_the_same_image_as_without_the_node(runs):
    """Off the GPU every call runs eagerly, so the node changes nothing (bit-identical PNG)."""
    _, _, images, log = _successful_run(runs, "fewstep_cuda_graph")
    _, _, images_off, log_off = _successful_run(runs, CUDA_GRAPH_OFF)
    assert "CUDA graph (diffusion model): running eagerly" in log  # the wrapper ran, and said why
    assert "CUDA graph" not in log_off
    assert images.keys() == images_off.keys()
    for node_id, group in images.items():
        for a, b in zip(group, images_off[node_id], strict=True):
            assert (a == b).all()


@pytest.mark.comfy
@pytest.mark.slow
def test_mean_start_calibration_runs_one_more_step_and_saves_a_real_image(runs):
    prompt, history, images, log = _successful_run(runs, MEAN_START)
    assert "Traceback" not in log
    (preview,) = [i for i, n in prompt.items() if n["class_type"] == "PreviewAny"]
    report = history["outputs"][preview]["text"][0]
    nfe = _only(prompt, "FewStepCalibrateSchedule")["nfe"]
    assert f"at NFE {nfe} ({nfe + 1} steps, the first from the calibration's mean prediction)" in report
    (picture,) = [a for group in images.values() for a in group]
    assert picture.std() > 5.0 and (picture.max(axis=2) == 0).mean() < 0.01


@pytest.mark.comfy
@pytest.mark.slow
def test_refined_calibration_runs_in_the_server_on_loaded_weights(runs):
    """The end-to-end refinement runs on the weights ComfyUI loaded (inference tensors) in a real
    server, from an API prompt that sets the optional refine_iterations input."""
    prompt, history, images, log = _successful_run(runs, REFINED)
    assert "Traceback" not in log
    (preview,) = [i for i, n in prompt.items() if n["class_type"] == "PreviewAny"]
    report = history["outputs"][preview]["text"][0]
    assert "at NFE 2 (3 steps" in report and "on 32 seeds" in report
    assert re.search(r"search \+ \d+ refinement\)", report), report
    (picture,) = [a for group in images.values() for a in group]
    assert picture.std() > 5.0


def _only(prompt: dict, class_type: str) -> dict:
    (node,) = [n["inputs"] for n in prompt.values() if n["class_type"] == class_type]
    return node


def _texts(prompt: dict, guider: dict) -> list[str]:
    return [prompt[guider[k][0]]["inputs"]["text"] for k in ("positive", "negative")]


@pytest.mark.comfy
@pytest.mark.slow
def test_ksampler_preset_is_the_sampler_node_on_the_same_settings(runs):
    """KSampler with ``fewstep_dpmpp_2m`` / ``fewstep_logsnr`` (the CUDA-graph example, eager on the
    CPU) and FewStep DPM-Solver++ Sampler (2M) + FewStep Schedule (logsnr_uniform) in
    SamplerCustomAdvanced give the same image for the same seed, cfg, steps and prompts."""
    preset, _, preset_images, _ = _successful_run(runs, "fewstep_cuda_graph")
    custom, _, custom_images, _ = _successful_run(runs, "fewstep_dpm_solver_custom_sampler")
    ksampler, sampler = _only(preset, "KSampler"), _only(custom, "FewStepDPMSolverSampler")
    schedule, guider = _only(custom, "FewStepSchedule"), _only(custom, "CFGGuider")
    assert (ksampler["sampler_name"], ksampler["scheduler"]) == ("fewstep_dpmpp_2m", "fewstep_logsnr")
    assert (sampler["solver"], sampler["order"], sampler["eta"], sampler["corrector"]) == (
        "multistep",
        2,
        0.0,
        "none",
    )
    assert (schedule["schedule"], schedule["steps"], schedule["denoise"]) == (
        "logsnr_uniform",
        ksampler["steps"],
        1.0,
    )
    assert ksampler["seed"] == _only(custom, "RandomNoise")["noise_seed"] and ksampler["cfg"] == guider["cfg"]
    assert _texts(preset, ksampler) == _texts(custom, guider)
    (a,) = [a for group in preset_images.values() for a in group]
    (b,) = [b for group in custom_images.values() for b in group]
    assert (a == b).all()


@pytest.mark.comfy
@pytest.mark.slow
def test_few_step_preset_runs_and_its_ksampler_names_give_the_same_image(runs):
    """The few-step preset set on the nodes (corrector bh2, final_order 4 with gaussian weights, the
    few-step window) and by KSampler's fewstep_dpmpp_2m_fast / fewstep_window
    on the same settings: real images, the same for both, and not the plain 2M image."""
    _, _, node_images, log = _successful_run(runs, FEWSTEP_NODES)
    _, _, ksampler_images, _ = _successful_run(runs, FEWSTEP_KSAMPLER)
    _, _, plain_images, _ = _successful_run(runs, "fewstep_dpm_solver_custom_sampler")
    assert "Traceback" not in log
    (a,) = [a for group in node_images.values() for a in group]
    (b,) = [b for group in ksampler_images.values() for b in group]
    (c,) = [c for group in plain_images.values() for c in group]
    assert a.std() > 5.0 and (a == b).all() and (a != c).any()


# ------------------------------------------------------------------------------------ UI format


def _input_specs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of every input in the served order."""
    order = info.get("input_order", {})
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in order.get(section, list(specs)):
            spec = specs[name]
            out.append((name, spec[0], spec[1] if len(spec) > 1 else {}))
    return out


def _is_widget(kind: object, options: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def _widget_names(info: dict) -> list[str]:
    names = []
    for name, kind, options in _input_specs(info):
        if _is_widget(kind, options):
            names.append(name)
            if options.get(CONTROL):
                names.append(CONTROL)
    return names


def _check_widget_value(node_type: str, name: str, kind: object, options: dict, value: object) -> None:
    where = f"{node_type}.{name} = {value!r}"
    if (node_type, name) in FILE_WIDGETS:
        assert isinstance(value, str) and value.endswith(".safetensors"), where
        return
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        assert value in choices, f"{where} is not one of {choices}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        if kind == "INT":
            assert isinstance(value, int), where
        assert options.get("min", value) <= value <= options.get("max", value), where
    elif kind == "STRING":
        assert isinstance(value, str), where


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt the frontend would queue for a UI-format workflow (no primitives/groups)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in UI_ONLY_NODES:
            continue
        inputs = {}
        values = dict(zip(_widget_names(object_info[node["type"]]), node["widgets_values"], strict=True))
        values.pop(CONTROL, None)
        inputs.update(values)
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                _, origin, origin_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


@pytest.mark.parametrize("path", _ui_files(), ids=lambda p: p.stem)
@pytest.mark.comfy
@pytest.mark.slow
def test_ui_example_matches_the_served_nodes(object_info, path):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4 and workflow["extra"]["info"]["models"]
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] == max(nodes)
    assert any(node["type"] in UI_ONLY_NODES for node in nodes.values()), "no note naming the models"
    for node in nodes.values():
        kind = node["type"]
        if kind in UI_ONLY_NODES:
            continue
        assert kind in object_info, f"{path.name}: node type {kind} is not served"
        info = object_info[kind]
        names = _widget_names(info)
        assert len(node["widgets_values"]) == len(names), (kind, names, node["widgets_values"])
        specs = {name: (k, o) for name, k, o in _input_specs(info)}
        for name, value in zip(names, node["widgets_values"], strict=True):
            if name == CONTROL:
                assert value in ("fixed", "increment", "decrement", "randomize"), (kind, value)
            else:
                _check_widget_value(kind, name, *specs[name], value)
        sockets = [(n, k) for n, k, o in _input_specs(info) if not _is_widget(k, o)]
        assert [(s["name"], s["type"]) for s in node["inputs"]] == sockets, kind
        assert [(o["name"], o["type"]) for o in node["outputs"]] == list(
            zip(info["output_name"], info["output"], strict=True)
        ), kind
    for link_id, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
        out = nodes[origin]["outputs"][origin_slot]
        into = nodes[target]["inputs"][target_slot]
        assert link_id in out["links"] and into["link"] == link_id, link_id
        assert out["type"] == link_type and into["type"] in (link_type, "*"), (link_id, link_type, into)
    assert workflow["last_link_id"] == max((link[0] for link in workflow["links"]), default=0)


@pytest.mark.parametrize("path", _ui_files(), ids=lambda p: p.stem)
@pytest.mark.comfy
@pytest.mark.slow
def test_ui_example_is_the_api_example(object_info, path):
    api = json.loads((API_EXAMPLES / path.name).read_text())
    for node in api.values():
        node.pop("_meta", None)
    assert ui_to_api(json.loads(path.read_text()), object_info) == api
