"""Reading a checkpoint's files safely: the error every problem raises, regular files only, strict JSON."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint cannot become a fastgpt GPTModel. The message names the file, and the tensor if one is at fault."""

    def __init__(self, path, problem: str, tensor: str | None = None):
        self.path, self.tensor = str(path), tensor
        where = f"{self.path}: tensor {tensor!r}" if tensor is not None else self.path
        super().__init__(f"{where}: {problem}")


def open_regular_file(path: Path):
    """``path`` opened for binary reading, refused unless it is a regular file.

    A named pipe, a device or a socket would block or never end: the file is
    opened without blocking and checked before anything is read from it.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(path, "is not a regular file (a named pipe, device or socket?); fastgpt reads "
                                    "checkpoints from regular files only")
    return os.fdopen(fd, "rb")


def parse_json_object(path: Path, text: bytes, what: str = "file") -> dict:
    """A JSON object from ``text``, refusing repeated keys and absurd nesting with a CheckpointError."""
    def no_repeats(pairs):
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise CheckpointError(path, f"the {what} repeats the key(s) {repeated}")
        return dict(pairs)

    try:
        value = json.loads(text, object_pairs_hook=no_repeats)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(path, f"the {what} is not valid JSON ({err})") from None
    except RecursionError:
        raise CheckpointError(path, f"the {what} is JSON nested too deeply to be a checkpoint's") from None
    if not isinstance(value, dict):
        raise CheckpointError(path, f"the {what} is not a JSON object")
    return value


MAX_JSON_BYTES = 100_000_000  # a GPT-2 config or shard index is kilobytes


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file (config, hparams, shard index) as a dict, or a CheckpointError naming the problem."""
    with open_regular_file(path) as f:
        text = f.read(MAX_JSON_BYTES + 1)
    if len(text) > MAX_JSON_BYTES:
        raise CheckpointError(path, f"is larger than {MAX_JSON_BYTES:,} bytes: not a checkpoint's JSON file")
    return parse_json_object(path, text)


# The sha256 of model.safetensors, recorded in the config.json that fastgpt's save_pretrained writes
# with it (transformers keeps unknown config keys as attributes and ignores them).
WEIGHTS_SHA256_KEY = "fastgpt_weights_sha256"


def check_weights_hash(config_path: Path, hf_config: dict) -> None:
    """Refuse a ``model.safetensors`` that is not the one saved with ``config_path`` (the config
    records its sha256). A config without the key (transformers', other tools') binds nothing; so does
    one transformers rewrote (it records ``transformers_version`` and copies the key, stale, along)."""
    recorded = hf_config.get(WEIGHTS_SHA256_KEY)
    if recorded is None or "transformers_version" in hf_config:
        return
    if not isinstance(recorded, str) or not re.fullmatch(r"[0-9a-f]{64}", recorded):
        raise CheckpointError(config_path, f"{WEIGHTS_SHA256_KEY} must be a sha256 (64 hex digits), got {recorded!r}")
    weights = config_path.with_name("model.safetensors")
    interrupted = ("the two files come from different saves: a save into this folder was interrupted between "
                   "them (or a file was replaced by hand); save the model again, or delete the "
                   f"{WEIGHTS_SHA256_KEY!r} entry from config.json to pair them anyway")
    if not os.path.lexists(weights):
        raise CheckpointError(config_path, f"records the sha256 of the model.safetensors saved with it, but the "
                                           f"folder has no model.safetensors; {interrupted}")
    digest = hashlib.sha256()
    with open_regular_file(weights) as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    found = digest.hexdigest()
    if found != recorded:
        raise CheckpointError(weights, f"does not match config.json (sha256 {found[:12]}..., config.json records "
                                       f"{recorded[:12]}...); {interrupted}")
