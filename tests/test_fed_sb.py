"""Fed-SB / LoRA-SB oracles (docs/methods.md#fed_sb), on non-square modules.

(a) exact aggregation, (b) Eckart–Young init with orthonormal bases, (c) only R and the
head train and ∂L/∂R = s·BᵀGAᵀ, (d) payload bytes, plus the whole one-time setup and a
round driven in-process through the real ClientApp (no Ray), the exact one-time bytes of
each init option (fp32 gradients, int8 signs, the server's own init: nothing up) and the
server's init equal to one client's holding its examples, and Opacus hooks mode.
"""

import math
from pathlib import Path

import pytest
import torch
from method_testing import LocalGrid, task_identity  # noqa: F401  (a fixture)
import clients.lora_sb
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from safetensors.torch import load_file
from torch import nn

from fedtune.comm.ledger import payload_bytes
from fedtune.comm.metered_grid import MeteredGrid
from fedtune.config import compose
from fedtune.errors import ConfigError, PayloadError
from fedtune.flower.strategy import ClientUpdate
from fedtune.models.lora_sb import (LoRASBModel, bases_of, full_weight_gradients, lora_sb_modules, set_bases,
                                    set_cores, update_approximation)
from fedtune.models.state import trainable_state
from fedtune.registry import METHODS, MODELS, TRAINERS
from fedtune.runtime.workspace import Workspace
from fedtune.trainer import TrainContext
from strategies.fed_sb import FedSB, FedSBConfig, factorise, sign_step
from strategies.fed_sb_init import server_batches

M, N, R = 12, 7, 3  # non-square: "up" is M×N, "down" is N×M
TINY = "model=tiny dataset=tiny strategy=fed_sb federation.num_clients=3 strategy.rank=4"


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q.float()


def _toy(alpha: float = 2.0 * R) -> LoRASBModel:
    torch.manual_seed(0)
    net = nn.ModuleDict({"up": nn.Linear(N, M), "down": nn.Linear(M, N), "classifier": nn.Linear(N, 2)})
    return LoRASBModel(net, ["up", "down"], R, alpha)


def _random_bases(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in lora_sb_modules(model).items():
        out[f"{name}.sb_B"] = _orthonormal(mod.sb_B.shape[0], mod.rank, g)
        out[f"{name}.sb_A"] = _orthonormal(mod.sb_A.shape[1], mod.rank, g).T.contiguous()
    return out


def _strategy(**kw: object) -> FedSB:
    return FedSB(num_clients=5, clients_per_round=3, seed=0, config=FedSBConfig(rank=R, init_step=0.01, **kw))


# ----------------------------------------------------------------------------- (a) exactness
@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_aggregation_is_exact_for_weighted_partial_participation(weighting: str) -> None:
    model = _toy()
    bases = _random_bases(model)
    set_bases(model, bases)
    modules = lora_sb_modules(model)
    W0 = {n: m.base.weight.detach().double() for n, m in modules.items()}
    strategy = _strategy(weighting=weighting)
    strategy.bases = bases
    g = torch.Generator().manual_seed(1)

    def client(pid: int, n: int) -> ClientUpdate:
        arrays = {k: torch.randn(v.shape, generator=g) for k, v in trainable_state(model).items()}
        return ClientUpdate(pid, n, arrays, {})

    for server_round, sampled in ((1, [(0, 40), (2, 10), (4, 25)]), (2, [(1, 5), (3, 60)])):
        updates = [client(pid, n) for pid, n in sampled]
        strategy.global_arrays = strategy.aggregate(server_round, updates)
        strategy.load_into(model)
        total = sum(n for _, n in sampled)
        p = [n / total if weighting == "examples" else 1 / len(sampled) for _, n in sampled]
        for name, mod in modules.items():
            B, A = bases[f"{name}.sb_B"].double(), bases[f"{name}.sb_A"].double()
            ideal = sum(pk * (W0[name] + mod.scale * B @ u.arrays[f"{name}.sb_R.weight"].double() @ A)
                        for pk, u in zip(p, updates))  # only this round's clients: no stale R's
            merged = W0[name] + mod.delta_weight().detach().double()
            assert tuple(mod.base.weight.shape) == ((M, N) if name.endswith("up") else (N, M))
            torch.testing.assert_close(merged, ideal, atol=1e-5, rtol=0)
        head = sum(pk * u.arrays["model.classifier.weight"] for pk, u in zip(p, updates))
        torch.testing.assert_close(model.model.classifier.weight.detach(), head, atol=1e-6, rtol=0)


def test_module_computes_w0_plus_s_bra() -> None:
    model = _toy(alpha=1.5)
    set_bases(model, _random_bases(model))
    g = torch.Generator().manual_seed(2)
    set_cores(model, {f"{n}.sb_R.weight": torch.randn(R, R, generator=g) for n in lora_sb_modules(model)})
    up = lora_sb_modules(model)["model.up"]
    x = torch.randn(5, N, generator=g)
    W = up.base.weight + (1.5 / R) * up.sb_B @ up.sb_R.weight @ up.sb_A
    torch.testing.assert_close(up(x), x @ W.T + up.base.bias)
    with pytest.raises(PayloadError):
        set_bases(model, {"model.up.sb_B": torch.zeros(M, R)})  # incomplete


# ----------------------------------------------------------------------------- (b) init
def _gradient_updates(seed: int = 3) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(pid, n, {"up.base.weight": torch.randn(M, N, generator=g),
                                  "down.base.weight": torch.randn(N, M, generator=g)}, {})
            for pid, n in ((0, 8), (1, 32), (2, 16))]


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_init_is_eckart_young_of_the_sign_step(scale: float) -> None:
    updates, p, eta = _gradient_updates(), [0.2, 0.5, 0.3], 0.01
    deltas = sign_step(updates, p, eta)
    bases, cores = factorise(deltas, R, scale)
    for module in ("up", "down"):
        G = sum(pk * u.arrays[f"{module}.base.weight"].double() for pk, u in zip(p, updates))
        dW = -eta * torch.sign(G)  # built independently of sign_step
        torch.testing.assert_close(deltas[f"{module}.base.weight"], dW)
        B, A, R0 = bases[f"{module}.sb_B"], bases[f"{module}.sb_A"], cores[f"{module}.sb_R.weight"]
        assert B.shape == dW.shape[:1] + (R,) and A.shape == (R, dW.shape[1]) and R0.shape == (R, R)
        sigma = torch.linalg.svdvals(dW)
        optimum = math.sqrt(float((sigma[R:] ** 2).sum()))
        error = float(torch.linalg.norm(scale * B.double() @ R0.double() @ A.double() - dW))
        assert optimum > 1e-3 and error == pytest.approx(optimum, rel=1e-5)
        torch.testing.assert_close(B.T @ B, torch.eye(R), atol=1e-5, rtol=0)
        torch.testing.assert_close(A @ A.T, torch.eye(R), atol=1e-5, rtol=0)


