"""``FedtuneStrategy``: the Flower ``Strategy`` every fedtune method subclasses.

It does the messaging once for all methods, so a method only writes its maths:

* **roll-call** (first round): a ``query.rollcall`` message to every node; each replies
  with its ``partition-id`` (in ``fedtune run``'s simulation the engine's own node map,
  :attr:`roster`, replaces the messages).  Clients are then *sampled by partition id*
  from the run's seeded stream (:mod:`fedtune.sampling`), not by Flower's random node
  ids, so a seed picks the same clients in simulation and in deployment.
* **train**: each sampled client gets ``{"arrays": downlink(round, pid), "config":
  {"server-round", "method"}}``; replies are decoded, validated (keys, shapes, dtype,
  finite values) and handed to :meth:`aggregate` sorted by partition id, so the sums
  are deterministic.  A failed or malformed reply is logged and left out.
* **evaluate**: none on clients; the ServerApp evaluates the global model centrally
  through ``evaluate_fn``.
* **metering**: :meth:`start` wraps the grid in a :class:`MeteredGrid`, so every
  message is counted in :attr:`ledger`, whoever drives the loop.
* **checkpoints**: :meth:`checkpoint_state` is everything the strategy holds (global
  state, ledger, round records and the method's own attributes) except the run's node
  ids; ``start(..., resume=state)`` restores it and continues at the next round.

Subclasses implement :meth:`aggregate` (pure tensor maths) and may override
:meth:`downlink` (per-client payloads) and :meth:`initialize`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedtune.comm.ledger import Ledger
from fedtune.comm.metered_grid import MeteredGrid
from fedtune.errors import PayloadError
from fedtune.flower.round_loop import run_rounds
from fedtune.models.state import check_arrays, load_trainable_state
from fedtune.registry import METHODS
from fedtune.runtime.roster import SimulationRoster
from fedtune.sampling import sample_partitions

ROLLCALL = "query.rollcall"
Arrays = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """One client's decoded, validated reply."""

    partition_id: int
    num_examples: int
    arrays: Arrays
    metrics: dict[str, float]


@dataclass
class RoundInfo:
    """What happened in one round (read by the ServerApp for ``metrics.csv``)."""

    sampled: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)
    train_loss: float = float("nan")
    aggregate_seconds: float = 0.0
    budget_spent: list[int] = field(default_factory=list)  # DP: replied, but their privacy budget is spent
    epsilon: float = float("nan")  # DP: max ε over all clients so far (NaN without privacy)


def weights_for(updates: list[ClientUpdate], weighting: str) -> list[float]:
    """Normalised aggregation weights ``p_k``: by example count (FedAvg) or uniform."""
    raw = [float(u.num_examples) if weighting == "examples" else 1.0 for u in updates]
    total = sum(raw)
    return [w / total for w in raw]


