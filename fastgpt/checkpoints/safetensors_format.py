"""Read safetensors checkpoints -- one file, or the shards an index lists -- one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes.

Why fastgpt reads it itself rather than through ``safetensors.safe_open``:
that maps the file into memory, and the mapped pages a load touches count
again beside the tensors copied out of them, so loading would cost twice the
model's size. Plain file reads into tensors fastgpt allocates cost it once,
and a model never depends on a file that is overwritten later. The reader is
as strict as the safetensors library: it refuses what that refuses (byte
ranges that overlap, alias or leave gaps, trailing bytes, shapes that are not
lists of non-negative integers, metadata that is not strings, repeated names),
and it says which tensor is at fault, before any tensor data is read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .files import CheckpointError, open_regular_file, parse_json_object, read_json

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
    """The tensors of one ``.safetensors`` file: ``shapes()`` from its header, ``read(name)`` from disk."""

    def __init__(self, path):
        self.path = Path(path)
        with open_regular_file(self.path) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < header_len <= size - 8:
                raise CheckpointError(self.path, f"not a safetensors file, or truncated in its header "
                                                 f"({size} bytes in all)")
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(self.path, f"not a safetensors file: its header would be {header_len:,} bytes "
                                                 f"(at most {MAX_HEADER_BYTES:,})")
            raw = f.read(header_len)
        if not raw.startswith(b"{"):
            raise CheckpointError(self.path, "not a safetensors file: its header does not start with '{'")
        header = parse_json_object(self.path, raw, "safetensors header")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(self.path, "malformed safetensors header: __metadata__ must map strings to strings")
        self.metadata = metadata
        self._data_start = 8 + header_len
        self._entries = {name: self._check_entry(name, entry) for name, entry in header.items()}
        self._check_byte_ranges(size - self._data_start)

    def _check_entry(self, name: str, entry) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        malformed = CheckpointError(self.path, f"malformed header entry {entry!r}: expected dtype, shape (a list of "
                                               "integers >= 0) and data_offsets (two integers >= 0)", name)
        if not isinstance(entry, dict):
            raise malformed
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(map(_is_count, shape)) and isinstance(offsets, list)
                and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise malformed
        if entry.get("dtype") not in _DTYPES:
            raise CheckpointError(self.path, f"unsupported dtype {entry.get('dtype')!r} (fastgpt reads "
                                             f"{', '.join(_DTYPES)})", name)
        dtype, (begin, end) = _DTYPES[entry["dtype"]], offsets
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(self.path, f"header gives {end - begin} bytes for shape {tuple(shape)} of "
                                             f"{entry['dtype']} ({expected} needed)", name)
        return dtype, tuple(shape), begin, end

    def _check_byte_ranges(self, data_size: int) -> None:
        """Each byte of the data belongs to exactly one tensor, in order, as the safetensors library requires."""
        position, previous = 0, None
        for name, (_, _, begin, end) in sorted(self._entries.items(), key=lambda item: item[1][2:]):
            if end > data_size:
                raise CheckpointError(self.path, f"the file is truncated: this tensor ends at byte "
                                                 f"{self._data_start + end} but the file has "
                                                 f"{self._data_start + data_size}", name)
            if begin < position:
                raise CheckpointError(self.path, f"its bytes overlap those of tensor {previous!r} (two tensors "
                                                 "cannot share bytes in a safetensors file)", name)
            if begin > position:
                raise CheckpointError(self.path, f"bytes {position}..{begin} of the data before this tensor belong "
                                                 "to no tensor", name)
            position, previous = end, name
        if position != data_size:
            raise CheckpointError(self.path, f"{data_size - position} trailing bytes after the last tensor's data "
                                             "(not a safetensors file as the library writes it)")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry[1] for name, entry in self._entries.items()}

    def path_of(self, name: str) -> Path:
        return self.path

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        if end > begin:
            with open_regular_file(self.path) as f:
                f.seek(self._data_start + begin)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                if f.readinto(view) != end - begin:
                    raise CheckpointError(self.path, "the file ended while reading this tensor", name)
        return tensor


class SafetensorsShards:
    """A sharded safetensors checkpoint: ``model.safetensors.index.json`` and the files it lists.

    Only files inside the index's folder are read (resolved, so neither ``..``
    nor a symlink leads out of it), and each tensor must sit in the shard the
    index names for it.
    """

    def __init__(self, index_path: Path):
        self.path = index_path
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(index_path, "has no weight_map (tensor name -> shard file)")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
        if bad is not None:
            raise CheckpointError(index_path, f"weight_map gives {bad[1]!r} for {bad[0]!r}; it must map tensor names "
                                              "to shard file names")
        folder = index_path.parent.resolve()
        files = {}
        for file in sorted(set(weight_map.values())):
            resolved = (folder / file).resolve()
            if not resolved.is_relative_to(folder) or resolved == folder:
                raise CheckpointError(index_path, f"weight_map names {file!r}, which is outside the checkpoint "
                                                  f"folder {folder}; shards must be files inside it")
            if not resolved.exists():
                raise CheckpointError(index_path, f"weight_map names the shard {file!r}, which does not exist")
            files[file] = SafetensorsFile(resolved)
        self._file_of = {}
        for file, shard in files.items():
            for name in shard.shapes():
                if name in self._file_of:
                    raise CheckpointError(shard.path, "tensor stored in two shards", name)
                if weight_map.get(name) != file:
                    raise CheckpointError(shard.path, f"the index puts this tensor in {weight_map.get(name)!r}, not "
                                                      f"in this shard", name)
                self._file_of[name] = shard
        absent = [name for name in weight_map if name not in self._file_of]
        if absent:
            raise CheckpointError(files[weight_map[absent[0]]].path, "is listed in the index but not stored in "
                                                                     "this shard", absent[0])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: file.shapes()[name] for name, file in self._file_of.items()}

    def path_of(self, name: str) -> Path:
        return self._file_of[name].path if name in self._file_of else self.path

    def read(self, name: str) -> torch.Tensor:
        return self._file_of[name].read(name)
