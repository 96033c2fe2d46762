"""Read a ``torch.save`` state-dict file (``.pth``, ``.pt``, ``.bin``), weights only: nothing else is unpickled.

``torch.save`` writes a zip archive: ``<name>/data.pkl``, a pickle of the object
whose tensors refer to storages by key, and ``<name>/data/<key>``, each
storage's raw bytes. This reader trusts none of it:

* the pickle is read by a restricted unpickler that knows only what a state
  dict is made of (dicts, ``OrderedDict``, tensors rebuilt from storages); any
  other global -- a class, ``os.system`` -- is refused by name before it is
  looked up, so nothing in the file runs;
* tensors come out of it as placeholders (storage key, dtype, offset, shape,
  strides); every name, shape and extent is checked against the storages'
  sizes in the zip's directory before a single byte of tensor data is read,
  so a small compressed file cannot inflate gigabytes before it is refused;
* each tensor's bytes are read only when the loader asks for it, after the
  loader has checked every name and shape against the model it will build.

Files from before torch 1.6 (a bare pickle, no zip) are read with
``torch.load(weights_only=True)``, which loads them whole.
"""

from __future__ import annotations

import collections
import math
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import CheckpointError, open_regular_file

MAX_PICKLE_BYTES = 64_000_000  # a state dict's pickle is kilobytes; an optimizer's with it, a few megabytes

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_DTYPE_NAMES = {str(dtype).removeprefix("torch."): dtype for dtype in _STORAGE_DTYPES.values()}

_NOT_A_STATE_DICT = ("fastgpt loads weights only and never unpickles other objects (that can run code): save "
                     "model.state_dict() instead")


class _Refused(Exception):
    """The pickle names a global that is not part of a state dict."""


