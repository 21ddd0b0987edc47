"""UNet parameter names and shapes of SD1.5 / SD2.1 / SDXL, in diffusers and LDM layouts.

* :func:`diffusers_unet_shapes` lists every parameter of diffusers' ``UNet2DConditionModel``
  for a base architecture (names and shapes, built from the block structure; no weights).
* :func:`diffusers_to_ldm_map` maps each diffusers name to the LDM (``openaimodel.UNetModel``)
  name that ComfyUI and single-file checkpoints use.
* :func:`convert_diffusers_to_ldm` renames a state dict with that map **without copying**:
  the returned dict holds the very same tensor objects.

The structure (Rombach et al. 2022, SD UNet; Podell et al. 2023, SDXL): ``L`` resolution levels
with ``channel_mult``, ``layers`` res-blocks per level on the way down and ``layers + 1`` on the way
up, a cross-attention transformer after a res-block where the level has one, and a
down/up-sampling conv between levels.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "UNET_CONFIGS",
    "UnetConfig",
    "convert_diffusers_to_ldm",
    "convert_ldm_to_diffusers",
    "diffusers_to_ldm_map",
    "diffusers_unet_shapes",
    "ldm_unet_shapes",
    "lora_to_kohya",
]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class UnetConfig:
    """The few numbers that fix an SD-family UNet's parameter list."""

    model_channels: int
    channel_mult: tuple[int, ...]
    transformer_depth: tuple[int, ...]  # per level, 0 = no attention
    transformer_depth_middle: int
    context_dim: int
    linear_proj: bool  # proj_in/out Linear (SD2, SDXL) or 1x1 conv (SD1)
    adm_in_channels: int | None = None  # SDXL's add_embedding input
    layers: int = 2
    in_channels: int = 4
    out_channels: int = 4


UNET_CONFIGS: dict[str, UnetConfig] = {
    "sd15": UnetConfig(320, (1, 2, 4, 4), (1, 1, 1, 0), 1, 768, False),
    "sd21": UnetConfig(320, (1, 2, 4, 4), (1, 1, 1, 0), 1, 1024, True),
    "sdxl": UnetConfig(320, (1, 2, 4), (0, 2, 10), 10, 2048, True, adm_in_channels=2816),
}

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _resnet(prefix: str, c_in: int, c_out: int, temb: int) -> dict[str, Shape]:
    s = {
        f"{prefix}norm1.weight": (c_in,),
        f"{prefix}norm1.bias": (c_in,),
        f"{prefix}conv1.weight": (c_out, c_in, 3, 3),
        f"{prefix}conv1.bias": (c_out,),
        f"{prefix}time_emb_proj.weight": (c_out, temb),
        f"{prefix}time_emb_proj.bias": (c_out,),
        f"{prefix}norm2.weight": (c_out,),
        f"{prefix}norm2.bias": (c_out,),
        f"{prefix}conv2.weight": (c_out, c_out, 3, 3),
        f"{prefix}conv2.bias": (c_out,),
    }
    if c_in != c_out:
        s[f"{prefix}conv_shortcut.weight"] = (c_out, c_in, 1, 1)
        s[f"{prefix}conv_shortcut.bias"] = (c_out,)
    return s


def _transformer(prefix: str, c: int, depth: int, ctx: int, linear: bool) -> dict[str, Shape]:
    proj = (c, c) if linear else (c, c, 1, 1)
    s = {
        f"{prefix}norm.weight": (c,),
        f"{prefix}norm.bias": (c,),
        f"{prefix}proj_in.weight": proj,
        f"{prefix}proj_in.bias": (c,),
    }
    for k in range(depth):
        b = f"{prefix}transformer_blocks.{k}."
        for attn, kv in (("attn1", c), ("attn2", ctx)):
            s[f"{b}{attn}.to_q.weight"] = (c, c)
            s[f"{b}{attn}.to_k.weight"] = (c, kv)
            s[f"{b}{attn}.to_v.weight"] = (c, kv)
            s[f"{b}{attn}.to_out.0.weight"] = (c, c)
            s[f"{b}{attn}.to_out.0.bias"] = (c,)
        for n in ("norm1", "norm2", "norm3"):
            s[f"{b}{n}.weight"] = (c,)
            s[f"{b}{n}.bias"] = (c,)
        s[f"{b}ff.net.0.proj.weight"] = (8 * c, c)
        s[f"{b}ff.net.0.proj.bias"] = (8 * c,)
        s[f"{b}ff.net.2.weight"] = (c, 4 * c)
        s[f"{b}ff.net.2.bias"] = (c,)
    s[f"{prefix}proj_out.weight"] = proj
    s[f"{prefix}proj_out.bias"] = (c,)
    return s


