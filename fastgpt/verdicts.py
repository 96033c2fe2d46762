"""The per-user file of measured ``auto`` verdicts (``fastgpt.trust``), shared by every process.

Where: ``FASTGPT_VERDICTS=path`` if set (``off`` disables the file), else
``$XDG_CACHE_HOME/fastgpt/verdicts.json`` or ``~/.cache/fastgpt/verdicts.json``.
Read lazily at first use (and again when the variable changes). Writes lock a
sibling ``.lock`` file, re-read the file and merge its entries with this
process's, then write a temporary file and ``os.replace`` it: two processes
never lose each other's verdicts, and a crash never leaves half a file. A
corrupt or foreign file gives one warning and is ignored (and left as it is),
never an error.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from contextlib import contextmanager
from typing import Optional

VERDICTS_ENV = "FASTGPT_VERDICTS"
FORMAT = "fastgpt-verdicts-1"


def cache_path() -> Optional[str]:
    """The file in use, or None when disabled (``FASTGPT_VERDICTS=off``)."""
    value = os.environ.get(VERDICTS_ENV, "").strip()
    if value.lower() == "off":
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastgpt", "verdicts.json")


class _Unusable(Exception):
    pass


def _read(path: str) -> dict:
    """The entries of ``path``: {} when it does not exist; _Unusable when it is not ours."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise _Unusable(f"{type(error).__name__}: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("verdicts"), dict):
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise _Unusable(f"format {found!r}, expected {FORMAT!r}")
    return {k: v for k, v in data["verdicts"].items() if isinstance(k, str) and isinstance(v, dict)}


@contextmanager
def _locked(path: str):
    try:
        import fcntl
    except ImportError:  # Windows: os.replace still keeps the file whole
        yield
        return
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class VerdictStore:
    """This process's view of the verdict file: ``get``, ``put``, ``entries``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._path: Optional[str] = None
        self._loaded = False
        self._entries: dict = {}
        self._unusable: set = set()   # paths found corrupt or foreign: warned once, never written

    def _ensure(self) -> Optional[str]:
        path = cache_path()
        if not self._loaded or path != self._path:
            self._path, self._loaded, self._entries = path, True, {}
            if path is not None:
                self._entries = self._read_or_warn(path)
        return path

    def _read_or_warn(self, path: str) -> dict:
        try:
            return _read(path)
        except _Unusable as problem:
            if path not in self._unusable:
                self._unusable.add(path)
                warnings.warn(f"fastgpt: the verdict cache {path} is not a fastgpt verdict file ({problem}); it is "
                              f"ignored and left as it is: delete it, or set {VERDICTS_ENV} to another path "
                              "(or off)", RuntimeWarning, stacklevel=4)
            return {}

    @property
    def path(self) -> Optional[str]:
        with self._lock:
            return self._ensure()

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            self._ensure()
            return self._entries.get(key)

    def entries(self) -> dict:
        with self._lock:
            self._ensure()
            return dict(self._entries)

    def put(self, key: str, entry: dict) -> None:
        """Record one verdict here and in the file (merged with what other processes wrote)."""
        self.put_many({key: entry})

    def put_many(self, new: dict) -> None:
        with self._lock:
            path = self._ensure()
            self._entries.update(new)
            if path is None or path in self._unusable:
                return
            folder = os.path.dirname(path)
            try:
                os.makedirs(folder, exist_ok=True)
                with _locked(path):
                    on_disk = self._read_or_warn(path)
                    if path in self._unusable:
                        return
                    merged = {**on_disk, **self._entries}
                    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp",
                                                     encoding="utf-8") as f:
                        json.dump({"format": FORMAT, "verdicts": dict(sorted(merged.items()))}, f, indent=1)
                    os.replace(f.name, path)
                    self._entries = merged
            except OSError as error:
                if path not in self._unusable:
                    self._unusable.add(path)
                    warnings.warn(f"fastgpt: cannot write the verdict cache {path} ({error}); verdicts stay in "
                                  "this process", RuntimeWarning, stacklevel=4)


_store = VerdictStore()


def store() -> VerdictStore:
    return _store


def reset() -> None:
    """Forget what was read (tests): the next use reads the file again."""
    global _store
    _store = VerdictStore()
