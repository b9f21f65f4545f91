"""User-facing errors.

A :class:`ConfigError` is raised for bad input (unknown names, out-of-range values,
missing files).  The CLI prints its message as one line and exits with code 2, so a
user never sees a traceback from deep inside a library for a typo in a config.
"""


class ConfigError(ValueError):
    """Bad user input; the message names the field and what is accepted."""


class PayloadError(ValueError):
    """A client's reply cannot be aggregated (wrong keys, shapes, dtypes, NaN/Inf)."""