class _Malformed(Exception):
    """The pickle is valid but does not describe tensors as torch.save writes them."""


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """A tensor the file describes, not yet read: its storage and its view of it."""
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _count(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Malformed(f"{what} must be an integer >= 0, got {value!r}")
    return value


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64:
        raise _Malformed(f"{what} must be a tuple of integers, got {value!r}")
    return tuple(_count(v, what) for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    # torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
    # backward_hooks, metadata=None), and the older _rebuild_tensor(storage, offset, size, stride).
    if not isinstance(storage, _Storage):
        raise _Malformed("a tensor refers to something that is not a storage")
    offset, shape, strides = _count(storage_offset, "a storage offset"), _ints(size, "a shape"), \
        _ints(stride, "strides")
    if len(shape) != len(strides):
        raise _Malformed(f"a tensor has shape {shape} but strides {strides}")
    if len(rest) >= 2 and rest[1]:
        raise _Malformed("a tensor carries backward hooks")
    if math.prod(shape) and offset + sum((n - 1) * s for n, s in zip(shape, strides)) >= storage.numel:
        raise _Malformed(f"a tensor of shape {shape} at offset {offset} runs past its storage "
                         f"({storage.numel} elements)")
    return _TensorRef(storage, offset, shape, strides)


def _rebuild_parameter(data, *rest):
    if not isinstance(data, _TensorRef):
        raise _Malformed("a parameter holds something that is not a tensor")
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()},
    **{("torch", name): dtype for name, dtype in _DTYPE_NAMES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles what ``torch.save(state_dict)`` writes, with placeholders for tensors; refuses the rest."""

    def __init__(self, file, storage_sizes: dict[str, int]):
        super().__init__(file)
        self.storage_sizes = storage_sizes  # key -> bytes, from the zip's directory
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Malformed(f"unknown persistent id {pid!r:.80}")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str):
            raise _Malformed(f"malformed storage reference {pid!r:.80}")
        numel = _count(numel, "a storage's size")
        if key not in self.storage_sizes:
            raise _Malformed(f"storage {key!r} is not in the archive")
        if self.storage_sizes[key] != numel * dtype.itemsize:
            raise _Malformed(f"storage {key!r} holds {self.storage_sizes[key]} bytes but the pickle says {numel} "
                             f"elements of {dtype} ({numel * dtype.itemsize} bytes)")
        storage = self.storages.setdefault(key, _Storage(key, dtype, numel))
        if storage != _Storage(key, dtype, numel):
            raise _Malformed(f"storage {key!r} is described twice, differently")
        return storage


class _Scanner(_StateDictUnpickler):
    """For pre-1.6 files: refuses globals by name as the archive reader does, tensors left to torch.load."""

    def __init__(self, file):
        super().__init__(file, {})

    def persistent_load(self, pid):
        return _Storage("", torch.uint8, 2**62)  # legacy storages are read by torch.load, after this scan

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return lambda *args, **kwargs: None
        raise _Refused(f"{module}.{name}")


def _scan_legacy_pickles(f) -> None:
    """Unpickle the pickles a pre-1.6 torch.save file starts with (magic number, protocol, system
    information, the object) with globals refused by name; raise _Refused for one that is not a
    state dict's. Anything else malformed is left for torch.load to report."""
    for _ in range(4):
        try:
            _Scanner(f).load()
        except _Refused:
            raise
        except Exception:
            return


class TorchFile:
    """A ``torch.save`` file of tensors: ``shapes()`` from its pickle, ``read(name)`` from its archive."""

    def __init__(self, path: Path):
        self.path = path
        with open_regular_file(path) as f:
            magic = f.read(4)
        # torch.save writes a zip archive (before torch 1.6, a pickle of protocol 2 or later).
        is_zip = magic == b"PK\x03\x04"
        is_pickle = len(magic) >= 2 and magic[0] == 0x80 and 2 <= magic[1] <= 5
        if not (is_zip or is_pickle):
            raise CheckpointError(path, f"is not a torch.save file (it starts with {magic!r}, not a zip archive "
                                        "or a pickle), nor .safetensors; fastgpt reads GPT-2 checkpoints: a "
                                        "Hugging Face folder, a TensorFlow folder, a state-dict file")
        loaded = self._read_archive() if is_zip else self._load_legacy()
        if isinstance(loaded, dict) and isinstance(loaded.get("model_state_dict"), dict):
            loaded = loaded["model_state_dict"]  # the seed's model-and-optimizer checkpoint
        if not isinstance(loaded, dict) or not all(isinstance(v, (torch.Tensor, _TensorRef))
                                                   for v in loaded.values()):
            raise CheckpointError(path, f"expected a state dict (a dict of tensors), got {type(loaded).__name__}")
        if not all(isinstance(k, str) for k in loaded):
            raise CheckpointError(path, "expected a state dict, whose keys are strings")
        self._tensors = dict(loaded)
        self._shapes = {name: tuple(t.shape) for name, t in self._tensors.items()}

    def _read_archive(self):
        try:
            with open_regular_file(self.path) as f, zipfile.ZipFile(f) as archive:
                infos = archive.infolist()
                pickles = [info for info in infos if re.fullmatch(r"[^/]+/data\.pkl", info.filename)]
                if len(pickles) != 1:
                    raise CheckpointError(self.path, "is a zip archive but not a torch.save file (no <name>/data.pkl)")
                root = pickles[0].filename[:-len("data.pkl")]
                self._root = root
                byteorder = next((info for info in infos if info.filename == root + "byteorder"), None)
                if byteorder is not None and byteorder.file_size < 16 \
                        and archive.read(byteorder).strip() not in (b"little", b""):
                    raise CheckpointError(self.path, "holds big-endian tensors; fastgpt reads little-endian files")
                if sys.byteorder != "little":
                    raise CheckpointError(self.path, "fastgpt reads torch.save files on little-endian machines only")
                if pickles[0].file_size > MAX_PICKLE_BYTES:
                    raise CheckpointError(self.path, f"its pickle would be {pickles[0].file_size:,} bytes (a state "
                                                     f"dict's is kilobytes; at most {MAX_PICKLE_BYTES:,})")
                sizes = {info.filename[len(root) + len("data/"):]: info.file_size for info in infos
                         if info.filename.startswith(root + "data/")}
                self._members = {info.filename: info for info in infos}
                with archive.open(pickles[0]) as pickled:
                    return _StateDictUnpickler(pickled, sizes).load()
        except CheckpointError:
            raise
        except _Refused as refused:
            raise CheckpointError(self.path, f"refused: the file asks to run {refused}, to build a Python object "
                                             f"besides tensors; {_NOT_A_STATE_DICT}") from None
        except _Malformed as err:
            raise CheckpointError(self.path, f"is not a state dict as torch.save writes it ({err})") from None
        except RecursionError:
            raise CheckpointError(self.path, "its pickle is nested too deeply to be a state dict's") from None
        except Exception as err:  # a truncated or damaged archive or pickle
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise CheckpointError(self.path, f"cannot be read as a torch.save file, truncated or damaged "
                                             f"({type(err).__name__}: {first_line})") from None

    def _load_legacy(self):
        try:
            with open_regular_file(self.path) as f:
                _scan_legacy_pickles(f)
                f.seek(0)
                return torch.load(f, map_location="cpu", weights_only=True)
        except _Refused as refused:
            raise CheckpointError(self.path, f"refused: the file asks to run {refused}, to build a Python object "
                                             f"besides tensors; {_NOT_A_STATE_DICT}") from None
        except pickle.UnpicklingError as err:
            found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(err))
            if found is None:
                raise CheckpointError(self.path, "cannot be read as a torch.save file, truncated or damaged "
                                                 "(its pickle is not valid)") from None
            # weights_only refused an object: never unpickle it, whatever torch's message suggests.
            raise CheckpointError(self.path, f"refused: the file asks to run {found.group(1)}, to build a Python "
                                             f"object besides tensors; {_NOT_A_STATE_DICT}") from None
        except Exception as err:  # a truncated or damaged file
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise CheckpointError(self.path, f"cannot be read as a torch.save file, truncated or damaged "
                                             f"({type(err).__name__}: {first_line})") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def path_of(self, name: str) -> Path:
        return self.path

    def read(self, name: str) -> torch.Tensor:
        found = self._tensors.pop(name)  # the caller owns it now; nothing else keeps it alive
        if isinstance(found, torch.Tensor):
            return found
        storage = found.storage
        data = torch.empty(storage.numel, dtype=storage.dtype)
        member = self._members[f"{self._root}data/{storage.key}"]
        try:
            with open_regular_file(self.path) as f, zipfile.ZipFile(f) as archive, archive.open(member) as stored:
                view = memoryview(data.view(torch.uint8).numpy()) if storage.numel else memoryview(b"")
                done = 0
                while done < len(view):
                    n = stored.readinto(view[done:])
                    if not n:
                        raise CheckpointError(self.path, "the archive ended while reading this tensor", name)
                    done += n
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            raise CheckpointError(self.path, f"cannot read this tensor's bytes, truncated or damaged "
                                             f"({type(err).__name__}: {err})", name) from None
        if math.prod(found.shape) == storage.numel and found.offset == 0 and \
                data.as_strided(found.shape, found.stride).is_contiguous():
            return data.view(found.shape)
        return data.as_strided(found.shape, found.stride, found.offset).clone()  # a view of part of a storage
