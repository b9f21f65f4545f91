"""Session fixtures for the ``dataset=hf`` tests: tiny checkpoints and data files, built once.

Import the fixtures into a test module (``from data_testing import data_files, tiny_llama``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_testing import DATA_FORMATS, save_tiny_model, write_dataset

FILE_KINDS = (".json", ".jsonl", ".csv", ".parquet", "")  # "": a save_to_disk folder


def data_path(root: Path, fmt: str, kind: str) -> Path:
    return root / (f"{fmt}{kind}" if kind else f"{fmt}_saved")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with a ChatML chat template."""
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def plain_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same Llama whose tokenizer has no chat template (the Alpaca prompt)."""
    return save_tiny_model(tmp_path_factory.mktemp("plain_llama"), "llama", chat_template=False)


@pytest.fixture(scope="session")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 examples in every format and file kind (CSV cannot hold chat messages)."""
    root = tmp_path_factory.mktemp("hf_data")
    for fmt in DATA_FORMATS:
        for kind in FILE_KINDS:
            if not (fmt == "chat" and kind == ".csv"):
                write_dataset(data_path(root, fmt, kind), fmt)
    return root


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():  # type: ignore[no-untyped-def]
    """Tiny models gain nothing from intra-op threads, and on a shared machine they lose a lot
    (every op waits for busy cores): one thread for the module, then what it was."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
