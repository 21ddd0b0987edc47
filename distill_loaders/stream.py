"""Stream a safetensors file's weights straight into already-allocated tensors.

Loading through a memory map (``safetensors.safe_open`` / ``load_file``) and then copying into a
model's parameters keeps two copies resident at the peak: the model's parameters (anonymous
memory) and the mapped file pages, so a float16 UNet needs about twice its file size of RAM, and
every 4 KiB page of the map costs a page fault. Here each tensor's byte range is read with
``readinto`` directly into the destination's memory (page cache -> parameter, one copy, no map),
or, when the destination has another dtype or layout, into one reused staging buffer and then
cast with ``copy_``. Peak RAM is the destination tensors plus at most the largest tensor.

The model is built first from shapes alone: :func:`placeholder_state_dict` gives every tensor as a
zero-stride view of a single zero (no memory), which is all a model constructor that only reads
shapes and dtypes needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import StudentLoadError
from .safetensors_header import FileContents

__all__ = ["SAFETENSORS_DTYPES", "placeholder_state_dict", "read_tensor", "stream_into"]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _dtype(contents: FileContents, name: str) -> torch.dtype:
    code = contents.tensors[name].dtype
    try:
        return SAFETENSORS_DTYPES[code]
    except KeyError:
        raise StudentLoadError(
            contents.path,
            f"tensor {name!r} has dtype {code}, which this loader does not read.",
            f"re-save the file with one of {', '.join(SAFETENSORS_DTYPES)}.",
        ) from None


def placeholder_state_dict(contents: FileContents) -> dict[str, torch.Tensor]:
    """Every tensor of ``contents`` as a zero with the right shape and dtype, occupying no memory
    (``torch.zeros(()).expand(shape)``: stride 0 everywhere). Reading one gives zeros."""
    out = {}
    for name, info in contents.tensors.items():
        out[name] = torch.zeros((), dtype=_dtype(contents, name)).expand(info.shape)
    return out


def _readinto(f, view: memoryview, path: Path, name: str) -> None:
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise StudentLoadError(path, f"the file ends inside tensor {name!r}.", "download it again.")
        done += n


def _byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def _check_finite(t: torch.Tensor) -> bool:
    if not t.is_floating_point() or not t.numel():
        return True
    lo, hi = torch.aminmax(t)  # NaN propagates, +-Inf shows at an end
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def stream_into(
    contents: FileContents,
    targets: Mapping[str, torch.Tensor],
    check_finite: bool = True,
    limit: int = 5,
) -> None:
    """Fill ``targets`` (file tensor name -> destination tensor) from the safetensors file of
    ``contents``, in file order. Destinations must have the file tensor's shape; their dtype may
    differ (cast on copy). Raises :class:`StudentLoadError` for unknown names, shape mismatches
    and, with ``check_finite``, for tensors holding NaN or Inf (named in the message)."""
    if contents.container != "safetensors":
        raise ValueError(f"stream_into reads safetensors files, got a {contents.container} file")
    order = []
    for name, dest in targets.items():
        info = contents.tensors.get(name)
        if info is None or info.data_offsets is None:
            raise StudentLoadError(
                contents.path,
                f"the file has no tensor {name!r}.",
                "the file does not match its header; download it again.",
            )
        if tuple(dest.shape) != tuple(info.shape):
            raise StudentLoadError(
                contents.path,
                f"tensor {name!r} has shape {list(info.shape)} but the model expects {list(dest.shape)}.",
                "the file is for a different architecture; pick the matching model.",
            )
        order.append((info.data_offsets[0], name, dest))
    order.sort(key=lambda item: item[0])
    staging = torch.empty(0, dtype=torch.uint8)
    bad = []
    with open(contents.path, "rb", buffering=0) as f, torch.no_grad():
        for begin, name, dest in order:
            info = contents.tensors[name]
            file_dtype = _dtype(contents, name)
            f.seek(contents.data_start + begin)
            if dest.device.type == "cpu" and dest.dtype == file_dtype and dest.is_contiguous():
                _readinto(f, _byte_view(dest), contents.path, name)  # page cache -> parameter
                data = dest.detach()
            else:
                nbytes = info.data_offsets[1] - begin
                if staging.numel() < nbytes:
                    staging = torch.empty(nbytes, dtype=torch.uint8)
                _readinto(f, memoryview(staging.numpy())[:nbytes], contents.path, name)
                data = staging[:nbytes].view(file_dtype).view(info.shape)
                dest.copy_(data)
            if check_finite and not _check_finite(data):  # right after the read, while data is cached
                bad.append(name)
    if bad:
        shown = ", ".join(bad[:limit]) + (f" (+{len(bad) - limit} more)" if len(bad) > limit else "")
        raise StudentLoadError(
            contents.path,
            f"{len(bad)} weight tensor(s) contain NaN or Inf: {shown}.",
            "the file is damaged or was saved from a diverged training run; "
            "download it again or use another checkpoint.",
        )


def read_tensor(contents: FileContents, name: str) -> torch.Tensor:
    """One tensor of a safetensors file as a new CPU tensor (for small extras such as LCM's
    guidance embedding)."""
    info = contents.tensors[name]
    out = torch.empty(info.shape, dtype=_dtype(contents, name))
    stream_into(contents, {name: out}, check_finite=False)
    return out
