"""``dataset=hf``: every format in every file kind, splits, partitions, response-only masking,
the truncation policy, and bad input as one line before Ray (in-process, offline)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from data_testing import FILE_KINDS, data_files, data_path, one_torch_thread, plain_llama, tiny_llama  # noqa: F401
from hf_testing import DATA_FORMATS, examples, records
from fedtune.config import compose
from fedtune.data.chat_encoding import IGNORE
from fedtune.data.generative import GenerativeDataset
from fedtune.data.sources import TextDataset
from fedtune.errors import ConfigError
from fedtune.runtime.workspace import Workspace

CASES = [(f, k) for f in DATA_FORMATS for k in FILE_KINDS if not (f == "chat" and k == ".csv")]


def hf_config(model: Path | None, path: Path, fmt: str, *extra: str):  # type: ignore[no-untyped-def]
    chosen = f"model=hf model.path={model}" if model is not None else "model=tiny"
    return compose(f"{chosen} dataset=hf dataset.path={path} dataset.format={fmt} federation.num_clients=2 "
                   f"runtime.device=cpu {' '.join(extra)}")


@pytest.mark.parametrize("fmt,kind", CASES)
def test_every_format_and_file_kind_loads_the_same_examples(fmt: str, kind: str, data_files: Path,
                                                            tiny_llama: Path) -> None:
    cfg = hf_config(None if fmt == "text_label" else tiny_llama, data_path(data_files, fmt, kind), fmt)
    data = Workspace(cfg).data
    source = records(fmt, examples())
    topics = sorted({r["category"] for r in source})
    assert data.label_names == topics
    assert (len(data.train), len(data.test)) == (40, 8)  # 12 per topic, 2 of each (round(2.4)) tested
    if fmt == "text_label":
        assert isinstance(data, TextDataset)
        got = sorted(zip(data.train.texts + data.test.texts, data.train.labels + data.test.labels))
        assert got == sorted((r["text"], topics.index(r["label"])) for r in source)
        return
    assert isinstance(data, GenerativeDataset)
    responses = sorted(data.train.responses + data.test.responses)
    assert responses == sorted(r["category"] for r in source)  # every answer is its example's topic
    assert data.train.categories == [topics[y] for y in data.train.labels]
    first = source[0]
    expected_body = {"alpaca": lambda: first["input"], "chat": lambda: first["messages"][0]["content"],
                     "prompt_completion": lambda: first["prompt"]}[fmt]()
    assert expected_body in data.train.body + data.test.body


@pytest.mark.parametrize("builtin", ["csv", "tiny"])
def test_dataset_csv_and_tiny_are_presets_of_dataset_hf(builtin: str, data_files: Path) -> None:
    """``dataset=csv`` / ``dataset=tiny`` are dataset=hf's text_label with other defaults: the same
    config fields and the same examples as dataset=hf on the same file."""
    from fedtune.data.hf_dataset import HFDatasetConfig
    from fedtune.data.sources import TINY_FILE

    path = data_path(data_files, "text_label", ".csv") if builtin == "csv" else TINY_FILE
    where = f"dataset.path={path}" if builtin == "csv" else ""
    cfg = compose(f"model=tiny dataset={builtin} {where} dataset.max_train_examples=30")
    assert isinstance(cfg.dataset, HFDatasetConfig) and cfg.dataset.format == "text_label"
    theirs = Workspace(cfg).data
    ours = Workspace(hf_config(None, path, "text_label", "dataset.max_train_examples=30")).data
    assert (ours.train, ours.test, ours.label_names) == (theirs.train, theirs.test, theirs.label_names)
    with pytest.raises(ConfigError, match=rf"^dataset.format: .*dataset={builtin} is a classification file"):
        compose(f"model=tiny dataset={builtin} {where} dataset.format=alpaca")


def test_a_split_column_fixes_the_split(tmp_path: Path) -> None:
    """dataset=csv reads a ``split`` column's train / test marks instead of carving; a value
    other than those is a one-line error naming the field."""
    rows = [{"text": f"{t} words {i}", "label": t, "split": "test" if i % 4 == 0 else "train"}
            for i, t in enumerate(["sport", "food"] * 10)]
    path = tmp_path / "marked.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    data = Workspace(compose(f"model=tiny dataset=csv dataset.path={path} federation.num_clients=2")).data
    assert sorted(data.test.texts) == sorted(r["text"] for r in rows if r["split"] == "test")
    assert sorted(data.train.texts) == sorted(r["text"] for r in rows if r["split"] == "train")
    bad = tmp_path / "bad.csv"
    bad.write_text(path.read_text().replace(",test", ",dev", 1))
    with pytest.raises(ConfigError, match=r"^dataset.split_column: column 'split' of .* holds 'dev'; accepted values: "
                                          r"train, test$"):
        Workspace(compose(f"model=tiny dataset=csv dataset.path={bad} federation.num_clients=2")).data


def test_csv_cells_are_read_as_the_text_they_hold(tmp_path: Path) -> None:
    """Labels ``01`` and ``1`` stay two labels, and the text ``NA`` stays text (pandas' inference would not)."""
    path = tmp_path / "typed.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in [("NA", "01"), ("one", "1")] * 10))
    data = Workspace(compose(f"model=tiny dataset=csv dataset.path={path} federation.num_clients=2")).data
    assert data.label_names == ["01", "1"]
    assert sorted(set(data.train.texts + data.test.texts)) == ["NA", "one"]


def test_validation_split_is_carved_from_train_and_never_the_test_split(data_files: Path, tiny_llama: Path) -> None:
    path = data_path(data_files, "alpaca", ".jsonl")
    data = Workspace(hf_config(tiny_llama, path, "alpaca", "dataset.validation_fraction=0.25")).data
    assert (len(data.train), len(data.validation), len(data.test)) == (32, 8, 8)
    key = lambda s: set(zip(s.body, s.responses))  # noqa: E731
    assert not key(data.validation) & key(data.test) and not key(data.validation) & key(data.train)
    cfg = hf_config(tiny_llama, path, "alpaca", "dataset.validation_fraction=0.25", "eval.split=validation")
    assert len(Workspace(cfg).encoded("validation")) == 8
    with pytest.raises(ConfigError, match=r"^eval.split: validation needs .*dataset.validation_fraction"):
        hf_config(tiny_llama, path, "alpaca", "eval.split=validation")


@pytest.mark.parametrize("name", ["tiny", "bbc_news"])
def test_a_builtin_dataset_carves_validation_from_train_and_zero_changes_nothing(name: str) -> None:
    """``dataset.validation_fraction`` on the built-in datasets is dataset=hf's carve: 0 keeps
    train and test exactly the seeded stratified split; F > 0 takes a stratified share of
    the training split only, the test split untouched, and eval.split=validation scores it."""
    import numpy as np

    from fedtune.data.sources import TINY_FILE, read_bbc_news, stratified_split

    if name == "tiny":
        rows = [json.loads(line) for line in TINY_FILE.read_text().splitlines()]
        names = sorted({r["label"] for r in rows})
        texts, labels = [r["text"] for r in rows], [names.index(r["label"]) for r in rows]
    else:
        texts, labels, _ = read_bbc_news()
    train_idx, test_idx = stratified_split(labels, 0.2, 0)
    plain = Workspace(compose(f"model=tiny dataset={name}")).data
    assert plain.train.texts == [texts[i] for i in train_idx] and plain.test.texts == [texts[i] for i in test_idx]
    assert len(plain.validation) == 0
    cfg = compose(f"model=tiny dataset={name} dataset.validation_fraction=0.2 eval.split=validation")
    carved = Workspace(cfg).data
    assert (carved.test.texts, carved.test.labels) == (plain.test.texts, plain.test.labels)
    assert sorted(carved.train.texts + carved.validation.texts) == sorted(plain.train.texts)
    assert not set(carved.train.texts) & set(carved.validation.texts)
    per_class = np.bincount(plain.train.labels)
    assert np.bincount(carved.validation.labels).tolist() == [int(round(0.2 * n)) for n in per_class]
    assert len(Workspace(cfg).encoded("validation")) == len(carved.validation)


def test_a_named_test_split_is_used_as_is(tmp_path: Path, tiny_llama: Path) -> None:
    import datasets

    rows = records("prompt_completion", examples(24))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:20]), "eval": datasets.Dataset.from_list(rows[20:])}
                         ).save_to_disk(str(tmp_path / "dd"))
    data = Workspace(hf_config(tiny_llama, tmp_path / "dd", "prompt_completion", "dataset.test_split=eval")).data
    assert sorted(data.test.body) == sorted(r["prompt"] for r in rows[20:]) and len(data.train) == 20
    with pytest.raises(ConfigError, match=r"^dataset.test_split: no split 'nope'; splits present: eval, train$"):
        Workspace(hf_config(tiny_llama, tmp_path / "dd", "prompt_completion", "dataset.test_split=nope")).data


