"""Client-side trainers, one module per training family, registered by name."""

from clients import lora_sgd  # noqa: F401  (registers "lora_sgd")
