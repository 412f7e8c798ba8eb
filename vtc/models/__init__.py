"""Model components transformers does not ship, in Hugging Face form (TokenPacker's projector, ...)."""
