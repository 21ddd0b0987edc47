"""Per-step latency of SD1.5 / SDXL-architecture UNets: eager vs the CUDA Graph node vs torch.compile.

Needs a CUDA GPU and a ComfyUI checkout (``--comfyui`` or ``COMFYUI_PATH``); loads ComfyUI in
GPU mode at run time. No weights are downloaded: the UNets are built from ComfyUI's own
SD1.5 / SDXL ``unet_config`` with random weights (timing does not depend on values; parity
is checked on the same random weights).

Arms, interleaved per repeat (ABAB cancels thermal drift): ``eager`` (plain ComfyUI),
``graph`` (this pack's CUDA Graph node), ``compile_cudagraphs`` (ComfyUI's
``set_torch_compile_wrapper`` with ``backend="cudagraphs"``, the closest prior art) and
optionally ``compile_reduce_overhead`` (inductor + CUDA graphs).

A *step* is one sampler step through ``comfy.sample.sample`` (Euler): the UNet call at the
case's UNet batch (``b1`` = cfg 1, cond only; ``b2`` = cfg 7, cond + uncond batched) plus the
sampler's own work. Step times come from the sampler callback with a device synchronise.

``--check`` runs the correctness suite instead and writes JSON: graph vs eager error per case,
captures when only prompt and seed change, recapture and parity after a LoRA-style weight
patch, and device memory over many prompts. ``tests/test_cuda_graph_gpu.py`` runs it.

Examples::

    python bench/cuda_graph_benchmark.py --cases sd15-512-b1,sd15-512-b2,sd15-768-b2,sdxl-1024-b2
    python bench/cuda_graph_benchmark.py --check --cases sd15-256-b2 --prompts 100 --json out.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARMS = ("eager", "graph", "compile_cudagraphs", "compile_reduce_overhead")
DEFAULT_CASES = "sd15-512-b1,sd15-512-b2,sd15-768-b2,sdxl-1024-b2"

# ComfyUI 0.3.64's own SD1.5 / SDXL UNet layouts (comfy/model_detection.py, diffusers table)
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
    "sdxl": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
    # a 32-channel two-level SD1.5 layout for smoke runs of this script
    "tiny": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 768, "transformer_depth_output": [1, 1, 1, 1],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
}


@dataclass(frozen=True)
class Case:
    arch: str
    resolution: int
    unet_batch: int

    @classmethod
    def parse(cls, text: str) -> Case:
        try:
            arch, res, batch = text.split("-")
            case = cls(arch, int(res), int(batch.removeprefix("b")))
        except ValueError:
            raise ValueError(f"case {text!r} is not <arch>-<resolution>-b<1|2>, e.g. sd15-512-b2") from None
        if arch not in UNET_CONFIGS or case.unet_batch not in (1, 2) or case.resolution % 64:
            raise ValueError(f"case {text!r}: arch in {sorted(UNET_CONFIGS)}, batch b1 or b2, resolution % 64 == 0")
        return case

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.resolution}-b{self.unet_batch}"

    @property
    def cfg(self) -> float:
        return 1.0 if self.unet_batch == 1 else 7.0


# ------------------------------------------------------------------ ComfyUI plumbing
def load_comfy(path: str | None) -> Any:
    """Import ComfyUI (GPU mode) and this pack's node module from a checkout path."""
    root = path or os.environ.get("COMFYUI_PATH")
    if not root or not (Path(root) / "comfy").is_dir():
        raise SystemExit("set --comfyui or COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, str(Path(root).resolve()))
    import torch

    if not torch.cuda.is_available():  # CPU smoke runs only (the graph arm then runs eagerly)
        importlib.import_module("comfy.cli_args").args.cpu = True
    mods = {name: importlib.import_module(name) for name in (
        "comfy.model_management", "comfy.supported_models", "comfy.model_patcher", "comfy.sample",
        "comfy.patcher_extension", "comfy.ldm.modules.attention", "comfy_api.torch_helpers",
    )}
    package = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("comfyui_fewstep", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_fewstep"] = pack
    spec.loader.exec_module(pack)
    mods["nodes"] = importlib.import_module("comfyui_fewstep.nodes.cuda_graph_nodes")
    return mods


def build_patcher(c: dict, arch: str, dtype: Any, seed: int = 0) -> Any:
    """A ModelPatcher around a random-weight UNet of ComfyUI's ``arch`` layout."""
    import torch

    config_cls = c["comfy.supported_models"].SDXL if arch == "sdxl" else c["comfy.supported_models"].SD15
    config = config_cls(dict(UNET_CONFIGS[arch]))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / fan_in**0.5))
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    mm = c["comfy.model_management"]
    return c["comfy.model_patcher"].ModelPatcher(model, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device())


