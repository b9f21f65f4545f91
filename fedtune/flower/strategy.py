"""``FedtuneStrategy``: the Flower ``Strategy`` every fedtune method subclasses.

It does the messaging once for all methods, so a method only writes its maths:

* **node discovery** (first round, :mod:`fedtune.flower.nodes`); clients are then
  *sampled by partition id* from the run's seeded stream (:mod:`fedtune.sampling`), not by
  Flower's random node ids, so a seed picks the same clients in simulation and deployment.
* **train**: each sampled client gets ``downlink(round, pid)`` (:mod:`fedtune.flower.exchange`);
  replies are decoded and validated (:mod:`fedtune.flower.replies`) and handed to
  :meth:`aggregate` sorted by partition id, so the sums are deterministic.  A failed or
  malformed reply is logged and left out.
* **evaluate**: none on clients; the ServerApp evaluates the global model centrally.
* **metering**: :meth:`start` wraps the grid in a :class:`MeteredGrid`, so every message
  is counted in :attr:`ledger`, whoever drives the loop.
* **checkpoints**: :meth:`state_dict` is what a resumed run needs, never the run's node
  ids; ``start(..., resume=checkpoint)`` loads it and continues at the next round.

Subclasses implement :meth:`aggregate` (pure tensor maths) and may override
:meth:`downlink` (per-client payloads), :meth:`initialize` and :meth:`setup`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedtune.comm.ledger import Ledger
from fedtune.comm.metered_grid import MeteredGrid, metered_as
from fedtune.config.method import MethodConfig
from fedtune.flower.exchange import SETUP, build_messages, handlerless, needs_error, send_setup
from fedtune.flower.nodes import ROLLCALL, discover_nodes
from fedtune.flower.replies import Arrays, ClientUpdate, RoundInfo, decode_replies, missing_replies, weights_for
from fedtune.flower.round_loop import RoundHooks, run_rounds
from fedtune.models.state import load_trainable_state
from fedtune.registry import METHODS
from fedtune.results.ledger_state import ledger_records, ledger_state
from fedtune.results.state_codec import check_state_keys
from fedtune.runtime.roster import SimulationRoster
from fedtune.sampling import sample_partitions

__all__ = ["Arrays", "ClientUpdate", "FedtuneStrategy", "ROLLCALL", "RoundInfo", "SETUP", "weights_for"]


class FedtuneStrategy(Strategy):
    """Base class: seeded sampling by partition id, validation, metering.

    Parameters
    ----------
    num_clients : partitions expected to answer the roll-call.
    clients_per_round : how many are sampled each round.
    seed : the run seed (sampling stream).
    min_replies : a round with fewer valid replies keeps the previous global state.
    rollcall_timeout : seconds to wait for all nodes to connect.
    config : the method's config dataclass (the ``config_cls`` it is registered with;
        :class:`~fedtune.config.method.MethodConfig` for an unregistered strategy), ``None``
        = its defaults.  Kept as :attr:`config`; ``config.weighting`` gives p_k.

    Class attribute :attr:`client_app_needs` declares what a method needs from each
    ClientApp beyond a ``train`` handler that replies ``{"arrays", "metrics":
    {"num-examples"}}`` (e.g. a ``train.setup`` handler, client-side state kept across
    rounds); each entry completes "each ClientApp must provide ...".  A method that
    declares none runs against any Flower ClientApp; one that declares some is refused,
    with these words, when the nodes turn out to be plain ClientApps (no roll-call).
    """

    name = "base"
    client_app_needs: tuple[str, ...] = ()

    def __init__(self, *, num_clients: int, clients_per_round: int, seed: int = 0, min_replies: int = 1,
                 rollcall_timeout: float = 300.0, config: Any = None) -> None:
        config_cls = METHODS.get(self.name).config_cls if self.name in METHODS.names() else MethodConfig
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
        self._initialized = False  # a causal LM's global state may be empty (no head), e.g. FLoRA's
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
        self._initialized = True

    def setup(self, grid: Grid, server_round: int) -> None:
        """One-time exchange before the first training round (default: none).

        Runs right after the roll-call.  Send ``"train.setup"`` messages with
        :meth:`setup_exchange` (they reach the trainer's ``setup`` method and are metered as
        ``one_time`` traffic), e.g. Fed-SB's initial gradients and bases; a ClientApp without
        the handler is refused with what it must provide (:attr:`client_app_needs`).
        """

    def resync(self, grid: Grid, server_round: int) -> None:
        """After a resume, give clients again what :meth:`setup` gave them once (default:
        nothing; Fed-SB re-sends its bases).  Metered as ``resume`` traffic."""

    def setup_exchange(self, grid: Grid, server_round: int, arrays_of: Callable[[int], Arrays],
                       required: bool = True) -> list[Message]:
        """One ``train.setup`` message to every known client, ``arrays_of(partition id)`` its
        content (:meth:`setup`, :meth:`resync`), and the replies: through
        :meth:`require_handlers` when ``required``, else as they came (error replies included)."""
        config = {"server-round": server_round, "method": self.name}
        replies = send_setup(grid, self.node_of, config, arrays_of, self.rollcall_timeout)
        return self.require_handlers(replies, SETUP) if required else replies

    def require_handlers(self, replies: list[Message], message_type: str) -> list[Message]:
        """``replies`` unchanged, unless a node has no ``message_type`` handler (a plain
        ClientApp): then a ``RuntimeError`` that says what each ClientApp must provide."""
        lacking = handlerless(replies, message_type)
        if lacking:
            raise RuntimeError(needs_error(type(self).__name__, self.client_app_needs,
                                           f"{len(lacking)} of {len(replies)} nodes have no '{message_type}' handler"))
        return replies

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
              resume: dict[str, Any] | None = None, hooks: RoundHooks | None = None,
              driver: Strategy | None = None) -> Result:
        """The round loop (:func:`run_rounds`) over a metered grid.

        ``resume``: a checkpoint taken after round ``resume["round"]`` (the dict of
        :func:`fedtune.results.checkpoint.load_checkpoint`); :meth:`load_state_dict` takes
        ``resume["strategy"]`` and the run goes on from the next round, as if it had never
        stopped.  ``hooks``: what the run does around each round (metrics, checkpoint).
        ``driver``: a wrapper around this strategy that the loop drives instead (Flower's
        DP wrappers, :class:`~fedtune.privacy.client_level.ClientLevelDP`); this strategy
        still keeps the state and meters the grid.
        """
        (driver or self).summary()
        self.initialize(initial_arrays.to_torch_state_dict())
        first_round, arrays = 1, initial_arrays
        if resume is not None:
            self.load_state_dict(resume["strategy"])
            self._resuming = True
            first_round, arrays = resume["round"] + 1, ArrayRecord(self.global_arrays)
        self._grid = grid if isinstance(grid, MeteredGrid) else MeteredGrid(grid, self.ledger, self._partition)
        return run_rounds(driver or self, self._grid, arrays, num_rounds, timeout, train_config, evaluate_fn,
                          first_round, hooks)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self._initialized:
            self.initialize(arrays.to_torch_state_dict())
        if isinstance(grid, MeteredGrid):
            grid.server_round = server_round
        if not self.node_of and self._resuming:  # a new process: learn the nodes, restore client state
            with metered_as(grid, "resume"):
                self._rollcall(grid)
                self.resync(grid, server_round)
            self._resuming = False
        elif not self.node_of:
            self._rollcall(grid)
            self.setup(grid, server_round)
        sampled = sample_partitions(self.seed, server_round, self.node_of, self.clients_per_round)
        self.rounds[server_round] = RoundInfo(sampled=sampled)
        cfg = {**dict(config), "server-round": server_round, "method": self.name}
        return build_messages(self.node_of, sampled, MessageType.TRAIN, cfg,
                              lambda pid: self.downlink(server_round, pid))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        info = self.rounds.setdefault(server_round, RoundInfo())
        unattributed: list[str] = []
        updates = sorted(self._decode(replies, info, unattributed), key=lambda u: u.partition_id)
        info.received = [u.partition_id for u in updates]
        missing_replies(info, unattributed)
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
        """Learn which node serves which partition (:func:`~fedtune.flower.nodes.discover_nodes`;
        its messages are counted as "control" traffic)."""
        nodes = discover_nodes(grid, self.num_clients, self.rollcall_timeout, self.roster)
        if nodes.by_rank and self.client_app_needs:
            raise RuntimeError(needs_error(type(self).__name__, self.client_app_needs,
                                           f"its nodes do not answer '{ROLLCALL}'"))
        self.node_of, self.partition_of_node = dict(nodes.node_of), nodes.partition_of_node
        self.ledger.attribute(self.partition_of_node)

    def _decode(self, replies: Iterable[Message], info: RoundInfo,
                unattributed: list[str] | None = None) -> Iterable[ClientUpdate]:
        """Valid updates (:func:`~fedtune.flower.replies.decode_replies`); every other reply
        is recorded in ``info.failures`` with its reason."""
        return decode_replies(replies, info, self, self._partition, self.client_epsilon, unattributed)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs of the base: the global state, the ledger, the round
        records and the clients' latest ε; never the run's node ids (a new run has new
        ones).  A method extends it with its own state (``{**super().state_dict(), ...}``),
        which :func:`fedtune.results.checkpoint.save_checkpoint` writes as safetensors + JSON."""
        return {"global_arrays": dict(self.global_arrays),
                "ledger": ledger_state(self.ledger.records),
                "rounds": {r: asdict(info) for r, info in self.rounds.items()},
                "client_epsilon": dict(self.client_epsilon)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (after :meth:`initialize`); a state with other keys
        (another method's, another version's) is refused in one line.  A method loads its
        own keys after ``super().load_state_dict(state)``."""
        check_state_keys(state, self.state_dict(), type(self).__name__)
        arrays = state["global_arrays"]
        if self.global_arrays and {k: tuple(v.shape) for k, v in arrays.items()} != {
                k: tuple(v.shape) for k, v in self.global_arrays.items()}:
            raise ValueError(f"{type(self).__name__}: the checkpoint's global state has other keys or shapes "
                             "than this run's model")
        self.global_arrays = dict(arrays)
        self.ledger.records = ledger_records(state["ledger"])
        self.rounds = {int(r): RoundInfo(**info) for r, info in state["rounds"].items()}
        self.client_epsilon = {int(pid): float(eps) for pid, eps in state["client_epsilon"].items()}

