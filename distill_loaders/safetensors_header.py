"""Read a model file's table of contents (names, shapes, dtypes, metadata) without its weights.

Safetensors: the 8-byte little-endian header length and the JSON header are parsed directly,
and checked against the file size, so a multi-GB file is read in well under a second and a
truncated or corrupt file is reported before anything is loaded. Torch ``.bin``/``.pt`` files go
through ``torch.load(weights_only=True, mmap=True)``; anything else that is a pickle is refused.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StudentLoadError, command, unreadable

__all__ = ["FileContents", "TensorInfo", "read_contents", "resolve_model_path"]

MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
_SAFETENSORS_EXT = (".safetensors", ".sft")
_TORCH_EXT = (".bin", ".pt", ".pth", ".ckpt")
_PICKLE_EXT = (".pkl", ".pickle")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str
    data_offsets: tuple[int, int] | None = None  # safetensors: byte range after the header


@dataclass
class FileContents:
    """What a model file holds, without the weights."""

    path: Path
    container: str  # "safetensors" | "torch"
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # a diffusers config.json next to the weights, if any
    size_bytes: int = 0
    data_start: int = 0  # safetensors: file offset of the first tensor byte (8 + header length)


def resolve_model_path(path: str | Path) -> tuple[Path, dict]:
    """The weights file to read for ``path`` and the diffusers ``config.json`` beside it (or ``{}``).

    A folder may be a diffusers UNet folder (``diffusion_pytorch_model*.safetensors``) or a whole
    pipeline with a ``unet/`` sub-folder.
    """
    path = Path(path)
    if not path.exists():
        raise StudentLoadError(
            path, "the file does not exist.", "check the path or pick a file from the list."
        )
    if path.is_dir():
        folder = path / "unet" if (path / "unet").is_dir() else path
        for name in (
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.fp16.bin",
        ):
            if (folder / name).is_file():
                return folder / name, _read_config(folder / "config.json")
        raise StudentLoadError(
            path,
            "this folder holds no diffusers UNet (diffusion_pytorch_model.safetensors).",
            "point at the UNet weights file or a diffusers pipeline folder with unet/.",
        )
    return path, _read_config(path.parent / "config.json") if path.name.startswith(
        "diffusion_pytorch_model"
    ) else {}


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


#: the first object of a legacy (non-zip) torch.save file
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def is_torch_save_file(path: str | Path) -> bool:
    """Whether ``path`` was written by ``torch.save`` (zip archive or the legacy format, whose
    first pickle is the magic number), whatever its extension: such a file is read with
    ``torch.load(weights_only=True)``. The opcodes are read, nothing is unpickled."""
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            return True
        f.seek(0)
        try:
            for op, arg, _ in pickletools.genops(io.BytesIO(f.read(64))):
                if op.name in ("LONG1", "LONG4", "INT", "LONG") and arg == TORCH_LEGACY_MAGIC:
                    return True
                if op.name not in ("PROTO", "FRAME"):
                    return False
        except Exception:  # noqa: BLE001 - not a pickle, or not one that starts with the magic
            return False
    return False


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "other"


def read_contents(path: str | Path) -> FileContents:
    """Names, shapes, dtypes and metadata of a model file or diffusers folder; raises
    :class:`StudentLoadError` for truncated, corrupt or code-carrying files."""
    weights, config = resolve_model_path(path)
    suffix = weights.suffix.lower()
    try:
        if suffix in _PICKLE_EXT and weights.is_file() and is_torch_save_file(weights):
            suffix = ".pt"  # a torch.save state dict with a pickle's name: read as one, without unpickling
    except OSError as e:
        raise unreadable(weights, e) from None
    if suffix in _PICKLE_EXT:
        raise StudentLoadError(
            weights,
            "this is a Python pickle, which can run arbitrary code when loaded; it is not opened here.",
            f"convert it first: {command('convert FILE')}; it writes .safetensors + .json.",
        )
    if suffix in _SAFETENSORS_EXT or suffix in _TORCH_EXT:
        try:
            contents = _read_safetensors(weights) if suffix in _SAFETENSORS_EXT else _read_torch(weights)
        except OSError as e:
            raise unreadable(weights, e) from None
    else:
        raise StudentLoadError(
            weights,
            f"unsupported file type {suffix!r}.",
            "use .safetensors (preferred), .bin/.pt/.pth/.ckpt state dicts, or a diffusers folder.",
        )
    contents.config = config
    return contents


def _read_safetensors(path: Path) -> FileContents:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        looks_like_safetensors = f.read(9)[8:9] == b"{"
    kind = "safetensors" if looks_like_safetensors else _sniff(path)
    if kind in ("zip", "pickle"):
        raise StudentLoadError(
            path,
            f"the file is named .safetensors but is a torch {'zip archive' if kind == 'zip' else 'pickle'}.",
            "rename it to .bin/.pt to load it as a weights-only torch state dict, or re-save it as safetensors.",
        )
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise StudentLoadError(
                path,
                f"the file is only {size} bytes long, too short to be safetensors.",
                "the download is incomplete or the file is damaged: download it again.",
            )
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise StudentLoadError(
                path,
                f"the safetensors header claims {n} bytes but the file has {size}.",
                "the file is truncated or not safetensors: download it again.",
            )
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise StudentLoadError(
                path,
                f"the safetensors header is not valid JSON ({e}).",
                "the file is corrupt: download it again.",
            ) from None
    if not isinstance(header, dict):
        raise StudentLoadError(
            path, "the safetensors header is not a JSON object.", "the file is corrupt: download it again."
        )
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise StudentLoadError(
            path,
            f"the safetensors header's __metadata__ is a JSON {type(metadata).__name__}, not an object.",
            "the file is corrupt or was written by a broken tool: download it again.",
        )
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        try:
            shape = tuple(int(d) for d in entry["shape"])
            dtype = str(entry["dtype"])
            begin, stop = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise StudentLoadError(
                path,
                f"the header entry for {name!r} is malformed.",
                "the file is corrupt: download it again.",
            ) from None
        numel = 1
        for d in shape:
            numel *= d
        if begin < 0 or stop < begin:
            raise StudentLoadError(
                path,
                f"tensor {name!r} has the byte range [{begin}, {stop}), outside the file's data.",
                "the file is corrupt: download it again.",
            )
        if dtype in _DTYPE_BYTES and stop - begin != numel * _DTYPE_BYTES[dtype]:
            raise StudentLoadError(
                path,
                f"tensor {name!r} has {stop - begin} bytes for shape {list(shape)} {dtype}.",
                "the file is corrupt: download it again.",
            )
        end = max(end, stop)
        tensors[name] = TensorInfo(shape, dtype, (begin, stop))
    if 8 + n + end > size:
        raise StudentLoadError(
            path,
            f"the file is truncated: its tensors need {8 + n + end} bytes, it has {size}.",
            "the download is incomplete: download it again.",
        )
    return FileContents(
        path,
        "safetensors",
        tensors,
        {str(k): str(v) for k, v in metadata.items()},
        size_bytes=size,
        data_start=8 + n,
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*m")

#: leading pickles of torch's legacy (non-zip) format: magic number, protocol, system info, the
#: object, the storage keys; the raw storage bytes follow
_LEGACY_PICKLES = 5


def _plain(error: BaseException) -> str:
    """An exception's text without terminal colour codes, on one line."""
    return " ".join(_ANSI.sub("", str(error)).split())


