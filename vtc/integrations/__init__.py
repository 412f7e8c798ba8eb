"""vtc inside other harnesses (lmms-eval)."""
