"""Write the example workflows in both ComfyUI formats from one description per workflow.

    python tools/make_example_workflows.py          # rewrites example_workflows/*.json and api/*.json

``example_workflows/<name>.json`` is the UI format (what the ComfyUI frontend saves and shows
under Workflow > Browse Templates for an installed pack: LiteGraph nodes with positional
``widgets_values``, a ``links`` table, schema version 0.4). ``example_workflows/api/<name>.json``
is the API format of the same graph (what ``POST /prompt`` accepts; node ids are the same).

Each node's widget order is written down in :data:`NODES` (it must follow the node's input order
in ``/object_info``; a seed widget with ``control_after_generate`` is followed by its control
value). The ComfyUI end-to-end test checks every file against a running server. Only the
standard library is used.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "example_workflows"
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
"""The checkpoint name the examples use; any SD1.5 checkpoint works (pick yours in the loader)."""
LCM_CHECKPOINT = "LCM_Dreamshaper_v7.safetensors"
"""A full single-file LCM student of SD1.5 (any SD1.5 LCM checkpoint works)."""
CONTROL = "control_after_generate"


@dataclass(frozen=True)
class NodeSpec:
    """Sockets (name, type), widget names in input order, outputs (name, type) of one node type."""

    sockets: tuple[tuple[str, str], ...] = ()
    widgets: tuple[str, ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()
    size: tuple[int, int] = (320, 110)
    ui_only: bool = False


_DPM_WIDGETS = (
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
    "final_order",
    "final_weights",
    "second_step",
    "first_step",
)
_SCHEDULE_WIDGETS = (
    "schedule",
    "steps",
    "denoise",
    "rho",
    "table_model",
    "gits_coeff",
    "custom_sigmas",
    "sigma_min",
    "sigma_max",
    "lambda_start",
    "sigma_end",
)

NODES: dict[str, NodeSpec] = {
    "CheckpointLoaderSimple": NodeSpec(
        widgets=("ckpt_name",),
        outputs=(("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")),
        size=(320, 100),
    ),
    "CLIPTextEncode": NodeSpec(
        sockets=(("clip", "CLIP"),),
        widgets=("text",),
        outputs=(("CONDITIONING", "CONDITIONING"),),
        size=(400, 160),
    ),
    "CFGGuider": NodeSpec(
        sockets=(("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")),
        widgets=("cfg",),
        outputs=(("GUIDER", "GUIDER"),),
        size=(270, 100),
    ),
    "BasicGuider": NodeSpec(
        sockets=(("model", "MODEL"), ("conditioning", "CONDITIONING")),
        outputs=(("GUIDER", "GUIDER"),),
        size=(220, 50),
    ),
    "RandomNoise": NodeSpec(widgets=("noise_seed", CONTROL), outputs=(("NOISE", "NOISE"),), size=(270, 85)),
    "EmptyLatentImage": NodeSpec(
        widgets=("width", "height", "batch_size"), outputs=(("LATENT", "LATENT"),), size=(270, 110)
    ),
    "SamplerCustomAdvanced": NodeSpec(
        sockets=(
            ("noise", "NOISE"),
            ("guider", "GUIDER"),
            ("sampler", "SAMPLER"),
            ("sigmas", "SIGMAS"),
            ("latent_image", "LATENT"),
        ),
        outputs=(("output", "LATENT"), ("denoised_output", "LATENT")),
        size=(270, 130),
    ),
    "KSampler": NodeSpec(
        sockets=(
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
        ),
        widgets=("seed", CONTROL, "steps", "cfg", "sampler_name", "scheduler", "denoise"),
        outputs=(("LATENT", "LATENT"),),
        size=(300, 270),
    ),
    "VAEDecode": NodeSpec(
        sockets=(("samples", "LATENT"), ("vae", "VAE")), outputs=(("IMAGE", "IMAGE"),), size=(210, 50)
    ),
    "SaveImage": NodeSpec(sockets=(("images", "IMAGE"),), widgets=("filename_prefix",), size=(320, 360)),
    "PreviewAny": NodeSpec(sockets=(("source", "*"),), size=(320, 120)),
    "MarkdownNote": NodeSpec(widgets=("text",), size=(420, 260), ui_only=True),
    "FewStepDPMSolverSampler": NodeSpec(
        widgets=_DPM_WIDGETS, outputs=(("SAMPLER", "SAMPLER"),), size=(320, 420)
    ),
    "FewStepSchedule": NodeSpec(
        sockets=(("model", "MODEL"),),
        widgets=_SCHEDULE_WIDGETS,
        outputs=(("SIGMAS", "SIGMAS"),),
        size=(320, 330),
    ),
    "FewStepNFEPlan": NodeSpec(
        sockets=(("model", "MODEL"),),
        widgets=("preset", "nfe", "schedule", "cfg", "denoise"),
        outputs=(("SAMPLER", "SAMPLER"), ("SIGMAS", "SIGMAS"), ("plan", "STRING")),
        size=(320, 200),
    ),
    "FewStepStudentLoader": NodeSpec(
        sockets=(("model", "MODEL"),),
        widgets=("model_file", "recipe", "steps", "lora_strength", "check_weights", "lcm_guidance", "timesteps",
                 "tcd_eta"),
        outputs=(
            ("MODEL", "MODEL"),
            ("SAMPLER", "SAMPLER"),
            ("SIGMAS", "SIGMAS"),
            ("CLIP", "CLIP"),
            ("VAE", "VAE"),
            ("recipe_info", "STRING"),
            ("cfg", "FLOAT"),
        ),
        size=(360, 230),
    ),
    "FewStepCalibrateSchedule": NodeSpec(
        sockets=(
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("latent_image", "LATENT"),
            ("negative", "CONDITIONING"),
        ),
        widgets=(
            "preset",
            "nfe",
            "seeds",
            "seed",
            "cfg",
            "grid_points",
            "substeps",
            "search_nfe",
            "use_cache",
            "save_as",
            "target",
            "refine_iterations",
        ),
        outputs=(("sampler", "SAMPLER"), ("sigmas", "SIGMAS"), ("report", "STRING")),
        size=(340, 370),
    ),
    "FewStepCUDAGraph": NodeSpec(
        sockets=(("model", "MODEL"),),
        widgets=("enable", "max_graphs", "warmup", "verify", "attention", "tolerance"),
        outputs=(("MODEL", "MODEL"),),
        size=(320, 200),
    ),
}
"""The node types the examples use. Optional sockets (the student loader's ``model``) stay unlinked."""


@dataclass
class Node:
    id: int
    type: str
    widgets: dict[str, Any]
    links: dict[str, tuple[int, int]]
    pos: tuple[int, int]
    title: str | None = None

    def out(self, name: str | None = None) -> tuple[int, int]:
        """The link source (node id, output slot) of output ``name`` (default: the first output)."""
        if name is None:
            return self.id, 0
        names = [n for n, _ in NODES[self.type].outputs]
        if name not in names:
            raise ValueError(f"{self.type} has no output {name!r}; it has {names}")
        return self.id, names.index(name)


@dataclass
class Workflow:
    """One example graph; :meth:`ui` and :meth:`api` render it in the two formats."""

    name: str
    title: str
    description: str
    models: list[str]
    nodes: list[Node] = field(default_factory=list)

    def add(
        self, type_: str, pos: tuple[int, int], title: str | None = None, links: dict | None = None, **widgets
    ) -> Node:
        spec = NODES[type_]
        names = [w for w in spec.widgets if w != CONTROL]
        if set(widgets) != set(names):
            raise ValueError(f"{type_}: widgets {sorted(widgets)} do not match {names}")
        sockets = {name for name, _ in spec.sockets}
        if links and not set(links) <= sockets:
            raise ValueError(f"{type_}: unknown sockets {sorted(set(links) - sockets)}")
        node = Node(len(self.nodes) + 1, type_, widgets, dict(links or {}), pos, title)
        self.nodes.append(node)
        return node

    def note(self, pos: tuple[int, int], heading: str, body: str) -> Node:
        """The "Read me" note: ``heading``, the models the example expects, then ``body``."""
        models = "\n".join(f"- `models/{m}`" for m in self.models)
        return self.add(
            "MarkdownNote", pos, title="Read me", text=f"## {heading}\n\nExpects:\n{models}\n\n{body}"
        )

    # ------------------------------------------------------------------ API format
    def api(self) -> dict[str, Any]:
        prompt: dict[str, Any] = {}
        for node in self.nodes:
            spec = NODES[node.type]
            if spec.ui_only:
                continue
            inputs: dict[str, Any] = {}
            for name in spec.widgets:
                if name != CONTROL:
                    inputs[name] = node.widgets[name]
            for name, _ in spec.sockets:
                if name in node.links:
                    source, slot = node.links[name]
                    inputs[name] = [str(source), slot]
            entry: dict[str, Any] = {"class_type": node.type, "inputs": inputs}
            if node.title:
                entry["_meta"] = {"title": node.title}
            prompt[str(node.id)] = entry
        return prompt

    # ------------------------------------------------------------------ UI (LiteGraph) format
    def ui(self) -> dict[str, Any]:
        links: list[list[Any]] = []
        out_links: dict[tuple[int, int], list[int]] = {}
        in_links: dict[tuple[int, str], int] = {}
        for node in self.nodes:
            spec = NODES[node.type]
            for target_slot, (name, _) in enumerate(spec.sockets):
                if name not in node.links:
                    continue
                source, slot = node.links[name]
                origin = self.nodes[source - 1]
                link_type = NODES[origin.type].outputs[slot][1]
                link_id = len(links) + 1
                links.append([link_id, source, slot, node.id, target_slot, link_type])
                out_links.setdefault((source, slot), []).append(link_id)
                in_links[(node.id, name)] = link_id
        nodes = []
        for order, node in enumerate(self.nodes):
            spec = NODES[node.type]
            entry: dict[str, Any] = {
                "id": node.id,
                "type": node.type,
                "pos": list(node.pos),
                "size": list(spec.size),
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": [
                    {"name": name, "type": kind, "link": in_links.get((node.id, name))}
                    for name, kind in spec.sockets
                ],
                "outputs": [
                    {
                        "name": name,
                        "type": kind,
                        "links": out_links.get((node.id, slot), []),
                        "slot_index": slot,
                    }
                    for slot, (name, kind) in enumerate(spec.outputs)
                ],
                "properties": {} if spec.ui_only else {"Node name for S&R": node.type},
                "widgets_values": [
                    "fixed" if name == CONTROL else node.widgets[name] for name in spec.widgets
                ],
            }
            if node.title:
                entry["title"] = node.title
            nodes.append(entry)
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(links),
            "nodes": nodes,
            "links": links,
            "groups": [],
            "config": {},
            "extra": {
                "ds": {"scale": 0.8, "offset": [40, 40]},
                "info": {"name": self.title, "description": self.description, "models": self.models},
            },
            "version": 0.4,
        }


