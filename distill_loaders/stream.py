"""Stream a safetensors file's weights straight into already-allocated tensors.

Loading through a memory map (``safetensors.safe_open`` / ``load_file``) and then copying into a
model's parameters keeps two copies resident at the peak: the model's parameters (anonymous
memory) and the mapped file pages, so a float16 UNet needs about twice its file size of RAM, and
every 4 KiB page of the map costs a page fault. Here each tensor's byte range is read with
``readinto`` directly into the destination's memory (page cache -> parameter, one copy, no map).
A destination of another dtype gets each piece through its reader thread's 1 MiB scratch buffer
(read, check, cast with ``copy_`` into the parameter's slice); only a non-contiguous one goes
through one reused staging buffer, a tensor at a time. Peak RAM is the destination tensors plus
at most the largest tensor.

Reads go in :data:`CHUNK_BYTES` pieces on a few threads (as many as torch's intra-op threads,
which is what ComfyUI's own ``copy_`` from a memory map uses). Each thread takes one consecutive
run of pieces of about equal size, so the calling thread only waits. The NaN/Inf check looks at
each piece in the thread that read it, right after the read, while it is still in the CPU cache.
It works on the raw bits (a float is NaN or +-Inf iff its exponent bits are all ones), with two
read-only integer numpy maxima: exact, no overflow, and no wake-up of torch's intra-op thread pool
per call (on a busy machine that wake-up, not the arithmetic, was most of the cost of a
``torch.aminmax`` per tensor).

The model is built first from shapes alone: :func:`placeholder_state_dict` gives every tensor as a
zero-stride view of a single zero (no memory), which is all a model constructor that only reads
shapes and dtypes needs. ``copy_`` from a placeholder leaves the destination as it is, so a
``load_state_dict`` of placeholders does not write 1.6 GB of zeros (and fault in every page from
two threads) just before :func:`stream_into` overwrites them.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .errors import StudentLoadError, unreadable
from .safetensors_header import FileContents

__all__ = [
    "CHUNK_BYTES",
    "SAFETENSORS_DTYPES",
    "default_workers",
    "placeholder_state_dict",
    "read_tensor",
    "stream_into",
]

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

CHUNK_BYTES = 1 << 20
"""Bytes per read-and-check step: fits the L2 cache, so the check reads what the read just wrote."""

# Float dtype -> (unsigned integer of its width, bits of +Inf). With the sign bit cleared, a value
# is NaN or +-Inf iff its bits are >= those of +Inf (all exponent bits set). float8 e4m3fn has no
# Inf; its only non-finite pattern is NaN, 0x7F.
NONFINITE_BITS: dict[torch.dtype, tuple[type, int]] = {
    torch.float64: (np.uint64, 0x7FF0_0000_0000_0000),
    torch.float32: (np.uint32, 0x7F80_0000),
    torch.float16: (np.uint16, 0x7C00),
    torch.bfloat16: (np.uint16, 0x7F80),
    torch.float8_e5m2: (np.uint8, 0x7C),
    torch.float8_e4m3fn: (np.uint8, 0x7F),
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


class _Placeholder(torch.Tensor):
    """A zero-stride zero whose ``copy_`` into another tensor is skipped (the destination keeps
    its memory untouched until :func:`stream_into` fills it). Every other operation runs on the
    plain zero and returns plain tensors."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_ and len(args) > 1 and type(args[1]) is cls and type(args[0]) is not cls:
            return args[0]
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def placeholder_state_dict(contents: FileContents) -> dict[str, torch.Tensor]:
    """Every tensor of ``contents`` as a zero with the right shape and dtype, occupying no memory
    (``torch.zeros(()).expand(shape)``: stride 0 everywhere). Reading one gives zeros; ``copy_``
    from one leaves the destination unchanged (``load_state_dict`` of placeholders writes nothing),
    so every destination must then be filled by :func:`stream_into`."""
    out = {}
    for name, info in contents.tensors.items():
        zero = torch.zeros((), dtype=_dtype(contents, name)).expand(info.shape)
        out[name] = torch.Tensor._make_subclass(_Placeholder, zero)
    return out


