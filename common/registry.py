"""The one registry: name -> class, filled by a class decorator (`Registry.register`), looked up by a config key.

Drafter kinds (`drafter.kind`), objectives (`loss.objective`) and recipes (`loss.recipe`) are each a class that
registers itself under its name when its module is imported; a second class under a taken name is an error naming
both, and an unknown name is an error naming the config key and the known names.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from .errors import ConfigError, DopdError

T = TypeVar("T", bound=type)


class Registry(dict, Generic[T]):
    """A dict of registered classes (iteration order = registration order, the order errors list them in)."""

    def __init__(self, what: str, key: str, attr: str = "name", error: type[DopdError] = ConfigError):
        super().__init__()
        self.what, self.key, self.attr, self.error = what, key, attr, error

    def register(self, cls: T) -> T:
        """Class decorator: register `cls` under `cls.<attr>`."""
        name = getattr(cls, self.attr)
        if name in self and self[name] is not cls:
            raise self.error(f"two {self.what} named '{name}': {self[name].__qualname__} and {cls.__qualname__}")
        self[name] = cls
        return cls

    def named(self, name: str) -> T:
        """The class registered under `name`, or an error naming the config key and the known names."""
        if name not in self:
            raise self.error(f"config key '{self.key}' must be one of {list(self)} (got {name!r})")
        return self[name]