# ---------------------------------------------------------------------------------------- pieces

POSITIVE = "a photograph of a lighthouse on a rocky coast at sunset, dramatic sky, highly detailed"
NEGATIVE = "blurry, low quality, watermark, text"
SD15_MODELS = [f"checkpoints/{CHECKPOINT} (any SD1.5 checkpoint)"]
SEED = 42
CFG = 5.0
Link = tuple[int, int]


def _dpm_widgets(**overrides: Any) -> dict[str, Any]:
    widgets = {
        "solver": "multistep",
        "order": 2,
        "solver_type": "midpoint",
        "prediction": "dpmsolver++",
        "lower_order_final": True,
        "lower_order_final_steps": 10,
        "euler_at_final": False,
        "final_step": "zero",
        "eta": 0.0,
        "s_noise": 1.0,
        "corrector": "none",
        "thresholding": "none",
        "threshold_percentile": 0.995,
        "threshold_max": 1.0,
        "third_order": "taylor",
        "atol": 0.0078,
        "rtol": 0.05,
        "final_order": 1,
        "final_weights": "adams",
        "second_step": "log_snr",
        "first_step": "ddim",
    }
    widgets.update(overrides)
    return widgets


def _schedule_widgets(schedule: str = "logsnr_uniform", steps: int = 8) -> dict[str, Any]:
    return {
        "schedule": schedule,
        "steps": steps,
        "denoise": 1.0,
        "rho": 0.0,
        "table_model": "auto",
        "gits_coeff": 1.2,
        "custom_sigmas": "",
        "sigma_min": 0.0,
        "sigma_max": 0.0,
        "lambda_start": 0.0,
        "sigma_end": 0.0,
    }