class FedtuneStrategy(Strategy):
    """Base class: seeded sampling by partition id, validation, metering.

    Parameters
    ----------
    num_clients : partitions expected to answer the roll-call.
    clients_per_round : how many are sampled each round.
    seed : the run seed (sampling stream).
    min_replies : a round with fewer valid replies keeps the previous global state.
    rollcall_timeout : seconds to wait for all nodes to connect.
    config : the method's config dataclass (the ``config_cls`` it is registered with);
        ``None`` = its defaults.  Kept as :attr:`config`; ``config.weighting`` gives p_k.
    """

    name = "base"
    transient = frozenset({"_grid", "node_of", "partition_of_node", "_resuming", "roster"})  # never checkpointed

    def __init__(self, *, num_clients: int, clients_per_round: int, seed: int = 0, min_replies: int = 1,
                 rollcall_timeout: float = 300.0, config: Any = None) -> None:
        config_cls = METHODS.get(self.name).config_cls
        if config is not None and not isinstance(config, config_cls):
            raise TypeError(f"{type(self).__name__}: config must be a {config_cls.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config if config is not None else config_cls()
        self.num_clients, self.clients_per_round = num_clients, clients_per_round
        self.seed, self.min_replies = seed, min_replies
        self.rollcall_timeout = rollcall_timeout
        self.ledger = Ledger()
        self.rounds: dict[int, RoundInfo] = {}
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.partition_of_node: dict[int, int] = {}
        self.global_arrays: Arrays = {}
        self.client_epsilon: dict[int, float] = {}  # DP: latest ε each client reported
        self._grid: MeteredGrid | None = None
        self._resuming = False  # set by start(resume=...): the next roll-call re-syncs, not sets up
        self.roster: SimulationRoster | None = None  # fedtune's simulation: the engine's node map, no roll-call

    @property
    def weighting(self) -> str:
        """``examples`` or ``uniform``, validated by the config (:class:`~fedtune.config.method.MethodConfig`)."""
        return self.config.weighting

    @classmethod
    def from_config(cls, cfg: Any) -> "FedtuneStrategy":
        """Build from a :class:`~fedtune.config.run.RunConfig`; the method's section is passed whole."""
        return cls(num_clients=cfg.federation.num_clients, clients_per_round=cfg.federation.clients_per_round,
                   seed=cfg.seed, min_replies=cfg.federation.min_clients, config=cfg.strategy)

    # ------------------------------------------------------------------ method hooks
    def initialize(self, arrays: Arrays) -> None:
        """Set the initial global state (called once by :meth:`start`)."""
        self.global_arrays = {k: v.clone() for k, v in arrays.items()}

    def setup(self, grid: Grid, server_round: int) -> None:
        """One-time exchange before the first training round (default: none).

        Runs right after the roll-call.  Send messages of type ``"train.setup"`` through
        ``grid.send_and_receive`` (they reach the trainer's ``setup`` method and are
        metered as ``one_time`` traffic), e.g. Fed-SB's initial gradients and bases.
        """

    def resync(self, grid: Grid, server_round: int) -> None:
        """After a resume, give clients again what :meth:`setup` gave them once (default:
        nothing; Fed-SB re-sends its bases).  Metered as ``resume`` traffic."""

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything this strategy holds, but the run's node ids (a new run has new ones).

        Taken from the instance's attributes, so a method's own state (accumulators,
        histories, bases, merged deltas) is included without the method listing it.
        """
        return {k: v for k, v in vars(self).items() if k not in self.transient}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state` (called after :meth:`initialize`)."""
        vars(self).update(state)

    def downlink(self, server_round: int, partition_id: int) -> Arrays:
        """What client ``partition_id`` receives for training (default: the global state)."""
        return self.global_arrays

    def expected_upload(self, partition_id: int) -> dict[str, tuple[int, ...]]:
        """Keys and shapes a client's upload must have (default: those of the global state)."""
        return {k: tuple(v.shape) for k, v in self.global_arrays.items()}

    def expected_dtypes(self, partition_id: int) -> dict[str, torch.dtype]:
        """Exact dtypes of the upload's keys (default: the global state's, for the keys it
        shares with :meth:`expected_upload`); any other key must be fp32 or an integer index
        dtype (:func:`~fedtune.models.state.check_arrays`)."""
        expected = self.expected_upload(partition_id)
        return {k: v.dtype for k, v in self.global_arrays.items() if k in expected}

    def payload_problem(self, partition_id: int, arrays: Arrays) -> str:
        """Why an upload that has the right keys, shapes and dtypes is still invalid ("" if
        it is not), e.g. seed indices outside the pool.  Such a reply is rejected and
        recorded as that client's failure, like any malformed one."""
        return ""

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> Arrays:
        """Combine the (sorted, validated) client updates into the new global state."""
        raise NotImplementedError

    def load_into(self, model: torch.nn.Module) -> None:
        """Make ``model`` the current global model (central evaluation, export).

        Default: copy :attr:`global_arrays` into its trainable parameters.  Methods that
        also change the frozen base (FedEx-LoRA, FLoRA) or keep state outside the
        trainable tensors override this.
        """
        load_trainable_state(model, self.global_arrays)

    def export(self, model: torch.nn.Module, path: str) -> None:
        """Write the final model (already :meth:`load_into`-ed) to the directory ``path``.

        Default: ``model.save_pretrained`` (a peft adapter for the LoRA methods).  Methods
        whose global model is more than the adapter add their extra state next to it, so
        :func:`fedtune.models.export.load_exported` rebuilds exactly the evaluated model.
        """
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(str(path))

    # ------------------------------------------------------------------ Flower API
    def summary(self) -> None:
        log(INFO, "\t├── %s: %d clients, %d per round, seed %d, weighting %s", type(self).__name__,
            self.num_clients, self.clients_per_round, self.seed, self.weighting)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              resume: dict[str, Any] | None = None) -> Result:
        """The round loop (:func:`run_rounds`) over a metered grid.

        ``resume``: a :meth:`checkpoint_state` taken after round ``resume["round"]``
        (the dict of :func:`fedtune.results.checkpoint.load_checkpoint`); the run goes on
        from the next round, as if it had never stopped.
        """
        self.summary()
        self.initialize(initial_arrays.to_torch_state_dict())
        first_round, arrays = 1, initial_arrays
        if resume is not None:
            self.restore_state(resume["strategy"])
            self._resuming = True
            first_round, arrays = resume["round"] + 1, ArrayRecord(self.global_arrays)
        self._grid = grid if isinstance(grid, MeteredGrid) else MeteredGrid(grid, self.ledger, self._partition)
        return run_rounds(self, self._grid, arrays, num_rounds, timeout, train_config, evaluate_fn, first_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.global_arrays:
            self.initialize(arrays.to_torch_state_dict())
        if isinstance(grid, MeteredGrid):
            grid.server_round = server_round
        if not self.node_of and self._resuming:  # a new process: learn the nodes, restore client state
            with _metered_as(grid, "resume"):
                self._rollcall(grid)
                self.resync(grid, server_round)
            self._resuming = False
        elif not self.node_of:
            self._rollcall(grid)
            self.setup(grid, server_round)
        sampled = sample_partitions(self.seed, server_round, self.node_of, self.clients_per_round)
        self.rounds[server_round] = RoundInfo(sampled=sampled)
        messages = []
        for pid in sampled:
            cfg = ConfigRecord({**dict(config), "server-round": server_round, "method": self.name})
            content = RecordDict({"arrays": ArrayRecord(self.downlink(server_round, pid)), "config": cfg})
            messages.append(Message(content, dst_node_id=self.node_of[pid], message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        info = self.rounds.setdefault(server_round, RoundInfo())
        unattributed: list[str] = []
        updates = sorted(self._decode(replies, info, unattributed), key=lambda u: u.partition_id)
        info.received = [u.partition_id for u in updates]
        self._missing_replies(info, unattributed)
        if self.client_epsilon:
            info.epsilon = max(self.client_epsilon.values())
        if len(updates) < self.min_replies:
            log(WARNING, "round %d: %d valid replies (< %d); global state unchanged", server_round,
                len(updates), self.min_replies)
            return None, None
        t0 = time.perf_counter()
        self.global_arrays = self.aggregate(server_round, updates)
        info.aggregate_seconds = time.perf_counter() - t0
        weights = weights_for(updates, "examples")
        info.train_loss = sum(w * u.metrics.get("train-loss", float("nan")) for w, u in zip(weights, updates))
        metrics = MetricRecord({"train-loss": info.train_loss, "num-replies": len(updates),
                                "num-failures": len(info.failures)})
        return ArrayRecord(self.global_arrays), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the global model is evaluated centrally on the held-out split

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # ------------------------------------------------------------------ internals
    def _partition(self, node_id: int) -> int:
        return self.partition_of_node.get(node_id, -1)

    def _rollcall(self, grid: Grid) -> None:
        """Learn which node serves which partition.

        From the simulation engine's own map when :attr:`roster` holds one (no messages);
        otherwise by asking every node (counted as "control" traffic).
        """
        if self.roster is not None and (engine_map := self.roster.wait(self.rollcall_timeout)) is not None:
            self._learn_nodes(engine_map.items(), source="the simulation engine")
            return
        deadline = time.monotonic() + self.rollcall_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {self.num_clients} nodes connected "
                                   f"within {self.rollcall_timeout:.0f} s")
            time.sleep(0.2)
        queries = [Message(RecordDict({"config": ConfigRecord({"rollcall": 1})}), dst_node_id=n,
                           message_type=ROLLCALL) for n in nodes]
        answers = []
        for reply in grid.send_and_receive(queries, timeout=self.rollcall_timeout):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed the roll-call: {reply.error.reason}")
            answers.append((reply.metadata.src_node_id, int(reply.content["metrics"]["partition-id"])))
        self._learn_nodes(answers, source="the roll-call")

    def _learn_nodes(self, node_partitions: Iterable[tuple[int, int]], source: str) -> None:
        """Record ``(node id, partition id)`` pairs: one node per partition, all present."""
        for node, pid in node_partitions:
            if pid in self.node_of or not 0 <= pid < self.num_clients:
                raise RuntimeError(f"node {node} reports partition-id {pid}, "
                                   f"which is duplicated or outside [0, {self.num_clients})")
            self.node_of[pid] = node
            self.partition_of_node[node] = pid
        self.ledger.attribute(self.partition_of_node)
        if len(self.node_of) < self.num_clients:
            missing = sorted(set(range(self.num_clients)) - set(self.node_of))
            raise RuntimeError(f"{source} names no node for partitions {missing[:10]} "
                               f"({len(self.node_of)} of {self.num_clients} known)")

    def _budget_spent(self, pid: int, reply: Message, info: RoundInfo) -> bool:
        """Record a DP client's ε; True when it sent nothing because its budget is spent
        (no contribution: neither an update nor a failure)."""
        metrics = reply.content["metrics"] if "metrics" in reply.content else {}
        if "dp-epsilon" in metrics:
            self.client_epsilon[pid] = float(metrics["dp-epsilon"])
        if not metrics.get("dp-budget-spent"):
            return False
        info.budget_spent.append(pid)
        log(INFO, "client %d: privacy budget spent (epsilon %.4g); no contribution", pid,
            self.client_epsilon.get(pid, float("nan")))
        return True

    def _missing_replies(self, info: RoundInfo, unattributed: list[str]) -> None:
        """Count a sampled client that never answered as failed (deployment: its node vanished,
        or the round timed out); the SuperLink's own error replies name no client, so their
        reason is attached to the missing ones."""
        answered = set(info.received) | set(info.failures) | set(info.budget_spent)
        reason = unattributed[0] if unattributed else "no reply within federation.round_timeout"
        for pid in info.sampled:
            if pid not in answered:
                info.failures[pid] = reason
                log(WARNING, "client %d failed: %s", pid, reason)

    def _decode(self, replies: Iterable[Message], info: RoundInfo,
                unattributed: list[str] | None = None) -> Iterable[ClientUpdate]:
        """Valid updates; every other reply is recorded in ``info.failures`` with its reason.

        Whatever a client sends (missing records, wrong record types, wrong keys, shapes or
        dtypes, NaN/Inf, a bad ``num-examples``) rejects that reply only, never the round.
        """
        for reply in replies:
            pid = self._partition(reply.metadata.src_node_id)
            if reply.has_error() and pid < 0 and unattributed is not None:  # from the SuperLink, not a node
                unattributed.append(_last_line(reply.error.reason))
                continue
            if reply.has_error():
                info.failures[pid] = _last_line(reply.error.reason)
                log(WARNING, "client %d failed: %s", pid, info.failures[pid])
                continue
            try:
                if self._budget_spent(pid, reply, info):
                    continue
                content = reply.content
                arrays = content["arrays"].to_torch_state_dict() if "arrays" in content else {}
                check_arrays(arrays, self.expected_upload(pid), self.expected_dtypes(pid))
                if problem := self.payload_problem(pid, arrays):
                    raise PayloadError(problem)
                metrics = dict(content["metrics"])
                num_examples = _num_examples(metrics["num-examples"])
                scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            except (PayloadError, KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
                info.failures[pid] = f"rejected payload: {exc}"
                log(WARNING, "client %d: %s", pid, info.failures[pid])
                continue
            yield ClientUpdate(pid, num_examples, arrays, scalars)


@contextmanager
def _metered_as(grid: Grid, kind: str) -> Iterator[None]:
    """Record the messages sent inside the block under ledger kind ``kind``."""
    if not isinstance(grid, MeteredGrid):
        yield
        return
    grid.kind, previous = kind, grid.kind
    try:
        yield
    finally:
        grid.kind = previous


def _last_line(reason: str) -> str:
    """The informative end of an error reply's reason: Flower's simulation writes
    ``<class ...>:<'traceback ... Exception ClientAppException occurred. Message: why'>``."""
    lines = [line.strip() for line in str(reason).strip().splitlines() if line.strip()]
    if not lines:
        return "error reply without a reason"
    line = lines[-1].removesuffix("'>")
    line = re.sub(r"^Exception (\w+) occurred\. Message: ", r"\1: ", line)
    return line[:200]


def _num_examples(value: object) -> int:
    """A client's ``num-examples`` as a positive int; :class:`PayloadError` otherwise."""
    number = float(value)  # type: ignore[arg-type]  # a list or a string raises TypeError/ValueError
    if not (number >= 1 and number.is_integer()):
        raise PayloadError(f"num-examples must be an integer >= 1, got {value!r}")
    return int(number)
