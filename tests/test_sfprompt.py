"""SFPrompt's oracles: the split model is the model, and the split traffic is its activations.

* head → body → tail (each run by :mod:`fedtune.models.split`) gives peft's unsplit
  prompt-tuning forward, for a classifier and a causal LM, and the gradient that crosses
  the cut twice reaches the prompts as the unsplit backward would;
* every split message carries exactly ``B × T × d`` fp32 activations (+ a ``B × T`` bool
  mask with the head's), so a round's split bytes are ``split_steps`` × the per-batch formula;
* EL2N scores and pruning keep the hardest ``⌈(1 − ρ) n⌉`` examples.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from clients.sfprompt import SFPromptTrainer, cut_of, el2n, keep_hardest, with_prompts
from fedtune.comm.ledger import SPLIT, TRAIN, UP
from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.models.split import run_head, run_tail
from fedtune.registry import MODELS
from fedtune.runtime.workspace import Workspace
from hf_testing import save_tiny_model
from method_testing import run_method, task_identity  # noqa: F401  (task_identity: a fixture)
from strategies.sfprompt import body_backward, body_forward, split_bytes_per_batch


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sfprompt")
    return {arch: save_tiny_model(folder / arch, arch) for arch in ("bert", "llama")}


def _prompted(path: Path, cut: str) -> tuple[object, object]:
    """The checkpoint as the sfprompt client builds it (the config's strategy section only;
    a causal LM is loaded directly, as its classification dataset would be refused)."""
    from transformers import AutoModelForCausalLM

    cfg = compose(["model=tiny", "model.max_length=16", "dataset=tiny", "strategy=sfprompt", *cut.split()])
    base = (AutoModelForCausalLM.from_pretrained(path) if "llama" in path.name else
            MODELS.get("hf").build(compose(["model=hf", f"model.path={path}"]).model, 4, 0, device=torch.device("cpu")))
    return cfg, SFPromptTrainer().build_model(base, cfg)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_split_forward_and_backward_equal_the_unsplit_model(arch: str, tiny_checkpoints: dict[str, Path]) -> None:
    cfg, model = _prompted(tiny_checkpoints[arch], "strategy.head_blocks=1 strategy.tail_blocks=0")
    base, cut = model.get_base_model(), cut_of(cfg)
    ids = torch.randint(5, 60, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = torch.tensor([0, 1, 2]) if arch == "bert" else ids.masked_fill(mask == 0, -100)
    whole = model(input_ids=ids, attention_mask=mask, labels=labels)  # peft's own prompt-tuning forward
    prompts = model.get_prompt(batch_size=1)
    assert prompts.shape == (1, cfg.strategy.num_prompts, base.config.hidden_size)

    embeds, pmask, plabels = with_prompts(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    h_client = run_head(base, embeds, pmask, cut)                     # client: head
    h, b = body_forward(base, h_client.detach(), pmask, cut)          # server: body
    b_client = b.detach().requires_grad_(True)                        # client: tail
    out = run_tail(base, b_client, pmask, cut, labels=plabels)
    torch.testing.assert_close(out.logits, whole.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, whole.loss, rtol=1e-5, atol=1e-6)

    out.loss.backward()
    grad_h = body_backward(h, b, b_client.grad)                       # server: ∂L/∂h
    model.zero_grad()
    h_client.backward(grad_h)                                         # client: through its head
    split_grad = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    prompt_keys = [n for n in split_grad if "prompt" in n]
    assert prompt_keys
    for n in prompt_keys:
        torch.testing.assert_close(split_grad[n], dict(model.named_parameters())[n].grad, rtol=1e-4, atol=1e-7)


def test_a_cut_that_leaves_the_server_nothing_is_one_line(tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="head_blocks"):
        _prompted(tiny_checkpoints["llama"], "strategy.head_blocks=1 strategy.tail_blocks=1")  # the checkpoints have 2 blocks


def test_split_messages_carry_exactly_the_activations(task_identity: None) -> None:  # noqa: F811
    run = run_method("sfprompt")
    cfg, strategy = run.cfg, run.strategy
    s, d = cfg.strategy, 32  # model=tiny's hidden size
    length = s.num_prompts + cfg.model.max_length
    sizes = {pid: len(ix) for pid, ix in enumerate(Workspace(cfg).partitions())}
    for r in run.rounds:
        for pid, n in sizes.items():
            batch = min(cfg.train.batch_size, math.ceil((1 - s.prune_ratio) * n))
            records = [x for x in strategy.ledger.records
                       if x.server_round == r and x.partition_id == pid and x.kind == SPLIT]
            down = sum(x.payload_bytes for x in records if x.direction == "down")
            up = sum(x.payload_bytes for x in records if x.direction == "up")
            per_down, per_up = split_bytes_per_batch(batch, length, d)
            assert (down, up) == (s.split_steps * per_down, s.split_steps * per_up), (r, pid)
            acts = 4 * batch * length * d
            ups = sorted(x.payload_bytes for x in records if x.direction == "up")
            assert ups == sorted([acts + batch * length] * s.split_steps + [acts] * s.split_steps + [0])
    # a client-round's payload sums every message of the round: the split steps and the prompt upload
    expected = []
    for r in run.rounds:
        for pid, n in sizes.items():
            batch = min(cfg.train.batch_size, math.ceil((1 - s.prune_ratio) * n))
            prompts = sum(x.payload_bytes for x in strategy.ledger.records
                          if (x.server_round, x.partition_id, x.kind, x.direction) == (r, pid, TRAIN, UP))
            expected.append(s.split_steps * split_bytes_per_batch(batch, length, d)[1] + prompts)
    assert strategy.ledger.payload_per_client_round(UP) == pytest.approx(sum(expected) / len(expected))


def test_el2n_and_pruning_keep_the_hardest_examples() -> None:
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 0])
    p = torch.softmax(logits, -1)
    want = torch.stack([torch.linalg.vector_norm(p[i] - torch.tensor([1.0, 0.0])) for i in range(3)])
    scores = el2n(logits, labels)
    torch.testing.assert_close(scores, want)
    assert keep_hardest(scores, [10, 11, 12], 0.5).tolist() == [11, 12]  # ⌈1.5⌉ = 2 hardest, index order
    assert keep_hardest(scores, [10, 11, 12], 0.0).tolist() == [10, 11, 12]
    tokens = torch.zeros(1, 3, 2)
    tokens[0, 0] = torch.tensor([4.0, 0.0])  # predicts token 0 for position 1
    token_labels = torch.tensor([[-100, 0, -100]])  # only position 1 is supervised
    torch.testing.assert_close(el2n(tokens, token_labels), want[:1])
