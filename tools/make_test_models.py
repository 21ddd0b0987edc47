"""Random-weight test models with the exact key layout of real checkpoints (no download, no ComfyUI).

    python tools/make_test_models.py                # build (or find) the cached SD1.5 checkpoint
    python tools/make_test_models.py --out x.safetensors

The SD1.5 checkpoint is a single ``.safetensors`` file in the original CompVis/``ldm`` layout that
ComfyUI's ``CheckpointLoaderSimple`` detects as SD1.5:

* ``model.diffusion_model.*``: the ``openaimodel`` UNet (Rombach et al. 2022, the v1 inference
  config: 320 channels, multipliers 1-2-4-4, two res-blocks per level, attention at the three
  finer levels, 8 heads, cross-attention width 768, conv ``proj_in``), 686 tensors;
* ``cond_stage_model.transformer.text_model.*``: the CLIP ViT-L/14 text encoder in Hugging Face
  names (12 layers, width 768, vocabulary 49408, 77 positions), 196 tensors;
* ``first_stage_model.*``: the KL-f8 autoencoder (128 channels, multipliers 1-2-4-4, two
  res-blocks, one mid-block attention with 1x1-conv projections), 248 tensors.

Weights are drawn from a seeded normal with a small standard deviation (0.02) and normalisation
layers start at weight 1 / bias 0, so every activation stays finite and the decoded image varies
with the latent. The file is stored in float16 (about 2.1 GB) and built once per cache directory:
``$FEWSTEP_TEST_CACHE`` or ``~/.cache/comfyui-fewstep-tests``.

Only ``torch`` and ``safetensors`` are imported, so tests load this module by path.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "CACHE_ENV",
    "SD15_CHECKPOINT_NAME",
    "cache_dir",
    "cached_sd15_checkpoint",
    "clip_l_shapes",
    "random_state_dict",
    "sd15_checkpoint_shapes",
    "sd15_unet_shapes",
    "sd15_vae_shapes",
    "write_sd15_checkpoint",
]

CACHE_ENV = "FEWSTEP_TEST_CACHE"
SD15_CHECKPOINT_NAME = "fewstep_test_sd15_random_v1.safetensors"
"""File name in the cache; bump the version suffix when the content changes."""

Shapes = dict[str, tuple[int, ...]]

# ----------------------------------------------------------------------------- building blocks


def _linear(shapes: Shapes, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (n_out, n_in)
    if bias:
        shapes[f"{name}.bias"] = (n_out,)


def _conv(shapes: Shapes, name: str, n_out: int, n_in: int, k: int) -> None:
    shapes[f"{name}.weight"] = (n_out, n_in, k, k)
    shapes[f"{name}.bias"] = (n_out,)


def _norm(shapes: Shapes, name: str, n: int) -> None:
    shapes[f"{name}.weight"] = (n,)
    shapes[f"{name}.bias"] = (n,)


# ----------------------------------------------------------------------------- SD1.5 UNet (ldm names)

UNET_CHANNELS = 320
UNET_MULT = (1, 2, 4, 4)
UNET_RES_BLOCKS = 2
UNET_ATTENTION_LEVELS = (0, 1, 2)
CONTEXT_DIM = 768
TIME_EMBED_DIM = 4 * UNET_CHANNELS


def _unet_resblock(shapes: Shapes, name: str, n_in: int, n_out: int) -> None:
    _norm(shapes, f"{name}.in_layers.0", n_in)
    _conv(shapes, f"{name}.in_layers.2", n_out, n_in, 3)
    _linear(shapes, f"{name}.emb_layers.1", n_out, TIME_EMBED_DIM)
    _norm(shapes, f"{name}.out_layers.0", n_out)
    _conv(shapes, f"{name}.out_layers.3", n_out, n_out, 3)
    if n_in != n_out:
        _conv(shapes, f"{name}.skip_connection", n_out, n_in, 1)


def _unet_transformer(shapes: Shapes, name: str, n: int) -> None:
    """``SpatialTransformer`` with one block, conv ``proj_in``/``proj_out`` (SD1.x), GEGLU feed-forward."""
    _norm(shapes, f"{name}.norm", n)
    _conv(shapes, f"{name}.proj_in", n, n, 1)
    block = f"{name}.transformer_blocks.0"
    for attn, context in (("attn1", n), ("attn2", CONTEXT_DIM)):
        _linear(shapes, f"{block}.{attn}.to_q", n, n, bias=False)
        _linear(shapes, f"{block}.{attn}.to_k", n, context, bias=False)
        _linear(shapes, f"{block}.{attn}.to_v", n, context, bias=False)
        _linear(shapes, f"{block}.{attn}.to_out.0", n, n)
    _linear(shapes, f"{block}.ff.net.0.proj", 8 * n, n)  # GEGLU: 2 x (4 n)
    _linear(shapes, f"{block}.ff.net.2", n, 4 * n)
    for i in (1, 2, 3):
        _norm(shapes, f"{block}.norm{i}", n)
    _conv(shapes, f"{name}.proj_out", n, n, 1)


def sd15_unet_shapes() -> Shapes:
    """Every tensor of the SD1.5 ``openaimodel`` UNet, ldm names without a prefix."""
    s: Shapes = {}
    _linear(s, "time_embed.0", TIME_EMBED_DIM, UNET_CHANNELS)
    _linear(s, "time_embed.2", TIME_EMBED_DIM, TIME_EMBED_DIM)
    _conv(s, "input_blocks.0.0", UNET_CHANNELS, 4, 3)
    skip_channels = [UNET_CHANNELS]
    ch, block = UNET_CHANNELS, 1
    for level, mult in enumerate(UNET_MULT):
        for _ in range(UNET_RES_BLOCKS):
            out = UNET_CHANNELS * mult
            _unet_resblock(s, f"input_blocks.{block}.0", ch, out)
            ch = out
            if level in UNET_ATTENTION_LEVELS:
                _unet_transformer(s, f"input_blocks.{block}.1", ch)
            skip_channels.append(ch)
            block += 1
        if level != len(UNET_MULT) - 1:
            _conv(s, f"input_blocks.{block}.0.op", ch, ch, 3)
            skip_channels.append(ch)
            block += 1
    _unet_resblock(s, "middle_block.0", ch, ch)
    _unet_transformer(s, "middle_block.1", ch)
    _unet_resblock(s, "middle_block.2", ch, ch)
    block = 0
    for level in reversed(range(len(UNET_MULT))):
        out = UNET_CHANNELS * UNET_MULT[level]
        for i in range(UNET_RES_BLOCKS + 1):
            _unet_resblock(s, f"output_blocks.{block}.0", ch + skip_channels.pop(), out)
            ch = out
            layer = 1
            if level in UNET_ATTENTION_LEVELS:
                _unet_transformer(s, f"output_blocks.{block}.1", ch)
                layer = 2
            if level != 0 and i == UNET_RES_BLOCKS:
                _conv(s, f"output_blocks.{block}.{layer}.conv", ch, ch, 3)
            block += 1
    _norm(s, "out.0", ch)
    _conv(s, "out.2", 4, ch, 3)
    return s


# ----------------------------------------------------------------------------- KL-f8 VAE (ldm names)

VAE_CHANNELS = 128
VAE_MULT = (1, 2, 4, 4)
VAE_RES_BLOCKS = 2
LATENT_CHANNELS = 4


def _vae_resblock(shapes: Shapes, name: str, n_in: int, n_out: int) -> None:
    _norm(shapes, f"{name}.norm1", n_in)
    _conv(shapes, f"{name}.conv1", n_out, n_in, 3)
    _norm(shapes, f"{name}.norm2", n_out)
    _conv(shapes, f"{name}.conv2", n_out, n_out, 3)
    if n_in != n_out:
        _conv(shapes, f"{name}.nin_shortcut", n_out, n_in, 1)


def _vae_mid(shapes: Shapes, name: str, n: int) -> None:
    _vae_resblock(shapes, f"{name}.block_1", n, n)
    _norm(shapes, f"{name}.attn_1.norm", n)
    for proj in ("q", "k", "v", "proj_out"):
        _conv(shapes, f"{name}.attn_1.{proj}", n, n, 1)
    _vae_resblock(shapes, f"{name}.block_2", n, n)


def sd15_vae_shapes() -> Shapes:
    """Every tensor of the SD1.x KL-f8 autoencoder, ldm names without a prefix."""
    s: Shapes = {}
    _conv(s, "encoder.conv_in", VAE_CHANNELS, 3, 3)
    ch = VAE_CHANNELS
    for level, mult in enumerate(VAE_MULT):
        out = VAE_CHANNELS * mult
        for j in range(VAE_RES_BLOCKS):
            _vae_resblock(s, f"encoder.down.{level}.block.{j}", ch, out)
            ch = out
        if level != len(VAE_MULT) - 1:
            _conv(s, f"encoder.down.{level}.downsample.conv", ch, ch, 3)
    _vae_mid(s, "encoder.mid", ch)
    _norm(s, "encoder.norm_out", ch)
    _conv(s, "encoder.conv_out", 2 * LATENT_CHANNELS, ch, 3)
    _conv(s, "quant_conv", 2 * LATENT_CHANNELS, 2 * LATENT_CHANNELS, 1)
    _conv(s, "post_quant_conv", LATENT_CHANNELS, LATENT_CHANNELS, 1)
    ch = VAE_CHANNELS * VAE_MULT[-1]
    _conv(s, "decoder.conv_in", ch, LATENT_CHANNELS, 3)
    _vae_mid(s, "decoder.mid", ch)
    for level in reversed(range(len(VAE_MULT))):
        out = VAE_CHANNELS * VAE_MULT[level]
        for j in range(VAE_RES_BLOCKS + 1):
            _vae_resblock(s, f"decoder.up.{level}.block.{j}", ch, out)
            ch = out
        if level != 0:
            _conv(s, f"decoder.up.{level}.upsample.conv", ch, ch, 3)
    _norm(s, "decoder.norm_out", ch)
    _conv(s, "decoder.conv_out", 3, ch, 3)
    return s


# ----------------------------------------------------------------------------- CLIP ViT-L/14 text encoder

CLIP_WIDTH = 768
CLIP_LAYERS = 12
CLIP_VOCAB = 49408
CLIP_POSITIONS = 77


def clip_l_shapes() -> Shapes:
    """Every tensor of the CLIP-L text encoder, Hugging Face names starting at ``text_model.``."""
    s: Shapes = {}
    d = CLIP_WIDTH
    s["text_model.embeddings.token_embedding.weight"] = (CLIP_VOCAB, d)
    s["text_model.embeddings.position_embedding.weight"] = (CLIP_POSITIONS, d)
    for i in range(CLIP_LAYERS):
        layer = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(s, f"{layer}.self_attn.{proj}", d, d)
        _norm(s, f"{layer}.layer_norm1", d)
        _linear(s, f"{layer}.mlp.fc1", 4 * d, d)
        _linear(s, f"{layer}.mlp.fc2", d, 4 * d)
        _norm(s, f"{layer}.layer_norm2", d)
    _norm(s, "text_model.final_layer_norm", d)
    return s


def sd15_checkpoint_shapes() -> Shapes:
    """The single-file SD1.5 checkpoint: UNet, CLIP-L and VAE under their ldm prefixes."""
    shapes: Shapes = {}
    for prefix, part in (
        ("model.diffusion_model.", sd15_unet_shapes()),
        ("cond_stage_model.transformer.", clip_l_shapes()),
        ("first_stage_model.", sd15_vae_shapes()),
    ):
        shapes.update({prefix + k: v for k, v in part.items()})
    return shapes


# ----------------------------------------------------------------------------- weights and files


def random_state_dict(
    shapes: Shapes,
    seed: int = 0,
    std: float = 0.02,
    dtype: torch.dtype = torch.float16,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs: N(0, std^2) for weights with 2+ dims, zeros for biases, ones for
    the 1-D weights of normalisation layers (every 1-D ``*.weight``)."""
    generator = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if len(shape) >= 2:
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
            yield name, t.to(dtype)
        elif name.endswith(".weight"):
            yield name, torch.ones(shape, dtype=dtype)
        else:
            yield name, torch.zeros(shape, dtype=dtype)


def write_sd15_checkpoint(path: str | Path, seed: int = 0, std: float = 0.02) -> Path:
    """Write the random SD1.5 checkpoint to ``path`` (atomically: a temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(random_state_dict(sd15_checkpoint_shapes(), seed=seed, std=std))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata={"format": "pt", "fewstep_test_model": "sd15 random"})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def cache_dir() -> Path:
    """Where built test models are kept: ``$FEWSTEP_TEST_CACHE`` or ``~/.cache/comfyui-fewstep-tests``."""
    value = os.environ.get(CACHE_ENV)
    return Path(value) if value else Path.home() / ".cache" / "comfyui-fewstep-tests"


def cached_sd15_checkpoint(directory: str | Path | None = None) -> Path:
    """The cached random SD1.5 checkpoint, built on first use."""
    path = Path(directory or cache_dir()) / SD15_CHECKPOINT_NAME
    if not path.is_file():
        write_sd15_checkpoint(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write here instead of the cache")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = write_sd15_checkpoint(args.out) if args.out else cached_sd15_checkpoint()
    print(f"{path} ({path.stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
