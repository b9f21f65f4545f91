"""Server-side aggregation, one module per method; importing registers them by name."""

from strategies import fedavg_lora  # noqa: F401
from strategies import fedkseed  # noqa: F401  (fedkseed, fedkseed_pro)
from strategies import fed_sb  # noqa: F401
from strategies import lora_fair  # noqa: F401
from strategies import ffa_lora  # noqa: F401
from strategies import fedex_lora  # noqa: F401
from strategies import flora  # noqa: F401
from strategies import ferret  # noqa: F401
