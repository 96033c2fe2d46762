"""Read a TensorFlow checkpoint (``model.ckpt.index`` + ``model.ckpt.data-*``) without TensorFlow.

OpenAI released GPT-2 as TensorFlow checkpoints. A checkpoint is two kinds of file:

* ``PREFIX.index``: a table (LevelDB's SSTable format) mapping each variable
  name to a ``BundleEntryProto`` -- dtype, shape, which data shard, byte offset
  and size -- plus, under the empty key, a ``BundleHeaderProto`` (shard count,
  endianness);
* ``PREFIX.data-00000-of-00001`` (one per shard): the raw tensor bytes.

The table format: the file ends with a 48-byte footer holding two block
handles (varint offset + size), padding, and the magic number
0xdb4775248b80fb57. The index block it points to lists the data blocks; each
block is a run of prefix-compressed entries (shared key length, unshared key
length, value length, key suffix, value), an array of restart offsets and
their count, then a trailer of one compression byte and a masked CRC32C.
TensorFlow writes these blocks uncompressed. Protobuf messages are decoded by
hand for the few fields needed.

Block checksums and each tensor's checksum (a masked CRC32C in its bundle
entry) are verified with ``google-crc32c``, whose C code checks gigabytes in
seconds; only if that package fell back to pure Python are tensor bytes
checked for length alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import torch

from .files import CheckpointError, open_regular_file

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5  # compression type (1 byte) + masked crc32c (4 bytes)

# tensorflow/core/framework/types.proto
_DTYPES = {1: torch.float32, 2: torch.float64, 3: torch.int32, 4: torch.uint8, 5: torch.int16, 6: torch.int8,
           9: torch.int64, 10: torch.bool, 14: torch.bfloat16, 19: torch.float16}


class TFCheckpoint:
    """The variables of one TensorFlow checkpoint: ``shapes()`` from its index, ``read(name)`` from its data."""

    def __init__(self, prefix):
        self.prefix = str(prefix)
        self.index_path = self.path = Path(self.prefix + ".index")
        entries = dict(_read_table(self.index_path))
        header = _fields(entries.pop(b"", b""))
        if header.get(2, 0) != 0:
            raise CheckpointError(self.index_path, "big-endian checkpoints are not supported")
        num_shards = header.get(1, 1)
        self._data_paths = [Path(f"{self.prefix}.data-{shard:05d}-of-{num_shards:05d}") for shard in range(num_shards)]
        self._entries = {key.decode("utf-8", "replace"): _bundle_entry(self.index_path, key, value)
                         for key, value in entries.items()}

    @property
    def data_paths(self) -> list[Path]:
        return list(self._data_paths)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry["shape"] for name, entry in self._entries.items()}

    def path_of(self, name: str) -> Path:
        """The file that records the tensor's shape (its bytes are in a data file)."""
        return self.index_path

    def read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        path = self._data_paths[entry["shard"]] if entry["shard"] < len(self._data_paths) else None
        if path is None or not path.exists():
            raise CheckpointError(path or self.index_path, "the data file this tensor is stored in is missing", name)
        dtype, shape = entry["dtype"], entry["shape"]
        if dtype is None:
            raise CheckpointError(path, f"unsupported TensorFlow dtype number {entry['dtype_number']}", name)
        size = math.prod(shape) * dtype.itemsize
        if entry["size"] != size:
            raise CheckpointError(path, f"the index gives {entry['size']} bytes for shape {shape} ({size} needed)", name)
        tensor = torch.empty(shape, dtype=dtype)
        with open_regular_file(path) as f:
            file_size = os.fstat(f.fileno()).st_size
            if entry["offset"] + size > file_size:
                raise CheckpointError(path, f"the file is truncated: this tensor ends at byte "
                                            f"{entry['offset'] + size} but the file has {file_size}", name)
            data = tensor.view(-1).view(torch.uint8).numpy()
            if size:
                f.seek(entry["offset"])
                f.readinto(memoryview(data))
        if entry["crc32c"] is not None and _crc32c_is_fast():
            data.flags.writeable = False  # google-crc32c takes read-only buffers only
            if _masked_crc32c(data) != entry["crc32c"]:
                raise CheckpointError(path, "checksum mismatch: the tensor's bytes are corrupt", name)
        return tensor


