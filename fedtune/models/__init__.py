"""Model registry: base models built from a config or loaded offline from a package."""
