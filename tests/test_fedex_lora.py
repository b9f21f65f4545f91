"""FedEx-LoRA oracles (docs/methods.md#fedex_lora): after aggregation every client's model
is the ideal ``W0 + s·Σ p_k B_k A_k``, on non-square modules, in both weight layouts,
including clients that skipped rounds; downlink bytes as documented."""

import pytest
import torch
from lora_testing import (MODULES, a_key, b_key, client_updates, effective_weights, message_payload, p_weights,
                          random_state, tiny_lora_shapes, tiny_workspace, train_client)

from fedtune.models.base_delta import set_base, snapshot_base
from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.models.state import trainable_state
from fedtune.trainer import TrainContext
from strategies.fedex_lora import FedExLoRA, FedExLoRAConfig
from strategies.lora_math import residual_factors, weighted_product

R, ALPHA = 3, 6.0  # s = 2


def _strategy(residual: str, k: int = 4) -> FedExLoRA:
    strategy = FedExLoRA(num_clients=k, clients_per_round=k, config=FedExLoRAConfig(residual=residual))
    strategy.lora_rank, strategy.lora_alpha = R, ALPHA  # the model's LoRA (from_config: model.lora)
    return strategy


def test_residual_factors_have_rank_nr_and_equal_the_fedit_gap() -> None:
    g = torch.Generator().manual_seed(0)
    p = p_weights(4)
    As = [torch.randn(R, 7, generator=g, dtype=torch.float64) for _ in p]
    Bs = [torch.randn(12, R, generator=g, dtype=torch.float64) for _ in p]
    B_res, A_res = residual_factors(As, Bs, p)
    assert B_res.shape == (12, 4 * R) and A_res.shape == (4 * R, 7)
    gap = weighted_product(As, Bs, p) - sum(w * B for w, B in zip(p, Bs)) @ sum(w * A for w, A in zip(p, As))
    assert gap.abs().max() > 1e-2
    torch.testing.assert_close(B_res @ A_res, gap, atol=1e-12, rtol=0)


@pytest.mark.parametrize("residual", ["dense", "factored"])
def test_post_aggregation_model_is_ideal_over_rounds_with_partial_participation(residual: str) -> None:
    g = torch.Generator().manual_seed(1)
    strategy = _strategy(residual)
    init = random_state(g, R)
    strategy.initialize(init)
    W = {m: torch.randn(*shape, generator=g, dtype=torch.float64) for m, shape in MODULES.items()}  # W0
    s = ALPHA / R
    model = {m: W[m] + s * init[b_key(m)].double() @ init[a_key(m)].double() for m in MODULES}
    for server_round, participants in ((1, [0, 1, 2, 3]), (2, [1, 3]), (3, [0, 2, 3])):
        states = [random_state(g, R) for _ in participants]
        updates = client_updates(states)
        for u, pid in zip(updates, participants):
            u.partition_id = pid
        total = sum(u.num_examples for u in updates)
        p = [u.num_examples / total for u in updates]
        # the ideal: the weighted average of the clients' models, all built on the current base
        base = {m: W[m] + strategy.delta.total().get(m, 0) for m in MODULES}
        ideal = {m: base[m] + s * weighted_product([x[a_key(m)] for x in states], [x[b_key(m)] for x in states], p)
                 for m in MODULES}
        strategy.global_arrays = strategy.aggregate(server_round, updates)
        D = strategy.delta.total()
        for m in MODULES:
            model[m] = W[m] + D[m] + s * strategy.global_arrays[b_key(m)].double() @ \
                strategy.global_arrays[a_key(m)].double()
            torch.testing.assert_close(model[m], ideal[m], atol=1e-5, rtol=0)
            assert D[m].shape == MODULES[m]  # (out, in): no transpose on nn.Linear