def _checkpoint(wf: Workflow) -> Node:
    return wf.add("CheckpointLoaderSimple", (0, 0), ckpt_name=CHECKPOINT)


def _text_nodes(wf: Workflow, loader: Node, y: int = 0) -> tuple[Node, Node]:
    """Positive and negative prompt, encoded with the loader's CLIP."""
    clip = {"clip": loader.out("CLIP")}
    positive = wf.add("CLIPTextEncode", (420, y), "Positive prompt", clip, text=POSITIVE)
    negative = wf.add("CLIPTextEncode", (420, y + 200), "Negative prompt", clip, text=NEGATIVE)
    return positive, negative


def _cfg_guider(wf: Workflow, model: Link, positive: Node, negative: Node) -> Node:
    links = {"model": model, "positive": positive.out(), "negative": negative.out()}
    return wf.add("CFGGuider", (880, 0), links=links, cfg=CFG)


def _noise(wf: Workflow, pos: tuple[int, int]) -> Node:
    return wf.add("RandomNoise", pos, noise_seed=SEED)


def _latent(wf: Workflow, pos: tuple[int, int]) -> Node:
    return wf.add("EmptyLatentImage", pos, width=512, height=512, batch_size=1)


def _sample_custom(
    wf: Workflow, pos: tuple[int, int], noise: Node, guider: Node, sampler: Link, sigmas: Link, latent: Node
) -> Node:
    """SamplerCustomAdvanced wired to its five inputs."""
    links = {
        "noise": noise.out(),
        "guider": guider.out(),
        "sampler": sampler,
        "sigmas": sigmas,
        "latent_image": latent.out(),
    }
    return wf.add("SamplerCustomAdvanced", pos, links=links)


