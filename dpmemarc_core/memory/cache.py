"""Simulated step peaks kept on disk, keyed by everything that decides them.

A meta-device simulation of GPT-2-large takes 2-10 CPU-seconds; the planner asks for a dozen of them
and asks again each time a user tries another budget. A result is stored under a key made of the
measurement's settings, the config file's bytes (for a config given by path), and a fingerprint of the
code that computes it (this package's sources and the installed torch / transformers / peft / opacus
versions), so any change to the step, the model code or the config misses the cache instead of reading
a stale figure. Only simulations are cached: a measurement on a real device is a fact about that run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from functools import lru_cache
from importlib import metadata
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # dpmemarc_core/
_VERSIONED = ("torch", "transformers", "peft", "opacus")
# Sources a simulated step never runs (commands, data, evaluation, federation, the audit, the planner): an
# edit there keeps the cache. Everything else, new modules included, is part of the key.
_NOT_IN_THE_STEP = ("cli/*.py", "data.py", "site_data.py", "metrics.py", "federated/*.py", "offline.py",
                    "training/presets.py", "training/export.py", "memory/plan.py", "memory/cache.py", "audit.py",
                    "privacy/audit_bound.py", "methods/side/generate.py")


def cache_root() -> Path:
    """`$DPMEMARC_CACHE/memory` (default ~/.cache/dpmemarc/memory)."""
    base = Path(os.environ.get("DPMEMARC_CACHE") or Path.home() / ".cache" / "dpmemarc").expanduser()
    return base / "memory"


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the package sources a simulated step runs (their code, not comments or docstrings) and of the
    shipped configs, and of the versions of the libraries it runs through."""
    digest = hashlib.sha256()
    skipped = {path for pattern in _NOT_IN_THE_STEP for path in _PACKAGE_DIR.glob(pattern)}
    for path in sorted({*_PACKAGE_DIR.rglob("*.py"), *_PACKAGE_DIR.rglob("*.json")} - skipped):
        digest.update(str(path.relative_to(_PACKAGE_DIR)).encode())
        digest.update(_code_of(path))
    for name in _VERSIONED:
        try:
            digest.update(f"{name}={metadata.version(name)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name}=absent".encode())
    return digest.hexdigest()


def _code_of(path: Path) -> bytes:
    """A Python source's syntax tree without its docstrings (comments never reach the tree), so rewording either
    keeps every cached simulation; any other file's bytes."""
    if path.suffix != ".py":
        return path.read_bytes()
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            del body[0]
    return ast.dump(tree).encode()


def _model_bytes(model: str) -> str:
    """A config given by path is keyed by its content (the same name can hold another config tomorrow)."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return ""


def cache_key(settings: dict) -> str:
    """The key of one simulation: its settings (JSON-able values), the model config's bytes, the code."""
    payload = json.dumps({"settings": settings, "config": _model_bytes(str(settings.get("model", ""))),
                          "code": code_fingerprint()}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def cached(settings: dict, compute: Callable[[], dict]) -> dict:
    """`compute()`'s result for `settings`, read from the cache when an earlier run stored it.

    A cache that cannot be written (read-only home, full disk) only costs the re-computation next time.
    """
    path = cache_root() / f"{cache_key(settings)}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    result = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: two planners filling the cache at once never read half a file.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            json.dump(result, handle, default=str)
        os.replace(handle.name, path)
    except OSError:
        pass
    return result
