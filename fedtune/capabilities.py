"""What a federated method declares about itself, with the reasons, for the core to read.

Privacy code, the ServerApp, export and the tests never branch on a method's name: they
read the :class:`Capabilities` and :class:`Payload` of its
:class:`~fedtune.registry.MethodSpec`.  Every default is the cautious one (a method
that declares nothing is refused under either DP mode, is not sum-only, has no
reloadable export), so a new method gains a capability only by stating it and why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedtune.errors import ConfigError


@dataclass(frozen=True)
class Condition:
    """A field of the method's own config section that must hold ``value`` for a capability.

    ``why`` completes the sentence "strategy.<field> must be <value> under <mode>, got ...: <why>".
    """

    field: str
    value: Any
    why: str

    def unmet(self, section: Any) -> bool:
        return getattr(section, self.field, None) != self.value


@dataclass(frozen=True)
class Support:
    """Whether a method supports something, why (or why not), and under which settings."""

    ok: bool
    reason: str
    conditions: tuple[Condition, ...] = ()

    def check(self, section: Any, under: str) -> None:
        """Raise a one-line :class:`ConfigError` for the first unmet condition of ``section``
        (the run's ``strategy`` config); ``under`` names the mode, e.g. ``privacy=client_dp``."""
        for c in self.conditions:
            if c.unmet(section):
                raise ConfigError(f"strategy.{c.field} must be {c.value} under {under}, "
                                  f"got {getattr(section, c.field, None)!r}: {c.why}")

    def overrides(self) -> list[str]:
        """The conditions as Hydra overrides (``strategy.<field>=<value>``)."""
        return [f"strategy.{c.field}={c.value}" for c in self.conditions]


def undeclared(what: str) -> Support:
    """The default: not supported, because the method did not say it is."""
    return Support(False, f"the method does not declare {what}")


# Client-level DP's noise σC/m is calibrated for a uniform mean of the m clipped updates.
UNIFORM_WEIGHTING = Condition(
    "weighting", "uniform",
    "the noise σC/m covers one client moving a uniform mean of m clipped updates by C/m; "
    "weighting by examples lets one client move it by p_k·C > C/m")


@dataclass(frozen=True)
class Capabilities:
    """A method's declared capabilities (all off unless declared).

    example_dp : ``privacy=dp_sgd`` (Opacus in the client's local steps) applies.
    client_dp : ``privacy=client_dp`` (Flower's fixed-clipping wrapper around the
        strategy) is sound: the released state is the uniform mean of the uploads.
    setup_on_client_data : what a one-time setup computes on client data outside any DP
        mechanism; written to summary.json's ``privacy.not_accounted`` ("" = no such setup);
        a callable of the run's ``strategy`` section where the answer depends on its options
        (read it through :meth:`setup_note`).
    sum_only : the aggregate is a function of ``Σ_k p_k·upload_k`` taken key by key (so
        it could run under secure aggregation), with the conditions under which it is.
    identical_updates_fixed_point : identical client uploads aggregate to that upload.
    sender_bound_directions : an upload means something only with its sender's identity
        (one-byte ZO: its codes multiply directions seeded by the sender's id), so identical
        uploads from two clients are two different updates; the aggregate is then the
        p_k-weighted sum of what each upload would move the model by alone.
    lr_schedule : it follows ``train.lr_schedule`` across rounds (:mod:`fedtune.schedule`).
    warmup : it follows ``train.warmup_steps`` within a round.
    step_size : the config field the schedule starts from, the method's step size
        (recorded per round as metrics.csv's ``lr``).
    quantized_base : the method trains on a frozen bitsandbytes-quantized base
        (``model.quantization=4bit|8bit``, QLoRA): it never updates, merges into or
        differentiates with respect to the base weights.
    """

    example_dp: Support = undeclared("that its local updates are DP-SGD steps")
    client_dp: Support = undeclared("that its aggregate is a uniform mean of the uploaded payload")
    setup_on_client_data: str | Callable[[Any], str] = ""
    sum_only: Support = undeclared("that its aggregate needs only the weighted sum of the uploads")
    identical_updates_fixed_point: bool = False
    sender_bound_directions: bool = False
    lr_schedule: Support = undeclared("that its step size follows train.lr_schedule")
    warmup: Support = undeclared("that its local steps follow train.warmup_steps")
    step_size: str = "train.lr"
    quantized_base: Support = undeclared("that it trains on a frozen quantized base")

    def setup_note(self, section: Any) -> str:
        """:attr:`setup_on_client_data` for a run whose ``strategy`` section is ``section``."""
        note = self.setup_on_client_data
        return note(section) if callable(note) else note


def nbytes(arrays: Mapping[str, Any]) -> int:
    """Payload bytes of tensors: ``Σ numel × itemsize``, as the ledger counts arrays."""
    return sum(v.numel() * v.element_size() for v in arrays.values())


PayloadFormula = Callable[[Any, int, Mapping[str, Any]], tuple[int, int]]


@dataclass(frozen=True)
class Payload:
    """What travels in one client's training round, in words and by formula.

    formula : ``(strategy, partition_id, upload) -> (down, up)`` payload bytes by the
        method's own formula at the strategy's current state (before it aggregates the
        round); the contract test checks it against what the ledger counts.
    """

    down: str
    up: str
    formula: PayloadFormula | None = None


@dataclass(frozen=True)
class Export:
    """What ``RUN_DIR/adapter`` holds and how it is loaded back.

    load : ``(freshly built base model, adapter dir) -> the evaluated model``; ``None``
        when fedtune has no loader for the format.
    """

    format: str
    load: Callable[[Any, Any], Any] | None = None