def _ksampler(wf: Workflow, model: Link, positive: Node, negative: Node, sampler_name: str) -> Node:
    """An SD1.5-sized latent into KSampler: 8 steps of ``sampler_name`` on the ``fewstep_logsnr`` schedule."""
    latent = _latent(wf, (420, 420))
    links = {
        "model": model,
        "positive": positive.out(),
        "negative": negative.out(),
        "latent_image": latent.out(),
    }
    return wf.add(
        "KSampler",
        (880, 0),
        links=links,
        seed=SEED,
        steps=8,
        cfg=CFG,
        sampler_name=sampler_name,
        scheduler="fewstep_logsnr",
        denoise=1.0,
    )


def _guided_sample(
    wf: Workflow, loader: Node, positive: Node, negative: Node, sampler: Link, sigmas: Link, latent: Node, name: str
) -> None:
    """CFGGuider + RandomNoise into SamplerCustomAdvanced, decoded and saved as ``FewStep/<name>``."""
    guider = _cfg_guider(wf, loader.out("MODEL"), positive, negative)
    noise = _noise(wf, (880, 150))
    sample = _sample_custom(wf, (1200, 0), noise, guider, sampler, sigmas, latent)
    _output(wf, sample.out(), loader.out("VAE"), 1200, 200, f"FewStep/{name}")


