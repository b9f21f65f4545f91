"""The fedtune ``ClientApp``: decode the message, call the method's trainer, reply.

The same app serves ``fedtune run`` (the config arrives in a closure, built by
:func:`make_client_app`) and ``flwr run`` / deployment (module-level :data:`app`
composes the config from the run config's ``overrides`` string, exactly as the
ServerApp does).  A SuperNode's data is found from its node config: ``partition-id``
(its partition of the named dataset) or ``data-path`` (its own file, :func:`workspace_for`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.config.composition import compose
from fedtune.config.run import RunConfig, from_dict
from fedtune.flower.faults import with_faults
from fedtune.privacy.client_level import clip_on_client
from fedtune.privacy.dp_sgd import with_privacy
from fedtune.privacy.histories import adopt_history
from fedtune.runtime.environment import quiet_libraries
from fedtune.runtime.workspace import LocalDataWorkspace, Workspace, clear_cache
from fedtune.trainer import TrainContext

STATE_ARRAYS, STATE_VALUES = "fedtune-client-arrays", "fedtune-client-values"
_serving: list[int] = []  # the Flower run this process last served


@functools.lru_cache(maxsize=4)
def _config_from_json(cfg_json: str) -> RunConfig:
    return from_dict(json.loads(cfg_json))


@functools.lru_cache(maxsize=4)
def _config_from_overrides(overrides: str) -> RunConfig:
    return compose(overrides)


def partition_id_of(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("node config has no 'partition-id' (start the SuperNode with "
                         "--node-config 'partition-id=<i> num-partitions=<n>')")
    return int(context.node_config["partition-id"])


def workspace_for(cfg: RunConfig, context: Context) -> Workspace:
    """The node's workspace: a partition of the named dataset, or, when the SuperNode was
    started with ``--node-config "... data-path=/its/file.csv"``, its own local file
    (``dataset=csv``'s format: columns ``text``, ``label`` and optionally ``split``) in place of ``dataset.path``."""
    path = context.node_config.get("data-path")
    if not path:
        return Workspace(cfg)
    if not hasattr(cfg.dataset, "path"):
        raise ValueError(f"node config data-path needs a file dataset (dataset=csv), got dataset={cfg.dataset.name}")
    local = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, path=str(path)))
    return LocalDataWorkspace(local)


def load_client_state(context: Context) -> dict[str, Any]:
    """A trainer's persistent state: tensors from an ArrayRecord, scalars from a ConfigRecord."""
    state: dict[str, Any] = {}
    if STATE_ARRAYS in context.state:
        state.update(context.state[STATE_ARRAYS].to_torch_state_dict())
    if STATE_VALUES in context.state:
        state.update(dict(context.state[STATE_VALUES]))
    return state


def save_client_state(context: Context, state: dict[str, Any]) -> None:
    """Store ``state`` in Flower's ``Context.state``, which persists per node across rounds
    (in simulation it lives in the driver and is shipped with every call: keep it small)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    values = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        context.state[STATE_ARRAYS] = ArrayRecord(tensors)
    if values:
        context.state[STATE_VALUES] = ConfigRecord(values)


def start_of_run(context: Context) -> None:
    """A process that served another run before (a warm actor, ``runtime.warm_actors``)
    starts this one as a fresh process would: with nothing cached from the last run."""
    if _serving != [context.run_id]:
        if _serving:
            clear_cache()
        _serving[:] = [context.run_id]


def make_client_app(cfg: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp for the given resolved config (``None``: read it from the run config)."""
    cfg_json = json.dumps(cfg, sort_keys=True) if cfg is not None else None
    app = ClientApp()

    def resolve(context: Context) -> RunConfig:
        quiet_libraries()
        start_of_run(context)
        if cfg_json is not None:
            return _config_from_json(cfg_json)
        return _config_from_overrides(str(context.run_config.get("overrides", "")))

    @app.query("rollcall")
    def rollcall(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition_id_of(context)})}),
                       reply_to=msg)

    def serve(msg: Message, context: Context, action: str) -> Message:
        workspace = workspace_for(resolve(context), context)
        ctx = TrainContext(server_round=int(msg.content["config"]["server-round"]),
                           partition_id=partition_id_of(context), device=workspace.device,
                           state=load_client_state(context), config=dict(msg.content["config"]))
        arrays = msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content else {}
        run = getattr(workspace.trainer, action)
        if action == "train":  # DP budget check and ε report (identity when privacy=none)
            adopt_history(ctx.state, msg.content["config"])  # a resumed server gives a DP history back
            run = with_privacy(run, workspace.cfg)
            run = with_faults(run, workspace.cfg)  # fault injection, outermost (identity when off)
        upload, metrics = run(workspace.model(), arrays, workspace, ctx)
        save_client_state(context, ctx.state)
        return Message(RecordDict({"arrays": ArrayRecord(upload), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:  # behind Flower's fixedclipping_mod under client_dp
        return clip_on_client(resolve(context), msg, context, lambda m, c: serve(m, c, "train"))

    @app.train("setup")
    def setup(msg: Message, context: Context) -> Message:
        """One-time exchange before round 1 (the trainer's ``setup``), e.g. Fed-SB's init."""
        return serve(msg, context, "setup")

    @app.train("step")
    def step(msg: Message, context: Context) -> Message:
        """One message of a round that is an exchange (the trainer's ``step``), e.g. SFPrompt's
        per-batch activations and gradients; ``config["phase"]`` says which."""
        return serve(msg, context, "step")

    return app


app = make_client_app()
