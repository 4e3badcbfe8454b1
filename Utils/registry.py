"""A tiny name -> object registry filled by a decorator (as torchvision's register_model)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from Utils.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; unknown names raise a clear `UnknownNameError`.

    Args:
        kind: what the registry holds, used in error messages (e.g. "model").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator that registers an object under `name` with optional metadata."""

        def decorator(obj: T) -> T:
            self.add(name, obj, **meta)
            return obj

        return decorator

    def add(self, name: str, obj: T, **meta: Any) -> None:
        """Registers `obj` under `name`; a name can be registered once only."""
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = obj
        self._meta[name] = meta

    def get(self, name: str) -> T:
        """Returns the object registered as `name`.

        Raises:
            UnknownNameError: naming the valid choices.
        """
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}"
            ) from None

    def meta(self, name: str) -> dict[str, Any]:
        """Returns the metadata registered with `name`."""
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def parse_name_list(text: str, registry: Registry, what: str | None = None) -> list[str]:
    """Splits a comma list of names and checks each against a registry.

    Args:
        text: e.g. "grad,update"; empty means no names.
        registry: the registry the names must belong to.
        what: label for errors (default: the registry's kind).

    Returns:
        The names in the given order, without duplicates.

    Raises:
        UnknownNameError: for the first unknown name, listing the valid ones.
    """
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name or name in names:
            continue
        if name not in registry:
            raise UnknownNameError(
                f"unknown {what or registry.kind} '{name}'; choose from: "
                f"{', '.join(registry.names())}"
            )
        names.append(name)
    return names
