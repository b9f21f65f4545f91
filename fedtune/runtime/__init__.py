"""Runtime: the Ray simulation launcher, local deployment trials, process control,
environment defaults, and (in :mod:`~fedtune.runtime.flower_private` only) Flower's internals."""
