"""Student loading benchmark: our loader vs ComfyUI's ``UNETLoader`` on the same full-size file.

Usage::

    COMFYUI_PATH=/path/to/ComfyUI python bench/student_load_benchmark.py [--repeats 3] [--dir DIR]

Two random-weight SD1.5 UNets (860M parameters, float16 safetensors, about 1.72 GB each) are
written once into ``--dir``: one with LDM names (``input_blocks.*``, what ``UNETLoader`` users
keep in ``diffusion_models/``) and one with diffusers names (``down_blocks.*``, DMD2 / Hyper-SD
UNet files). Each measurement runs in a fresh Python process that first imports ComfyUI and this
pack, then loads the file with one arm:

* ``comfy``: ``comfy.sd.load_diffusion_model(path, model_options)`` (the ``UNETLoader`` node);
* ``ours``: ``nodes.student_nodes.load_student_model(path, ...)``, the code path of the
  ``FewStepStudentLoader`` node with its defaults: header detection, zero-copy key renaming,
  ComfyUI model construction from shape-only placeholders, every weight read from the file
  straight into its parameter with the NaN/Inf check, and the recipe's object patches;
* ``ours_nocheck``: the same with ``check_weights=False``.

Time is the wall time of that call. Peak RAM is the process's peak resident set size during the
call (``VmHWM``, which counts file pages mapped by safetensors as well as anonymous memory) minus
the resident size just before it; a 5 ms sampler thread splits the peak into anonymous and
file-backed pages; CPU time is the process's (``time.process_time``, all threads) during the call,
steadier than wall time on a shared machine. The page cache is warm for every run (the files are
read once before the first measurement), so the times compare CPU work, not disk speed. Arms
alternate (rotating order) within every repeat; each cell is the median of ``--repeats`` runs.

The UNet is built in float16 in both arms (``model_options={"dtype": torch.float16}``), the
dtype ComfyUI picks for SD1.5 on a CUDA GPU; on a CPU-only machine ComfyUI would otherwise pick
float32 and every arm would hold twice the file size in weights. ``--dtype default`` measures
that instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import import_package

LAYOUTS = ("ldm", "diffusers")
ARMS = ("comfy", "ours", "ours_nocheck")
ARM_LABELS = {
    "comfy": "ComfyUI UNETLoader",
    "ours": "FewStep student loader",
    "ours_nocheck": "FewStep, check_weights off",
}
FILE_NAMES = {"ldm": "bench_sd15_unet_ldm.safetensors", "diffusers": "bench_sd15_unet_diffusers.safetensors"}
TIME_TARGET = 1.05
RAM_TARGET = 1.10


# ----------------------------------------------------------------------------- files


def write_files(directory: Path, seed: int = 0) -> dict[str, Path]:
    """The two benchmark UNets (random N(0, 0.02^2) float16 weights, norms 1), built once."""
    import importlib

    import torch
    from safetensors.torch import save_file

    keys = importlib.import_module(import_package().__name__ + ".distill_loaders.keys")
    directory.mkdir(parents=True, exist_ok=True)
    paths = {layout: directory / name for layout, name in FILE_NAMES.items()}
    if all(p.is_file() for p in paths.values()):
        return paths
    g = torch.Generator().manual_seed(seed)
    diffusers = {}
    for name, shape in keys.diffusers_unet_shapes("sd15").items():
        if len(shape) >= 2:
            diffusers[name] = torch.empty(shape).normal_(0.0, 0.02, generator=g).half()
        else:
            diffusers[name] = (torch.ones if name.endswith(".weight") else torch.zeros)(shape).half()
    ldm, unexpected = keys.convert_diffusers_to_ldm(diffusers, "sd15")
    if unexpected:
        raise RuntimeError(f"unmapped keys: {unexpected[:5]}")
    for layout, sd in (("diffusers", diffusers), ("ldm", ldm)):
        tmp = paths[layout].with_suffix(".tmp")
        save_file(sd, str(tmp))
        os.replace(tmp, paths[layout])
    return paths


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


# ----------------------------------------------------------------------------- child process


def _status_kb(fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in fields:
                out[name] = int(value.split()[0])
    return out


class _Sampler(threading.Thread):
    """Track the largest anonymous and file-backed resident sizes while a call runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.max_anon = self.max_file = 0

    def run(self) -> None:
        while not self.stop.is_set():
            s = _status_kb(("RssAnon", "RssFile"))
            self.max_anon = max(self.max_anon, s.get("RssAnon", 0))
            self.max_file = max(self.max_file, s.get("RssFile", 0))
            time.sleep(0.005)