def _walk(cfg: UnetConfig):
    """Yield ``(diffusers_prefix, ldm_prefix, shapes)`` for every sub-module, in order."""
    mc, mult, n = cfg.model_channels, cfg.channel_mult, cfg.layers
    temb = 4 * mc
    yield (
        "",
        "",
        {
            "conv_in.weight": (mc, cfg.in_channels, 3, 3),
            "conv_in.bias": (mc,),
            "time_embedding.linear_1.weight": (temb, mc),
            "time_embedding.linear_1.bias": (temb,),
            "time_embedding.linear_2.weight": (temb, temb),
            "time_embedding.linear_2.bias": (temb,),
            "conv_norm_out.weight": (mc,),
            "conv_norm_out.bias": (mc,),
            "conv_out.weight": (cfg.out_channels, mc, 3, 3),
            "conv_out.bias": (cfg.out_channels,),
        },
    )
    if cfg.adm_in_channels:
        yield (
            "",
            "",
            {
                "add_embedding.linear_1.weight": (temb, cfg.adm_in_channels),
                "add_embedding.linear_1.bias": (temb,),
                "add_embedding.linear_2.weight": (temb, temb),
                "add_embedding.linear_2.bias": (temb,),
            },
        )
    levels = len(mult)
    ch = mc
    skip_channels = [mc]
    index = 1
    for i, m in enumerate(mult):
        out = mc * m
        for j in range(n):
            yield f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", _resnet("", ch, out, temb)
            ch = out
            if cfg.transformer_depth[i]:
                yield (
                    f"down_blocks.{i}.attentions.{j}.",
                    f"input_blocks.{index}.1.",
                    _transformer("", ch, cfg.transformer_depth[i], cfg.context_dim, cfg.linear_proj),
                )
            skip_channels.append(ch)
            index += 1
        if i < levels - 1:
            yield (
                f"down_blocks.{i}.downsamplers.0.conv.",
                f"input_blocks.{index}.0.op.",
                {"weight": (ch, ch, 3, 3), "bias": (ch,)},
            )
            skip_channels.append(ch)
            index += 1
    yield "mid_block.resnets.0.", "middle_block.0.", _resnet("", ch, ch, temb)
    yield (
        "mid_block.attentions.0.",
        "middle_block.1.",
        _transformer("", ch, cfg.transformer_depth_middle, cfg.context_dim, cfg.linear_proj),
    )
    yield "mid_block.resnets.1.", "middle_block.2.", _resnet("", ch, ch, temb)
    index = 0
    for u, level in enumerate(reversed(range(levels))):
        out = mc * mult[level]
        depth = cfg.transformer_depth[level]
        for j in range(n + 1):
            skip = skip_channels.pop()
            yield (
                f"up_blocks.{u}.resnets.{j}.",
                f"output_blocks.{index}.0.",
                _resnet("", ch + skip, out, temb),
            )
            ch = out
            if depth:
                yield (
                    f"up_blocks.{u}.attentions.{j}.",
                    f"output_blocks.{index}.1.",
                    _transformer("", ch, depth, cfg.context_dim, cfg.linear_proj),
                )
            if level > 0 and j == n:
                yield (
                    f"up_blocks.{u}.upsamplers.0.conv.",
                    f"output_blocks.{index}.{2 if depth else 1}.conv.",
                    {"weight": (ch, ch, 3, 3), "bias": (ch,)},
                )
            index += 1