def _output(wf: Workflow, latent: Link, vae: Link, x: int, y: int, prefix: str) -> Node:
    decode = wf.add("VAEDecode", (x, y), links={"samples": latent, "vae": vae})
    return wf.add("SaveImage", (x + 250, y), links={"images": decode.out()}, filename_prefix=prefix)


# ---------------------------------------------------------------------------------------- examples


def dpm_solver_custom_sampler() -> Workflow:
    wf = Workflow(
        "fewstep_dpm_solver_custom_sampler",
        "FewStep: DPM-Solver++ with SamplerCustomAdvanced",
        "DPM-Solver++(2M) on a log-SNR-uniform schedule in 8 steps, through ComfyUI's custom-sampling nodes.",
        SD15_MODELS,
    )
    loader = _checkpoint(wf)
    positive, negative = _text_nodes(wf, loader)
    guider = _cfg_guider(wf, loader.out("MODEL"), positive, negative)
    noise = _noise(wf, (880, 150))
    sampler = wf.add("FewStepDPMSolverSampler", (0, 400), **_dpm_widgets())
    schedule = wf.add(
        "FewStepSchedule", (420, 450), links={"model": loader.out("MODEL")}, **_schedule_widgets()
    )
    latent = _latent(wf, (880, 280))
    sample = _sample_custom(wf, (1200, 0), noise, guider, sampler.out(), schedule.out(), latent)
    _output(wf, sample.out(), loader.out("VAE"), 1200, 200, "FewStep/dpm_solver")
    wf.note(
        (880, 450),
        "DPM-Solver++ as a SAMPLER",
        "**FewStep DPM-Solver++ Sampler** sets the solver (multistep 2M here; order 3 for low cfg, "
        "`singlestep` for 2S/3S, `adaptive` for error-controlled steps). **FewStep Schedule** computes "
        "the noise levels from the model's own schedule: `logsnr_uniform` is the paper's choice for few "
        "steps. Each multistep step is one model call. For 5-10 steps, the pack's few-step preset: "
        "`corrector` bh2, `final_order` 4, `final_weights` gaussian and `first_step` gaussian in the "
        "sampler, `logsnr_window` "
        "with `lambda_start` -2 and "
        "`sigma_end` 0.03 in the schedule (or the NFE Plan node's `dpmpp_2m_fast`).",
    )
    return wf


def ksampler_presets() -> Workflow:
    wf = Workflow(
        "fewstep_ksampler_presets",
        "FewStep: presets in the plain KSampler",
        "The fewstep_* sampler and scheduler names in the stock KSampler dropdowns: DPM-Solver++(3M) on the "
        "log-SNR-uniform schedule.",
        SD15_MODELS,
    )
    loader = _checkpoint(wf)
    positive, negative = _text_nodes(wf, loader)
    sample = _ksampler(wf, loader.out("MODEL"), positive, negative, "fewstep_dpmpp_3m")
    _output(wf, sample.out(), loader.out("VAE"), 1220, 0, "FewStep/ksampler_preset")
    wf.note(
        (0, 200),
        "FewStep presets in KSampler",
        "The pack adds `fewstep_*` names to the KSampler `sampler_name` and `scheduler` lists "
        "(`fewstep_dpmpp_2m`, `fewstep_dpmpp_3m`, `fewstep_unipc_bh2`, ... and `fewstep_logsnr`, "
        "`fewstep_ays`, `fewstep_gits`, ...). They need this pack installed to load.",
    )
    return wf


