"""FFA-LoRA oracles (docs/methods.md#ffa_lora): A frozen and identical, aggregation exact."""

import pytest
import torch
from lora_testing import (MODULES, client_updates, effective_weights, message_payload, p_weights, random_state,
                          tiny_lora_shapes, tiny_workspace, train_client)

from fedtune.errors import ConfigError
from fedtune.config import compose
from fedtune.models.state import check_arrays, trainable_state
from fedtune.registry import MODELS
from strategies.ffa_lora import FFALoRA, FFALoRAConfig
from strategies.lora_math import A_TAG, B_TAG


def test_average_of_b_times_shared_a_is_the_average_product() -> None:
    g = torch.Generator().manual_seed(0)
    p = p_weights(4)
    for m, n in MODULES.values():
        A = torch.randn(3, n, generator=g, dtype=torch.float64)
        Bs = [torch.randn(m, 3, generator=g, dtype=torch.float64) for _ in p]
        B_bar = sum(w * B for w, B in zip(p, Bs))
        torch.testing.assert_close(B_bar @ A, sum(w * (B @ A) for w, B in zip(p, Bs)), atol=1e-13, rtol=0)


def test_strategy_averages_b_and_head_and_refuses_a() -> None:
    g = torch.Generator().manual_seed(1)
    states = [random_state(g, 3, with_a=False) for _ in range(3)]
    strategy = FFALoRA(num_clients=3, clients_per_round=3)
    strategy.initialize(states[0])
    out = strategy.aggregate(1, client_updates(states))
    p = p_weights(3)
    assert not any(A_TAG in k for k in out)
    for key in states[0]:
        torch.testing.assert_close(out[key], sum(w * s[key] for w, s in zip(p, states)), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="lora_A must be frozen"):
        FFALoRA(num_clients=1, clients_per_round=1).initialize(random_state(g, 3))


@pytest.fixture(scope="module")
def ws():
    return tiny_workspace("ffa_lora")


def test_a_is_identical_on_independent_builds_and_never_trained(ws) -> None:
    cfg = ws.cfg
    fresh = [ws.trainer.build_model(MODELS.get("tiny").build(cfg.model, ws.data.num_labels, cfg.seed), cfg)
             for _ in range(2)]
    a_of = [{n: p.detach().clone() for n, p in m.named_parameters() if A_TAG in n} for m in fresh]
    assert a_of[0] and all(not p.requires_grad for n, p in fresh[0].named_parameters() if A_TAG in n)
    for name, value in a_of[0].items():
        assert torch.equal(value, a_of[1][name])  # same seeded init on every party
    model = ws.model()
    init = trainable_state(model)
    strategy = FFALoRA.from_config(ws.cfg)
    strategy.initialize(init)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if A_TAG in n}
    updates = [train_client(ws, strategy.downlink(1, pid), 1, pid) for pid in (0, 2)]
    for name, value in before.items():
        assert torch.equal(dict(model.named_parameters())[name], value)  # A untouched by training
        torch.testing.assert_close(value, a_of[0][name])  # and equal to an independent build's
    assert all(not torch.equal(u.arrays[k], init[k]) for u in updates for k in init if B_TAG in k)


def test_global_model_is_the_average_client_model_and_bytes_are_b_plus_head(ws) -> None:
    model = ws.model()
    strategy = FFALoRA.from_config(ws.cfg)
    strategy.initialize(trainable_state(model))
    clients = []
    for pid in (0, 1, 3):
        updates = train_client(ws, strategy.downlink(1, pid), 1, pid)
        clients.append((updates, effective_weights(model)))
    updates = [u for u, _ in clients]
    strategy.global_arrays = strategy.aggregate(1, updates)
    strategy.load_into(model)
    total = sum(u.num_examples for u in updates)
    ideal = {k: sum(u.num_examples / total * w[k] for u, w in clients) for k in clients[0][1]}
    for name, weight in effective_weights(model).items():
        torch.testing.assert_close(weight, ideal[name], atol=1e-6, rtol=0)
    shapes = tiny_lora_shapes(model)
    r = ws.cfg.model.lora.rank
    head = sum(v.numel() for k, v in strategy.global_arrays.items() if B_TAG not in k)
    expected = 4 * (sum(r * m for m, _ in shapes.values()) + head)
    assert any(m != n for m, n in shapes.values())  # a non-square module is covered
    for u in updates:
        assert message_payload(u.arrays) == expected
        check_arrays(u.arrays, strategy.expected_upload(u.partition_id))
    assert message_payload(strategy.downlink(2, 1)) == expected


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"^weighting"):
        FFALoRAConfig(weighting="median")
    with pytest.raises(ConfigError, match=r"strategy\.weighting"):
        compose("strategy=ffa_lora strategy.weighting=median")
