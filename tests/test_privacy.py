"""DP-SGD on clients (issue 5): accounting, what gets per-sample gradients, equivalence
with the non-private loop, the budget stop, bad input.  No Ray: clients are called
directly or through the real ClientApp on an in-process grid (``LocalGrid``)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import opacus.optimizers
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedtune.comm.metered_grid import MeteredGrid
from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.flower.client_app import STATE_ARRAYS
from fedtune.flower.server_app import run_server
from fedtune.models.lora_sb import bases_of, lora_sb_modules, set_bases
from fedtune.models.state import load_trainable_state, trainable_state
from fedtune.privacy.accounting import HISTORY_KEY, check_delta, save_history
from fedtune.privacy.dp_sgd import private_batches, with_privacy
from fedtune.randomness import seed_torch
from fedtune.registry import METHODS
from fedtune.runtime.workspace import Workspace
from fedtune.trainer import TrainContext
from strategies.fedavg_lora import FedAvgLoRA
from method_testing import LocalGrid, task_identity  # noqa: F401  (fixture)

BASE = "model=tiny dataset=tiny federation.num_clients=3 runtime.device=cpu train.local_steps=3"
DP = f"{BASE} privacy=dp_sgd"


def _train(ws: Workspace, arrays: dict[str, torch.Tensor], ctx: TrainContext):  # type: ignore[no-untyped-def]
    """One client round exactly as the ClientApp runs it (trainer.train behind with_privacy)."""
    return with_privacy(ws.trainer.train, ws.cfg)(ws.model(), arrays, ws, ctx)


def _fed_sb_state(ws: Workspace) -> dict[str, torch.Tensor]:
    """Random orthonormal LoRA-SB bases in a client's state, as Fed-SB's setup leaves them."""
    g = torch.Generator().manual_seed(7)
    state = {}
    for key, value in bases_of(ws.model()).items():
        q, _ = torch.linalg.qr(torch.randn(max(value.shape), min(value.shape), generator=g))
        state[f"fed-sb/{key}"] = q if value.shape[0] >= value.shape[1] else q.T
    return state


# ----------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
def test_epsilon_after_rounds_equals_opacus_recomputed(accountant: str) -> None:
    sigma, delta, rounds = 1.1, 1e-5, 3
    ws = Workspace(compose(f"{DP} privacy.noise_multiplier={sigma} privacy.target_epsilon=null "
                           f"privacy.delta={delta} privacy.accountant={accountant}"))
    pid = 1
    n, steps, batch = len(ws.partitions()[pid]), ws.cfg.train.local_steps, ws.cfg.train.batch_size
    ctx = TrainContext(1, pid, torch.device("cpu"), {})
    arrays, reported = ws.initial_arrays(), []
    for r in range(1, rounds + 1):
        ctx.server_round = r
        arrays, metrics = _train(ws, arrays, ctx)
        reported.append(metrics["dp-epsilon"])
        assert metrics["dp-budget-spent"] == 0 and metrics["dp-noise-multiplier"] == sigma
    independent = create_accountant(mechanism=accountant)
    independent.history = [(sigma, batch / n, rounds * steps)]  # q = B/n, all of the client's steps
    expected = independent.get_epsilon(delta=delta)
    assert reported[-1] == pytest.approx(expected, rel=1e-9, abs=0)
    assert reported[0] < reported[1] < reported[2]  # ε composes across rounds, not per round
    assert ctx.state[HISTORY_KEY].tolist() == [[sigma, batch / n, rounds * steps]]


def test_target_epsilon_calibrates_sigma_like_make_private_with_epsilon() -> None:
    ws = Workspace(compose(f"{DP} privacy.target_epsilon=2.0 num_rounds=2"))
    n = len(ws.partitions()[0])
    steps = 2 * ws.cfg.train.local_steps  # planned: every round (fraction 1) × local steps
    want = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=16 / n, steps=steps,
                                accountant="rdp")
    ctx = TrainContext(1, 0, torch.device("cpu"), {})
    arrays = ws.initial_arrays()
    for r in (1, 2):
        ctx.server_round = r
        arrays, metrics = _train(ws, arrays, ctx)
        assert metrics["dp-noise-multiplier"] == want
    assert 1.9 < metrics["dp-epsilon"] <= 2.0  # the plan spends (almost) exactly the budget


# ----------------------------------------------------------------------------- per-sample gradients
@pytest.mark.parametrize("strategy", ["fedavg_lora", "ffa_lora", "fed_sb"])
def test_only_trainable_parameters_get_per_sample_gradients(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = " strategy.rank=4" if strategy == "fed_sb" else ""
    ws = Workspace(compose(f"{DP} strategy={strategy} privacy.noise_multiplier=1.0 privacy.target_epsilon=null{extra}"))
    model = ws.model()
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    seen: list[tuple[set[str], set[int]]] = []

    class Spy(opacus.optimizers.DPOptimizer):
        def pre_step(self, closure=None):  # type: ignore[no-untyped-def]
            have = {names[id(p)]: p.grad_sample for p in model.parameters()
                    if getattr(p, "grad_sample", None) is not None}
            seen.append((set(have), {g.shape[0] for g in have.values()}))
            return super().pre_step(closure)

    monkeypatch.setattr(opacus.optimizers, "DPOptimizer", Spy)
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    state = _fed_sb_state(ws) if strategy == "fed_sb" else {}
    ctx = TrainContext(1, 0, torch.device("cpu"), state)
    load_trainable_state(model, ws.initial_arrays())
    if state:  # Fed-SB: the trainer (re)loads these bases into B and A every round
        set_bases(model, {k.removeprefix("fed-sb/"): v for k, v in state.items()})
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    arrays = ws.initial_arrays()
    for r in (1, 2):  # two rounds with the client's persistent state
        ctx.server_round = r
        arrays, _ = _train(ws, arrays, ctx)

    assert len(seen) == 2 * ws.cfg.train.local_steps
    for got, batch_sizes in seen:
        assert got == trainable  # every trainable parameter, nothing frozen
        assert len(batch_sizes) == 1  # one per-sample row per example of the step's batch
    if strategy == "ffa_lora":
        assert not any(".lora_A." in n for n in trainable)
    if strategy == "fed_sb":
        assert trainable == {f"{m}.sb_R.weight" for m in lora_sb_modules(model)} | \
            {"model.classifier.weight", "model.classifier.bias"}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), frozen[name]), name  # the frozen base never moves
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad") and p.grad is None
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == hooks_before
    initial = ws.initial_arrays()
    assert set(arrays) == trainable and all(not torch.equal(arrays[k], initial[k]) for k in arrays)  # noisy steps


# ----------------------------------------------------------------------------- equivalence
def test_zero_noise_huge_clip_equals_the_non_private_run_and_noise_changes_it() -> None:
    """Same batches (``sampling=shuffle``: the non-private loop's batches), σ = 0 and a
    clip no gradient reaches: DP-SGD's clipped mean is the plain mean gradient."""
    reference = Workspace(compose(BASE))
    start = reference.initial_arrays()

    def upload(overrides: str, pid: int = 2) -> dict[str, torch.Tensor]:
        ws = Workspace(compose(overrides))
        return _train(ws, start, TrainContext(1, pid, torch.device("cpu"), {}))[0]

    plain = upload(BASE)
    private = upload(f"{DP} privacy.noise_multiplier=0 privacy.target_epsilon=null privacy.max_grad_norm=1e6 "
                     "privacy.sampling=shuffle")
    assert any((plain[k] - start[k]).abs().max() > 1e-3 for k in plain)  # it trained
    for key in plain:
        torch.testing.assert_close(private[key], plain[key], atol=2e-5, rtol=1e-4)
    noisy = upload(f"{DP} privacy.noise_multiplier=1.0 privacy.target_epsilon=null privacy.sampling=shuffle")
    assert max((noisy[k] - plain[k]).abs().max() for k in plain) > 1e-2


def test_poisson_path_equals_plain_sgd_on_the_same_poisson_batches() -> None:
    """With Poisson batches of random size b, Opacus' σ = 0, huge-clip update is
    Σ_i ∇ℓ_i / (qn): plain SGD on ``mean loss · b / B`` over the same batches."""
    over = "train.optimizer=sgd train.local_steps=4"
    ws = Workspace(compose(f"{DP} {over} privacy.noise_multiplier=0 privacy.target_epsilon=null "
                           "privacy.max_grad_norm=1e6"))
    start, pid, cfg = ws.initial_arrays(), 0, ws.cfg
    private, metrics = _train(ws, start, TrainContext(1, pid, torch.device("cpu"), {}))
    assert math.isinf(metrics["dp-epsilon"])  # σ = 0 is no privacy, and says so

    model, encoded = ws.model(), ws.encoded("train")
    load_trainable_state(model, start)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.train.lr)
    seed_torch(cfg.seed, "train", 1, pid)
    model.train()
    sizes = []
    for idx in private_batches(ws.partitions()[pid], cfg, 1, pid):
        sizes.append(len(idx))
        opt.zero_grad(set_to_none=True)
        (model(**encoded.batch(idx)).loss * len(idx) / cfg.train.batch_size).backward()
        opt.step()
    model.eval()
    reference = trainable_state(model)
    assert len(set(sizes)) > 1  # Poisson: the batch size really varies
    for key in reference:
        torch.testing.assert_close(private[key], reference[key], atol=2e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- budget stop
def test_budget_stop_client_sends_nothing_and_strategy_treats_it_as_absent(task_identity: None) -> None:
    cfg = compose(f"{DP} privacy.noise_multiplier=1.0 privacy.target_epsilon=5")
    ws = Workspace(cfg)
    grid = LocalGrid(cfg, 3)
    n1 = len(ws.partitions()[1])
    spent = {}  # client 1 has already spent most of its budget (as after earlier rounds)
    save_history(spent, [(1.0, cfg.train.batch_size / n1, 200)])
    grid.contexts[101].state[STATE_ARRAYS] = ArrayRecord(spent)
    strategy = FedAvgLoRA.from_config(cfg)
    strategy.initialize(ws.initial_arrays())
    metered = MeteredGrid(grid, strategy.ledger, strategy._partition)
    for rnd in (1, 2):
        before = {k: v.clone() for k, v in strategy.global_arrays.items()}
        messages = strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), metered)
        replies = metered.send_and_receive(messages)
        by_pid = {strategy._partition(r.metadata.src_node_id): r for r in replies}
        assert len(by_pid[1].content["arrays"]) == 0  # nothing but the notice
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        info = strategy.rounds[rnd]
        assert info.budget_spent == [1] and info.received == [0, 2] and not info.failures
        assert arrays is not None and metrics["num-replies"] == 2
        ups = {p: by_pid[p].content["arrays"].to_torch_state_dict() for p in (0, 2)}
        w = {p: len(ws.partitions()[p]) for p in (0, 2)}
        for key, value in strategy.global_arrays.items():  # FedAvg over the two that trained
            expected = (w[0] * ups[0][key] + w[2] * ups[2][key]) / (w[0] + w[2])
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)
        assert any(not torch.equal(before[k], v) for k, v in strategy.global_arrays.items())
        assert info.epsilon == max(strategy.client_epsilon.values()) == strategy.client_epsilon[1] > 5


