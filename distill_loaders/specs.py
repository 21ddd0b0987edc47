"""The recipe table: how each published one-/few-step student is sampled.

One :class:`Recipe` per (student, base architecture, step mode). Every field is taken from the
student's own inference code or model card; ``source`` names where. A recipe is pure data; the
numbers it implies (sigmas, first-step noise scale) are computed in :mod:`.recipes`.

Vocabulary (one source of truth each, as ``Literal`` option sets):

* ``prediction`` — what the network outputs: ``eps`` (noise), ``v`` (velocity, Salimans & Ho
  2022), ``x0`` (the clean sample, SDXL-Lightning 1-step), ``lcm`` (eps plus the LCM consistency boundary condition,
  Luo et al. 2023 eq. 9, ``c_skip``/``c_out`` with timestep scaling 10 and sigma_data 0.5),
  ``flow_reversed`` (rectified-flow velocity pointing noise -> data, InstaFlow/2-RF/SCFlow;
  opposite sign to ComfyUI's CONST), ``edm`` (EDM-preconditioned pixel denoiser, Karras et
  al. 2022 Table 1, ``c_noise = ln(sigma)/4``).
* ``schedule`` — how the timesteps are chosen: ``trailing`` (diffusers trailing spacing,
  ``round(arange(1000, 0, -1000/N)) - 1``; equal to ComfyUI's ``simple``), ``lcm50``
  (the LCM/TCD 50-step skip grid), ``turbo`` (999, 899, 799, 699), ``fixed`` (the recipe's
  own ``timesteps``), ``flow_linear`` (``t = 1000 (1 - i/N)``), ``linear_from`` (the first
  timestep of ``timesteps`` shrunk linearly, ``t_i = t_0 (1 - i/N)``, SiD-LSG multi-step).
* ``step_rule`` — what happens between steps: ``euler`` (deterministic; DDIM for eps/x0),
  ``renoise`` (predict x0, then fresh Gaussian noise to the next level, LCM-style),
  ``ancestral`` (Euler-ancestral, eta 1), ``tcd`` (TCD with gamma = ``eta``),
  ``edm_onestep`` (one generator call ``G(sigma_init z, sigma_init)``).
* ``first_noise`` — the variance of the first network input: ``unit`` (the network sees
  unit-variance noise whatever the first timestep), ``ddpm`` (it sees ``add_noise(0, z, t)``
  = ``sqrt(1 - abar_t) z``, ComfyUI's default below ``sigma_max``), ``edm`` (``sigma_init z``
  in EDM units).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

__all__ = [
    "ARCHS",
    "FIRST_NOISE",
    "PREDICTIONS",
    "RECIPES",
    "SCHEDULES",
    "STEP_RULES",
    "Arch",
    "FirstNoise",
    "Prediction",
    "Recipe",
    "Schedule",
    "StepRule",
    "get_recipe",
    "parse_timesteps",
    "recipe_names",
    "register_recipe",
    "with_tcd_eta",
    "with_timesteps",
]

Arch = Literal["sd15", "sd21", "sdxl", "edm_songunet", "edm_dhariwal"]
Prediction = Literal["eps", "v", "x0", "lcm", "flow_reversed", "edm"]
Schedule = Literal["trailing", "lcm50", "turbo", "fixed", "flow_linear", "linear_from", "edm_sigma"]
StepRule = Literal["euler", "renoise", "ancestral", "tcd", "edm_onestep"]
FirstNoise = Literal["unit", "ddpm", "edm"]

ARCHS: tuple[str, ...] = get_args(Arch)
PREDICTIONS: tuple[str, ...] = get_args(Prediction)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
STEP_RULES: tuple[str, ...] = get_args(StepRule)
FIRST_NOISE: tuple[str, ...] = get_args(FirstNoise)

LATENT_ARCHS: tuple[str, ...] = ("sd15", "sd21", "sdxl")
EDM_ARCHS: tuple[str, ...] = ("edm_songunet", "edm_dhariwal")


@dataclass(frozen=True)
class Recipe:
    """How one student is sampled.

    Attributes:
        name: unique key, ``<student>_<arch>_<mode>``.
        student: the published method's name.
        archs: base architectures the recipe applies to.
        prediction, schedule, step_rule, first_noise: see the module docstring.
        steps: the step count the student was distilled for (the default).
        allowed_steps: step counts the authors document; ``()`` means any count >= 1.
        timesteps: explicit DDPM timesteps for ``fixed``/``linear_from`` schedules.
        cfg: classifier-free guidance scale in ComfyUI's convention (1 = off).
        eta: TCD's gamma (``tcd`` rule only).
        sigma_init: EDM starting sigma (``edm`` prediction only).
        x0_abar: the ``abar`` the student's own code uses to turn its first eps prediction into x0,
            ``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``, where it is not the schedule's value
            (SwiftBrush trains and samples with abar_999 rounded to 0.0047); ``None``: the schedule's.
        source: repository + file (or model card) the recipe is read from.
        note: anything a user should know.
    """

    name: str
    student: str
    archs: tuple[str, ...]
    prediction: Prediction
    schedule: Schedule
    step_rule: StepRule
    first_noise: FirstNoise
    steps: int
    allowed_steps: tuple[int, ...] = ()
    timesteps: tuple[float, ...] = ()
    cfg: float = 1.0
    eta: float = 0.0
    sigma_init: float | None = None
    x0_abar: float | None = None
    source: str = ""
    note: str = ""
    is_lora: bool = field(default=False)

    def __post_init__(self) -> None:
        for value, options, what in (
            (self.prediction, PREDICTIONS, "prediction"),
            (self.schedule, SCHEDULES, "schedule"),
            (self.step_rule, STEP_RULES, "step_rule"),
            (self.first_noise, FIRST_NOISE, "first_noise"),
        ):
            if value not in options:
                raise ValueError(f"recipe {self.name!r}: {what} {value!r} is not one of {options}")
        for arch in self.archs:
            if arch not in ARCHS:
                raise ValueError(f"recipe {self.name!r}: arch {arch!r} is not one of {ARCHS}")
        if self.schedule in ("fixed", "linear_from") and not self.timesteps:
            raise ValueError(f"recipe {self.name!r}: schedule {self.schedule!r} needs timesteps")


_DMD2 = "tianweiy/DMD2"
_R: list[Recipe] = [
    # DMD2 (Yin et al. 2024). Generators are eps UNets; 4-step re-noises with fresh noise.
    Recipe(
        "dmd2_sd15_1step",
        "DMD2",
        ("sd15",),
        "eps",
        "fixed",
        "renoise",
        "unit",
        1,
        (1,),
        (999,),
        source=f"{_DMD2}: main/test_folder_sd.py (t = 999, unit noise); main/utils.py (get_x0_from_noise)",
        note="x0 uses the schedule's abar_999 = 0.0046601 as DMD2's training does; its evaluation script "
        "rounds it to 0.0047 (0.4% in latent scale)",
    ),
    Recipe(
        "dmd2_sdxl_1step",
        "DMD2",
        ("sdxl",),
        "eps",
        "fixed",
        "renoise",
        "unit",
        1,
        (1,),
        (399,),
        source=f"{_DMD2}: demo/text_to_image_sdxl.py (--conditioning_timestep 399, unit noise)",
        note="unit-variance noise at t=399; ComfyUI's default would feed std 0.758",
    ),
    Recipe(
        "dmd2_sdxl_4step",
        "DMD2",
        ("sdxl",),
        "eps",
        "fixed",
        "renoise",
        "unit",
        4,
        (4,),
        (999, 749, 499, 249),
        source=f"{_DMD2}: main/sd_unified_model.py (denoising_step_list = range(999, 0, -250))",
        note="also the recipe of dmd2_sdxl_4step_lora (kohya keys, rank 64, alpha 8)",
    ),
    # DMD v1 (Yin et al. CVPR 2024): no official weights; DMD2's SD1.5 evaluation path.
    Recipe(
        "dmd_sd15_1step",
        "DMD",
        ("sd15",),
        "eps",
        "fixed",
        "renoise",
        "unit",
        1,
        (1,),
        (999,),
        source=f"{_DMD2}: main/test_folder_sd.py (DMD2 is the authors' DMD re-implementation)",
    ),
    # SiD-LSG (Zhou et al. ICLR 2025): eps UNet at t_init = 625, input add_noise(0, z, 625).
    Recipe(
        "sid_lsg_sd15_1step",
        "SiD-LSG",
        ("sd15",),
        "eps",
        "linear_from",
        "renoise",
        "ddpm",
        1,
        (),
        (625,),
        source="mingyuanzhou/SiD-LSG: training/sid_sd_util.py (sid_sd_sampler, init_timestep 625)",
        note="multi-step (t_i = 625 (1 - i/K), fresh noise) is marked work-in-progress upstream",
    ),
    Recipe(
        "sid_lsg_sd21_1step",
        "SiD-LSG",
        ("sd21",),
        "eps",
        "linear_from",
        "renoise",
        "ddpm",
        1,
        (),
        (625,),
        source="mingyuanzhou/SiD-LSG: training/sid_sd_util.py (sid_sd_sampler, init_timestep 625)",
        note="SD2.1-base student: force eps (ComfyUI's SD2 v-pred heuristic must not decide)",
    ),
    # SiD (Zhou et al. ICML 2024) and DMD2 ImageNet: EDM pixel generators.
    Recipe(
        "sid_edm_1step",
        "SiD",
        ("edm_songunet", "edm_dhariwal"),
        "edm",
        "edm_sigma",
        "edm_onestep",
        "edm",
        1,
        (1,),
        sigma_init=2.5,
        source="mingyuanzhou/SiD: generate_onestep.py (--sigma_G 2.5)",
    ),
    Recipe(
        "dmd2_imagenet_1step",
        "DMD2",
        ("edm_dhariwal",),
        "edm",
        "edm_sigma",
        "edm_onestep",
        "edm",
        1,
        (1,),
        sigma_init=80.0,
        source=f"{_DMD2}: demo/imagenet_example.py (conditioning_sigma 80)",
    ),
    # Rectified flows on SD1.5 (Liu et al. ICLR 2024; SCFlow AAAI 2025): Euler on t = 1000 (1 - i/N).
    Recipe(
        "instaflow_sd15_1step",
        "InstaFlow",
        ("sd15",),
        "flow_reversed",
        "flow_linear",
        "euler",
        "unit",
        1,
        (1,),
        source="gnobitab/InstaFlow: code/pipeline_rf.py (one step, guidance 0)",
    ),
    Recipe(
        "rectified_flow_2_sd15",
        "2-Rectified Flow",
        ("sd15",),
        "flow_reversed",
        "flow_linear",
        "euler",
        "unit",
        4,
        (),
        cfg=1.5,
        source="gnobitab/InstaFlow: code/README.md (2-8 Euler steps, guidance 1-2)",
    ),
    Recipe(
        "scflow_sd15_1step",
        "SCFlow",
        ("sd15",),
        "flow_reversed",
        "flow_linear",
        "euler",
        "unit",
        1,
        (),
        source="hao-pt/SCFlow: sd_distill/pipeline_rf.py, tools/infer_instaflow.sh (--step 1 --guidance 1)",
    ),
    # Adversarial diffusion distillation (Sauer et al. 2023): Euler-ancestral at 999, 899, 799, 699.
    Recipe(
        "sd_turbo_sd21",
        "SD-Turbo",
        ("sd21",),
        "eps",
        "turbo",
        "ancestral",
        "unit",
        1,
        (1, 2, 3, 4),
        source="Stability-AI/generative-models: scripts/demo/turbo.py (SubstepSampler, indices 0,100,200,300)",
        note="SD2.1 eps config; force eps",
    ),
    Recipe(
        "sdxl_turbo_sdxl",
        "SDXL-Turbo",
        ("sdxl",),
        "eps",
        "turbo",
        "ancestral",
        "unit",
        1,
        (1, 2, 3, 4),
        source="Stability-AI/generative-models: scripts/demo/turbo.py (SubstepSampler)",
        note="512x512",
    ),
    # SDXL-Lightning (Lin et al. 2024): Euler trailing; the 1-step file predicts x0.
    Recipe(
        "sdxl_lightning_1step_x0",
        "SDXL-Lightning",
        ("sdxl",),
        "x0",
        "trailing",
        "euler",
        "unit",
        1,
        (1,),
        source="ByteDance/SDXL-Lightning model card (prediction_type='sample' for 1 step)",
    ),
    *[
        Recipe(
            f"sdxl_lightning_{n}step",
            "SDXL-Lightning",
            ("sdxl",),
            "eps",
            "trailing",
            "euler",
            "unit",
            n,
            (n,),
            source="ByteDance/SDXL-Lightning model card (EulerDiscreteScheduler, trailing)",
        )
        for n in (2, 4, 8)
    ],
    # Hyper-SD (Ren et al. 2024).
    Recipe(
        "hyper_sdxl_1step_unet",
        "Hyper-SD",
        ("sdxl",),
        "eps",
        "fixed",
        "renoise",
        "unit",
        1,
        (1,),
        (800,),
        source="ByteDance/Hyper-SD model card (LCMScheduler, timesteps=[800])",
        note="unit-variance noise at t=800 as diffusers feeds it",
    ),
    *[
        Recipe(
            f"hyper_{n}step_lora",
            "Hyper-SD",
            ("sd15", "sdxl"),
            "eps",
            "trailing",
            "euler",
            "unit",
            n,
            (n,),
            source="ByteDance/Hyper-SD model card (DDIMScheduler, trailing)",
            is_lora=True,
        )
        for n in (2, 4, 8)
    ],
    # CFG-preserving LoRAs: same trailing DDIM steps, but trained to keep real guidance and
    # negative prompts ("support 5~8 guidance scales"); the card's example uses 5.0.
    *[
        Recipe(
            f"hyper_{n}step_cfg_lora",
            "Hyper-SD",
            ("sd15", "sdxl"),
            "eps",
            "trailing",
            "euler",
            "unit",
            n,
            (n,),
            cfg=5.0,
            source="ByteDance/Hyper-SD model card (CFG-preserved LoRAs: DDIM trailing, guidance 5~8)",
            note="guidance 5-8 with a negative prompt",
            is_lora=True,
        )
        for n in (8, 12)
    ],
    Recipe(
        "hyper_1step_lora_tcd",
        "Hyper-SD",
        ("sd15", "sdxl"),
        "eps",
        "lcm50",
        "tcd",
        "unit",
        1,
        (),
        eta=1.0,
        source="ByteDance/Hyper-SD model card (unified 1-step LoRA with TCDScheduler, eta=1.0)",
        note="lower eta gives more detail for more steps",
        is_lora=True,
    ),
    # LCM / LCM-LoRA (Luo et al. 2023): boundary condition, 50-step grid, fresh noise each step.
    Recipe(
        "lcm",
        "LCM",
        ("sd15", "sdxl"),
        "lcm",
        "lcm50",
        "renoise",
        "unit",
        4,
        (),
        source="huggingface/diffusers: schedulers/scheduling_lcm.py; luosiallen/latent-consistency-model",
        note="full LCM models also take a guidance embedding w (time_cond_proj_dim 256)",
    ),
    Recipe(
        "lcm_lora",
        "LCM-LoRA",
        ("sd15", "sd21", "sdxl"),
        "lcm",
        "lcm50",
        "renoise",
        "unit",
        4,
        (),
        source="latent-consistency/lcm-lora-sdv1-5 model card",
        note="cfg 1-2",
        is_lora=True,
    ),
    # TCD (Zheng et al. 2024).
    Recipe(
        "tcd_lora",
        "TCD",
        ("sd15", "sd21", "sdxl"),
        "eps",
        "lcm50",
        "tcd",
        "unit",
        4,
        (),
        eta=0.3,
        source="jabir-zheng/TCD: scheduling_tcd.py (eta default 0.3)",
        is_lora=True,
    ),
    # PCM (Wang et al. 2024). The authors' demo samples with diffusers' TCDScheduler(timestep_spacing=
    # "trailing") and the pipeline's default eta 0. TCDScheduler stores timestep_spacing but never reads
    # it: set_timesteps always picks floor(linspace(0, 50, N)) on the 50-step grid 999, 979, ..., 19
    # (4 steps: 999, 759, 499, 259), and its last step ends at t = 0 (abar_0), like the training's
    # last phase (DDIMSolver.ddim_alpha_cumprods_prev[0] = alphas_cumprod[0]). eta 0 = DDIM jumps.
    *[
        Recipe(
            f"pcm_{kind}_{n}step",
            "PCM",
            ("sd15", "sdxl"),
            "eps",
            "lcm50",
            "tcd",
            "unit",
            n,
            (n,),
            cfg=cfg,
            eta=0.0,
            source="G-U-N/Phased-Consistency-Model: demo/app.py (TCDScheduler, eta 0, guidance "
            f"{cfg if cfg > 1 else 0:g}); huggingface/diffusers: schedulers/scheduling_tcd.py (set_timesteps)",
            note="the 50-step grid, not trailing: diffusers' TCDScheduler ignores timestep_spacing",
            is_lora=True,
        )
        for kind, cfg, steps in (("smallcfg", 1.0, (2, 4, 8, 16)), ("normalcfg", 7.5, (4, 8, 16)))
        for n in steps
    ],
    # SwiftBrush (Nguyen & Tran CVPR 2024): SD2.1-base, unit noise at t = 999.
    Recipe(
        "swiftbrush_sd21_1step",
        "SwiftBrush",
        ("sd21",),
        "eps",
        "fixed",
        "renoise",
        "unit",
        1,
        (1,),
        (999,),
        x0_abar=0.0047,
        source="VinAIResearch/SwiftBrush: infer.py and train_swiftbrush.py (predict_original, abar 0.0047)",
        note="x0 with abar_999 = 0.0047 as SwiftBrush trains and samples (the schedule's is 0.0046601)",
    ),
    # Step-distilled students with their own timesteps (SnapFusion, Li et al. 2023: an 8-step
    # SD1.5 student; progressive distillation, Salimans & Ho 2022). Deterministic DDIM steps between
    # the student's timesteps, given in the loader's 'timesteps' input (trailing spacing otherwise).
    # The first input is unit-variance noise whatever the first timestep, as in diffusers' text-to-
    # image pipelines (init_noise_sigma = 1 for DDIM/DDPM schedulers).
    *[
        Recipe(
            f"step_distilled_{prediction}",
            "step-distilled (e.g. SnapFusion)",
            ("sd15", "sd21", "sdxl"),
            prediction,  # type: ignore[arg-type]
            "trailing",
            "euler",
            "unit",
            8,
            source="Li et al. 2023 (SnapFusion, arXiv 2306.00980), sec. 4: 8-step student, DDIM sampling; "
            "the timesteps are the student's own",
            note="give the student's own timesteps in the loader's 'timesteps' input and its cfg as its "
            "authors use it",
        )
        for prediction in ("eps", "v")
    ],
]

RECIPES: dict[str, Recipe] = {r.name: r for r in _R}
if len(RECIPES) != len(_R):  # pragma: no cover - guards edits to the table
    raise RuntimeError("duplicate recipe names in the recipe table")


def recipe_names() -> list[str]:
    """All recipe names, table order."""
    return list(RECIPES)


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a ``ValueError`` listing the valid names otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown student recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None


def register_recipe(recipe: Recipe, replace: bool = False) -> Recipe:
    """Add ``recipe`` to the table (the loader's recipe list and ``get_recipe``), for a student the
    table does not know yet. An existing name is refused unless ``replace``."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"register_recipe needs a Recipe, got {type(recipe).__name__}")
    if recipe.name in RECIPES and not replace:
        raise ValueError(f"a recipe named {recipe.name!r} exists already; pass replace=True to overwrite it")
    RECIPES[recipe.name] = recipe
    return recipe


def parse_timesteps(text: str) -> tuple[int, ...]:
    """``"999, 759, 499, 259"`` -> ``(999, 759, 499, 259)``: integer DDPM timesteps in [0, 999],
    strictly decreasing, at least one (commas or spaces between them)."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"timesteps must be integers separated by commas, e.g. '999, 759, 499, 259'; got {text!r}") \
            from None
    if not values:
        raise ValueError("timesteps is empty; give the student's timesteps, e.g. '999, 759, 499, 259'")
    if not all(0 <= t <= 999 for t in values):
        raise ValueError(f"timesteps must lie in [0, 999] (DDPM training timesteps), got {list(values)}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"timesteps must be strictly decreasing (first step at the highest noise), got {list(values)}")
    return values


#: LCM's distillation grid (diffusers ``LCMScheduler``, 50 original steps of 1000): 19, 39, ..., 999.
#: ComfyUI's LCM model sampling only has these noise levels.
LCM_TIMESTEP_GRID: tuple[int, ...] = tuple(range(19, 1000, 20))


def with_timesteps(recipe: Recipe, timesteps: tuple[int, ...]) -> Recipe:
    """``recipe`` evaluated at the given DDPM timesteps (one model call each, same step rule).
    LCM students take timesteps of their distillation grid only (:data:`LCM_TIMESTEP_GRID`)."""
    if recipe.prediction in ("flow_reversed", "edm"):
        raise ValueError(f"recipe {recipe.name!r} ({recipe.student}) has no DDPM timesteps; custom timesteps apply to "
                         "eps / v / x0 / LCM students")
    off_grid = [int(t) for t in timesteps if int(t) not in LCM_TIMESTEP_GRID]
    if recipe.prediction == "lcm" and off_grid:
        nearest = [min(LCM_TIMESTEP_GRID, key=lambda g, t=t: abs(g - t)) for t in off_grid]
        raise ValueError(
            f"recipe {recipe.name!r} (LCM) runs on its distillation grid 19, 39, ..., 999 (every 20th "
            f"timestep); {off_grid} {'is' if len(off_grid) == 1 else 'are'} not on it. Use "
            f"{', '.join(map(str, nearest))} instead."
        )
    # the student's own abar belongs to its own first timestep (SwiftBrush: 999), not to another one
    same_start = bool(recipe.timesteps) and int(timesteps[0]) == int(recipe.timesteps[0])
    return replace(recipe, schedule="fixed", timesteps=tuple(float(t) for t in timesteps), steps=len(timesteps),
                   allowed_steps=(), x0_abar=recipe.x0_abar if same_start else None)


def with_tcd_eta(recipe: Recipe, eta: float) -> Recipe:
    """``recipe`` with TCD's gamma set to ``eta`` in [0, 1] (0: deterministic, PCM; 1: a fresh-noise
    jump, LCM-like). Only for the TCD step rule."""
    if recipe.step_rule != "tcd":
        raise ValueError(f"recipe {recipe.name!r} uses the {recipe.step_rule!r} step rule; eta applies to TCD recipes")
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"TCD eta (gamma) must lie in [0, 1], got {eta!r}")
    return replace(recipe, eta=float(eta))