def test_lowrank_svd_is_seeded_orthonormal_and_near_optimal() -> None:
    dW = -0.01 * torch.sign(_gradient_updates()[0].arrays["up.base.weight"])
    state = torch.random.get_rng_state()
    B1, A1, R1 = update_approximation(dW, R, method="lowrank", seed=7, key="up")
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    B2, A2, R2 = update_approximation(dW, R, method="lowrank", seed=7, key="up")
    assert torch.equal(B1, B2) and torch.equal(A1, A2) and torch.equal(R1, R2)
    torch.testing.assert_close(B1.T @ B1, torch.eye(R), atol=1e-5, rtol=0)
    torch.testing.assert_close(A1 @ A1.T, torch.eye(R), atol=1e-5, rtol=0)
    sigma = torch.linalg.svdvals(dW.double())
    optimum = math.sqrt(float((sigma[R:] ** 2).sum()))
    error = float(torch.linalg.norm(B1.double() @ R1.double() @ A1.double() - dW.double()))
    assert optimum - 1e-6 <= error <= 1.05 * optimum


def test_sign_uploads_are_a_weighted_vote() -> None:
    signs = [ClientUpdate(i, 1, {"w.base.weight": torch.tensor([[1.0, -1.0, 1.0]]) * s}, {})
             for i, s in enumerate((1, 1, -1))]
    out = sign_step(signs, [0.25, 0.25, 0.5], 2.0)["w.base.weight"]
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64))  # a tie
    out = sign_step(signs, [0.4, 0.4, 0.2], 2.0)["w.base.weight"]
    torch.testing.assert_close(out, torch.tensor([[-2.0, 2.0, -2.0]], dtype=torch.float64))


