"""EDM pixel-space networks (Karras et al. 2022, "Elucidating the Design Space...", Appendix F) for
one-step generators distilled from EDM teachers (SiD, DMD2-ImageNet), written for inference.

Parameter names match the EDM training code's module tree (``map_layer0``, ``enc.32x32_block0.conv0``,
``dec.8x8_in0.qkv``, ...), so a pickle converted by :mod:`.convert_pickle` loads strictly.

* :class:`SongUNet` — DDPM++ / NCSN++ (Song et al. 2021) as configured in EDM Table 7.
* :class:`DhariwalUNet` — ADM (Dhariwal & Nichol 2021).
* :func:`edm_denoise` — EDM preconditioning (Table 1): ``c_skip = s_d^2/(s^2+s_d^2)``,
  ``c_out = s s_d / sqrt(s^2+s_d^2)``, ``c_in = 1/sqrt(s^2+s_d^2)``, ``c_noise = ln(s)/4``.
* :func:`generate_one_step` — SiD's ``x0 = G(sigma_init z, sigma_init)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.functional import conv2d, conv_transpose2d, group_norm, silu

__all__ = ["DhariwalUNet", "SongUNet", "build_edm_network", "edm_denoise", "generate_one_step"]


class Linear(nn.Module):
    def __init__(self, c_in: int, c_out: int, bias: bool = True):
        super().__init__()
        self.in_features = c_in
        self.weight = nn.Parameter(torch.zeros(c_out, c_in))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None

    def forward(self, x):
        y = x @ self.weight.to(x.dtype).t()
        return y + self.bias.to(x.dtype) if self.bias is not None else y


def _binomial_filter(taps) -> torch.Tensor:
    f = torch.as_tensor(taps, dtype=torch.float32)
    return torch.outer(f, f)[None, None] / f.sum() ** 2


class Conv2d(nn.Module):
    """3x3/1x1 convolution with optional 2x FIR up/down-sampling (``kernel = 0``: resampling only)."""

    def __init__(
        self, c_in, c_out, kernel, bias=True, up=False, down=False, resample_filter=(1, 1), fused=False
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down, self.fused = c_in, c_out, up, down, fused
        self.weight = nn.Parameter(torch.zeros(c_out, c_in, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(c_out)) if kernel and bias else None
        self.register_buffer("resample_filter", _binomial_filter(resample_filter) if up or down else None)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused and self.up and w is not None:
            # EDM's fused path: the up-sampling crops what it can, the convolution pads the rest.
            x = conv_transpose2d(
                x,
                (4 * f).tile(self.in_channels, 1, 1, 1),
                groups=self.in_channels,
                stride=2,
                padding=max(f_pad - w_pad, 0),
            )
            x = conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused and self.down and w is not None:
            x = conv2d(x, w, padding=w_pad + f_pad)
            x = conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = conv_transpose2d(
                    x,
                    (4 * f).tile(self.in_channels, 1, 1, 1),
                    groups=self.in_channels,
                    stride=2,
                    padding=f_pad,
                )
            if self.down:
                x = conv2d(
                    x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad
                )
            if w is not None:
                x = conv2d(x, w, padding=w_pad)
        return x if self.bias is None else x + self.bias.to(x.dtype).view(1, -1, 1, 1)


class GroupNorm(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-5, groups: int = 32, min_per_group: int = 4):
        super().__init__()
        self.groups, self.eps = min(groups, channels // min_per_group), eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return group_norm(x, self.groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


@dataclass(frozen=True)
class _BlockStyle:
    emb: int
    skip_scale: float
    eps: float
    resample_filter: tuple
    resample_proj: bool
    adaptive_scale: bool
    num_heads: int | None  # None: channels // 64
    channels_per_head: int = 64


class UNetBlock(nn.Module):
    """Residual block (+ optional self-attention) shared by DDPM++, NCSN++ and ADM (EDM Fig. 3 / App. F)."""

    def __init__(self, c_in, c_out, s: _BlockStyle, up=False, down=False, attention=False):
        super().__init__()
        self.in_channels, self.out_channels, self.skip_scale, self.adaptive_scale = (
            c_in,
            c_out,
            s.skip_scale,
            s.adaptive_scale,
        )
        self.num_heads = 0 if not attention else (s.num_heads or c_out // s.channels_per_head)
        self.norm0 = GroupNorm(c_in, s.eps)
        self.conv0 = Conv2d(c_in, c_out, 3, up=up, down=down, resample_filter=s.resample_filter)
        self.affine = Linear(s.emb, c_out * (2 if s.adaptive_scale else 1))
        self.norm1 = GroupNorm(c_out, s.eps)
        self.conv1 = Conv2d(c_out, c_out, 3)
        self.skip = None
        if c_out != c_in or up or down:
            kernel = 1 if s.resample_proj or c_out != c_in else 0
            self.skip = Conv2d(c_in, c_out, kernel, up=up, down=down, resample_filter=s.resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(c_out, s.eps)
            self.qkv = Conv2d(c_out, 3 * c_out, 1)
            self.proj = Conv2d(c_out, c_out, 1)

    def forward(self, x, emb):
        h = self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = silu(torch.addcmul(shift, self.norm1(h), scale + 1))  # fused, as the reference rounds
        else:
            h = silu(self.norm1(h + params))
        h = self.conv1(h)
        h = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:
            n, c = h.shape[:2]
            q, k, v = (
                self.qkv(self.norm2(h)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            )
            w = (
                torch.einsum("ncq,nck->nqk", q.float(), (k / math.sqrt(k.shape[1])).float())
                .softmax(dim=2)
                .to(q.dtype)
            )
            a = torch.einsum("nqk,nck->ncq", w, v)
            h = (self.proj(a.reshape(h.shape)) + h) * self.skip_scale
        return h


def _positional(x, channels: int, endpoint: bool, max_positions: int = 10000):
    half = channels // 2
    freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if endpoint else 0))
    x = torch.outer(x, ((1.0 / max_positions) ** freqs).to(x.dtype))
    return torch.cat([x.cos(), x.sin()], dim=1)


def _labels(class_labels, x, dim: int):
    """One-hot labels as float; ``None`` means no class (zeros), as EDM's preconditioners pass."""
    if class_labels is None:
        return x.new_zeros(x.shape[0], dim)
    return class_labels.to(x.dtype).reshape(-1, dim)


