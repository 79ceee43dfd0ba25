"""Loading a run configuration: read (YAML + overrides), fill a named recipe, build the typed `Config`, resolve.

Resolution needs the registries: the drafter kinds (`common/drafters/`), the recipes (`common/recipes.py`) and the
objectives. The kinds and recipes live in common/ and are imported; the objectives live with the learner
(`learner/objectives/`), so this module names their package as a string and imports it when a config is resolved
(`OBJECTIVES_PACKAGE`, the one plugin point of common/; tests/test_import_map.py allows exactly this name). That is
how a config resolved on a rollout actor knows the objective's defaults and refusals without common/ importing the
learner at module level. common/config.py itself imports none of the registries (they import it).
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

from .config import Config, build_config, read_tree
from .drafters import KINDS
from .errors import ConfigError
from .recipes import apply_recipe_tree, recipe_named

# the package whose import registers every objective in its OBJECTIVES dict (loss.objective=<name> looks it up)
OBJECTIVES_PACKAGE = "dopd.learner.objectives"


def objectives() -> dict[str, Any]:
    """The objective registry: name -> class with `defaults` (loss settings it implies) and `check(cfg)`."""
    return importlib.import_module(OBJECTIVES_PACKAGE).OBJECTIVES


def resolve(cfg: Config) -> Config:
    """Fill every default that depends on other keys, then check the whole: a named recipe's settings fill the
    keys left unset (where the config was read; in code: fields still at their default), the drafter kind must
    be registered, so must the objective; a None loss setting takes the objective's default, then the kind's;
    the runner-dependent keys take the runner's values (a value the runner cannot honour is an error naming it).
    Idempotent: a resolved config (config.yaml) resolves to itself. Returns `cfg`, resolved in place."""
    registry = objectives()
    recipe = recipe_named(cfg.loss.recipe) if cfg.loss.recipe is not None else None
    if recipe is not None and not getattr(cfg, "_recipe_filled", False):
        recipe.fill_config(cfg)  # built in code: no tree to fill (load_config filled its tree before building)
        cfg._recipe_filled = True
    if cfg.drafter.kind not in KINDS:
        raise ConfigError(f"config key 'drafter.kind' must be one of {list(KINDS)} (got {cfg.drafter.kind!r})")
    kind = KINDS[cfg.drafter.kind]
    lc = cfg.loss
    if lc.objective is None:
        lc.objective = kind.default_loss.get("objective", "opd")
    if lc.objective not in registry:
        raise ConfigError(f"config key 'loss.objective' must be one of {list(registry)} (got {lc.objective!r})")
    for defaults in (registry[lc.objective].defaults, kind.default_loss):
        for key, value in defaults.items():
            if getattr(lc, key) is None:
                setattr(lc, key, value)
    cfg._resolve_runner()
    cfg.validate()
    registry[lc.objective].check(cfg)
    kind.check_recipe(cfg)
    if recipe is not None:
        recipe.check(cfg)
    return cfg


def from_tree(tree: dict[str, Any]) -> Config:
    """A named recipe fills the keys the tree leaves unset (common/recipes.py), then the config is built and resolved."""
    apply_recipe_tree(tree)
    cfg = build_config(tree)
    cfg._recipe_filled = True
    return resolve(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (optional) and apply `section.key=value` overrides; unknown keys are errors. Resolved."""
    return from_tree(read_tree(path, overrides))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `to_dict` (checkpoints, run directories)."""
    return from_tree(copy.deepcopy(data))
