"""``train.lr_schedule`` / ``lr_min`` / ``warmup_steps``: the values, the optimizer, the refusals.

The oracle for the cosine values is the known cosines at 0, π/4, π/2, 3π/4 and π
(1, √2/2, 0, −√2/2, −1), not the formula again.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.privacy.dp_sgd import with_privacy
from fedtune.schedule import method_lr, round_lr, warmup_factor
from fedtune.runtime.workspace import Workspace
from fedtune.trainer import TrainContext

BASE = "model=tiny dataset=tiny federation.num_clients=3 runtime.device=cpu"
HALF_SQRT2 = math.sqrt(2) / 2


def test_cosine_goes_from_lr_in_round_one_to_lr_min_in_the_last() -> None:
    got = [round_lr("cosine", 1.0, 0.0, r, 5) for r in range(1, 6)]  # t = 0, 1/4, 1/2, 3/4, 1
    assert got == pytest.approx([1.0, (1 + HALF_SQRT2) / 2, 0.5, (1 - HALF_SQRT2) / 2, 0.0], abs=1e-15)
    assert round_lr("cosine", 5e-5, 1e-6, 1, 20) == 5e-5 and round_lr("cosine", 5e-5, 1e-6, 20, 20) == 1e-6
    assert round_lr("cosine", 0.5, 0.1, 2, 3) == pytest.approx(0.3, abs=1e-15)  # the middle: the mean
    assert round_lr("cosine", 0.5, 0.1, 1, 1) == 0.5  # a one-round run trains at lr
    assert all(round_lr("constant", 0.5, 0.1, r, 7) == 0.5 for r in range(1, 8))


def test_warmup_is_linear_over_the_first_steps() -> None:
    assert [warmup_factor(4, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [warmup_factor(0, s) for s in range(3)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("privacy", ["", "privacy=dp_sgd privacy.noise_multiplier=1.0 privacy.target_epsilon=null"])
def test_the_local_optimizer_steps_at_the_scheduled_lr(privacy: str) -> None:
    """A real local training call (FedAvg-LoRA's trainer, behind the DP wrapper as the
    ClientApp runs it); the lr read from the optimizer at every step.  Rounds 2 and 3 of 3:
    5.5e-3, 1e-3 (round 1: 1e-2); warmup over 2 steps halves step 0."""
    cfg = compose(f"{BASE} strategy=fedavg_lora num_rounds=3 train.local_steps=3 train.batch_size=4 "
                  f"train.lr=1e-2 train.lr_min=1e-3 train.lr_schedule=cosine train.warmup_steps=2 {privacy}")
    ws = Workspace(cfg)
    model, seen, state = ws.model(), [], {}
    local = (torch.optim.AdamW, torch.optim.SGD)  # not Opacus' wrapper around them
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append([g["lr"] for g in opt.param_groups]) if type(opt) in local else None)
    try:
        for r in (2, 3):
            with_privacy(ws.trainer.train, cfg)(model, ws.initial_arrays(), ws, TrainContext(r, 0, ws.device, state))
    finally:
        hook.remove()
    expected = [lr * f for lr in (5.5e-3, 1e-3) for f in (0.5, 1.0, 1.0)]
    assert [g[0] for g in seen] == pytest.approx(expected, rel=1e-12)
    assert all(len(set(g)) == 1 for g in seen)  # every param group


def test_the_recorded_lr_is_the_methods_step_size() -> None:
    cfg = compose(f"{BASE} strategy=fedkseed num_rounds=3 strategy.lr=1e-2 train.lr_schedule=cosine train.lr_min=0")
    assert [method_lr(cfg, r) for r in (1, 2, 3)] == pytest.approx([1e-2, 5e-3, 0.0], abs=1e-18)
    cfg = compose(f"{BASE} strategy=ferret num_rounds=3 train.lr=4e-3 train.lr_schedule=cosine train.lr_min=0")
    assert method_lr(cfg, 2) == pytest.approx(2e-3, rel=1e-12)  # Ferret: its local optimizer's lr
    assert method_lr(compose(f"{BASE} strategy=ferret train.lr=4e-3"), 5) == 4e-3


@pytest.mark.parametrize("override, words", [
    ("train.lr_schedule=linear", "train.lr_schedule: unknown 'linear'; accepted: constant, cosine"),
    ("train.lr_min=-1", "train.lr_min must be a finite number >= 0, got -1.0"),
    ("train.warmup_steps=-1", "train.warmup_steps must be >= 0 (0 = off), got -1"),
    ("train.lr_schedule=cosine train.lr=1e-3 train.lr_min=1e-2",
     "train.lr_min (0.01) exceeds train.lr (0.001), the schedule's maximum for strategy=fedavg_lora"),
    ("strategy=fedkseed train.warmup_steps=3", "train.warmup_steps must be 0 for strategy=fedkseed, got 3: "),
    ("strategy=fedkseed_pro train.lr_schedule=cosine strategy.lr=1e-4 train.lr_min=1e-3",
     "train.lr_min (0.001) exceeds strategy.lr (0.0001)"),
])
def test_bad_schedules_are_one_line_before_ray(override: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        compose(f"{BASE} {override}")
    assert str(err.value).startswith(words) and "\n" not in str(err.value)


def test_a_cosine_run_resumes_only_over_its_own_num_rounds(tmp_path) -> None:
    """The lr of a round depends on num_rounds: a resumed run keeps it, so it keeps its lrs."""
    from dataclasses import replace

    from fedtune.flower.server_app import resume_point
    from fedtune.results.checkpoint import save_checkpoint
    from fedtune.results.store import METRIC_COLUMNS, csv_text

    (tmp_path / "metrics.csv").write_text(csv_text(METRIC_COLUMNS, [{"round": r} for r in range(3)]))
    cfg = compose(f"{BASE} num_rounds=4 train.lr_schedule=cosine")
    save_checkpoint(tmp_path, 2, {}, cfg.to_dict())
    resume_point(cfg, tmp_path)  # the same num_rounds: accepted
    with pytest.raises(ValueError, match=r"anneals its lr over num_rounds=4 \(train.lr_schedule=cosine\)"):
        resume_point(replace(cfg, num_rounds=6), tmp_path)
    constant = compose(f"{BASE} num_rounds=4")
    save_checkpoint(tmp_path, 2, {}, constant.to_dict())
    resume_point(replace(constant, num_rounds=6), tmp_path)  # constant: num_rounds may grow, as before
