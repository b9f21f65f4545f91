"""``strategy.trainable`` for FedKSeed and Ferret: presets as regexes, pattern lists, errors.

The oracle for the presets is the substring lists they replaced, written out here: on the
tiny BERT and on Llama names (SmolLM2's scheme: tied embeddings, RMSNorms, no biases) the
regex presets must select exactly what those did.
"""

from __future__ import annotations

import pytest
import torch

from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.registry import MODELS
from fedtune.runtime.workspace import Workspace
from fedtune.trainable import TRAINABLE_PRESETS, check_trainable, select_trainable
from tests.hf_testing import model_config

SUBSTRING_PRESETS: dict[str, tuple[str, ...] | None] = {  # the presets before patterns, verbatim
    "all": None,
    "no_embeddings": ("encoder.", "pooler.", "classifier.", "embeddings.LayerNorm",
                      "model.layers.", "model.norm.", "lm_head."),
    "bias_and_head": ("bias", "LayerNorm", "pooler.", "classifier.", "layernorm.", "model.norm.", "lm_head."),
    "head_and_norms": ("LayerNorm", "pooler.", "classifier.", "layernorm.", "model.norm.", "lm_head."),
}
BASE = "model=tiny dataset=tiny federation.num_clients=3"


def _old(names: list[str], preset: str) -> list[str]:
    parts = SUBSTRING_PRESETS[preset]
    return [n for n in names if parts is None or any(p in n for p in parts)]


@pytest.fixture(scope="module")
def names() -> dict[str, list[str]]:
    """Parameter names of the tiny BERT (model=tiny) and of tiny random Llama, Qwen2, GPT-2."""
    import transformers as tf

    cfg = compose(f"{BASE} strategy=fedkseed")
    out = {"bert": [n for n, _ in MODELS.get("tiny").build(cfg.model, 4, 0).named_parameters()]}
    for arch in ("llama", "qwen2", "gpt2"):
        torch.manual_seed(0)
        out[arch] = [n for n, _ in tf.AutoModelForCausalLM.from_config(model_config(arch, 64)).named_parameters()]
    return out


SMOLLM2_LAYER = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                 "input_layernorm.weight", "post_attention_layernorm.weight"]
SMOLLM2 = (["model.embed_tokens.weight"] + [f"model.layers.{i}.{p}" for i in range(30) for p in SMOLLM2_LAYER]
           + ["model.norm.weight"])  # SmolLM2-135M: 30 Llama layers, lm_head tied to the embeddings


@pytest.mark.parametrize("preset", list(SUBSTRING_PRESETS))
def test_presets_select_what_the_substring_presets_did(names, preset: str) -> None:
    assert set(SUBSTRING_PRESETS) == set(TRAINABLE_PRESETS)
    for arch in ("bert", "llama"):
        assert select_trainable(names[arch], preset) == _old(names[arch], preset), arch
    assert select_trainable(SMOLLM2, preset) == _old(SMOLLM2, preset)


def test_presets_cover_bert_llama_qwen2_and_gpt2(names) -> None:
    bert, qwen, gpt = names["bert"], names["qwen2"], names["gpt2"]
    assert len(select_trainable(SMOLLM2, "no_embeddings")) == len(SMOLLM2) - 1 == 30 * 9 + 1
    assert select_trainable(SMOLLM2, "head_and_norms") == [n for n in SMOLLM2 if "norm" in n] != []
    assert select_trainable(qwen, "head_and_norms") == [n for n in qwen if "layernorm" in n or n == "model.norm.weight"]
    assert {n for n in select_trainable(qwen, "bias_and_head") if n.endswith(".bias")} == \
        {n for n in qwen if n.endswith(".bias")} != set()  # Qwen2's q/k/v biases
    assert select_trainable(gpt, "head_and_norms") == [n for n in gpt if ".ln_" in n] != []
    assert select_trainable(gpt, "no_embeddings") == [n for n in gpt if n.startswith(("transformer.h.",
                                                                                       "transformer.ln_f."))]
    assert set(select_trainable(gpt, "bias_and_head")) == {n for n in gpt if n.endswith(".bias") or ".ln_" in n}
    assert "transformer.wte.weight" in gpt and "transformer.wte.weight" not in select_trainable(gpt, "no_embeddings")
    assert select_trainable(bert, "all") == bert


def test_pattern_lists_are_regular_expressions_searched_in_names(names) -> None:
    bert = names["bert"]
    assert select_trainable(bert, [r"^classifier\."]) == ["classifier.weight", "classifier.bias"]
    layer0 = select_trainable(bert, [r"encoder\.layer\.0\..*\.weight$"])
    assert layer0 and all(n.startswith("bert.encoder.layer.0.") and n.endswith(".weight") for n in layer0)
    assert select_trainable(["a.x", "b.y", "c.x"], ["x$", "^b"]) == ["a.x", "b.y", "c.x"]  # order kept, union


def test_a_pattern_list_matching_nothing_is_one_line_naming_the_field(names) -> None:
    with pytest.raises(ConfigError, match=r"^strategy\.trainable=\['nope'\] matches no parameter") as err:
        check_trainable(names["bert"], ["nope"])
    assert "\n" not in str(err.value) and names["bert"][0] in str(err.value)
    cfg = compose(f"{BASE} strategy=ferret strategy.trainable=[nothing_here]")
    with pytest.raises(ConfigError, match=r"^strategy\.trainable"):  # when the model is built
        Workspace(cfg).trainer.build_model(MODELS.get("tiny").build(cfg.model, 4, 0), cfg)


@pytest.mark.parametrize("override, words", [
    ("strategy.trainable=lora", "strategy.trainable: unknown preset 'lora'"),
    ("strategy.trainable=[]", "strategy.trainable must be a preset"),
    ("strategy.trainable=['(']", "strategy.trainable: '(' is not a regular expression"),
])
def test_bad_trainable_values_are_refused(override: str, words: str) -> None:
    for method in ("fedkseed", "ferret"):
        with pytest.raises(ConfigError, match="^" + words.replace("(", r"\(").replace("[", r"\[")):
            compose([*BASE.split(), f"strategy={method}", override])  # as the shell passes it


def test_the_built_model_tunes_exactly_the_selected_parameters() -> None:
    cfg = compose([*BASE.split(), "strategy=fedkseed", r"strategy.trainable=['^classifier\.','LayerNorm\.weight$']"])
    assert cfg.strategy.trainable == [r"^classifier\.", r"LayerNorm\.weight$"]
    model = Workspace(cfg).trainer.build_model(MODELS.get("tiny").build(cfg.model, 4, 0), cfg)
    tuned = [n for n, p in model.named_parameters() if p.requires_grad]
    assert tuned == [n for n, _ in model.named_parameters()
                     if n.startswith("classifier.") or n.endswith("LayerNorm.weight")] != []
