"""Pretrained GPT-2 by name: ``from_pretrained("gpt2")`` as transformers takes it, ``"124M"`` as the seed does.

A name is resolved, in this order, to

1. a local checkpoint at that path (a folder or file named ``gpt2`` in the
   working directory wins, as a path always has);
2. the seed's ``models_dir`` (``download_and_load_gpt2(model_size, models_dir)``;
   its default is a folder named ``gpt2`` holding ``124M/``, ``355M/``, ...):
   ``<models_dir>/<size>/`` with OpenAI's TensorFlow files. A folder of size
   subfolders is the seed's ``models_dir``, never a checkpoint itself;
3. the Hugging Face cache, through ``huggingface_hub``, with no network (weights
   a user already fetched with transformers are found there);
4. only when asked (``download=True``, ``fastgpt generate --download``): a
   download through ``huggingface_hub`` (its progress bar, its checksums, its
   cache), of ``config.json`` and ``model.safetensors`` only.

Offline, a name found nowhere is a ``FileNotFoundError`` that says where it
looked and how to download. ``huggingface_hub`` is optional (transformers
brings it; ``pip install 'fastgpt[hub]'``): without it steps 3 and 4 say so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

# Hugging Face's names and the seed's sizes of the four released GPT-2 models.
HUB_NAMES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
SEED_SIZES = {size: name for name, size in HUB_NAMES.items()}
# The files fetched from the hub: fastgpt reads a Hugging Face folder from these two.
HUB_FILES = ["config.json", "model.safetensors"]
HUB_EXTRA = "pip install 'fastgpt[hub]' (or pip install huggingface_hub)"


def is_pretrained_name(name) -> bool:
    return isinstance(name, str) and (name in HUB_NAMES or name in SEED_SIZES)


def is_seed_models_dir(path: Path) -> bool:
    """A folder of the seed's size subfolders (124M/, 355M/, ...) and no checkpoint files of its own."""
    if not path.is_dir() or (path / "config.json").exists() or (path / "hparams.json").exists():
        return False
    return any((path / size).is_dir() for size in SEED_SIZES)


def resolve_checkpoint(path_or_name, *, models_dir=None, download: bool = False) -> Path:
    """The local checkpoint ``path_or_name`` stands for (see the module's docstring), or FileNotFoundError."""
    path = Path(path_or_name)  # TypeError for what is no path, as before
    name = str(path_or_name)
    if not is_pretrained_name(name):
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist" + (
                "" if not download else f"; download=True fetches the released GPT-2 by name: "
                                        f"{', '.join(HUB_NAMES)} or {', '.join(SEED_SIZES)}"))
        if is_seed_models_dir(path):
            sizes = [size for size in SEED_SIZES if (path / size).is_dir()]
            raise FileNotFoundError(f"{path} is the seed's models_dir (a folder of size subfolders: "
                                    f"{', '.join(sizes)}), not a checkpoint: pass {path / sizes[0]}, or a size "
                                    f"with models_dir={str(path)!r}")
        return path
    if path.exists() and not is_seed_models_dir(path):
        return path  # 1. a local checkpoint by that name
    size, hub_name = (HUB_NAMES[name], name) if name in HUB_NAMES else (name, SEED_SIZES[name])
    looked = [f"{path.resolve()} (no such checkpoint)" if not path.exists() else None]

    # 2. The seed's models_dir.
    seed_dir = Path("gpt2" if models_dir is None else models_dir)
    candidate = seed_dir / size
    if (candidate / "hparams.json").exists():
        return candidate
    looked.append(f"{candidate.resolve()} (the seed's models_dir{'' if models_dir else ', its default'}; "
                  "pass models_dir=... for another)")

    # 3. The Hugging Face cache, offline.
    try:
        import huggingface_hub
    except ImportError:
        huggingface_hub = None
        looked.append(f"not the Hugging Face cache: huggingface_hub is not installed ({HUB_EXTRA})")
    if huggingface_hub is not None:
        for repo_id in (hub_name, f"openai-community/{hub_name}"):
            found = _cached_snapshot(huggingface_hub, repo_id)
            if found is not None:
                return found
        looked.append(f"the Hugging Face cache {_cache_dir() or huggingface_hub.constants.HF_HUB_CACHE} "
                      f"({hub_name} or openai-community/{hub_name}, with config.json and model weights)")

    # 4. A download, only when asked.
    if download:
        if huggingface_hub is None:
            raise ModuleNotFoundError(f"downloading {hub_name} needs huggingface_hub: {HUB_EXTRA}")
        folder = Path(huggingface_hub.snapshot_download(hub_name, allow_patterns=HUB_FILES, cache_dir=_cache_dir(),
                                                        endpoint=os.environ.get("HF_ENDPOINT") or None))
        missing = [file for file in HUB_FILES if not (folder / file).exists()]
        if missing:
            raise FileNotFoundError(f"downloaded {hub_name} to {folder}, but the hub sent no {', '.join(missing)}")
        return folder
    where = "\n  ".join(filter(None, looked))
    raise FileNotFoundError(f"GPT-2 {name!r} ({hub_name if name != hub_name else size}) was not found offline. "
                            f"Looked in:\n  {where}\n"
                            f"To download it (about {_DOWNLOAD_SIZES[size]}) from the Hugging Face hub: "
                            f"from_pretrained({name!r}, download=True), or fastgpt generate ... --checkpoint {name} "
                            "--download")


_DOWNLOAD_SIZES = {"124M": "0.5 GB", "355M": "1.5 GB", "774M": "3.2 GB", "1558M": "6.4 GB"}


def _cache_dir() -> Optional[str]:
    """The hub cache the environment names now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _cached_snapshot(huggingface_hub, repo_id: str) -> Optional[Path]:
    """The cached snapshot of ``repo_id`` (its main revision) holding a config and weights, or None."""
    # One weights format at a time: the cache may list files of the repository never fetched.
    for weights in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"):
        try:
            folder = Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True, cache_dir=_cache_dir(),
                                                            allow_patterns=["config.json", weights]))
        except Exception:  # not cached (LocalEntryNotFoundError), or not whole: not found there
            continue
        if (folder / "config.json").exists() and (folder / weights).exists():
            return folder
    return None