class _FourierEmbedding(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.register_buffer("freqs", torch.zeros(channels // 2))

    def forward(self, x):
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class _UNetBase(nn.Module):
    def _build(
        self, res0, c_img_in, mc, mult, num_blocks, attn_res, style, first_out, enc_attn, dec_attn_last_only
    ):
        self.enc = nn.ModuleDict()
        cout = c_img_in
        for level, m in enumerate(mult):
            res = res0 >> level
            if level == 0:
                cin, cout = cout, first_out(m)
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, style, down=True)
            for i in range(num_blocks):
                cin, cout = cout, mc * m
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(
                    cin, cout, style, attention=enc_attn and res in attn_res
                )
        skips = [b.out_channels for b in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, m in reversed(list(enumerate(mult))):
            res = res0 >> level
            if level == len(mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, style, attention=True)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, style)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, style, up=True)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), mc * m
                attn = res in attn_res and (i == num_blocks or not dec_attn_last_only)
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, style, attention=attn)
            self._after_level(level, res, cout)
        return cout

    def _after_level(self, level, res, cout):
        pass

    def _unet(self, x, emb):
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        out = None
        for name, block in self.dec.items():
            if name.endswith("_aux_norm"):
                aux = block(x)
            elif name.endswith("_aux_conv"):
                out = block(silu(aux))
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return x, out


