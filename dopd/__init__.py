"""dopd: train speculative-decoding drafters by on-policy distillation (Draft-OPD)."""

__version__ = "0.1.0"