_TOP_TO_LDM = {
    "conv_in.": "input_blocks.0.0.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def _ldm_name(diffusers_prefix: str, ldm_prefix: str, local: str) -> str:
    if not diffusers_prefix:
        for src, dst in _TOP_TO_LDM.items():
            if local.startswith(src):
                return dst + local[len(src) :]
        raise KeyError(local)  # pragma: no cover - the walk only yields known names
    if ".resnets." in diffusers_prefix:
        module, _, param = local.rpartition(".")
        return f"{ldm_prefix}{_RESNET_TO_LDM[module]}.{param}"
    return ldm_prefix + local  # transformers and samplers keep their inner names


@lru_cache(maxsize=16)
def _tables(cfg: UnetConfig) -> tuple[dict[str, Shape], dict[str, str]]:
    shapes: dict[str, Shape] = {}
    names: dict[str, str] = {}
    for d, ldm, local in _walk(cfg):
        for k, v in local.items():
            shapes[d + k] = v
            names[d + k] = _ldm_name(d, ldm, k)
    return shapes, names


def diffusers_unet_shapes(arch: str | UnetConfig) -> dict[str, Shape]:
    """Every parameter name -> shape of diffusers' ``UNet2DConditionModel`` for ``arch`` (a new dict)."""
    return dict(_tables(UNET_CONFIGS[arch] if isinstance(arch, str) else arch)[0])


def diffusers_to_ldm_map(arch: str | UnetConfig) -> dict[str, str]:
    """``{diffusers_name: ldm_name}`` for every UNet parameter of ``arch`` (a new dict)."""
    return dict(_tables(UNET_CONFIGS[arch] if isinstance(arch, str) else arch)[1])


def ldm_unet_shapes(arch: str | UnetConfig) -> dict[str, Shape]:
    """Every LDM UNet parameter name (no ``model.diffusion_model.`` prefix) -> shape."""
    mapping = diffusers_to_ldm_map(arch)
    return {mapping[k]: v for k, v in diffusers_unet_shapes(arch).items()}


#: the UNet's prefix in single-file (LDM) checkpoints
LDM_PREFIX = "model.diffusion_model."

# Extra diffusers parameters some students carry that the LDM UNet has no slot for.
LCM_GUIDANCE_EMBEDDING = "time_embedding.cond_proj.weight"
LDM_LCM_GUIDANCE_EMBEDDING = "time_embed.cond_proj.weight"
#: every name the LCM guidance embedding is stored under: diffusers, LDM (as our converter writes
#: it), and both inside a single-file checkpoint
LCM_EMBEDDING_NAMES = (LCM_GUIDANCE_EMBEDDING, LDM_LCM_GUIDANCE_EMBEDDING,
                       LDM_PREFIX + LDM_LCM_GUIDANCE_EMBEDDING, LDM_PREFIX + LCM_GUIDANCE_EMBEDDING)


def lcm_embedding_name(names: Iterable[str]) -> str | None:
    """The name the LCM guidance embedding has in ``names`` (a state dict or key set), or None."""
    present = set(names)
    return next((n for n in LCM_EMBEDDING_NAMES if n in present), None)


def convert_diffusers_to_ldm(
    state_dict: dict, arch: str | UnetConfig, prefix: str = ""
) -> tuple[dict, list[str]]:
    """Rename a diffusers UNet state dict to LDM names, zero-copy.

    Returns ``(converted, unexpected)``: ``converted`` maps LDM names (with ``prefix`` prepended)
    to the *same* tensor objects; ``unexpected`` lists input keys with no LDM counterpart. The LCM
    guidance embedding (``time_embedding.cond_proj.weight``) is kept as
    ``time_embed.cond_proj.weight`` rather than dropped.
    """
    mapping = diffusers_to_ldm_map(arch)
    converted: dict = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if key in mapping:
            converted[prefix + mapping[key]] = value
        elif key == LCM_GUIDANCE_EMBEDDING:
            converted[prefix + LDM_LCM_GUIDANCE_EMBEDDING] = value
        else:
            unexpected.append(key)
    return converted, unexpected


def convert_ldm_to_diffusers(
    state_dict: dict, arch: str | UnetConfig, prefix: str = ""
) -> tuple[dict, list[str]]:
    """Inverse of :func:`convert_diffusers_to_ldm` (``prefix`` is stripped from input keys)."""
    inverse = {v: k for k, v in diffusers_to_ldm_map(arch).items()}
    inverse[LDM_LCM_GUIDANCE_EMBEDDING] = LCM_GUIDANCE_EMBEDDING
    converted: dict = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        local = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        if local in inverse:
            converted[inverse[local]] = value
        else:
            unexpected.append(key)
    return converted, unexpected


_LORA_PART = (
    (".lora_A.default.weight", "lora_down"),
    (".lora_B.default.weight", "lora_up"),
    (".lora_A.weight", "lora_down"),
    (".lora_B.weight", "lora_up"),
    (".lora.down.weight", "lora_down"),
    (".lora.up.weight", "lora_up"),
    ("_lora.down.weight", "lora_down"),
    ("_lora.up.weight", "lora_up"),  # attention-processor LoRA
    (".lora_linear_layer.down.weight", "lora_down"),
    (".lora_linear_layer.up.weight", "lora_up"),
    (".lora.down.weight", "lora_down"),
    (".lora.up.weight", "lora_up"),
    ("_lora.down.weight", "lora_down"),
    ("_lora.up.weight", "lora_up"),  # attention-processor LoRA
    (".alpha", "alpha"),
)


def _kohya_name(key: str) -> str | None:
    for suffix, part in _LORA_PART:
        if not key.endswith(suffix):
            continue
        module = key[: -len(suffix)]
        for prefix in ("base_model.model.", "unet."):
            module = module.removeprefix(prefix)
        if module.startswith(("lora_unet_", "lora_te", "text_encoder", "te_")):
            return None
        if ".processor." in module:  # diffusers attention-processor LoRA: attn1.processor.to_q_lora
            head, _, tail = module.partition(".processor.")
            tail = tail.removesuffix("_lora")
            module = f"{head}.{'to_out.0' if tail == 'to_out' else tail}"
        return f"lora_unet_{module.replace('.', '_')}.{part}" + ("" if part == "alpha" else ".weight")
    return None


def lora_to_kohya(state_dict: dict) -> tuple[dict, int]:
    """Rename diffusers / PEFT UNet LoRA keys (``unet.<module>.lora_A.weight``, ``.lora.down.weight``,
    ``.processor.to_q_lora.down.weight``, ...) to kohya's ``lora_unet_<module_with_underscores>.lora_down.weight``,
    which ComfyUI maps for every SD UNet module (it does not map PEFT ``lora_A``/``lora_B`` names on SD
    UNets). Zero-copy; every other key passes through unchanged. Returns ``(state_dict, renamed_count)``."""
    out: dict = {}
    renamed = 0
    for key, value in state_dict.items():
        new = _kohya_name(key)
        if new is None:
            out[key] = value
        else:
            out[new] = value
            renamed += 1
    return out, renamed
