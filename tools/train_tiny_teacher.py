"""Train the demo's tiny EDM teacher on scikit-learn's 8x8 digits (a few minutes on 2 CPU cores).

    python tools/train_tiny_teacher.py            # writes demo/tiny_teacher.safetensors

The data: ``sklearn.datasets.load_digits`` (1797 images, shipped inside scikit-learn, no
download), grey values 0..16 mapped to ``[-1, 1]`` and upsampled bilinearly to 16x16.
The objective: EDM's denoising loss (Karras et al. 2022, arXiv 2206.00364, Table 1 and
eq. 8): ``ln sigma ~ N(P_mean, P_std^2)``, weight ``(sigma^2 + sigma_data^2) / (sigma sigma_data)^2``.
Adam with a linear warm-up and a cosine decay; the file stores the EMA weights.
Everything is seeded: the same command on the same torch build and thread count gives
the same file. Needs the ``train`` extra (scikit-learn).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "demo" / "tiny_teacher.safetensors"


def _pack():
    """Import ``comfyui_fewstep`` (installed, or this checkout under that name)."""
    try:
        return importlib.import_module("comfyui_fewstep")
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "comfyui_fewstep", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_fewstep"] = module
        spec.loader.exec_module(module)
        return module


def prepare_digits(resolution: int = 16) -> torch.Tensor:
    """The digits as a float32 tensor ``(1797, 1, resolution, resolution)`` in ``[-1, 1]``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("training needs scikit-learn: pip install 'comfyui-fewstep[train]'") from exc
    images = torch.from_numpy(load_digits().images).to(torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    if resolution != images.shape[-1]:
        images = torch.nn.functional.interpolate(
            images, size=resolution, mode="bilinear", align_corners=False
        )
    return images.clamp(-1.0, 1.0).contiguous()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="safetensors file to write")
    p.add_argument("--iters", type=int, default=1500, help="optimizer steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the stored weights")
    p.add_argument("--p-mean", type=float, default=-1.2, help="EDM P_mean (log-normal sigma)")
    p.add_argument("--p-std", type=float, default=1.2, help="EDM P_std")
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--base-channels", type=int, default=24)
    p.add_argument("--channel-mult", type=str, default="1,2,2")
    p.add_argument("--sigma-data", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--log-every", type=int, default=250)
    return p


def train(args: argparse.Namespace, command: str) -> Path:
    """Run the training described by ``args``; returns the written file."""
    pack = _pack()
    network = importlib.import_module(".demo.network", pack.__name__)
    teacher = importlib.import_module(".demo.teacher", pack.__name__)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = prepare_digits(args.resolution)
    config = network.TinyUNetConfig(
        resolution=args.resolution,
        base_channels=args.base_channels,
        channel_mult=tuple(int(m) for m in args.channel_mult.split(",")),
        sigma_data=args.sigma_data,
        extra={"dataset": "sklearn.datasets.load_digits, [-1, 1], bilinear to resolution"},
    )
    model = network.EDMDenoiser(config)
    ema = network.EDMDenoiser(config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {n_params} parameters on {len(data)} images for {args.iters} steps", file=sys.stderr)

    start, running = time.time(), 0.0
    for step in range(args.iters):
        lr_scale = min(1.0, (step + 1) / max(1, args.warmup))
        lr_scale *= 0.5 * (1 + math.cos(math.pi * step / max(1, args.iters)))
        for group in opt.param_groups:
            group["lr"] = args.lr * max(lr_scale, 0.02)
        y = data[torch.randint(len(data), (args.batch,), generator=gen)]
        sigma = (torch.randn(args.batch, generator=gen) * args.p_std + args.p_mean).exp()
        noise = torch.randn(y.shape, generator=gen) * sigma[:, None, None, None]
        weight = (sigma**2 + args.sigma_data**2) / (sigma * args.sigma_data) ** 2
        loss = (weight[:, None, None, None] * (model(y + noise, sigma) - y).square()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.iters:
            print(f"step {step + 1:5d}  loss {running:.4f}  {time.time() - start:6.1f}s", file=sys.stderr)

    meta = {
        "training_command": command,
        "training": json.dumps(
            {"iters": args.iters, "batch": args.batch, "lr": args.lr, "ema": args.ema, "seed": args.seed,
             "p_mean": args.p_mean, "p_std": args.p_std, "threads": args.threads,
             "final_loss": round(running, 5), "seconds": round(time.time() - start, 1),
             "torch": torch.__version__},
            sort_keys=True,
        ),
    }
    out = teacher.save_teacher(ema, args.out, metadata=meta)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.time() - start:.0f}s", file=sys.stderr)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    command = shlex.join(["python", "tools/train_tiny_teacher.py", *argv])
    train(args, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
