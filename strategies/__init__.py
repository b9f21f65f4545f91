"""Server-side aggregation, one module per method; each registers itself when imported
(:func:`fedtune.registry.load_plugins` imports every module of this package)."""
