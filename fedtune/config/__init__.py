"""The run configuration: typed sections (:mod:`.sections`), the whole run and its
validation (:mod:`.run`), Hydra composition and its errors (:mod:`.composition`).

Hydra composes the ``RunConfig`` schema with the groups ``strategy``, ``model``,
``dataset``, ``privacy`` and ``tracking`` (each option a registered dataclass); :func:`from_dict`
turns the composed, resolved mapping into a :class:`RunConfig`.  Modules inside
fedtune import the submodules; this package re-exports them for everyone else.
"""

from fedtune.config.composition import CONFIG_DIR, GROUPS, check_group_choices, compose, register_configs
from fedtune.config.run import RunConfig, from_dict
from fedtune.config.sections import (FAULT_MALFORMED, FAULT_MODES, LOG_LEVELS, NODE_MAPS, PARTITION_KINDS,
                                     EvalConfig, FaultsConfig, FederationConfig, PartitionConfig, RuntimeConfig,
                                     TrainConfig)
from fedtune.errors import ConfigError

__all__ = ["CONFIG_DIR", "GROUPS", "FAULT_MALFORMED", "FAULT_MODES", "LOG_LEVELS", "NODE_MAPS", "PARTITION_KINDS",
           "ConfigError", "EvalConfig", "FaultsConfig", "FederationConfig", "PartitionConfig", "RunConfig",
           "RuntimeConfig", "TrainConfig", "check_group_choices", "compose", "from_dict", "register_configs"]