def _blocked_global(error: BaseException) -> str:
    """The part of torch's weights-only refusal that names what the pickle wanted to load."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line]
    text = (named or lines or [type(error).__name__])[0]
    return text.split("WeightsUnpickler error:")[-1].strip().split(". ")[0].rstrip(".")[:200]


def _legacy_pickles_complete(path: Path) -> bool:
    """Whether every leading pickle of a torch file ends (with STOP) inside the file.

    A legacy file cut inside its object pickle makes ``torch.load`` report a cut-off global name
    ("Unsupported global: GLOBAL torch._uti") exactly as for a pickle that needs code; this tells
    the two apart without unpickling anything. Zip files are checked by their own index."""
    return zipfile.is_zipfile(path) or _pickles_end(path, _LEGACY_PICKLES)


def _pickles_end(path: Path, count: int) -> bool:
    """Whether the file's first ``count`` pickles each end (with STOP) inside it (opcodes read,
    nothing run)."""
    try:
        with open(path, "rb") as f:
            for _ in range(count):
                for _op in pickletools.genops(f):
                    pass
    except Exception:  # noqa: BLE001 - exhausted or garbled: a pickle does not end
        return False
    return True


def load_torch_state_dict(path: Path, map_location: str = "cpu") -> dict:
    """``torch.load(weights_only=True)`` (memory-mapped when the file is a zip archive), unwrapped
    from a ``state_dict`` key; a clear :class:`StudentLoadError` when the pickle holds code."""
    import pickle

    import torch

    if _sniff(path) == "pickle" and not is_torch_save_file(path) and _pickles_end(path, 1):
        raise StudentLoadError(
            path,
            "the file is a plain Python pickle, not a torch.save state dict; it was not run.",
            f"convert it with: {command('convert FILE')}; it rebuilds tensors only.",
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if not _legacy_pickles_complete(path):
            raise StudentLoadError(
                path,
                "the file ends inside its pickled header.",
                "the file is truncated: download it again.",
            ) from None
        raise StudentLoadError(
            path,
            f"the file is a pickle that needs code to load ({_blocked_global(e)}); it was not run.",
            f"convert it with: {command('convert FILE')}; it rebuilds tensors only.",
        ) from None
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises IndexError, struct.error, EOFError, ...
        raise StudentLoadError(
            path,
            f"the file cannot be read as a torch state dict ({type(e).__name__}: {_plain(e)[:200]}).",
            "the file is truncated or corrupt: download it again.",
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StudentLoadError(
            path,
            "the file does not hold a flat dict of tensors.",
            "save the model's state_dict (name -> tensor), ideally as safetensors.",
        )
    return obj


def _read_torch(path: Path) -> FileContents:
    if _sniff(path) == "other":
        raise StudentLoadError(
            path,
            "the file is neither a torch zip archive nor a pickle.",
            "the file is corrupt or of another format: download it again.",
        )
    sd = load_torch_state_dict(path, map_location="meta" if zipfile.is_zipfile(path) else "cpu")
    tensors = {k: TensorInfo(tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()}
    return FileContents(path, "torch", tensors, size_bytes=os.path.getsize(path))
