"""Training side: the learner rank (learner.py), its objectives and losses, batches, DeepSpeed ZeRO ranks (zero.py)."""
