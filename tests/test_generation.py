"""Generative evaluation: Rouge-L against a hand-computed LCS F-measure, exact match, batched
KV-cache greedy decoding against one-at-a-time decoding, metrics per held-out category."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_testing import data_files, data_path, one_torch_thread, tiny_llama  # noqa: F401  (fixtures)
from fedtune.config import compose
from fedtune.generation import exact_match, generative_metrics, greedy_generate, rouge_l, score_set
from fedtune.runtime.workspace import Workspace


def test_rouge_l_is_the_lcs_f_measure_rouge_score_reports() -> None:
    from rouge_score import rouge_scorer

    # reference "the cat is on the mat" (6 tokens), prediction "the cat sat on a mat now" (7):
    # the longest common subsequence is "the cat on mat" (4): P = 4/7, R = 4/6, F = 2PR / (P + R) = 8/13
    reference, prediction = "The cat is on the mat.", "the cat sat on a mat now"
    p, r = 4 / 7, 4 / 6
    assert rouge_l(prediction, reference) == pytest.approx(2 * p * r / (p + r)) == pytest.approx(8 / 13)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert rouge_l(prediction, reference) == scorer.score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(reference, reference) == 1.0 and rouge_l("dog", reference) == 0.0


def test_exact_match_ignores_surrounding_and_repeated_whitespace_only() -> None:
    assert exact_match("  sports \n", "sports") == 1.0
    assert exact_match("hot  dog", "hot dog") == 1.0
    assert exact_match("Sports", "sports") == 0.0 and exact_match("sports.", "sports") == 0.0


@pytest.fixture(scope="module")
def llama_model(tiny_llama: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_kv_cache_generation_equals_one_prompt_at_a_time(seed: int, llama_model) -> None:  # type: ignore[no-untyped-def]
    """Left-padded batches decode exactly what each prompt decodes alone (property over random prompts)."""
    gen = torch.Generator().manual_seed(seed)
    vocab, pad, eos = llama_model.config.vocab_size, 0, 3
    lengths = torch.randint(3, 15, (6,), generator=gen).tolist()
    prompts = [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    batched = greedy_generate(llama_model, ids, mask, 10, pad, eos, batch_size=4, device="cpu")
    alone = [greedy_generate(llama_model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), 10, pad, eos,
                             batch_size=1, device="cpu")[0] for p in prompts]
    assert batched == alone
    assert all(len(a) <= 10 and eos not in a for a in alone)
    # and what generate decodes is the argmax of a plain forward pass, step by step (no cache)
    seq = list(prompts[0])
    for _ in range(len(alone[0])):
        seq.append(int(llama_model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert seq[len(prompts[0]):] == alone[0]


def test_heldout_metrics_per_category_average_to_the_heldout_metrics(data_files: Path, tiny_llama: Path,
                                                                     llama_model) -> None:  # type: ignore[no-untyped-def]
    cfg = compose(f"model=hf model.path={tiny_llama} dataset=hf dataset.path={data_path(data_files, 'alpaca', '.jsonl')} "
                  "dataset.format=alpaca dataset.heldout=[music,travel] federation.num_clients=2 eval.max_new_tokens=3")
    ws = Workspace(cfg)
    test = ws.encoded("test")
    assert sorted(set(test.heldout.categories)) == ["music", "travel"] and len(test.heldout) == 4
    metrics = generative_metrics(llama_model, test, 3, 8, "cpu")
    per_example = score_set(llama_model, test.heldout, test.tokenizer, test.pad_id, test.eos_id, 3, 8, "cpu")
    for name, key in (("rouge-l", "rouge_l"), ("exact-match", "exact_match")):
        by_cat = {c: [v for v, x in zip(per_example[key], per_example["categories"]) if x == c] for c in ("music", "travel")}
        for c, values in by_cat.items():
            assert metrics[f"heldout-{name}/{c}"] == pytest.approx(sum(values) / len(values))
        assert metrics[f"heldout-{name}"] == pytest.approx(sum(per_example[key]) / 4)
    tokens = sum(per_example["tokens"])
    assert metrics["heldout-loss"] == pytest.approx(sum(per_example["loss"]) / tokens)
    assert metrics["eval-accuracy"] == metrics["exact-match"]  # accuracy means exact match here
    # the response loss is the model's own shifted cross-entropy over the response tokens
    seen = test.seen.scored
    out = llama_model(input_ids=seen.input_ids, attention_mask=seen.attention_mask, labels=seen.labels,
                      logits_to_keep=seen.keep)
    assert metrics["eval-loss"] == pytest.approx(float(out.loss), rel=1e-5)
