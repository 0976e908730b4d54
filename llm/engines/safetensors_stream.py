"""Read a model folder's safetensors weights one tensor at a time, without memory-mapping.

Sharded loading (llm/engines/materialize.py) has rank 0 read each tensor and send it to the other
ranks. ``safetensors.safe_open`` memory-maps the file: every page it touches stays in the process's
resident set until the file is closed, so reading a whole checkpoint that way costs a full model
copy of RSS on rank 0. Here each tensor is ``readinto`` a fresh buffer instead: rank 0 holds one
tensor at a time (the file's pages sit in the OS page cache, which the kernel can drop).

The format (the safetensors specification): an 8-byte little-endian header length N, N bytes of
JSON mapping each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
relative to the end of the header; an optional ``"__metadata__"`` entry), then the raw bytes. A
sharded checkpoint has ``model.safetensors.index.json`` whose ``weight_map`` names each tensor's
file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class _Entry(NamedTuple):
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def has_safetensors(folder: str | Path) -> bool:
    """Whether ``folder`` holds ``model.safetensors`` or a safetensors index."""
    folder = Path(folder)
    return (folder / INDEX).is_file() or (folder / SINGLE).is_file()


def read_header(path: Path) -> dict[str, _Entry]:
    """The tensors of one safetensors file (name → entry), checked against the file size.

    Raises:
        ValueError: not a safetensors file, an unknown dtype, or offsets that do not fit.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n < 2 or n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError as error:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON)") from error
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or 8 + n + end > size:
            raise ValueError(f"{path}: tensor {key!r}: data_offsets {[begin, end]} do not hold "
                             f"{shape} {info['dtype']} inside the file")
        entries[key] = _Entry(path, dtype, shape, 8 + n + begin, nbytes)
    return entries


class SafetensorsFolder:
    """The tensors of a model folder (single file or index), read one at a time by :meth:`get`.

    Raises:
        FileNotFoundError: no ``model.safetensors`` and no index in ``folder``, or a file the
            index names is missing.
        ValueError: a malformed file or index (named).
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.what = str(folder)
        if (folder / INDEX).is_file():
            try:
                weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise ValueError(f"{folder / INDEX}: no readable weight_map") from error
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            raise FileNotFoundError(f"{folder}: no {SINGLE} or {INDEX}")
        self.entries: dict[str, _Entry] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{folder / INDEX} names {name}, which is missing")
            for key, entry in read_header(path).items():
                if weight_map is None or weight_map.get(key) == name:
                    self.entries[key] = entry
        self._open: dict[Path, object] = {}

    def keys(self) -> set[str]:
        return set(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def where(self, key: str) -> str:
        return str(self.entries[key].file)

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` in the file's dtype, in freshly allocated CPU memory."""
        e = self.entries[key]
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        if e.nbytes:
            f = self._open.get(e.file)
            if f is None:
                f = self._open[e.file] = open(e.file, "rb")  # noqa: SIM115 (closed in close())
            f.seek(e.start)
            if f.readinto(memoryview(buf.numpy())) != e.nbytes:
                raise OSError(f"{e.file}: short read for tensor {key!r}")
        return buf.view(e.dtype).reshape(e.shape)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


class StateDictWeights:
    """The same interface over an in-memory state dict (a model built in full on rank 0)."""

    def __init__(self, state: dict[str, torch.Tensor], what: str):
        self.state, self.what = state, what

    def keys(self) -> set[str]:
        return set(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def where(self, key: str) -> str:
        return self.what

    def get(self, key: str) -> torch.Tensor:
        return self.state[key].detach()

    def close(self) -> None:
        self.state = {}
