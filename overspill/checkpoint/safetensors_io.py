"""A small safetensors reader that reads into memory we own, with positional reads.

Why not ``safetensors.safe_open``: its tensors are views of one private mmap per file,
so every page touched stays in the process's RSS for as long as the file is open.
Loading then costs "model + mmap'd pages" of RSS, and a streaming runtime cannot
bound its memory. Reading with ``os.preadv`` straight into a preallocated tensor
costs exactly the tensor, is thread-safe (positional), works with O_DIRECT-style
buffers, and lets us check every offset against the file size up front, so a
truncated file is reported by name instead of crashing in a page fault.

Format (https://github.com/huggingface/safetensors): u64 little-endian header length
N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}},
then the data; offsets are relative to the end of the header.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from ..errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20
_CHUNK = 1 << 30  # Linux caps one read at ~2 GiB; stay well under it


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int   # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: every tensor must lie inside the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {len(raw)} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header length {n}, file size {size})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (expected a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype = DTYPES[h["dtype"]]
            shape = tuple(int(s) for s in h["shape"])
            b, e = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor '{name}' has a malformed header entry {h!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if e - b != math.prod(shape) * itemsize or b < 0:
            raise CheckpointError(f"{path}: tensor '{name}' header says {e - b} bytes but shape {list(shape)} "
                                  f"of {h['dtype']} needs {math.prod(shape) * itemsize}")
        if start + e > size:
            raise CheckpointError(f"{path}: truncated: tensor '{name}' needs bytes up to {start + e} "
                                  f"but the file has {size}")
        infos[name] = TensorInfo(dtype, shape, start + b, e - b)
    return infos, meta


def pread_into(fd: int, buf: torch.Tensor, offset: int, path: str = "?") -> None:
    """Fill a contiguous CPU tensor with bytes from ``fd`` at ``offset`` (positional, thread-safe)."""
    mv = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done:done + _CHUNK]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n


DIRECT_MIN = 4 << 20   # tensors this large are read with O_DIRECT


class SafetensorsFile:
    """One .safetensors file: validated header, tensors read on demand into fresh memory."""

    def __init__(self, path: str):
        self.path = path
        self.tensors, self.metadata = read_header(path)
        self._fd: int | None = None
        self._direct = None   # DirectFile once opened; False where the filesystem refuses O_DIRECT

    @property
    def fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def read(self, name: str, out: torch.Tensor | None = None, buffered: bool = False) -> torch.Tensor:
        info = self.tensors[name]
        if out is None:
            if not buffered and info.nbytes >= DIRECT_MIN:
                return self.read_many([name])[name]
            out = torch.empty(info.shape, dtype=info.dtype)
        assert out.is_contiguous() and out.numel() * out.element_size() == info.nbytes
        return self._buffered(out, info.offset)

    def _buffered(self, out: torch.Tensor, offset: int) -> torch.Tensor:
        """Fill ``out`` from byte ``offset`` with buffered reads, then drop those bytes from the page cache (they now
        live in ``out``)."""
        pread_into(self.fd, out, offset, self.path)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, out.numel() * out.element_size(), os.POSIX_FADV_DONTNEED)
        return out

    def read_many(self, names: list[str], alloc=None, rows: dict[str, list[tuple[int, int]]] | None = None
                  ) -> dict[str, torch.Tensor]:
        """Several tensors; the large ones read with O_DIRECT together (see _direct_request), into memory from
        ``alloc(shape, dtype)`` (io.aligned_buffer's). ``rows``: {name: [(a, b), ...]}: read only those ranges of
        the tensor's first dimension (contiguous bytes each), concatenated in order (a tensor-parallel rank's
        share)."""
        rows = rows or {}
        pieces: dict[str, list[torch.Tensor]] = {}
        reqs = []
        for name in names:
            info = self.tensors[name]
            got = []
            for start, shape in self._regions(name, rows.get(name)):
                nbytes = math.prod(shape) * info.dtype.itemsize
                r = self._direct_request(info, alloc, start, nbytes, shape) if nbytes >= DIRECT_MIN and \
                    self._direct is not False else None
                if r is None:
                    t = self._buffered(torch.empty(shape, dtype=info.dtype), info.offset + start)
                else:
                    t = r[0]
                    reqs.append(r[1])
                got.append(t)
            pieces[name] = got
        if reqs:
            from ..io import read_pool
            self._direct.read_many(reqs, read_pool())
        out = {}
        for name, got in pieces.items():
            if len(got) == 1:
                out[name] = got[0]
                continue
            n = sum(g.shape[0] for g in got)
            shape = (n,) + tuple(got[0].shape[1:])
            t = alloc(shape, got[0].dtype) if alloc else torch.empty(shape, dtype=got[0].dtype)
            torch.cat(got, out=t)
            out[name] = t
        return out

    def _regions(self, name: str, parts: list[tuple[int, int]] | None) -> list[tuple[int, tuple[int, ...]]]:
        """(byte offset within the tensor, shape) of each piece to read: the whole tensor, or row ranges of it."""
        info = self.tensors[name]
        if parts is None:
            return [(0, info.shape)]
        row = math.prod(info.shape[1:]) * info.dtype.itemsize
        for a, b in parts:
            if not 0 <= a < b <= (info.shape[0] if info.shape else 0):
                raise CheckpointError(f"{self.path}: tensor '{name}' {list(info.shape)} has no rows {a}:{b}")
        return [(a * row, (b - a,) + tuple(info.shape[1:])) for a, b in parts]

    def _direct_request(self, info: TensorInfo, alloc=None, start: int = 0, nbytes: int | None = None,
                        shape: tuple[int, ...] | None = None):
        """(tensor, (aligned buffer, aligned offset, bytes needed from there)) to read a large tensor (or the
        ``nbytes`` of it from byte ``start``, as ``shape``) with O_DIRECT into an aligned buffer, the tensor a view at
        its offset within the 4 KiB-aligned span (at most 8 KiB more): no page-cache copy, and several readers in
        flight (this virtual disk: ~1.5x one buffered reader). None where O_DIRECT is unavailable or the offset
        does not suit the dtype."""
        from ..io import ALIGN, DirectFile, aligned_buffer

        nbytes = info.nbytes if nbytes is None else nbytes
        shape = info.shape if shape is None else shape
        offset = info.offset + start
        lead = offset % ALIGN
        if lead % info.dtype.itemsize:
            return None
        if self._direct is None:
            f = DirectFile(self.path, direct=True)
            if not f.direct:
                f.close()
                self._direct = False
                return None
            self._direct = f
        span = -(-(lead + nbytes) // ALIGN) * ALIGN
        buf = aligned_buffer(span, alloc=alloc)
        return buf[lead:lead + nbytes].view(info.dtype).view(shape), (buf, offset - lead, lead + nbytes)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._direct:
            self._direct.close()
        self._direct = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def write_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically (temp file + fsync + rename)."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata or {"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