def arm_patcher(c: dict, base: Any, arm: str, max_graphs: int = 4) -> Any:
    if arm == "eager":
        return base
    if arm == "graph":
        return c["nodes"].apply_cuda_graph(base, max_graphs=max_graphs, warmup=2, verify=True)
    m = base.clone()
    if arm == "compile_cudagraphs":
        c["comfy_api.torch_helpers"].set_torch_compile_wrapper(model=m, backend="cudagraphs")
    elif arm == "compile_reduce_overhead":
        c["comfy_api.torch_helpers"].set_torch_compile_wrapper(model=m, backend="inductor", mode="reduce-overhead")
    else:
        raise ValueError(f"arm {arm!r} is not one of {ARMS}")
    return m


def graph_runner(c: dict, patcher: Any) -> Any:
    """The node's ``GraphedForward`` (its ``stats`` and ``cache``) on a patched model."""
    pe = c["comfy.patcher_extension"]
    (fn,) = patcher.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, c["nodes"].WRAPPER_KEY)
    return fn.__self__.runner


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def conds(case: Case, seed: int, tokens: int = 77) -> tuple[list, list]:
    import torch

    g = torch.Generator().manual_seed(seed)
    dim = UNET_CONFIGS[case.arch]["context_dim"]

    def one() -> list:
        extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if case.arch == "sdxl" else {}
        return [[torch.randn(1, tokens, dim, generator=g), extra]]

    return one(), one()


def run(c: dict, patcher: Any, case: Case, steps: int, seed: int, step_times: list | None = None) -> Any:
    """One seeded Euler run; appends per-step wall times (s) to ``step_times``."""
    import torch

    side = case.resolution // 8
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 4, side, side, generator=g)
    positive, negative = conds(case, seed)
    stamps: list[float] = []

    def callback(step, x0, x, total):
        sync()
        stamps.append(time.perf_counter())

    sync()
    start = time.perf_counter()
    out = c["comfy.sample"].sample(patcher, noise, steps, case.cfg, "euler", "normal", positive, negative,
                                   torch.zeros_like(noise), seed=seed, callback=callback, disable_pbar=True)
    if step_times is not None:
        edges = [start] + stamps
        step_times.extend(b - a for a, b in itertools.pairwise(edges[1:]))  # drop the first step
    return out


