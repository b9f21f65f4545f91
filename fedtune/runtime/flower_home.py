"""What Flower's command-line tools need around them: their environment, a federation
entry in ``$FLWR_HOME/config.toml``, and the app directory ``flwr run`` bundles.

Used by :class:`~fedtune.runtime.deploy.LocalTrial` and by anyone driving ``flwr`` by hand
against a trial (``fedtune deploy start`` prints the commands).
"""

from __future__ import annotations

import os
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

FEDERATION = "fedtune-local"
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for Flower binaries: this venv's ``bin`` first, a private ``FLWR_HOME``."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def write_federation(flwr_home: Path, name: str, address: str, root_certificates: Path | None) -> Path:
    """Add (or replace) the connection ``name`` in ``$FLWR_HOME/config.toml`` and make it the default.

    ``root_certificates=None`` writes ``insecure = true`` (plain HTTP).  Flower 1.41 keeps
    connections there, not in ``pyproject.toml``.
    """
    path = Path(flwr_home) / "config.toml"
    data: dict[str, Any] = tomllib.loads(path.read_text()) if path.is_file() else {}
    links = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_certificates is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    links[name] = entry
    links["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def app_snapshot(app_dir: str | Path, dest: str | Path) -> Path:
    """Copy what the app's FAB carries (``pyproject.toml`` and its ``fab-include`` files) to ``dest``.

    ``flwr run <dir>`` walks *every* file under ``<dir>`` before filtering (Flower 1.41's
    ``collect_files``), a virtual environment included: ~7 CPU s per run for a repository
    with ``.venv/`` inside.  Running from a snapshot builds the same bundle in a fraction.
    """
    src, out = Path(app_dir).resolve(), Path(dest).resolve()
    project = tomllib.loads((src / "pyproject.toml").read_text())
    patterns = project.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    if not patterns:
        raise ValueError(f"{src / 'pyproject.toml'}: no [tool.flwr.app] fab-include to snapshot")
    files = {src / "pyproject.toml", *(p for p in [src / ".gitignore"] if p.is_file())}
    for pattern in patterns:
        files.update(p for p in src.glob(pattern) if p.is_file() and "__pycache__" not in p.parts)
    for path in files:
        target = out / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return out