# ----------------------------------------------------------------------------- (c) gradients
def test_only_cores_and_head_train_and_core_gradient_is_projected_full_gradient() -> None:
    cfg = compose(TINY + " strategy.alpha=8 model.lora.target_modules=[query,dense]")
    ws = Workspace(cfg)
    model = TRAINERS.get("lora_sb").build_model(
        MODELS.get("tiny").build(cfg.model, ws.data.num_labels, cfg.seed), cfg)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    modules = lora_sb_modules(model)
    assert trainable == sorted([f"{n}.sb_R.weight" for n in modules] + ["model.classifier.bias",
                                                                          "model.classifier.weight"])
    assert all(f"{n}.sb_A" in dict(model.named_parameters()) for n in modules)  # parameters, not buffers
    assert not list(model.buffers()) or all(".sb_" not in n for n, _ in model.named_buffers())
    shapes = {tuple(m.base.weight.shape) for m in modules.values()}
    assert (64, 32) in shapes and (32, 64) in shapes  # non-square targets are covered

    set_bases(model, _random_bases(model, seed=4))
    g = torch.Generator().manual_seed(5)
    set_cores(model, {f"{n}.sb_R.weight": torch.randn(4, 4, generator=g) for n in modules})
    batch = ws.encoded("train").batch(torch.arange(8))
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    G, _ = full_weight_gradients(model, [batch])
    for name, mod in modules.items():
        assert mod.scale == 2.0 and mod.base.weight.grad is None and mod.sb_A.grad is None
        expected = mod.scale * mod.sb_B.T @ G[f"{name}.base.weight"] @ mod.sb_A.T
        assert expected.abs().max() > 1e-6
        torch.testing.assert_close(mod.sb_R.weight.grad, expected, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- protocol, (d) bytes
@pytest.mark.parametrize("upload, grad_bytes", [("gradient", 4), ("sign", 1)])
def test_setup_and_round_through_the_client_app(task_identity: None, upload: str, grad_bytes: int,
                                               tmp_path: Path) -> None:
    cfg = compose(f"{TINY} strategy.init_upload={upload}")
    ws = Workspace(cfg)
    model = ws.model()
    strategy = FedSB.from_config(cfg)
    assert strategy.config.init_step == cfg.train.lr
    strategy.initialize(trainable_state(model))
    grid = LocalGrid(cfg, 3)
    metered = MeteredGrid(grid, strategy.ledger, strategy._partition)

    with pytest.raises(RuntimeError, match="no LoRA-SB bases"):  # train before setup fails loudly
        ws.trainer.train(model, trainable_state(model), ws, TrainContext(1, 0, ws.device, {}))
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord(), metered)  # roll-call + setup
    modules = lora_sb_modules(model)
    L, r = len(modules), cfg.strategy.rank
    dims = [tuple(m.base.weight.shape) for m in modules.values()]
    head = sum(v.numel() for k, v in trainable_state(model).items() if "classifier" in k)

    # setup: clients' gradients (or signs) up once, B and A down once, to every client
    one_time = [rec for rec in strategy.ledger.records if rec.kind == "one_time"]
    up = sorted(rec.payload_bytes for rec in one_time if rec.direction == "up")
    down = sorted(rec.payload_bytes for rec in one_time if rec.direction == "down")
    assert up == [0] * 3 + [grad_bytes * sum(m * n for m, n in dims)] * 3
    assert down == [0] * 3 + [4 * sum(r * (m + n) for m, n in dims)] * 3
    for pid, context in enumerate(grid.contexts.values()):
        state = context.state["fedtune-client-arrays"].to_torch_state_dict()
        assert len(state) == 2 * L
        for key, value in strategy.bases.items():
            assert torch.equal(state[f"fed-sb/{key}"], value)  # bit-identical bases on every client
    for name, mod in modules.items():
        torch.testing.assert_close(mod.sb_B.T @ mod.sb_B, torch.eye(r), atol=1e-5, rtol=0)
        R0 = strategy.global_arrays[f"{name}.sb_R.weight"]
        assert torch.count_nonzero(R0 - torch.diag(torch.diagonal(R0))) == 0 and R0.diagonal().min() > 0

    # one round: R's + head each way, 4·(L·r² + head) payload bytes per client and direction
    per_client = 4 * (L * r * r + head)
    for m in messages:
        assert payload_bytes(m.content) == per_client
    before = {k: v.clone() for k, v in strategy.global_arrays.items()}
    replies = metered.send_and_receive(messages)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics["num-replies"] == 3 and not strategy.rounds[1].failures
    train = [rec for rec in strategy.ledger.records if rec.kind == "train"]
    assert len(train) == 6 and all(rec.payload_bytes == per_client for rec in train)
    upload = replies[0].content["arrays"].to_torch_state_dict()
    assert payload_bytes(RecordDict({"arrays": ArrayRecord(upload)})) == per_client
    assert any(not torch.equal(before[k], v) for k, v in strategy.global_arrays.items() if "sb_R" in k)

    strategy.load_into(model)  # the server's eval model: B, A, R̄ and head
    for key, value in bases_of(model).items():
        assert torch.equal(value, strategy.bases[key])
    model.save_pretrained(str(tmp_path))  # what the ServerApp exports: the adapter only
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == set(strategy.bases) | set(strategy.global_arrays)