class SongUNet(_UNetBase):
    """DDPM++ (``positional`` embedding, standard encoder/decoder) and NCSN++ (``fourier``) of EDM.
    Only the ``standard`` encoder and decoder are implemented (EDM's DDPM++ configs, used by SiD)."""

    def __init__(
        self,
        img_resolution,
        in_channels,
        out_channels,
        label_dim=0,
        augment_dim=0,
        model_channels=128,
        channel_mult=(1, 2, 2, 2),
        channel_mult_emb=4,
        num_blocks=4,
        attn_resolutions=(16,),
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=(1, 1),
        **_unused,
    ):
        super().__init__()
        if encoder_type != "standard" or decoder_type != "standard":
            raise ValueError(
                f"SongUNet encoder/decoder {encoder_type!r}/{decoder_type!r} is not supported; "
                "only 'standard' (DDPM++) is implemented"
            )
        emb, noise = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        self.noise_channels, self.embedding_type = noise, embedding_type
        style = _BlockStyle(emb, math.sqrt(0.5), 1e-6, tuple(resample_filter), True, False, 1)
        self.map_noise = _FourierEmbedding(noise) if embedding_type == "fourier" else None
        self.map_label = Linear(label_dim, noise) if label_dim else None
        self.map_augment = Linear(augment_dim, noise, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise, emb)
        self.map_layer1 = Linear(emb, emb)
        self._out_channels = out_channels
        self._build(
            img_resolution,
            in_channels,
            model_channels,
            channel_mult,
            num_blocks,
            tuple(attn_resolutions),
            style,
            lambda m: model_channels,
            True,
            True,
        )

    def _after_level(self, level, res, cout):
        if level == 0:
            self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, 1e-6)
            self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, self._out_channels, 3)

    def forward(self, x, noise_labels, class_labels=None):
        if self.map_noise is None:
            emb = _positional(noise_labels, self.noise_channels, endpoint=True)
        else:
            emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # sin first, as in DDPM++
        if self.map_label is not None:
            labels = _labels(class_labels, x, self.map_label.in_features)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))
        return self._unet(x, emb)[1]


class DhariwalUNet(_UNetBase):
    """ADM of EDM (ImageNet-64 config: 192 channels, mult 1,2,3,4, 3 blocks, attention at 32/16/8)."""

    def __init__(
        self,
        img_resolution,
        in_channels,
        out_channels,
        label_dim=0,
        augment_dim=0,
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        channel_mult_emb=4,
        num_blocks=3,
        attn_resolutions=(32, 16, 8),
        **_unused,
    ):
        super().__init__()
        emb = model_channels * channel_mult_emb
        self.model_channels = model_channels
        style = _BlockStyle(emb, 1.0, 1e-5, (1, 1), False, True, None)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb)
        self.map_layer1 = Linear(emb, emb)
        self.map_label = Linear(label_dim, emb, bias=False) if label_dim else None
        cout = self._build(
            img_resolution,
            in_channels,
            model_channels,
            channel_mult,
            num_blocks,
            tuple(attn_resolutions),
            style,
            lambda m: model_channels * m,
            True,
            False,
        )
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3)

    def forward(self, x, noise_labels, class_labels=None):
        emb = _positional(noise_labels, self.model_channels, endpoint=False)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_labels(class_labels, x, self.map_label.in_features))
        x, _ = self._unet(x, silu(emb))
        return self.out_conv(silu(self.out_norm(x)))


_ARCHS = {
    "edm_songunet": SongUNet,
    "SongUNet": SongUNet,
    "edm_dhariwal": DhariwalUNet,
    "DhariwalUNet": DhariwalUNet,
}


