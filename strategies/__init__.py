"""Server-side aggregation, one module per method; importing registers them by name."""

from strategies import fedavg_lora  # noqa: F401
