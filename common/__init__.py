"""Shared by actors and learner: config, models, drafters, the speculative-decoding engine, records, queue, metrics."""