def _byte_view(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(-1).view(torch.uint8).numpy()


def all_finite(chunk: np.ndarray, dtype: torch.dtype) -> bool:
    """Whether the float values whose bytes are ``chunk`` are all finite (exact, bitwise).

    With ``B`` the bits of +Inf, a value is +Inf/NaN iff its bits as a signed integer are >= B and
    -Inf/NaN iff its bits as an unsigned integer are >= sign bit | B: two read-only integer
    maxima, no scratch writes."""
    uint, inf_bits = NONFINITE_BITS[dtype]
    sign_bit = 1 << (8 * np.dtype(uint).itemsize - 1)
    signed = np.dtype(uint).str.replace("u", "i")
    return int(chunk.view(signed).max()) < inf_bits and int(chunk.view(uint).max()) < (sign_bit | inf_bits)


def default_workers() -> int:
    """Reader threads: as many as torch's intra-op threads (what ComfyUI's ``copy_`` of a mapped
    file into the parameters uses), at most 8."""
    return max(1, min(torch.get_num_threads(), 8))


_Target = Union[np.ndarray, tuple[torch.Tensor, torch.dtype]]
"""Where a piece goes: the destination's own bytes, or (destination elements, file dtype) to cast."""

class _ChunkReader:
    """Reads one chunk at a file offset into memory and checks it, from any thread: every thread
    has its own unbuffered file handle (file reads and numpy release the GIL, so threads read and
    fault in pages in parallel)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.local = threading.local()
        self.files: list = []
        self.lock = threading.Lock()

    def read(self, offset: int, nbytes: int, name: str, dtype: torch.dtype | None, target: _Target) -> bool:
        """Read ``nbytes`` from ``offset`` into ``target``; with a float ``dtype``, False when they
        hold NaN/Inf. ``target`` is either the destination's bytes, or the destination elements
        (another dtype) and the file's dtype: the piece is read into this thread's scratch buffer,
        checked there and cast into them."""
        f = getattr(self.local, "file", None)
        if f is None:
            f = self.local.file = open(self.path, "rb", buffering=0)
            self.local.scratch = np.empty(CHUNK_BYTES, dtype=np.uint8)
            with self.lock:
                self.files.append(f)
        chunk = target if isinstance(target, np.ndarray) else self.local.scratch[:nbytes]
        f.seek(offset)
        view, done = memoryview(chunk), 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise StudentLoadError(
                    self.path, f"the file ends inside tensor {name!r}.", "download it again."
                )
            done += n
        finite = dtype is None or all_finite(chunk, dtype)
        if isinstance(target, tuple):
            elements, file_dtype = target
            elements.copy_(torch.from_numpy(chunk).view(file_dtype))
        return finite

    def close(self) -> None:
        for f in self.files:
            f.close()


_Piece = tuple[int, int, str, Union[torch.dtype, None], _Target]  # offset, bytes, tensor, check dtype, target


def _split(pieces: list[_Piece], parts: int) -> list[list[_Piece]]:
    """``pieces`` (in file order) as ``parts`` consecutive runs of about equal byte counts."""
    total = sum(piece[1] for piece in pieces)
    runs: list[list[_Piece]] = [[] for _ in range(parts)]
    done = 0
    for piece in pieces:
        runs[min(parts - 1, done * parts // max(total, 1))].append(piece)
        done += piece[1]
    return [run for run in runs if run]


def _read_pieces(
    reader: _ChunkReader, pieces: list[_Piece], pool: ThreadPoolExecutor, workers: int
) -> set[str]:
    """Read and check ``pieces`` on ``workers`` threads; the names of tensors that failed the check.

    Each thread gets one consecutive run of the pieces (one task per thread, not per piece): with a
    task per 1 MiB piece, submitting and collecting 2000 futures kept the calling thread contending
    for the GIL with the readers for about a quarter of the load."""

    def run(part: list[_Piece]) -> set[str]:
        # Grad and inference modes are per thread. ComfyUI builds models under inference_mode, so
        # the destinations may be inference tensors, which only accept an in-place cast inside
        # inference mode (normal tensors accept it there too).
        with torch.inference_mode():
            return {piece[2] for piece in part if not reader.read(*piece)}

    futures = [pool.submit(run, part) for part in _split(pieces, workers)]
    bad: set[str] = set()
    for future in futures:
        bad |= future.result()
    return bad


def stream_into(
    contents: FileContents,
    targets: Mapping[str, torch.Tensor],
    check_finite: bool = True,
    limit: int = 5,
    workers: int | None = None,
) -> None:
    """Fill ``targets`` (file tensor name -> destination tensor) from the safetensors file of
    ``contents``. Destinations must have the file tensor's shape; their dtype may differ (cast on
    copy). Raises :class:`StudentLoadError` for unknown names, shape mismatches, a truncated file
    and, with ``check_finite``, for tensors holding NaN or Inf (named in the message).

    The file is read in :data:`CHUNK_BYTES` pieces, in file order, by ``workers`` threads
    (:func:`default_workers` when None), each taking a consecutive run of about equal size; each
    piece is checked by the thread that read it. A contiguous CPU destination of the file's dtype
    is read into in place; one of another dtype gets each piece through the reading thread's
    scratch buffer, cast into its slice. Other destinations (non-contiguous, or not on the CPU)
    are then read one at a time into a reused staging buffer (all threads) and copied."""
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
    workers = workers or default_workers()

    def pieces(begin: int, nbytes: int, name: str, checked: torch.dtype | None, target) -> list[_Piece]:
        """The tensor at ``begin`` as pieces: ``target`` is its bytes (read in place) or, to cast,
        its elements (flat) with the file's dtype."""
        out = []
        for k in range(0, nbytes, CHUNK_BYTES):
            n = min(CHUNK_BYTES, nbytes - k)
            if isinstance(target, np.ndarray):
                part = target[k : k + n]
            else:
                elements, file_dtype = target
                size = torch.empty((), dtype=file_dtype).element_size()
                part = (elements[k // size : (k + n) // size], file_dtype)
            out.append((contents.data_start + begin + k, n, name, checked, part))
        return out

    direct: list[_Piece] = []
    staged: list[tuple[int, str, torch.Tensor, torch.dtype | None]] = []
    for begin, name, dest in order:
        file_dtype = _dtype(contents, name)
        checked = file_dtype if check_finite and file_dtype in NONFINITE_BITS else None
        nbytes = contents.tensors[name].data_offsets[1] - begin
        if dest.device.type == "cpu" and dest.is_contiguous():
            if dest.dtype == file_dtype:  # page cache -> parameter
                direct += pieces(begin, nbytes, name, checked, _byte_view(dest))
            else:  # page cache -> a reader's scratch (in cache) -> cast into the parameter
                direct += pieces(begin, nbytes, name, checked, (dest.detach().view(-1), file_dtype))
        else:
            staged.append((begin, name, dest, checked))
    reader = _ChunkReader(contents.path)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fewstep-read")
    try:
        with torch.no_grad():
            bad = _read_pieces(reader, direct, pool, workers)
            staging = torch.empty(0, dtype=torch.uint8)
            for begin, name, dest, checked in staged:  # one reused staging buffer: one tensor at a time
                nbytes = contents.tensors[name].data_offsets[1] - begin
                if staging.numel() < nbytes:
                    staging = torch.empty(nbytes, dtype=torch.uint8)
                buffer = staging[:nbytes].numpy()
                bad |= _read_pieces(reader, pieces(begin, nbytes, name, checked, buffer), pool, workers)
                dest.copy_(staging[:nbytes].view(_dtype(contents, name)).view(contents.tensors[name].shape))
    except OSError as e:
        raise unreadable(contents.path, e) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        reader.close()
    if bad:
        names = [name for _, name, _ in order if name in bad]
        shown = ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
        raise StudentLoadError(
            contents.path,
            f"{len(names)} weight tensor(s) contain NaN or Inf: {shown}.",
            "the file is damaged or was saved from a diverged training run; "
            "download it again or use another checkpoint.",
        )


def read_tensor(contents: FileContents, name: str) -> torch.Tensor:
    """One tensor of a safetensors file as a new CPU tensor (for small extras such as LCM's
    guidance embedding)."""
    info = contents.tensors[name]
    out = torch.empty(info.shape, dtype=_dtype(contents, name))
    stream_into(contents, {name: out}, check_finite=False, workers=1)
    return out
