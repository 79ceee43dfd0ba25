"""Rollout side: target-assisted speculative rollout, error-position replay, and the Ray actor that wraps them."""
