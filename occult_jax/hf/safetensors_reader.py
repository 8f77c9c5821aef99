"""Safetensors checkpoints read without torch: memory-mapped, zero-copy tensor views.

A `.safetensors` file is an 8-byte little-endian header length n, n bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the
raw little-endian bytes, offsets relative to the end of the header. A sharded checkpoint adds
`model.safetensors.index.json` whose `weight_map` names each tensor's file. Tensors are views
into an `np.memmap`, so only the bytes a caller indexes are read from disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import ml_dtypes
import numpy as np

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str  # absolute path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of one .safetensors file (one-line ValueError if it is malformed)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes).")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path} is not a safetensors file (header length {n} exceeds the "
                             f"file size {size}).")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e}).") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object.")
    start, out = 8 + n, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES.get(entry["dtype"])
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (start + int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {entry!r:.80} "
                             "(needs dtype, shape, data_offsets [begin, end]).") from None
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']!r}, which "
                             f"is not supported; supported: {sorted(DTYPES)}.")
        if (end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or end > size
                or begin < start or min(shape, default=0) < 0):
            raise ValueError(f"{path}: tensor {name!r} has byte range [{begin}, {end}) that does "
                             f"not match its shape {shape} and dtype, or the file size {size}.")
        out[name] = TensorInfo(path, dtype, shape, begin, end)
    return out


def _read_index(path: str) -> object:
    """The `weight_map` of an index file (one-line ValueError if it is not a JSON object)."""
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({str(e).splitlines()[0]}); re-save the "
                         "checkpoint.") from None
    return index.get("weight_map") if isinstance(index, dict) else None


class SafetensorsCheckpoint:
    """The tensors of a checkpoint folder: `model.safetensors`, or the shards that
    `model.safetensors.index.json` lists."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        index = os.path.join(self.directory, INDEX)
        if os.path.isfile(index):
            weight_map = _read_index(index)
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no 'weight_map'; re-save the checkpoint.")
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(self.directory, SINGLE)):
            weight_map, files = None, [SINGLE]
        else:
            raise ValueError(f"{self.directory} holds neither {SINGLE} nor {INDEX}; save the "
                             "model with save_pretrained(..., safe_serialization=True) (PyTorch "
                             ".bin checkpoints are not read).")
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                raise ValueError(f"{INDEX} lists {name}, which is missing from "
                                 f"{self.directory}.")
            self.tensors.update(read_header(path))
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise ValueError(f"{INDEX} lists {len(missing)} tensors that no shard holds, "
                                 f"e.g. {missing[0]!r}.")
        self._maps: dict[str, np.memmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ValueError(f"checkpoint {self.directory} has no tensor {name!r}.") from None

    def array(self, name: str) -> np.ndarray:
        """A read-only view of tensor `name` (bytes are read when indexed or converted)."""
        info = self.info(name)
        if info.file not in self._maps:
            self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        raw = self._maps[info.file][info.begin:info.end]
        return raw.view(info.dtype).reshape(info.shape)