def build_edm_network(arch: str, **kwargs) -> nn.Module:
    """An EDM network by name (``edm_songunet``/``SongUNet`` or ``edm_dhariwal``/``DhariwalUNet``) with
    EDM's constructor arguments (``img_resolution``, ``in_channels``, ``out_channels``, ``label_dim``...)."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown EDM network {arch!r}; expected one of {sorted(_ARCHS)}")
    return _ARCHS[arch](**kwargs)


def edm_denoise(
    net: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, class_labels=None, sigma_data: float = 0.5
) -> torch.Tensor:
    """EDM preconditioned denoiser D(x; sigma) (Karras et al. 2022, Table 1, eq. 7)."""
    sigma = (
        torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        .reshape(-1, 1, 1, 1)
        .expand(x.shape[0], 1, 1, 1)
    )
    x = x.float()
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log().flatten() / 4
    return c_skip * x + c_out * net(c_in * x, c_noise, class_labels=class_labels).float()


@torch.no_grad()
def generate_one_step(
    net: nn.Module, z: torch.Tensor, sigma_init: float, class_labels=None, sigma_data: float = 0.5
) -> torch.Tensor:
    """One-step generation ``x0 = G(sigma_init z, sigma_init)`` (SiD ``generate_onestep.py``);
    returns pixels in [-1, 1] (clamped). ``sigma_init z`` is formed in float64 as SiD does, then
    rounded once to float32 by :func:`edm_denoise` (float32 on MPS, which has no float64)."""
    x = sigma_init * (z if z.device.type == "mps" else z.to(torch.float64))
    return edm_denoise(net, x, sigma_init, class_labels, sigma_data).clamp(-1, 1)


def strip_precond_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's own names from an ``EDMPrecond`` state dict (every name under ``model.``, as in
    DMD2's ImageNet ``pytorch_model.bin``); any other state dict is returned unchanged."""
    if sd and "model.map_layer0.weight" in sd and all(k.startswith("model.") for k in sd):
        return {k[len("model.") :]: v for k, v in sd.items()}
    return sd


def edm_config_from_state_dict(sd: dict) -> tuple[str, dict]:
    """``(arch, constructor kwargs)`` read from a network state dict's names and shapes alone."""
    import re

    def shape(k):
        return tuple(sd[k].shape)

    arch = "edm_dhariwal" if "out_conv.weight" in sd else "edm_songunet"
    conv0 = next((k for k in sd if re.fullmatch(r"enc\.(\d+)x\1_conv\.weight", k)), None)
    if conv0 is None or "map_layer0.weight" not in sd:
        raise ValueError("not an EDM SongUNet/DhariwalUNet state dict (no enc.<R>x<R>_conv / map_layer0)")
    if any(re.match(r"(enc\.\d+x\d+_aux_(skip|residual|down)|dec\.\d+x\d+_aux_up)\.", k) for k in sd):
        raise ValueError(
            "this EDM SongUNet uses NCSN++'s 'skip'/'residual' encoder or 'skip' decoder, which is not "
            "supported; only the 'standard' DDPM++ layout (SiD's published generators) loads"
        )
    res0 = int(conv0.split(".")[1].split("x")[0])
    emb, noise = shape("map_layer0.weight")
    # DhariwalUNet's timestep embedding has model_channels; SongUNet's has model_channels *
    # channel_mult_noise and its first convolution has model_channels outputs.
    mc = noise if arch == "edm_dhariwal" else shape(conv0)[0]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"enc\.(\d+)x\1_", k))}, reverse=True)
    mult, attn = [], []
    num_blocks = len({k.split(".")[1] for k in sd if k.startswith(f"enc.{res0}x{res0}_block")})
    for r in levels:
        mult.append(shape(f"enc.{r}x{r}_block0.conv1.weight")[0] // mc)
        if f"enc.{r}x{r}_block0.qkv.weight" in sd or f"dec.{r}x{r}_block{num_blocks}.qkv.weight" in sd:
            attn.append(r)
    out_key = "out_conv.weight" if arch == "edm_dhariwal" else f"dec.{res0}x{res0}_aux_conv.weight"
    kwargs = {
        "img_resolution": res0,
        "in_channels": shape(conv0)[1],
        "out_channels": shape(out_key)[0],
        "label_dim": shape("map_label.weight")[1] if "map_label.weight" in sd else 0,
        "augment_dim": shape("map_augment.weight")[1] if "map_augment.weight" in sd else 0,
        "model_channels": mc,
        "channel_mult": mult,
        "channel_mult_emb": emb // mc,
        "num_blocks": num_blocks,
        "attn_resolutions": attn,
    }
    if arch == "edm_songunet":
        kwargs["embedding_type"] = "fourier" if "map_noise.freqs" in sd else "positional"
        kwargs["channel_mult_noise"] = noise // mc
        filt = next((sd[k] for k in sd if k.endswith("resample_filter")), None)
        kwargs["resample_filter"] = [1, 1] if filt is None or filt.shape[-1] == 2 else [1, 3, 3, 1]
    return arch, kwargs
