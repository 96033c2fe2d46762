"""Read a ``torch.save`` state-dict file (``.pth``, ``.pt``, ``.bin``), weights only: nothing else is unpickled."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from .files import CheckpointError, open_regular_file


class TorchFile:
    """A ``torch.save`` file of tensors, loaded once (weights only); ``read`` hands each tensor over."""

    def __init__(self, path: Path):
        self.path = path
        with open_regular_file(path) as f:
            magic = f.read(4)
            f.seek(0)
            # torch.save writes a zip archive (before torch 1.6, a pickle of protocol 2 or later).
            is_zip = magic == b"PK\x03\x04"
            is_pickle = len(magic) >= 2 and magic[0] == 0x80 and 2 <= magic[1] <= 5
            if not (is_zip or is_pickle):
                raise CheckpointError(path, f"is not a torch.save file (it starts with {magic!r}, not a zip archive "
                                            "or a pickle), nor .safetensors; fastgpt reads GPT-2 checkpoints: a "
                                            "Hugging Face folder, a TensorFlow folder, a state-dict file")
            try:
                loaded = torch.load(f, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
                if found is None:
                    raise CheckpointError(path, "cannot be read as a torch.save file, truncated or damaged "
                                                "(its pickle is not valid)") from None
                # weights_only refused an object: never unpickle it, whatever torch's message suggests.
                raise CheckpointError(path, f"holds Python objects besides tensors ({found.group(1)}); fastgpt loads "
                                            "weights only and never unpickles other objects (that can run code): "
                                            "save model.state_dict() instead") from None
            except Exception as err:  # a truncated or damaged archive
                first_line = str(err).splitlines()[0] if str(err) else ""
                raise CheckpointError(path, f"cannot be read as a torch.save file, truncated or damaged "
                                            f"({type(err).__name__}: {first_line})") from None
        if isinstance(loaded, dict) and isinstance(loaded.get("model_state_dict"), dict):
            loaded = loaded["model_state_dict"]  # the seed's model-and-optimizer checkpoint
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise CheckpointError(path, "expected a state dict (a dict of tensors), "
                                        f"got {type(loaded).__name__}")
        self._tensors = dict(loaded)
        self._shapes = {name: tuple(t.shape) for name, t in self._tensors.items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def path_of(self, name: str) -> Path:
        return self.path

    def read(self, name: str) -> torch.Tensor:
        return self._tensors.pop(name)  # the caller owns it now; nothing else keeps it alive
