"""Read ``dataset.path`` with the ``datasets`` library: local files, a folder, or a hub id.

``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` files go through ``datasets``' packaged
builders of those names (a CSV's cells read as the text they hold); a folder written by ``save_to_disk`` through ``load_from_disk``;
any other folder through ``load_dataset(folder)`` (which infers the builder from its
files); anything else is taken for a hub id, read with its configuration ``dataset.subset``
when one is named (GSM8K's ``main``).  Every failure a user can cause (a path
that does not exist, a hub id while the hub is unreachable or ``HF_DATASETS_OFFLINE=1``,
a split that is not there) is a one-line :class:`~fedtune.errors.ConfigError` naming
``dataset.path`` or the split field, raised where the data is first read: before Ray.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _fetch_hint(hub_id: str, subset: str = "") -> str:
    name = f", '{subset}'" if subset else ""
    then = " and dataset.subset=''" if subset else ""
    return (f"fetch it where the hub is reachable (python -c \"import datasets; datasets.load_dataset('{hub_id}'{name})"
            f".save_to_disk('DIR')\") and set dataset.path=DIR{then}, or give a local file")


def read_splits(path: str, revision: str = "", subset: str = "") -> dict[str, Any]:
    """``{split name: datasets.Dataset}`` of ``path`` (a single file or table is split ``train``).

    ``subset`` is a hub dataset's configuration name; a local file or a ``save_to_disk``
    folder holds one table already, so naming one there is refused rather than ignored.
    """
    import datasets

    datasets.disable_progress_bars()
    local = Path(path).expanduser()
    saved = local.is_dir() and ((local / "dataset_info.json").is_file() or (local / "dataset_dict.json").is_file())
    if subset and (local.is_file() or saved):
        raise ConfigError(f"dataset.subset: {subset!r} names a hub dataset's configuration, but {local} is one "
                          "local table already; set dataset.subset=''")
    if local.is_file():
        builder = FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ConfigError(f"dataset.path: {local} is not a data file this reads; accepted: "
                              f"{', '.join(FILE_BUILDERS)} files or a folder")
        options = _csv_as_text(local) if builder == "csv" else {}
        return _as_dict(_load(lambda: datasets.load_dataset(builder, data_files=str(local), **options), local))
    if saved:
        return _as_dict(_load(lambda: datasets.load_from_disk(str(local)), local))
    if local.is_dir():
        return _as_dict(_load(lambda: datasets.load_dataset(str(local), subset or None), local))
    if not _HUB_ID.match(path) or Path(path).suffix.lower() in FILE_BUILDERS:
        raise ConfigError(f"dataset.path: no such file or folder: {local}")
    if _offline():
        raise ConfigError(f"dataset.path: {path!r} is not a local file or folder and the hub is offline "
                          f"(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE=1); {_fetch_hint(path, subset)}")
    try:
        return _as_dict(datasets.load_dataset(path, subset or None, revision=revision or None))
    except (ConnectionError, OSError) as exc:
        raise ConfigError(f"dataset.path: cannot reach the hub for {path!r} ({type(exc).__name__}); "
                          f"{_fetch_hint(path, subset)}") from None
    except Exception as exc:  # noqa: BLE001  (datasets raises its own DatasetNotFoundError etc.)
        raise ConfigError(f"dataset.path: {path!r} is not a local file or folder, nor a hub dataset "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def _csv_as_text(path: Path) -> dict[str, Any]:
    """Read every CSV cell as the text it holds: pandas would turn labels ``01`` into ``1``,
    a label column with a gap into floats (``1.0``) and the text ``NA`` into a missing value."""
    import datasets

    with open(path, newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False}


def _load(read: Any, where: Path) -> Any:
    try:
        return read()
    except Exception as exc:  # noqa: BLE001  (pyarrow / json parse errors: say which file)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"dataset.path: cannot read {where} ({first})") from None


def _as_dict(loaded: Any) -> dict[str, Any]:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def pick_split(splits: dict[str, Any], name: str, field_name: str) -> Any:
    """The split ``name`` of ``splits``, or a one-line error naming ``field_name`` and the splits present."""
    if name not in splits:
        raise ConfigError(f"{field_name}: no split {name!r}; splits present: {', '.join(sorted(splits))}")
    return splits[name]