def _setup(cfg: object, nodes: int) -> tuple[FedSB, LocalGrid]:
    """Roll-call and one-time setup of ``cfg`` on an in-process grid of ``nodes`` ClientApps."""
    strategy = FedSB.from_config(cfg)
    strategy.initialize(Workspace(cfg).initial_arrays())
    grid = LocalGrid(cfg, nodes)
    strategy.configure_train(1, ArrayRecord(), ConfigRecord(), MeteredGrid(grid, strategy.ledger, strategy._partition))
    return strategy, grid


def test_server_init_uploads_nothing_and_equals_one_client_holding_its_examples(
        task_identity: None, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose(f"{TINY} strategy.init_source=server")
    ws = Workspace(cfg)
    server, grid = _setup(cfg, 3)
    dims = [tuple(m.base.weight.shape) for m in lora_sb_modules(ws.model()).values()]
    one_time = [rec for rec in server.ledger.records if rec.kind == "one_time"]
    up = [rec.payload_bytes for rec in one_time if rec.direction == "up"]
    down = [rec.payload_bytes for rec in one_time if rec.direction == "down"]
    assert up == [0] * 3  # one exchange only (the bases), whose replies carry no arrays
    assert down == [4 * sum(cfg.strategy.rank * (m + n) for m, n in dims)] * 3
    for context in grid.contexts.values():
        state = context.state["fedtune-client-arrays"].to_torch_state_dict()
        assert all(torch.equal(state[f"fed-sb/{k}"], v) for k, v in server.bases.items())
    proxy = server_batches(ws)  # init_samples × num_clients examples of the training split
    assert sum(len(b["labels"]) for b in proxy) == 32 * 3 < len(ws.encoded("train"))
    assert "server" in METHODS.get("fed_sb").capabilities.setup_note(cfg.strategy)

    # the same examples held by one client, uploaded as fp32 or as signs: the same ΔW, bases and R0
    monkeypatch.setattr(clients.lora_sb, "init_batches", lambda *args: proxy)
    for upload in ("gradient", "sign"):
        one, _ = _setup(compose(f"{TINY} federation.num_clients=1 strategy.init_upload={upload}"), 1)
        assert set(one.bases) == set(server.bases) and set(one.global_arrays) == set(server.global_arrays)
        assert all(torch.equal(v, server.bases[k]) for k, v in one.bases.items()), upload
        assert all(torch.equal(v, server.global_arrays[k]) for k, v in one.global_arrays.items()), upload


# ----------------------------------------------------------------------------- config, Opacus
def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.rank must be > 0, got 0"):
        compose("strategy=fed_sb strategy.rank=0")
    with pytest.raises(ConfigError, match=r"strategy\.init_upload: unknown 'bits'"):
        compose("strategy=fed_sb strategy.init_upload=bits")
    with pytest.raises(ConfigError, match=r"strategy\.init_source: unknown 'both'; accepted: clients, server$"):
        compose("strategy=fed_sb strategy.init_source=both")
    with pytest.raises(ConfigError, match=r"strategy\.init_upload=sign needs init_source=clients; "):
        compose("strategy=fed_sb strategy.init_source=server strategy.init_upload=sign")
    with pytest.raises(ValueError, match=r"rank must be in \[1, min\(out, in\) = 7\], got 8"):
        LoRASBModel(nn.ModuleDict({"up": nn.Linear(N, M)}), ["up"], 8, 8.0)


def test_opacus_hooks_train_only_the_cores_and_head() -> None:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    cfg = compose(TINY)
    ws = Workspace(cfg)
    model = TRAINERS.get("lora_sb").build_model(
        MODELS.get("tiny").build(cfg.model, ws.data.num_labels, cfg.seed), cfg)
    set_bases(model, _random_bases(model, seed=6))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    enc = ws.encoded("train")
    data = TensorDataset(enc.input_ids[:64], enc.attention_mask[:64], enc.labels[:64])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    engine = PrivacyEngine(accountant="rdp")
    model.train()
    private, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(data, 16),
                                               noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                               grad_sample_mode="hooks")
    for ids, mask, y in loader:
        opt.zero_grad()
        private(input_ids=ids, attention_mask=mask, labels=y).loss.backward()
        assert all((getattr(p, "grad_sample", None) is not None) == p.requires_grad for p in model.parameters())
        opt.step()
    assert engine.get_epsilon(1e-5) > 0
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == p.requires_grad, name  # R and head move; W0, B, A, the rest do not
