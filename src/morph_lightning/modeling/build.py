"""Build a component from its config section, checking keys and types at start-up."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from jsonargparse import ArgumentParser

T = TypeVar("T")


def build(cls: type[T], kwargs: dict[str, Any] | None, where: str, **derived: Any) -> T:
    """`cls(**kwargs, **derived)` after `checked_kwargs`."""
    return cls(**checked_kwargs(cls, kwargs, where, **derived), **derived)


def checked_kwargs(
    cls: type | Callable, kwargs: dict[str, Any] | None, where: str, **derived: Any
) -> dict[str, Any]:
    """`kwargs` after jsonargparse checked them against the signature of `cls` (a class or function).

    `derived` are sizes another component fixes (e.g. the decoder's prefix width is the LLM's hidden
    size); setting one of them in the config is an error, so the two can never disagree silently.
    """
    kwargs = dict(kwargs or {})
    clash = sorted(set(kwargs) & set(derived))
    if clash:
        raise ValueError(f"{where}: {clash} are derived from other components; remove them from the config")
    parser = ArgumentParser(exit_on_error=False)
    if inspect.isclass(cls):
        parser.add_class_arguments(cls, skip=set(derived))
    else:
        parser.add_function_arguments(cls, skip=set(derived))
    try:
        cfg = parser.parse_object(kwargs)
    except Exception as err:  # jsonargparse names the offending key; add where it sits
        raise ValueError(f"{where}: {err}") from None
    return parser.instantiate_classes(cfg).as_dict()
