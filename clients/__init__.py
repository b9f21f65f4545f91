"""Client-side trainers, one module per training family, registered by name."""

from clients import lora_sgd  # noqa: F401  (registers "lora_sgd")
from clients import zo_seeds  # noqa: F401  (registers "zo_seeds": FedKSeed, FedKSeed-Pro)
from clients import lora_sb  # noqa: F401  (registers "lora_sb")
from clients import base_delta  # noqa: F401  (registers "lora_sgd_base_delta", "lora_fresh_rank")
from clients import ferret  # noqa: F401  (registers "ferret")