def nfe_plan() -> Workflow:
    wf = Workflow(
        "fewstep_nfe_plan",
        "FewStep: NFE plan (budget of model calls)",
        "Give a number of model calls; FewStep NFE Plan picks the step count for the solver and returns the "
        "SAMPLER and SIGMAS (DPM-Solver++(3S) with 9 calls here).",
        SD15_MODELS,
    )
    loader = _checkpoint(wf)
    positive, negative = _text_nodes(wf, loader)
    plan = wf.add(
        "FewStepNFEPlan",
        (0, 420),
        links={"model": loader.out("MODEL")},
        preset="dpmpp_3s",
        nfe=9,
        schedule="logsnr_uniform",
        cfg=CFG,
        denoise=1.0,
    )
    latent = _latent(wf, (880, 280))
    _guided_sample(wf, loader, positive, negative, plan.out("SAMPLER"), plan.out("SIGMAS"), latent, "nfe_plan")
    wf.add("PreviewAny", (420, 450), "Plan", {"source": plan.out("plan")})
    wf.note(
        (0, 660),
        "Budget first",
        "Set `nfe` to the number of model calls you can afford. Single-step presets (2S, 3S) spend "
        "several calls per step, so the plan derives the steps; the **Plan** box shows steps, calls "
        "and network evaluations (cfg != 1 doubles the latter).",
    )
    return wf


def student_steps() -> Workflow:
    wf = Workflow(
        "fewstep_student_1_and_4_steps",
        "FewStep: a distilled student in 1 and 4 steps",
        "Load Distilled Student (FewStep) returns the model with the recipe's prediction type, its sampler and "
        "its sigmas; the same student sampled in 1 step and in 4 steps.",
        [f"checkpoints/{LCM_CHECKPOINT} (a single-file SD1.5 LCM student; LCM and SD/SDXL-Turbo "
         "checkpoints run at both 1 and 4 steps)"],
    )
    for row, steps in enumerate((1, 4)):
        y = row * 650
        loader = wf.add(
            "FewStepStudentLoader",
            (0, y),
            f"Student, {steps} step{'s' if steps > 1 else ''}",
            model_file=f"checkpoints/{LCM_CHECKPOINT}",
            recipe="lcm",
            steps=steps,
            lora_strength=1.0,
            check_weights=True,
            lcm_guidance=8.5,
            timesteps="",
            tcd_eta=-1.0,
        )
        text = wf.add("CLIPTextEncode", (420, y), "Prompt", {"clip": loader.out("CLIP")}, text=POSITIVE)
        links = {"model": loader.out("MODEL"), "conditioning": text.out()}
        guider = wf.add("BasicGuider", (880, y), links=links)
        noise = _noise(wf, (880, y + 100))
        latent = _latent(wf, (880, y + 230))
        sample = _sample_custom(
            wf, (1200, y), noise, guider, loader.out("SAMPLER"), loader.out("SIGMAS"), latent
        )
        _output(wf, sample.out(), loader.out("VAE"), 1200, y + 200, f"FewStep/student_{steps}step")
    wf.note(
        (1820, 0),
        "Distilled students",
        "`recipe` = `auto` detects DMD2, SiD-LSG, Turbo, Lightning, Hyper-SD, LCM, TCD, PCM, InstaFlow ... "
        "from the file name, metadata and keys; here it is set to `lcm`. Students distilled for fixed step "
        "counts (Lightning, DMD2, Hyper-SD's 1-step UNet, InstaFlow, SwiftBrush) refuse other counts: set "
        "`steps` to 0 for the count the student was distilled for. UNet-only and LoRA students have no "
        "CLIP or VAE: take them from a base checkpoint loader (a LoRA student also needs that base MODEL on "
        "the loader's `model` input; pick the file from `loras/`). Here the student is sampled without cfg "
        "(a BasicGuider); where the loader's `cfg` output is above 1 (PCM normal-cfg, Hyper-SD's CFG LoRAs, "
        "2-RF), use a CFGGuider with that cfg and a negative prompt.",
    )
    return wf