def child(arm: str, path: Path, dtype: str) -> dict:
    """Load ``path`` once with ``arm`` in this (fresh) process and report time and memory."""
    import gc
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _comfy import import_comfy

    if import_comfy() is None:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    import comfy.sd
    import torch

    student_nodes = importlib.import_module(import_package().__name__ + ".nodes.student_nodes")
    options = {"dtype": torch.float16} if dtype == "fp16" else {}

    gc.collect()
    before = _status_kb(("VmRSS", "RssAnon", "RssFile"))
    sampler = _Sampler()
    sampler.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    if arm == "comfy":
        model = comfy.sd.load_diffusion_model(str(path), model_options=options)
    else:
        model = student_nodes.load_student_model(
            path, "dmd2_sd15_1step", check_weights=arm == "ours", model_options=options
        )[0]
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    sampler.stop.set()
    sampler.join()
    peak = _status_kb(("VmHWM",))["VmHWM"]
    after = _status_kb(("VmRSS", "RssAnon", "RssFile"))
    unet = model.model.diffusion_model
    n_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    return {
        "arm": arm,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "peak_mb": (peak - before["VmRSS"]) / 1024,
        "peak_anon_mb": (sampler.max_anon - before["RssAnon"]) / 1024,
        "peak_file_mb": (sampler.max_file - before["RssFile"]) / 1024,
        "after_mb": (after["VmRSS"] - before["VmRSS"]) / 1024,
        "weights_mb": n_bytes / 2**20,
        "weight_dtype": str(next(unet.parameters()).dtype),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ----------------------------------------------------------------------------- driver


def run_arm(arm: str, path: Path, dtype: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", arm, "--file", str(path)]
    cmd += ["--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} on {path.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "comfyui-fewstep-bench")
    parser.add_argument("--dtype", choices=("fp16", "default"), default="fp16")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(ARMS),
        help="comfy: UNETLoader; ours: our loader (NaN/Inf check on, the default); ours_nocheck: check off",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every run here")
    parser.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.child:
        print(json.dumps(child(args.child, args.file, args.dtype)))
        return 0
    if not os.environ.get("COMFYUI_PATH"):
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout")
    arms = ["comfy"] + [arm for arm in args.arms if arm != "comfy"]  # ratios are to ComfyUI's arm

    paths = write_files(args.dir)
    runs: dict[tuple[str, str], list[dict]] = {}
    for layout in args.layouts:
        warm_page_cache(paths[layout])
        for r in range(args.repeats):
            for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:  # rotate: no arm always first
                runs.setdefault((layout, arm), []).append(run_arm(arm, paths[layout], args.dtype))

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}"
    )
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"# model dtype: {args.dtype}; median of {args.repeats} fresh processes per cell; load average {load}\n"
    )
    print(
        "| file layout | arm | load time (s) | CPU time (s) | peak RAM (MB) | anon / file-backed at peak (MB) "
        "| file size (MB) | peak / file | time / ComfyUI | CPU time / ComfyUI |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for layout in args.layouts:
        size_mb = paths[layout].stat().st_size / 2**20
        med = {
            arm: {
                k: statistics.median(r[k] for r in runs[(layout, arm)])
                for k in ("seconds", "cpu_seconds", "peak_mb", "peak_anon_mb", "peak_file_mb")
            }
            for arm in arms
        }
        for arm in arms:
            m = med[arm]
            print(
                f"| {layout} | {ARM_LABELS[arm]} "
                f"| {m['seconds']:.2f} | {m['cpu_seconds']:.2f} | {m['peak_mb']:.0f} | {m['peak_anon_mb']:.0f} / {m['peak_file_mb']:.0f} "
                f"| {size_mb:.0f} | {m['peak_mb'] / size_mb:.2f}x | {m['seconds'] / med['comfy']['seconds']:.2f}x "
                f"| {m['cpu_seconds'] / med['comfy']['cpu_seconds']:.2f}x |"
            )
    if args.json:
        args.json.write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in runs.items()}, indent=1))
    print(f"\ntargets: time <= {TIME_TARGET}x ComfyUI, peak RAM <= {RAM_TARGET}x file size")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