def test_private_run_completes_and_reports_epsilon(task_identity: None, tmp_path: Path) -> None:
    """The ServerApp's loop on the in-process grid: the budget runs out mid-run, the run completes."""
    cfg = compose(f"{DP} num_rounds=4 privacy.target_epsilon=3 privacy.planned_rounds=2 eval.max_examples=32")
    summary = run_server(LocalGrid(cfg, 3), cfg, tmp_path)
    assert summary["status"] == "completed"
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    eps = [float(r["epsilon"]) for r in rows[1:]]
    assert rows[0]["epsilon"] == "" and eps == sorted(eps) and 0 < eps[-1] <= 3.0
    assert [int(r["num_replies"]) for r in rows[1:]] == [3, 3, 0, 0]  # planned 2 rounds: then the stop
    assert [int(r["num_failures"]) for r in rows[1:]] == [0, 0, 0, 0]
    privacy = json.loads((tmp_path / "summary.json").read_text())["privacy"]
    assert privacy["delta"] == 1e-5 and privacy["final_epsilon"] == pytest.approx(eps[-1], abs=1e-6)
    assert privacy["clients_out_of_budget"] == [0, 1, 2] and privacy["replies_withheld_for_budget"] == 6


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("override, message", [
    ("privacy.noise_multiplier=-0.5", r"privacy\.noise_multiplier must be a number >= 0, got -0\.5"),
    ("privacy.max_grad_norm=0", r"privacy\.max_grad_norm must be a positive number, got 0"),
    ("privacy.max_grad_norm=-1", r"privacy\.max_grad_norm must be a positive number"),
    ("privacy.accountant=moments", r"privacy\.accountant: unknown 'moments'; accepted: rdp, prv, gdp"),
    ("privacy.delta=1.5", r"privacy\.delta must be in \(0, 1\)"),
    ("privacy.target_epsilon=null", r"privacy\.noise_multiplier: dp_sgd needs"),
    ("privacy.target_epsilon=0", r"privacy\.target_epsilon must be > 0"),
    ("privacy.noise_multiplier=0", r"privacy\.noise_multiplier 0 gives epsilon = inf"),
    ("privacy.sampling=fixed", r"privacy\.sampling: unknown 'fixed'"),
    ("privacy.grad_sample_mode=ew", r"privacy\.grad_sample_mode: unknown 'ew'"),
    ("strategy=fedkseed", r"privacy: dp_sgd is not supported with strategy=fedkseed: FedKSeed's clients"),
])
def test_bad_privacy_config_names_the_field(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose(f"{DP} {override}")


def test_delta_must_be_below_one_over_n() -> None:
    cfg = compose(f"{DP} privacy.delta=0.01")  # valid alone; the clients hold > 100 examples
    sizes = [len(p) for p in Workspace(cfg).partitions()]
    assert max(sizes) > 100
    with pytest.raises(ConfigError, match=rf"privacy\.delta must be < 1/n .* n = {max(sizes)} examples"):
        check_delta(cfg, sizes)
    ws = Workspace(cfg)
    with pytest.raises(ConfigError, match=r"privacy\.delta must be < 1/n"):  # the client checks too
        _train(ws, ws.initial_arrays(), TrainContext(1, 0, torch.device("cpu"), {}))
    check_delta(compose(f"{DP} privacy.delta=0.001"), sizes)  # 0.001 < 1/n passes


def test_unreachable_target_is_a_config_error() -> None:
    ws = Workspace(compose(f"{DP} privacy.target_epsilon=1e-6 num_rounds=50"))
    with pytest.raises(ConfigError, match=r"privacy\.target_epsilon 1e-06 cannot be reached"):
        _train(ws, ws.initial_arrays(), TrainContext(1, 0, torch.device("cpu"), {}))


# ----------------------------------------------------------------------------- every first-order method
EXAMPLE_DP = [name for name in METHODS.names() if METHODS.get(name).capabilities.example_dp.ok]


@pytest.mark.parametrize("strategy", [*EXAMPLE_DP, "ferret strategy.trainable=all"])
def test_every_first_order_method_trains_privately(strategy: str) -> None:
    """The shared loop makes each method that declares example-level DP private; its upload
    still passes the strategy's checks.  (``ferret strategy.trainable=all`` trains the
    embeddings: the (B, T) position-ids path.)"""
    from fedtune.models.state import check_arrays

    extra = " strategy.rank=4" if strategy == "fed_sb" else ""
    cfg = compose(f"{DP} strategy={strategy} privacy.noise_multiplier=1.0 privacy.target_epsilon=null{extra}")
    ws = Workspace(cfg)
    server = METHODS.get(cfg.strategy.name).strategy_cls.from_config(cfg)
    server.initialize(ws.initial_arrays())
    ctx = TrainContext(1, 2, torch.device("cpu"), _fed_sb_state(ws) if cfg.strategy.name == "fed_sb" else {})
    upload, metrics = _train(ws, server.downlink(1, 2), ctx)
    check_arrays(upload, server.expected_upload(2))
    assert ctx.state[HISTORY_KEY][0, 2] == cfg.train.local_steps and 0 < metrics["dp-epsilon"] < math.inf


def test_functorch_mode_matches_hooks_and_empty_poisson_draws_are_noisy_accounted_steps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import fedtune.privacy.dp_sgd as dp_sgd

    over = f"{DP} privacy.noise_multiplier=0.5 privacy.target_epsilon=null"
    ws = Workspace(compose(over))
    start = ws.initial_arrays()
    hooks = _train(ws, start, TrainContext(1, 0, torch.device("cpu"), {}))[0]
    functorch = _train(Workspace(compose(f"{over} privacy.grad_sample_mode=functorch")), start,
                       TrainContext(1, 0, torch.device("cpu"), {}))[0]
    for key in hooks:  # same seeds, same batches, same noise: the two modes agree
        torch.testing.assert_close(functorch[key], hooks[key], atol=1e-5, rtol=1e-4)

    real = dp_sgd.private_batches
    monkeypatch.setattr(dp_sgd, "private_batches",
                        lambda *a: (idx if t != 1 else idx[:0] for t, idx in enumerate(real(*a))))
    ctx = TrainContext(1, 0, torch.device("cpu"), {})
    emptied, metrics = _train(ws, start, ctx)
    assert ctx.state[HISTORY_KEY][0, 2] == ws.cfg.train.local_steps  # the empty step is accounted
    assert all(torch.isfinite(v).all() for v in emptied.values()) and math.isfinite(metrics["train-loss"])
    assert any(not torch.equal(emptied[k], hooks[k]) for k in hooks)
