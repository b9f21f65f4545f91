"""``model=hf``: tiny random Llama/Qwen2/GPT-2/BERT checkpoints loaded through the one
loading path, LoRA with peft's default targets, bf16 and gradient checkpointing on CPU,
bitsandbytes 4-bit (one real Ray round) and 8-bit, one matching rule for every method,
and every bad model input refused in one line before Ray starts.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from conftest import on_shared_ray
import torch
from hf_testing import ARCHITECTURES, save_tiny_model
from method_testing import run_method, task_identity  # noqa: F401  (a fixture)

from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.evaluation import evaluate
from fedtune.models.preflight import preflight
from fedtune.models.state import load_trainable_state
from fedtune.registry import METHODS, MODELS
from fedtune.runtime.workspace import Workspace

INSTRUCT = ("dataset=bbc_instruct dataset.categories=[business,sports,tech] federation.num_clients=2 "
            "model.max_length=160 dataset.max_train_examples=40 eval.max_examples=4 train.batch_size=2 "
            "eval.batch_size=4 train.local_steps=1 num_rounds=1 runtime.device=cpu").split()
CLASSIFY = "dataset=tiny model.max_length=32 federation.num_clients=2 train.batch_size=4 num_rounds=1 runtime.device=cpu".split()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-checkpoints")
    return {arch: save_tiny_model(root / arch, arch) for arch in ARCHITECTURES}


def overrides(path: Path, *extra: str) -> list[str]:
    task = CLASSIFY if path.name == "bert" else INSTRUCT
    return ["model=hf", f"model.path={path}", *task, *extra]


def adapted(model: torch.nn.Module) -> set[str]:
    """Names (under the HF model) of the modules an adapter wraps: peft's or LoRA-SB's."""
    names = {n for n, _ in model.named_modules() if n.endswith((".lora_A", ".sb_R"))}
    return {n.rsplit(".", 1)[0].removeprefix("base_model.model.").removeprefix("model.", ) for n in names}


def lora_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """One AdamW step on the trainable parameters: ``(loss, {name: change})``."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss), {n: p.detach() - before[n] for n, p in params.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_trains_lora_on_peft_default_targets(arch: str, checkpoints: dict[str, Path]) -> None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    ws = Workspace(compose(overrides(checkpoints[arch])))
    assert ws.cfg.model.lora.target_modules == "auto"
    model = ws.model()
    suffixes = {n.rsplit(".", 1)[-1] for n in adapted(model)}
    assert suffixes == set(DEFAULTS[arch]), suffixes  # GPT-2: c_attn, a Conv1D (fan_in_fan_out)
    loss, change = lora_step(model, ws.encoded("train").batch(torch.arange(2)))
    assert torch.isfinite(torch.tensor(loss))
    assert any(".lora_B." in n and c.abs().sum() > 0 for n, c in change.items())
    if arch == "gpt2":
        with pytest.raises(ConfigError, match=r"^model.lora.target_modules: .*c_attn is a Conv1D.*use a peft LoRA"):
            preflight(compose(overrides(checkpoints[arch], "strategy=fed_sb", "strategy.rank=4")))


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_runs_a_round_on_a_causal_lm(name: str, checkpoints: dict[str, Path],
                                                  task_identity: None) -> None:
    """Each method, one in-process round on the tiny Llama (a head-less causal LM: FLoRA's
    global state is empty until its first merge)."""
    quick = [q for q in METHODS.get(name).quick if not q.startswith("model.")]  # quick's model.* are model=tiny's
    run = run_method(name, [*overrides(checkpoints["llama"]), *quick], 1)
    assert len(run.rounds[1].updates) == 2


