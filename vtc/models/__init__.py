"""Models and model parts transformers does not ship: TokenPacker's projector (Hugging Face form), VAR (var/)."""
