"""Models: one module per registered model (see dogkit.core.registry)."""