def test_bf16_base_trains_an_fp32_adapter_on_cpu(checkpoints: dict[str, Path]) -> None:
    ws = Workspace(compose(overrides(checkpoints["llama"], "model.dtype=bfloat16")))
    model = ws.model()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}  # peft keeps adapters in fp32
    loss, change = lora_step(model, ws.encoded("train").batch(torch.arange(2)))
    assert torch.isfinite(torch.tensor(loss)) and any(c.abs().sum() > 0 for c in change.values())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(checkpoints: dict[str, Path]) -> None:
    results = []
    for flag in ("false", "true"):
        ws = Workspace(compose(overrides(checkpoints["llama"], f"model.gradient_checkpointing={flag}")))
        model = ws.model()
        load_trainable_state(model, ws.initial_arrays())  # the cached model may have trained before
        base = model.get_base_model()
        assert base.is_gradient_checkpointing == (flag == "true")
        model.train()
        loss = model(**ws.encoded("train").batch(torch.arange(2))).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
        model.eval()
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss0, loss1)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-5, atol=1e-7)


def test_8bit_base_trains_a_lora_adapter(checkpoints: dict[str, Path]) -> None:
    ws = Workspace(compose(overrides(checkpoints["llama"], "model.quantization=8bit")))
    model = ws.model()
    assert model.get_base_model().is_loaded_in_8bit
    loss, change = lora_step(model, ws.encoded("train").batch(torch.arange(2)))
    assert torch.isfinite(torch.tensor(loss)) and any(c.abs().sum() > 0 for c in change.values())


