"""Where dopd keeps per-user state: the cluster address file, Prometheus config and its scrape-target files."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """`DOPD_HOME` (default ~/.dopd): cluster.json, prometheus/ (config, data, prom_targets/*.json)."""
    d = Path(os.environ.get("DOPD_HOME", Path.home() / ".dopd")).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def prom_targets_dir() -> Path:
    """Prometheus file_sd directory: every running dopd job writes <job>.json here with its /metrics address."""
    d = state_dir() / "prometheus" / "prom_targets"
    d.mkdir(parents=True, exist_ok=True)
    return d