def test_dataset_subset_picks_a_named_configuration_and_is_refused_on_one_table(tmp_path: Path, tiny_llama: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # a folder laid out as a hub dataset repository: a README whose front matter names two configurations
    repo = tmp_path / "repo"
    repo.mkdir()
    rows = records("prompt_completion", examples(24))
    parts = {"main": rows[:12], "socratic": rows[12:]}
    for name, part in parts.items():
        (repo / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: main\n  data_files: main.jsonl\n"
                                    "- config_name: socratic\n  data_files: socratic.jsonl\n---\n")
    for name, part in parts.items():
        data = Workspace(hf_config(tiny_llama, repo, "prompt_completion", f"dataset.subset={name}",
                                   "dataset.test_fraction=0.25")).data
        assert sorted([*data.train.body, *data.test.body]) == sorted(r["prompt"] for r in part), name
    table = tmp_path / "main.jsonl"
    table.write_text((repo / "main.jsonl").read_text())
    with pytest.raises(ConfigError, match=r"^dataset.subset: 'main' names a hub dataset's configuration, but .*"
                                          r"main.jsonl is one local table already; set dataset.subset=''$"):
        Workspace(hf_config(tiny_llama, table, "prompt_completion", "dataset.subset=main")).data
    monkeypatch.chdir(tmp_path)  # a hub id must not match a local folder
    with pytest.raises(ConfigError, match=r"load_dataset\('openai/gsm8k', 'main'\)\.save_to_disk\('DIR'\)\"\) "
                                          r"and set dataset.path=DIR and dataset.subset=''"):
        Workspace(hf_config(tiny_llama, "openai/gsm8k", "prompt_completion", "dataset.subset=main")).data


def test_natural_partitions_by_category_with_heldout_values(data_files: Path, tiny_llama: Path) -> None:
    path = data_path(data_files, "chat", ".jsonl")
    cfg = hf_config(tiny_llama, path, "chat", "partition.kind=label", "partition.by=category",
                    "federation.num_clients=2", "dataset.heldout=[music,travel]")
    ws = Workspace(cfg)
    cats = ws.data.train.categories
    parts = [sorted({cats[i] for i in p}) for p in ws.partitions()]
    assert sorted(parts) == [["food"], ["sports"]]  # one value per client; held-out values reach nobody
    assert sorted(set(ws.data.heldout["test"].categories)) == ["music", "travel"]
    assert not {"music", "travel"} & set(ws.data.test.categories)
    dirichlet = Workspace(hf_config(tiny_llama, path, "chat", "partition.kind=dirichlet", "partition.by=category",
                                    "partition.alpha=1.0", "partition.min_partition_size=2")).partitions()
    assert sorted(i for p in dirichlet for i in p) == list(range(40))


def _pieces(tokenizer, ids: list[int]) -> str:  # type: ignore[no-untyped-def]
    return tokenizer.decode(ids)


@pytest.mark.parametrize("template", [True, False])
def test_labels_are_exactly_the_response_tokens_and_eos(template: bool, data_files: Path, tiny_llama: Path,
                                                        plain_llama: Path) -> None:
    model = tiny_llama if template else plain_llama
    ws = Workspace(hf_config(model, data_path(data_files, "alpaca", ".jsonl"), "alpaca"))
    enc, tok = ws.encoded("train"), ws.encoded("test").tokenizer
    for row in range(len(enc)):
        response = ws.data.train.responses[row]
        want = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = enc.labels[row].tolist()
        assert [t for t in labels if t != IGNORE] == want
        assert labels[-len(want):] == want and all(t == IGNORE for t in labels[:-len(want)])
        assert enc.input_ids[row, -len(want):].tolist() == want  # the sequence ends with the response
        prompt = _pieces(tok, enc.input_ids[row][enc.attention_mask[row].bool()].tolist()[:-len(want)])
        if template:
            assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and ws.data.train.body[row] in prompt
        else:
            assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
            assert f"### Input:\n{ws.data.train.body[row]}" in prompt


def test_truncation_cuts_the_input_keeps_the_template_tail_and_caps_the_response(tmp_path: Path,
                                                                                tiny_llama: Path) -> None:
    import json

    long_input = " ".join(["goal team match"] * 40)
    rows = [{"instruction": "Which topic is this about?", "input": long_input, "output": "sports " * 30}] * 10
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ws = Workspace(hf_config(tiny_llama, path, "alpaca", "model.max_length=48", "dataset.max_response_tokens=6",
                             "dataset.test_fraction=0.2"))
    enc, tok = ws.encoded("train"), ws.encoded("test").tokenizer
    ids = enc.input_ids[0][enc.attention_mask[0].bool()].tolist()
    assert len(ids) == 48
    response = [t for t in enc.labels[0].tolist() if t != IGNORE]
    full = tok("sports " * 30, add_special_tokens=False)["input_ids"]
    assert response == full[:6]  # capped: the first 6 tokens and no EOS
    prompt = tok.decode(ids[:-6])
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")  # the template's tail survives
    assert "Which topic is this about?\n\ngoal team" in prompt  # the instruction whole, the input cut from its end
    with pytest.raises(ConfigError, match=r"^model.max_length: 8 tokens do not hold"):
        Workspace(hf_config(tiny_llama, path, "alpaca", "model.max_length=8")).encoded("train")


def _line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_line_naming_the_field(data_files: Path, tiny_llama: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    alpaca = data_path(data_files, "alpaca", ".jsonl")
    cases = {
        "dataset.fields.output: column 'response' not in split 'train'": ("alpaca", alpaca, "dataset.fields.output=response"),
        "dataset.fields.messages: column 'messages' not in": ("chat", alpaca, ""),
        "dataset.path: no such file or folder": ("alpaca", tmp_path / "none.jsonl", ""),
        "dataset.path: 'someone/dolly' is not a local file or folder and the hub is offline": ("alpaca", "someone/dolly", ""),
        "dataset.heldout: 'nope' is no value of column 'category'": ("alpaca", alpaca, "dataset.heldout=[nope]"),
        "partition: client 1 gets no examples": ("alpaca", alpaca, "partition.kind=dirichlet partition.by=category "
                                                 "partition.min_partition_size=0 partition.alpha=0.01 federation.num_clients=30"),
    }
    monkeypatch.chdir(tmp_path)  # a hub id must not match a local folder
    for want, (fmt, path, extra) in cases.items():
        with pytest.raises(ConfigError) as exc:
            Workspace(hf_config(tiny_llama, path, fmt, *extra.split())).partitions()
        assert _line(exc).startswith(want), _line(exc)
        if "columns present" in _line(exc) or "fields" in want:
            assert "columns present: instruction, input, output, category" in _line(exc)
    with pytest.raises(ConfigError) as exc:
        hf_config(tiny_llama, alpaca, "sharegpt")
    assert _line(exc).startswith("dataset.format: unknown 'sharegpt'; accepted: alpaca, chat, prompt_completion")


@pytest.mark.parametrize("extra,want", [
    ("dataset.format=alpaca dataset.fields.output=response", "dataset.fields.output: column 'response'"),
    ("dataset.format=alpaca dataset.path=someone/dolly", "dataset.path: 'someone/dolly' is not a local"),
])
def test_cli_refuses_bad_data_before_ray_and_leaves_no_run_directory(extra: str, want: str, data_files: Path,
                                                                    tiny_llama: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    import sys

    from fedtune.cli import main

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    args = ["run", "model=hf", f"model.path={tiny_llama}", "dataset=hf",
            f"dataset.path={data_path(data_files, 'alpaca', '.jsonl')}", *extra.split(), f"hydra.run.dir={run_dir}"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fedtune: error: {want}"), err
    assert not run_dir.exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_simulate_refuses_bad_data_before_ray_starts(data_files: Path, tiny_llama: Path, tmp_path: Path) -> None:
    import sys

    from fedtune.runtime.simulation import simulate

    chat_csv = tmp_path / "chat.csv"
    chat_csv.write_text('messages,category\n"[{\'role\': \'user\'}]",food\n')
    for path, fmt, want in ((data_path(data_files, "alpaca", ".jsonl"), "prompt_completion",
                             "dataset.fields.prompt: column 'prompt' not in"),
                            (chat_csv, "chat", "dataset.fields.messages: row 0 of column 'messages' is not a list")):
        with pytest.raises(ConfigError) as exc:
            simulate(hf_config(tiny_llama, path, fmt), tmp_path / "run")
        assert _line(exc).startswith(want), _line(exc)
    assert not (tmp_path / "run").exists()
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
