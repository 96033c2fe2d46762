"""Read a safetensors file one tensor at a time, into memory the caller owns.

The format is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes. Reading with plain
file reads (no memory map) means a loaded model holds its weights once: the
file's pages are not kept mapped beside the copies, and a model never
depends on a file that may be overwritten later. Every offset is checked
against the file's size when it is opened, so a truncated file is reported,
with the tensor it cuts, before anything is read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .weights import CheckpointError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """The tensors of one ``.safetensors`` file: ``shapes()`` from its header, ``read(name)`` from disk."""

    def __init__(self, path):
        self.path = Path(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            prefix = f.read(8)
            header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < header_len <= size - 8:
                raise CheckpointError(self.path, f"not a safetensors file, or truncated in its header "
                                                 f"({size} bytes in all)")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(self.path, f"not a safetensors file: unreadable header ({err})") from None
        if not isinstance(header, dict):
            raise CheckpointError(self.path, "not a safetensors file: its header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries = {name: self._check_entry(name, entry, size - self._data_start)
                         for name, entry in header.items()}

    def _check_entry(self, name: str, entry, data_size: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(self.path, f"unsupported or malformed header entry {entry!r}", name) from None
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(self.path, f"header gives {end - begin} bytes for shape {shape} of "
                                             f"{entry['dtype']} ({expected} needed)", name)
        if end > data_size:
            raise CheckpointError(self.path, f"the file is truncated: this tensor ends at byte "
                                             f"{self._data_start + end} but the file has "
                                             f"{self._data_start + data_size}", name)
        return dtype, shape, begin, end

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry[1] for name, entry in self._entries.items()}

    def path_of(self, name: str) -> Path:
        return self.path

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        if end > begin:
            with open(self.path, "rb") as f:
                f.seek(self._data_start + begin)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                if f.readinto(view) != end - begin:
                    raise CheckpointError(self.path, "the file ended while reading this tensor", name)
        return tensor