def cuda_graph() -> Workflow:
    wf = Workflow(
        "fewstep_cuda_graph",
        "FewStep: CUDA graphs in front of a sampler",
        "FewStep CUDA Graph between the model and KSampler: later model calls replay captured CUDA graphs "
        "(NVIDIA GPUs; on other devices the model runs as usual).",
        SD15_MODELS,
    )
    loader = _checkpoint(wf)
    graph = wf.add(
        "FewStepCUDAGraph",
        (0, 200),
        links={"model": loader.out("MODEL")},
        enable=True,
        max_graphs=4,
        warmup=2,
        verify=True,
        attention="auto",
        tolerance=0.001,
    )
    positive, negative = _text_nodes(wf, loader)
    sample = _ksampler(wf, graph.out("MODEL"), positive, negative, "fewstep_dpmpp_2m")
    _output(wf, sample.out(), loader.out("VAE"), 1220, 0, "FewStep/cuda_graph")
    wf.note(
        (0, 450),
        "CUDA graphs",
        "Put **FewStep CUDA Graph** after the loader (and after LoRAs) and before the sampler. The "
        "first calls of each shape run eagerly and capture; later ones replay. Images do not change; "
        "calls that cannot be captured safely (CPU, low-VRAM loading, patches) run as usual and the log "
        "says why.",
    )
    return wf


def calibrated_steps() -> Workflow:
    wf = Workflow(
        "fewstep_calibrated_steps",
        "FewStep: steps calibrated to your model",
        "FewStep Calibrate Steps fits a 6-call schedule and the solver's coefficients to this checkpoint "
        "(a few hundred model calls once, then cached) and drives SamplerCustomAdvanced with them.",
        SD15_MODELS,
    )
    loader = _checkpoint(wf)
    positive, negative = _text_nodes(wf, loader)
    latent = _latent(wf, (0, 200))
    calibrate = wf.add(
        "FewStepCalibrateSchedule",
        (420, 420),
        links={
            "model": loader.out("MODEL"),
            "positive": positive.out(),
            "latent_image": latent.out(),
            "negative": negative.out(),
        },
        preset="dpmpp_2m_fitted",
        nfe=6,
        seeds=8,
        seed=0,
        cfg=CFG,
        grid_points=100,
        substeps=3,
        search_nfe=320,
        use_cache=True,
        save_as="",
        target="ode",
        refine_iterations=0,
    )
    sampler, sigmas = calibrate.out("sampler"), calibrate.out("sigmas")
    _guided_sample(wf, loader, positive, negative, sampler, sigmas, latent, "calibrated_steps")
    wf.add("PreviewAny", (880, 420), "Calibration report", {"source": calibrate.out("report")})
    wf.note(
        (0, 420),
        "Calibrated steps",
        "The first run integrates a few accurate trajectories of *your* model (8 seeds, about 650 "
        "batched model calls: minutes on a GPU) and fits where the 6 steps go and how the solver "
        "combines them. The result is cached by the model's weights and the settings, so later runs "
        "start sampling at once. Use the **sampler** and **sigmas** of the same node together; set "
        "`save_as` to keep the schedule as a shareable JSON file (FewStep Load Schedule reads it). "
        "For the most accurate result, set `seeds` to 32 or more and `refine_iterations` to 8: the "
        "coefficients and steps are then refined together (a few hundred to 1500 more model calls).",
    )
    return wf


EXAMPLES = (dpm_solver_custom_sampler, ksampler_presets, nfe_plan, student_steps, cuda_graph, calibrated_steps)


def render(out_dir: Path = OUT_DIR) -> dict[Path, str]:
    """File path -> JSON text for every example in both formats."""
    files: dict[Path, str] = {}
    for make in EXAMPLES:
        wf = make()
        files[out_dir / f"{wf.name}.json"] = json.dumps(wf.ui(), indent=2) + "\n"
        files[out_dir / "api" / f"{wf.name}.json"] = json.dumps(wf.api(), indent=2) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ; exit 1 if any")
    args = parser.parse_args(argv)
    stale = []
    for path, text in render().items():
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for path in stale:
        print(("stale: " if args.check else "wrote: ") + str(path.relative_to(ROOT)))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
