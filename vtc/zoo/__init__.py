"""Synthetic data, toy-model builders and bundled toy checkpoints (everything runs offline)."""