def test_4bit_qlora_round_on_ray_and_its_adapter_reloads(checkpoints: dict[str, Path], tmp_path: Path,
                                                       ray_address: str) -> None:
    from fedtune.runtime.simulation import simulate

    cfg = compose(overrides(checkpoints["llama"], "strategy=fedavg_lora", "model.quantization=4bit",
                            *on_shared_ray(ray_address).split()))
    summary = simulate(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["client_failures"] == 0
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv", newline="")))
    assert [int(r["num_replies"]) for r in rows[1:]] == [2]
    ws = Workspace(cfg)
    base = MODELS.get("hf").build(cfg.model, ws.data.num_labels, cfg.seed)
    assert base.is_loaded_in_4bit and base.config.quantization_config.bnb_4bit_quant_type == "nf4"
    model = METHODS.get("fedavg_lora").export.load(base, tmp_path / "adapter")
    loss, acc = evaluate(model, ws.encoded("test"), cfg.eval.batch_size, ws.device, cfg.eval.max_examples)
    assert loss == pytest.approx(float(rows[-1]["eval_loss"]), abs=1e-5)
    assert acc == pytest.approx(summary["final_accuracy"], abs=5e-7)


def test_fed_sb_and_fedavg_lora_adapt_the_same_modules(checkpoints: dict[str, Path]) -> None:
    targets = "model.lora.target_modules=[query,intermediate.dense]"
    found = {}
    for method in ("fedavg_lora", "fed_sb"):
        cfg = compose(overrides(checkpoints["bert"], f"strategy={method}", targets, "strategy.rank=4"
                                if method == "fed_sb" else "strategy.weighting=examples"))
        preflight(cfg)
        found[method] = adapted(Workspace(cfg).model())
    assert found["fed_sb"] == found["fedavg_lora"]
    assert sorted({n.split(".", 4)[-1] for n in found["fed_sb"]}) == ["attention.self.query", "intermediate.dense"]
    assert len(found["fed_sb"]) == 4  # 2 layers × 2 targets


def test_quantized_base_is_a_declared_capability() -> None:
    for name in METHODS.names():
        support = METHODS.get(name).capabilities.quantized_base
        assert support.reason.strip(), name
    assert {n for n in METHODS.names() if METHODS.get(n).capabilities.quantized_base.ok} >= {"fedavg_lora"}


def one_line(overrides_: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError) as err:
        preflight(compose(overrides_))
    assert "\n" not in str(err.value)
    assert err.match(pattern)


def test_bad_model_input_is_one_line_before_ray(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    one_line(["model=hf", "model.path=made-up-org/no-such-model", *CLASSIFY],
             r"^model.path: cannot load hub id 'made-up-org/no-such-model': HF_HUB_OFFLINE=1 .*"
             r"`hf download made-up-org/no-such-model --local-dir DIR`")
    one_line(["model=hf", f"model.path={tmp_path / 'nowhere'}", *CLASSIFY], r"^model.path: folder not found: ")
    with pytest.raises(ConfigError, match=r"^model.dtype: unknown 'float64'; accepted: auto, float32, bfloat16"):
        compose(overrides(checkpoints["bert"], "model.dtype=float64"))
    with pytest.raises(ConfigError, match=r"^model.quantization: unknown '2bit'; accepted: none, 4bit, 8bit"):
        compose(overrides(checkpoints["bert"], "model.quantization=2bit"))
    one_line(overrides(checkpoints["bert"], "model.quantization=4bit", "model.dtype=float16"),
             r"^model.dtype: float16 compute under bitsandbytes needs a CUDA GPU")
    one_line(overrides(checkpoints["llama"], "model.lora.target_modules=[q_proj,query]"),
             r"^model.lora.target_modules: 'query' matches no linear layer of this model; its linear layers: "
             r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")
    for method, reason in (("fedkseed", "tunes the model's own parameters"), ("flora", "merges"),
                           ("fedex_lora", "merges"), ("fed_sb", "full-weight gradient")):
        with pytest.raises(ConfigError, match=rf"^model.quantization: strategy={method} cannot train on a 4bit "
                                              rf"base: .*{reason}"):
            compose(overrides(checkpoints["bert"], f"strategy={method}", "model.quantization=4bit"))


def test_fed_sb_rank_bound_reads_no_weights(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(checkpoints["bert"], tmp_path / "bert")
    (folder / "model.safetensors").unlink()  # the check reads config.json only
    one_line(overrides(folder, "strategy=fed_sb", "strategy.rank=33"),
             r"^strategy.rank must be <= min\(out, in\) = 32 of every target, got 33 \(bert.encoder.layer.0")
    preflight(compose(overrides(folder, "strategy=fed_sb", "strategy.rank=32")))  # the bound itself passes


def test_missing_pad_token_is_set_to_eos_and_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fedtune.models.hf import hf_tokenizer

    folder = save_tiny_model(tmp_path / "gpt2-nopad", "gpt2", pad_token=False)
    cfg = compose(overrides(folder))
    with caplog.at_level("WARNING", logger="fedtune.models.hf"):
        tokenizer = hf_tokenizer(cfg.model)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert any("has no pad token" in r.getMessage() for r in caplog.records)
    assert tokenizer.chat_template  # the checkpoint's own template frames the prompts


def test_minilm_is_model_hf_on_its_packaged_folder() -> None:
    """``model=minilm`` loads through ``model=hf``'s path, to the weights and seeded head a
    plain transformers load gives (so its default run is unchanged)."""
    from transformers import AutoModelForSequenceClassification

    from fedtune.models.zoo import minilm_dir
    from fedtune.randomness import seed_torch

    preset = compose(CLASSIFY + ["model=minilm"])
    as_hf = MODELS.get("minilm").as_hf(preset.model)
    direct = compose(["model=hf", f"model.path={minilm_dir()}", *CLASSIFY,
                      "model.task=classification", "model.dtype=float32", "model.lora.target_modules=[query,value]"])
    assert as_hf == direct.model
    built = MODELS.get("minilm").build(preset.model, 4, 7).state_dict()
    seed_torch(7, "model-init")
    plain = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=4).state_dict()
    assert built.keys() == plain.keys() and all(torch.equal(built[k], plain[k]) for k in plain)


def test_a_mismatched_model_and_data_format_names_the_deciding_field(checkpoints: dict[str, Path],
                                                                     tmp_path: Path) -> None:
    from hf_testing import write_dataset

    labels, alpaca = write_dataset(tmp_path / "t.jsonl", "text_label"), write_dataset(tmp_path / "a.jsonl", "alpaca")
    cases = [(checkpoints["llama"], labels, "text_label", "dataset.format: model=hf is a causal LM"),
             (checkpoints["bert"], alpaca, "alpaca", "model.task: dataset=hf is an instruction task")]
    for model_dir, data, fmt, words in cases:
        with pytest.raises(ConfigError, match=words) as err:
            compose(["model=hf", f"model.path={model_dir}", "dataset=hf", f"dataset.path={data}",
                     f"dataset.format={fmt}"])
        assert "\n" not in str(err.value)
