"""Runtime: per-process caches, the Ray simulation launcher, environment defaults."""
