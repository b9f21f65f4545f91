"""The server as the durable holder of every DP client's accountant history.

Example-level DP (:mod:`fedtune.privacy.dp_sgd`) keeps each client's Opacus history, the
``(σ, q, steps)`` rows, in the client's ``Context.state``.  A restarted simulation loses
those contexts, so the server keeps its own copy and the checkpoint carries it:

* **derived, not uploaded.**  A client's history changes only when it trains: it then
  runs exactly ``train.local_steps`` DP-SGD steps at its σ and q (its reply says which, in
  ``dp-noise-multiplier`` and ``dp-sample-rate``; ``dp-budget-spent = 1`` means it took
  no step), and saves its state with its reply.  The server extends its copy by those
  steps with the accountant's own merge (:func:`~fedtune.privacy.accounting.extended`)
  for every reply that arrives with DP metrics, so nothing is added to any message and
  an uninterrupted run is unchanged.  An error reply carries no new client state either
  (the ClientApp saves it only with a reply), so both copies agree.
* **given back once.**  After a resume, the next training message to each client with a
  history carries it in its config (``dp-history``, the rows flattened); the client keeps
  whichever of that and its own has more steps (:func:`adopt_history`): the server's
  after a restarted simulation, its own where it survived (a deployed SuperNode that kept
  running).  A client stops being owed its history once a reply from it arrives.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fedtune.privacy.accounting import extended, load_history, save_history
from fedtune.results.state_codec import check_state_keys

HISTORY_CONFIG = "dp-history"  # train-config key of a history given back after a resume
History = list[tuple[float, float, int]]


class AccountantHistories:
    """Every DP client's accountant history as the server knows it (module doc)."""

    def __init__(self, accountant: str, local_steps: int) -> None:
        self.accountant, self.local_steps = accountant, local_steps
        self.histories: dict[int, History] = {}
        self.owed: set[int] = set()  # clients to give their history back (after a resume)

    def observe(self, replies: list[Message], partition_of_node: dict[int, int]) -> None:
        """Extend the history of every client that trained in these replies."""
        for reply in replies:
            pid = partition_of_node.get(reply.metadata.src_node_id, -1)
            if reply.has_error() or pid < 0 or "metrics" not in reply.content:
                continue
            metrics = reply.content["metrics"]
            if "dp-noise-multiplier" not in metrics:
                continue
            self.owed.discard(pid)  # its state (with the history it was given) was saved with this reply
            if not metrics.get("dp-budget-spent"):
                self.histories[pid] = extended(self.histories.get(pid, []), self.accountant,
                                               float(metrics["dp-noise-multiplier"]),
                                               float(metrics["dp-sample-rate"]), self.local_steps)

    def give_back(self, messages: list[Message], partition_of_node: dict[int, int]) -> list[Message]:
        """``messages`` with each owed client's history added to its config."""
        out = []
        for message in messages:
            pid = partition_of_node.get(message.metadata.dst_node_id, -1)
            if pid not in self.owed or not self.histories.get(pid):
                out.append(message)
                continue
            content = RecordDict({name: record for name, record in message.content.items()})
            config = dict(content["config"]) if "config" in content else {}
            config[HISTORY_CONFIG] = [float(x) for row in self.histories[pid] for x in row]
            content["config"] = ConfigRecord(config)
            out.append(Message(content, dst_node_id=message.metadata.dst_node_id,
                               message_type=message.metadata.message_type))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"histories": {pid: [tuple(row) for row in h] for pid, h in self.histories.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The checkpoint's histories; every client with one is owed it (a resume)."""
        check_state_keys(state, self.state_dict(), type(self).__name__)
        self.histories = {int(pid): [(float(s), float(q), int(t)) for s, q, t in rows]
                          for pid, rows in state["histories"].items()}
        self.owed = set(self.histories)


def adopt_history(state: dict[str, Any], config: Any) -> None:
    """Client side: take the history a resumed server gives back when it has more steps
    than the one in the client's own ``state`` (a restart lost that one)."""
    if HISTORY_CONFIG not in config:
        return
    flat = [float(x) for x in config[HISTORY_CONFIG]]
    given = [(flat[i], flat[i + 1], int(flat[i + 2])) for i in range(0, len(flat) - 2, 3)]
    if sum(t for _, _, t in given) > sum(t for _, _, t in load_history(state)):
        save_history(state, given)


def server_privacy_state(cfg: Any, runner: Any) -> Any:
    """What the server's checkpoint must hold for the run's privacy (``None`` without):
    the accountant histories of example-level DP, or the client-level DP wrapper itself."""
    if cfg.privacy.name == "dp_sgd":
        return AccountantHistories(cfg.privacy.accountant, cfg.train.local_steps)
    if cfg.privacy.name == "client_dp":
        return runner
    return None
