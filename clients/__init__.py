"""Client-side trainers, one module per training family; each registers itself when imported
(:func:`fedtune.registry.load_plugins` imports every module of this package)."""
