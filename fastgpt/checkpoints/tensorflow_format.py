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
from typing import Iterator, Optional

import torch

from .files import CheckpointError, open_regular_file

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_BLOCK_TRAILER_SIZE = 5  # compression type (1 byte) + masked crc32c (4 bytes)

# tensorflow/core/framework/types.proto
_DTYPES = {1: torch.float32, 2: torch.float64, 3: torch.int32, 4: torch.uint8, 5: torch.int16, 6: torch.int8,
           9: torch.int64, 10: torch.bool, 14: torch.bfloat16, 19: torch.float16}


MAX_INDEX_BYTES = 64_000_000  # GPT-2 XL's index is about 50 KB
MAX_SHARDS = 100_000
MAX_RANK = 64
MAX_DIM = 2**40
MAX_BYTES = 2**48


class TFCheckpoint:
    """The variables of one TensorFlow checkpoint: ``shapes()`` from its index, ``read(name)`` from its data.

    Every count and field the index gives is type-checked and bounded before it is used: a
    malformed or hostile index is a CheckpointError naming the file (and the variable), early.
    """

    def __init__(self, prefix):
        self.prefix = str(prefix)
        self.index_path = self.path = Path(self.prefix + ".index")
        entries = dict(_read_table(self.index_path))
        try:
            header = _fields(entries.pop(b"", b""))
        except ValueError as err:
            raise CheckpointError(self.index_path, f"corrupt checkpoint index header ({err})") from None
        endianness = _int_field(self.index_path, header, 2, 0, "the header's endianness", maximum=1)
        if endianness != 0:
            raise CheckpointError(self.index_path, "big-endian checkpoints are not supported")
        self.num_shards = _int_field(self.index_path, header, 1, 1, "the header's shard count", maximum=MAX_SHARDS)
        if self.num_shards < 1:
            raise CheckpointError(self.index_path, "malformed index: the header's shard count is 0")
        self._entries = {key.decode("utf-8", "replace"): _bundle_entry(self.index_path, key, value, self.num_shards)
                         for key, value in entries.items()}

    def _data_path(self, shard: int) -> Path:
        return Path(f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}")

    @property
    def data_paths(self) -> list[Path]:
        return [self._data_path(shard) for shard in range(self.num_shards)]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry["shape"] for name, entry in self._entries.items()}

    def path_of(self, name: str) -> Path:
        """The file that records the tensor's shape (its bytes are in a data file)."""
        return self.index_path

    def read(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        path = self._data_path(entry["shard"])
        if not path.exists():
            raise CheckpointError(path, "the data file this tensor is stored in is missing", name)
        dtype, shape = entry["dtype"], entry["shape"]
        if dtype is None:
            raise CheckpointError(path, f"unsupported TensorFlow dtype number {entry['dtype_number']}", name)
        size = math.prod(shape) * dtype.itemsize
        if entry["size"] != size:
            raise CheckpointError(path, f"the index gives {entry['size']} bytes for shape {shape} ({size} needed)", name)
        with open_regular_file(path) as f:
            file_size = os.fstat(f.fileno()).st_size
            if entry["offset"] + size > file_size:
                raise CheckpointError(path, f"the file is truncated: this tensor ends at byte "
                                            f"{entry['offset'] + size} but the file has {file_size}", name)
            tensor = torch.empty(shape, dtype=dtype)
            data = tensor.view(-1).view(torch.uint8).numpy()
            if size:
                f.seek(entry["offset"])
                f.readinto(memoryview(data))
        if entry["crc32c"] is not None and _crc32c_is_fast():
            data.flags.writeable = False  # google-crc32c takes read-only buffers only
            if _masked_crc32c(data) != entry["crc32c"]:
                raise CheckpointError(path, "checksum mismatch: the tensor's bytes are corrupt", name)
        return tensor


def _int_field(path: Path, fields: dict, number: int, default, what: str, name: Optional[str] = None,
               maximum: int = MAX_BYTES) -> int:
    """Field ``number`` as an int in [0, maximum], or a CheckpointError saying what it is."""
    value = fields.get(number, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        shown = f"{len(value)} bytes" if isinstance(value, (bytes, list)) else repr(value)
        raise CheckpointError(path, f"malformed index: {what} must be an integer in [0, {maximum}], got {shown}",
                              name)
    return value


def _message_field(path: Path, fields: dict, number: int, what: str, name: Optional[str] = None) -> bytes:
    value = fields.get(number, b"")
    if not isinstance(value, bytes):
        raise CheckpointError(path, f"malformed index: {what} must be a message, got {value!r:.40}", name)
    return value


def _bundle_entry(index_path: Path, key: bytes, value: bytes, num_shards: int) -> dict:
    """Decode a BundleEntryProto (tensorflow/core/protobuf/tensor_bundle.proto), every field checked."""
    name = key.decode("utf-8", "replace")
    try:
        fields = _fields(value, repeated={7})
        if fields.get(7):
            raise CheckpointError(index_path, "partitioned (sliced) variables are not supported", name)
        shape_fields = _fields(_message_field(index_path, fields, 2, "the shape", name), repeated={2})
        if shape_fields.get(3):
            raise CheckpointError(index_path, "the tensor's shape is unknown", name)
        dims = shape_fields.get(2, [])
        if len(dims) > MAX_RANK:
            raise CheckpointError(index_path, f"malformed index: {len(dims)} dimensions (at most {MAX_RANK})", name)
        shape = []
        for dim in dims:
            if not isinstance(dim, bytes):
                raise CheckpointError(index_path, f"malformed index: a dimension must be a message, got {dim!r:.40}",
                                      name)
            shape.append(_int_field(index_path, _fields(dim), 1, 0, "a dimension's size", name, maximum=MAX_DIM))
    except ValueError as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(index_path, f"malformed index entry ({err})", name) from None
    if math.prod(shape) > MAX_BYTES:
        raise CheckpointError(index_path, f"malformed index: shape {tuple(shape)} is larger than any checkpoint's",
                              name)
    dtype_number = _int_field(index_path, fields, 1, 0, "the dtype", name, maximum=2**31)
    shard = _int_field(index_path, fields, 3, 0, "the shard number", name, maximum=num_shards - 1)
    crc32c = fields.get(6)
    if crc32c is not None:
        crc32c = _int_field(index_path, fields, 6, None, "the checksum", name, maximum=2**32 - 1)
    return {"dtype": _DTYPES.get(dtype_number), "dtype_number": dtype_number, "shape": tuple(shape),
            "shard": shard, "offset": _int_field(index_path, fields, 4, 0, "the byte offset", name),
            "size": _int_field(index_path, fields, 5, 0, "the byte size", name),
            "crc32c": crc32c}  # masked, as the index blocks' are


# ---------------------------------------------------------------- protobuf wire format

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value, position after it)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")
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
        data = f.read(MAX_INDEX_BYTES + 1)
    if len(data) > MAX_INDEX_BYTES:
        raise CheckpointError(path, f"is larger than {MAX_INDEX_BYTES:,} bytes: not a GPT-2 checkpoint index")
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
    except CheckpointError:
        raise
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
    if len(block) < 4:
        raise ValueError(f"a block at byte {offset} is {len(block)} bytes, too short for its restart count")
    num_restarts = int.from_bytes(block[-4:], "little")
    entries_end = len(block) - 4 * (num_restarts + 1)
    if entries_end < 0:
        raise ValueError(f"a block at byte {offset} claims {num_restarts} restart points, more than it holds")
    pos, key = 0, b""
    while pos < entries_end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_length, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_length > entries_end:
            raise ValueError(f"an entry of the block at byte {offset} runs past its block")
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
