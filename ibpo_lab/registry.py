"""Name → function registries (estimators, losses, repair operators, sampling backends).

One small class serves every registry so they register, reject duplicates and report unknown
names the same way. It is a ``dict``, so ``name in REG`` and ``REG[name]`` work as before.
"""

from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F")

__all__ = ["Registry"]


class Registry(dict):
    """``kind`` names one entry in messages ("estimator"); ``plural`` names several ("estimators")."""

    def __init__(self, kind: str, plural: str | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.plural = plural or f"{kind}s"

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register ``fn`` under ``name``; a different object under a taken name is an error."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def wrap(fn: F) -> F:
            if name in self and self[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self[name] = fn
            return fn

        return wrap

    def get_registered(self, name: str):
        """The object under ``name``; a ValueError listing the known names otherwise."""
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.plural}: {', '.join(self.names())}")
        return self[name]

    def names(self) -> list[str]:
        return sorted(self)