# ------------------------------------------------------------------ timing
def quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)

    def pick(q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {"median_ms": 1e3 * statistics.median(xs), "p10_ms": 1e3 * pick(0.1), "p90_ms": 1e3 * pick(0.9)}


def bootstrap_ratio(eager: list[float], arm: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Ratio of medians eager/arm (speedup) with a 95% bootstrap interval over repeat medians."""
    import random

    rng = random.Random(seed)
    point = statistics.median(eager) / statistics.median(arm)
    draws = sorted(
        statistics.median(rng.choices(eager, k=len(eager))) / statistics.median(rng.choices(arm, k=len(arm)))
        for _ in range(n)
    )
    return point, draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def benchmark(c: dict, args: argparse.Namespace) -> dict:
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    results = {}
    for case in map(Case.parse, args.cases.split(",")):
        base = build_patcher(c, case.arch, dtype)
        arms = {a: arm_patcher(c, base, a) for a in args.arms.split(",")}
        first_run, per_repeat, all_steps = {}, {a: [] for a in arms}, {a: [] for a in arms}
        with torch.inference_mode():
            for a, p in arms.items():  # first run: warm-up, capture or compile
                t0 = time.perf_counter()
                run(c, p, case, args.steps, seed=0)
                first_run[a] = time.perf_counter() - t0
            for r in range(args.repeats):
                for a, p in arms.items():
                    times: list[float] = []
                    run(c, p, case, args.steps, seed=r + 1, step_times=times)
                    per_repeat[a].append(statistics.median(times))
                    all_steps[a].extend(times)
        entry = {"first_run_s": first_run}
        for a in arms:
            entry[a] = quantiles(all_steps[a]) | {"steps_per_s": 1.0 / statistics.median(all_steps[a])}
            if a != "eager" and "eager" in arms:
                point, lo, hi = bootstrap_ratio(per_repeat["eager"], per_repeat[a])
                entry[a]["speedup"] = {"median_ratio": point, "ci95": [lo, hi]}
        if "graph" in arms:
            entry["graph"]["stats"] = graph_runner(c, arms["graph"]).stats.summary()
        results[case.name] = entry
        del arms, base
        c["comfy.model_management"].unload_all_models()
        torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------ correctness suite
def memory_allocated() -> int:
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def max_rel_error(a: Any, b: Any) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def check(c: dict, args: argparse.Namespace) -> dict:
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    report = {}
    for case in map(Case.parse, args.cases.split(",")):
        base = build_patcher(c, case.arch, dtype)
        graph = arm_patcher(c, base, "graph", max_graphs=2)
        runner = graph_runner(c, graph)
        stats = runner.stats
        out: dict[str, Any] = {}
        with torch.inference_mode():
            eager_out = run(c, base, case, args.steps, seed=0)
            graph_out = run(c, graph, case, args.steps, seed=0)
            out["graph_vs_eager_rel_error"] = max_rel_error(graph_out, eager_out)
            out["graph_equals_eager_bitwise"] = bool(torch.equal(graph_out, eager_out))
            out["captures_first_run"] = stats.captures
            for seed in (1, 2, 3):  # only prompt and seed change
                run(c, graph, case, args.steps, seed=seed)
            out["captures_after_new_prompts"] = stats.captures
            # a LoRA-style weight patch applied after the node (a diff on the output conv)
            key = "diffusion_model.out.2.weight"
            weight = base.model.diffusion_model.out[2].weight
            patch = {key: (torch.randn(weight.shape, generator=torch.Generator().manual_seed(9)).to(weight) * 0.05,)}
            lora_graph, lora_eager = graph.clone(), base.clone()
            lora_graph.add_patches(patch)
            lora_eager.add_patches(patch)
            lora_graph_out = run(c, lora_graph, case, args.steps, seed=0)
            out["captures_after_lora"] = stats.captures
            out["lora_invalidations"] = stats.invalidations
            lora_eager_out = run(c, lora_eager, case, args.steps, seed=0)
            out["lora_graph_vs_eager_rel_error"] = max_rel_error(lora_graph_out, lora_eager_out)
            out["lora_changed_output"] = not torch.equal(lora_graph_out, graph_out)
            # memory over many prompts (same signature), then over more signatures than the cache holds
            run(c, graph, case, args.steps, seed=0)
            sync()
            baseline = memory_allocated()
            peak_growth = 0
            for seed in range(args.prompts):
                run(c, graph, case, 2, seed=100 + seed)
                peak_growth = max(peak_growth, memory_allocated() - baseline)
            out["prompts"] = args.prompts
            out["memory_growth_over_prompts_bytes"] = peak_growth
            out["captures_after_prompts"] = stats.captures
            sizes = [case.resolution - 64 * k for k in range(4) if case.resolution - 64 * k >= 128]
            reserved = []
            for _ in range(2):
                for r in sizes:
                    run(c, graph, Case(case.arch, r, case.unet_batch), 2, seed=r)
                    sync()
                    reserved.append(torch.cuda.memory_reserved() if torch.cuda.is_available() else 0)
            out["cached_graphs_after_size_sweep"] = len(runner.cache)
            out["captures_after_size_sweep"] = stats.captures
            out["reserved_bytes_size_sweep"] = reserved
        out["stats"] = stats.summary()
        report[case.name] = out
        del graph, base
        c["comfy.model_management"].unload_all_models()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return report


# ------------------------------------------------------------------ main
def environment(c: dict) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None, "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "allocator": torch.cuda.get_allocator_backend() if cuda else None,
        "attention": c["comfy.ldm.modules.attention"].optimized_attention.__name__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH)")
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated (default {DEFAULT_CASES})")
    parser.add_argument("--arms", default="eager,graph,compile_cudagraphs", help=f"comma-separated subset of {ARMS}")
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--steps", type=int, default=30, help="sampler steps per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check", action="store_true", help="run the correctness suite instead of timing")
    parser.add_argument("--prompts", type=int, default=100, help="prompts in the memory check")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    try:
        for text in args.cases.split(","):
            Case.parse(text)
    except ValueError as exc:
        parser.error(str(exc))
    c = load_comfy(args.comfyui)
    import torch

    if not torch.cuda.is_available() and not args.check:
        raise SystemExit("timing needs a CUDA GPU (--check also runs on CPU, as a smoke test)")
    result = {"environment": environment(c), "args": vars(args)}
    result["check" if args.check else "timing"] = check(c, args) if args.check else benchmark(c, args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