def test_downlink_bytes_dense_and_factored() -> None:
    g = torch.Generator().manual_seed(2)
    p_lora = sum(R * (m + n) for m, n in MODULES.values())
    head = 4 * 5 + 4
    dense, factored = _strategy("dense"), _strategy("factored")
    merged = 0
    for strategy in (dense, factored):
        strategy.initialize(random_state(g, R))
        assert message_payload(strategy.downlink(1, 0)) == 4 * (p_lora + head)  # nothing merged yet
    for server_round, k in ((1, 4), (2, 2)):
        updates = client_updates([random_state(g, R) for _ in range(k)])
        for strategy in (dense, factored):
            strategy.global_arrays = strategy.aggregate(server_round, updates)
        merged += k
        for pid in range(4):  # every client gets the same, whether or not it took part
            assert message_payload(dense.downlink(server_round + 1, pid)) == \
                4 * (p_lora + head + sum(m * n for m, n in MODULES.values()))
            assert message_payload(factored.downlink(server_round + 1, pid)) == \
                4 * (p_lora + head + sum(merged * R * (m + n) for m, n in MODULES.values()))
        assert message_payload(updates[0].arrays) == 4 * (p_lora + head)
    for m in MODULES:
        torch.testing.assert_close(dense.delta.total()[m], factored.delta.total()[m], atol=1e-5, rtol=0)


def test_conv1d_layout_residual_is_transposed_only_there() -> None:
    """GPT-2 Conv1D stores (in, out): the same (out, in) residual must give the same function."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = get_peft_model(GPT2Model(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=11, n_positions=8)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True))
    name, layer = next((n, m) for n, m in model.named_modules() if n.endswith("c_attn"))
    w0 = snapshot_base(model)[name].clone()
    assert w0.shape == (8, 24)  # Conv1D: (in, out)
    D = torch.randn(24, 8, dtype=torch.float64)  # a residual in (out, in), as the server sends it
    set_base(model, {name: D})
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer.base_layer(x), x @ (w0 + D.T.float()) + layer.base_layer.bias)
    set_base(model, {})
    assert torch.equal(layer.base_layer.weight, w0)  # reset to the pristine copy


@pytest.fixture(scope="module")
def ws():
    return tiny_workspace("fedex_lora")


@pytest.mark.parametrize("residual", ["dense", "factored"])
def test_through_the_trainer_on_tiny_bert(ws, residual: str) -> None:
    model = ws.model()
    lora = ws.cfg.model.lora
    assert FedExLoRA.from_config(ws.cfg).scale == lora.alpha / lora.rank
    strategy = FedExLoRA(num_clients=4, clients_per_round=4, config=FedExLoRAConfig(residual=residual))
    strategy.lora_rank, strategy.lora_alpha = lora.rank, lora.alpha
    strategy.initialize(trainable_state(model))
    shapes = tiny_lora_shapes(model)
    assert any(m != n for m, n in shapes.values())
    ideal, sent = None, {}
    for server_round, participants in ((1, (0, 1, 2)), (2, (0, 3))):
        clients = []
        for pid in participants:
            arrays = strategy.downlink(server_round, pid)
            sent[server_round, pid] = message_payload(arrays)
            if ideal is not None:  # the starting model is the ideal one, even for pid 3 (new)
                ws.trainer.load(model, arrays, ws, TrainContext(server_round, pid, torch.device("cpu")))
                for name, weight in effective_weights(model).items():
                    torch.testing.assert_close(weight, ideal[name], atol=1e-5, rtol=0)
            update = train_client(ws, arrays, server_round, pid)
            clients.append((update, effective_weights(model)))
        updates = [u for u, _ in clients]
        total = sum(u.num_examples for u in updates)
        ideal = {k: sum(u.num_examples / total * w[k] for u, w in clients) for k in clients[0][1]}
        strategy.global_arrays = strategy.aggregate(server_round, updates)
        strategy.load_into(model)  # the server's evaluation model (same cached model: reset works)
        for name, weight in effective_weights(model).items():
            torch.testing.assert_close(weight, ideal[name], atol=1e-5, rtol=0)
    r, p_lora = ws.cfg.model.lora.rank, sum(ws.cfg.model.lora.rank * (m + n) for m, n in shapes.values())
    head = sum(v.numel() for k, v in strategy.global_arrays.items() if ".lora_" not in k)
    extra = sum(m * n for m, n in shapes.values()) if residual == "dense" else \
        sum(3 * r * (m + n) for m, n in shapes.values())  # 3 clients were merged in round 1
    assert sent == {(1, 0): 4 * (p_lora + head), (1, 1): 4 * (p_lora + head), (1, 2): 4 * (p_lora + head),
                    (2, 0): 4 * (p_lora + head + extra), (2, 3): 4 * (p_lora + head + extra)}
    assert all(message_payload(u.arrays) == 4 * (p_lora + head) for u in updates)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"^residual"):
        FedExLoRAConfig(residual="svd")
    with pytest.raises(ConfigError, match=r"strategy\.residual"):
        compose("strategy=fedex_lora strategy.residual=svd")