def _bundle_entry(index_path: Path, key: bytes, value: bytes) -> dict:
    """Decode a BundleEntryProto (tensorflow/core/protobuf/tensor_bundle.proto)."""
    fields = _fields(value, repeated={7})
    name = key.decode("utf-8", "replace")
    if fields.get(7):
        raise CheckpointError(index_path, "partitioned (sliced) variables are not supported", name)
    shape_fields = _fields(fields.get(2, b""), repeated={2})
    if shape_fields.get(3):
        raise CheckpointError(index_path, "the tensor's shape is unknown", name)
    shape = tuple(_fields(dim).get(1, 0) for dim in shape_fields.get(2, []))
    dtype_number = fields.get(1, 0)
    return {"dtype": _DTYPES.get(dtype_number), "dtype_number": dtype_number, "shape": shape,
            "shard": fields.get(3, 0), "offset": fields.get(4, 0), "size": fields.get(5, 0),
            "crc32c": fields.get(6)}  # masked, as the index blocks' are


# ---------------------------------------------------------------- protobuf wire format

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value, position after it)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(message: bytes, repeated: frozenset | set = frozenset()) -> dict:
    """Top-level fields of a protobuf message: number -> int (varint, fixed) or bytes (length-delimited).

    Numbers in ``repeated`` collect a list; otherwise the last value wins, as in protobuf.
    """
    out: dict = {}
    pos = 0
    while pos < len(message):
        tag, pos = _varint(message, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _varint(message, pos)
        elif wire_type == 1:
            value, pos = int.from_bytes(message[pos:pos + 8], "little"), pos + 8
        elif wire_type == 2:
            length, pos = _varint(message, pos)
            value, pos = message[pos:pos + length], pos + length
        elif wire_type == 5:
            value, pos = int.from_bytes(message[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(message):
            raise ValueError("truncated protobuf message")
        if number in repeated:
            out.setdefault(number, []).append(value)
        else:
            out[number] = value
    return out


# ---------------------------------------------------------------- SSTable

def _read_table(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) of an SSTable file, in key order."""
    with open_regular_file(path) as f:
        data = f.read()
    if len(data) < _FOOTER_SIZE or int.from_bytes(data[-8:], "little") != _TABLE_MAGIC:
        raise CheckpointError(path, "not a TensorFlow checkpoint index (no table footer; truncated or another format)")
    footer = data[-_FOOTER_SIZE:]
    try:
        _, pos = _varint(footer, 0)  # the metaindex handle: TensorFlow leaves that block empty
        _, pos = _varint(footer, pos)
        index_offset, pos = _varint(footer, pos)
        index_size, _ = _varint(footer, pos)
        for _, handle in _block_entries(path, data, index_offset, index_size):
            offset, pos = _varint(handle, 0)
            size, _ = _varint(handle, pos)
            yield from _block_entries(path, data, offset, size)
    except ValueError as err:  # a malformed varint or entry
        raise CheckpointError(path, f"corrupt checkpoint index ({err})") from None


def _block_entries(path: Path, data: bytes, offset: int, size: int) -> Iterator[tuple[bytes, bytes]]:
    end = offset + size
    if end + _BLOCK_TRAILER_SIZE > len(data) - _FOOTER_SIZE:
        raise CheckpointError(path, f"a block at byte {offset} runs past the end of the file (truncated index)")
    block, compression = data[offset:end], data[end]
    stored_crc = int.from_bytes(data[end + 1:end + 5], "little")
    if _masked_crc32c(data[offset:end + 1]) != stored_crc:
        raise CheckpointError(path, f"checksum mismatch in the block at byte {offset} (corrupt index)")
    if compression != 0:
        raise CheckpointError(path, f"compressed index blocks (type {compression}) are not supported; "
                                    "TensorFlow writes them uncompressed")
    num_restarts = int.from_bytes(block[-4:], "little")
    entries_end = len(block) - 4 * (num_restarts + 1)
    pos, key = 0, b""
    while pos < entries_end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_length, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]  # keys are prefix-compressed against the previous one
        pos += unshared
        yield key, block[pos:pos + value_length]
        pos += value_length


def _crc32c_is_fast() -> bool:
    import google_crc32c

    return google_crc32c.implementation == "c"


def _masked_crc32c(data) -> int:
    import google_crc32c  # imported when a checkpoint is read: it warns at import if it lacks its C code

    crc = google_crc32c.value(data)
    # LevelDB masks stored CRCs so that a CRC of data containing CRCs stays well distributed.
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
