"""Model-agnostic tensor utilities shared by methods and adapters (no transformers imports)."""
