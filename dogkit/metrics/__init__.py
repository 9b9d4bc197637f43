"""Tooling layer: the competition metric (MiFID) and its pieces."""
