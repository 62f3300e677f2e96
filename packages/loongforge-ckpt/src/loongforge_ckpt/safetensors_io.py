"""Reading and writing HF safetensors checkpoints tensor by tensor, without memory maps.

:class:`HFCheckpoint` reads the headers of every file of an HF model directory up front (so a
truncated file, a missing tensor or a wrong shape is reported before anything is written) and then
reads one tensor at a time with plain ``read`` calls into a fresh buffer: memory holds only the
tensors the caller keeps, and mapped file pages never inflate the process's resident memory.

:class:`ShardedSafetensorsWriter` writes an HF directory (``model.safetensors`` or
``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json``) from a plan of names,
dtypes and shapes fixed in advance, so each tensor goes to disk as soon as it is produced, in any
order, and is dropped; the shard size does not bound memory.

Only the safetensors format is read: no pickle, no code execution.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from loongforge_ckpt.errors import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: headers larger than this are refused as corrupt (the format allows 100 MB)
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parse_size(text: str | int) -> int:
    """``"2GB"``, ``"500MB"``, ``"64KiB"``, ``"1048576"`` -> bytes (decimal units like HF's)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    unit = next((u for u in units if s.endswith(u)), None)  # longest suffixes come first
    number, factor = (s[: -len(unit)], units[unit]) if unit else (s, 1)
    try:
        value = float(number)
    except ValueError:
        raise ConversionError(f"cannot read size {text!r} (use e.g. 2GB, 500MB, 64KiB)") from None
    if value <= 0:
        raise ConversionError(f"size {text!r} must be positive")
    return int(value * factor)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: ``file``, absolute byte range ``[begin, end)``, dtype and shape."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one ``.safetensors`` file, checked against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{file}: not a safetensors file (only {size} bytes; truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise ConversionError(f"{file}: not a safetensors file (header length {n} is implausible)")
        if 8 + n > size:
            raise ConversionError(f"{file}: truncated inside its header ({size} bytes, the header needs {8 + n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ConversionError(f"{file}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{file}: tensor {name!r} has an unreadable header entry {meta!r}") from None
        expected = math.prod(shape) * dtype_size(dtype)
        if end - begin != expected:
            raise ConversionError(
                f"{file}: tensor {name!r} has {end - begin} bytes of data but shape {shape} {meta['dtype']} needs {expected}"
            )
        out[name] = TensorInfo(name, file, dtype, shape, data_start + begin, data_start + end)
    cut = [info for info in out.values() if info.end > size]
    if cut:
        first = min(cut, key=lambda info: info.begin)  # the tensor the file ends inside (or before)
        more = f" (and {len(cut) - 1} later tensor(s))" if len(cut) > 1 else ""
        raise ConversionError(f"{file} is truncated: tensor {first.name!r} needs bytes {first.begin}..{first.end} "
                              f"but the file has only {size} bytes{more}")
    return out


class HFCheckpoint:
    """The safetensors of an HF model directory (single file or sharded with an index)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"{self.path}: not a directory (an HF model directory is expected)")
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ConversionError(f"{index}: unreadable index ({exc!r})") from None
            files = sorted(set(weight_map.values()))
        else:
            weight_map = {}
            files = [SINGLE_FILE] if (self.path / SINGLE_FILE).is_file() else sorted(
                p.name for p in self.path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
            hint = f" (found {', '.join(bins[:3])}: pickle checkpoints are not read; re-save with safe_serialization=True)" if bins else ""
            raise ConversionError(f"{self.path}: no safetensors weights{hint}")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            file = self.path / name
            if not file.is_file():
                raise ConversionError(f"{index}: lists {name}, which does not exist")
            for tname, info in read_header(file).items():
                if tname in self.tensors:
                    raise ConversionError(f"tensor {tname!r} is stored twice: in {self.tensors[tname].file} and {file}")
                self.tensors[tname] = info
        for tname, fname in weight_map.items():
            info = self.tensors.get(tname)
            if info is None or info.file.name != fname:
                raise ConversionError(f"{index}: maps tensor {tname!r} to {fname}, which does not contain it")

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ConversionError(f"HF checkpoint {self.path} has no tensor {name!r}") from None

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read into its own buffer."""
        info = self.info(name)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            with open(info.file, "rb") as f:
                f.seek(info.begin)
                got = f.readinto(memoryview(buf.numpy()))
            if got != info.nbytes:
                raise ConversionError(
                    f"{info.file} is truncated: tensor {name!r} needs {info.nbytes} bytes from offset {info.begin}, read {got}"
                )
        return buf.view(info.dtype).reshape(info.shape)

    def __call__(self, name: str) -> torch.Tensor:
        return self.read(name)


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedSafetensorsWriter:
    """Write the tensors of ``plan`` (``(name, dtype, shape)`` in file order) into shards of at
    most ``max_shard_bytes`` (a tensor larger than that gets a shard of its own)."""

    def __init__(self, out_dir: str | os.PathLike, plan: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, dtype, shape in plan:
            nbytes = math.prod(shape) * dtype_size(dtype)
            if shards[-1] and used + nbytes > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, dtype, tuple(shape), nbytes))
            used += nbytes
        names = shard_file_names(len(shards))
        self.files: list[Path] = [self.out_dir / n for n in names]
        self.where: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}  # name -> (fd index, offset, ...)
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self._fds: list[int] = []
        for k, (file, entries) in enumerate(zip(self.files, shards, strict=True)):
            header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
            offset = 0
            for name, dtype, shape, nbytes in entries:
                if name in self.weight_map:
                    raise ValueError(f"tensor {name!r} planned twice")
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                self.weight_map[name] = file.name
                self.where[name] = (k, offset, dtype, shape)
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            data_start = 8 + len(raw)
            os.ftruncate(fd, data_start + offset)
            for name, _, _, _ in entries:
                k_, off, dt, sh = self.where[name]
                self.where[name] = (k_, data_start + off, dt, sh)
            self.total_bytes += offset
        self._pending = set(self.where)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.where:
            raise ValueError(f"tensor {name!r} is not in the plan")
        if name not in self._pending:
            raise ValueError(f"tensor {name!r} written twice")
        k, offset, dtype, shape = self.where[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name!r}: planned {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        while len(view):
            written = os.pwrite(self._fds[k], view, offset)
            view, offset = view[written:], offset + written
        self._pending.discard(name)

    def close(self) -> list[Path]:
        """Flush every shard and write the index (when sharded); returns the files written."""
        if self._pending:
            raise ValueError(f"tensors planned but never written: {sorted(self._pending)[:8]}")
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        written = list(self.files)
        if len(self.files) > 1:
            index = self.out_dir / INDEX_FILE
            index.write_text(json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}, indent=2) + "\n")
            written.append(index)
        return written

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
