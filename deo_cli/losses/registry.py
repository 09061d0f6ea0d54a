"""The explicit registry of DEO's losses (docs/design.md §7.2, habit 2: one file, one registry line).

``@register_loss("name")`` on an ``nn.Module`` class with plain constructor arguments;
:func:`build_loss` builds one by name (unknown names raise ``UsageError`` with a did-you-mean).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from deo_cli.errors import UsageError

_LOSSES: dict[str, type[nn.Module]] = {}


def register_loss(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register a loss class under ``name``."""

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        _LOSSES[name] = cls
        cls.registry_name = name
        return cls

    return decorator


def _ensure_registered() -> None:
    from deo_cli.losses import coding_rate, compression, deo_loss, distill_cls, distill_patch  # noqa: F401


def get_loss_class(name: str) -> type[nn.Module]:
    _ensure_registered()
    try:
        return _LOSSES[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_LOSSES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(
            f"unknown loss {name!r}{hint}", f"choose one of {', '.join(list_losses())}"
        ) from None


def build_loss(name: str, **kwargs) -> nn.Module:
    """Instantiate the registered loss ``name`` with plain keyword arguments."""
    return get_loss_class(name)(**kwargs)


def list_losses() -> list[str]:
    _ensure_registered()
    return sorted(_LOSSES)
