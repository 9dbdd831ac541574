"""Backbone registry: built-ins from ``backbones/``, third parties through entry points.

Built-in plugins are the public modules of the ``backbones`` package; each registers its classes
with :func:`register_backbone` when imported. Third-party packages declare an entry point in the
group ``bench.backbones`` (``name = "pkg.module:Class"``); those are imported only when a name is
looked up or listed, and not at all when ``BENCH_DISABLE_PLUGIN_AUTOLOAD=1``.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import os
import pkgutil
from importlib.metadata import entry_points
from typing import Any, Callable, TypeVar

from bench.contract import Backbone
from bench.errors import RegistryError

ENTRY_POINT_GROUP = "bench.backbones"
AUTOLOAD_SWITCH = "BENCH_DISABLE_PLUGIN_AUTOLOAD"

_REGISTRY: dict[str, type[Backbone]] = {}  # canonical name -> class
_ALIASES: dict[str, str] = {}  # alias -> canonical name
_state = {"builtins": False, "entry_points": False}

B = TypeVar("B", bound=type[Backbone])


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_backbone(name: str, *aliases: str) -> Callable[[B], B]:
    """Class decorator: register a :class:`bench.Backbone` subclass under ``name`` and ``aliases``.

    Example:
        >>> import bench
        >>> @bench.register_backbone("doc_example_backbone")
        ... class Mine(bench.Backbone):
        ...     pass
        >>> "doc_example_backbone" in bench.list_backbones()
        True
    """

    def wrap(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, Backbone)):
            raise RegistryError(f"@register_backbone({name!r}) needs a subclass of bench.Backbone, got {cls!r}")
        for key in (name, *aliases):
            owner = _REGISTRY.get(key) or _REGISTRY.get(_ALIASES.get(key, ""))
            if owner is not None and owner is not cls:
                raise RegistryError(
                    f"backbone name {key!r} is registered twice: by {_origin(owner)} and by {_origin(cls)}"
                )
        cls.name = name
        cls.aliases = tuple(aliases)
        _REGISTRY[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return wrap


def _load_builtins() -> None:
    if _state["builtins"]:
        return
    _state["builtins"] = True
    import backbones

    for info in pkgutil.iter_modules(backbones.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"backbones.{info.name}")


def _plugin_entry_points() -> list[Any]:
    if os.environ.get(AUTOLOAD_SWITCH, "").strip().lower() in {"1", "true", "yes"}:
        return []
    return list(entry_points(group=ENTRY_POINT_GROUP))


def _load_entry_point(ep: Any) -> None:
    try:
        obj = ep.load()
    except Exception as exc:  # a broken third-party plugin must not hide the others
        raise RegistryError(f"backbone plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
    if isinstance(obj, type) and issubclass(obj, Backbone) and obj not in _REGISTRY.values():
        register_backbone(ep.name)(obj)


def _load_all_entry_points() -> None:
    if _state["entry_points"]:
        return
    _state["entry_points"] = True
    for ep in _plugin_entry_points():
        if ep.name not in _REGISTRY and ep.name not in _ALIASES:
            _load_entry_point(ep)


def _lookup(name: str) -> type[Backbone]:
    _load_builtins()
    key = _ALIASES.get(name, name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    # Lazy: import only the entry point that carries this name before loading every plugin.
    for ep in _plugin_entry_points():
        if ep.name == name:
            _load_entry_point(ep)
            return _REGISTRY[_ALIASES.get(name, name)]
    _load_all_entry_points()
    key = _ALIASES.get(name, name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    known = sorted(set(_REGISTRY) | set(_ALIASES))
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise RegistryError(f"unknown backbone {name!r}{hint} (known: {', '.join(sorted(_REGISTRY))})")


def get_backbone_class(name: str) -> type[Backbone]:
    """The class registered under ``name`` (or an alias); ``arch.tag`` and ``arch:variant`` accepted.

    Example:
        >>> get_backbone_class("pixels").name
        'pixels'
    """
    return _lookup(split_name(name)[0])


def list_backbones(pattern: str = "*") -> list[str]:
    """Sorted canonical names of the registered backbones matching a shell-style pattern.

    Example:
        >>> "pixels" in list_backbones("pix*")
        True
    """
    _load_builtins()
    _load_all_entry_points()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def split_name(name: str) -> tuple[str, str | None]:
    """``"ddpm.lsun_cat"`` -> ``("ddpm", "lsun_cat")``; ``"ddpm"`` -> ``("ddpm", None)``.

    A ``:variant`` suffix (``timm:convnext_base``) is not part of the arch; see :func:`split_variant`.

    Example:
        >>> split_name("ddpm.lsun_cat"), split_name("timm:vit_small_patch16_224.augreg_in21k")
        (('ddpm', 'lsun_cat'), ('timm', None))
    """
    head, _, _ = name.partition(":")
    arch, _, tag = head.partition(".")
    return arch, (tag or None)


def split_variant(name: str) -> tuple[str, str | None]:
    """``"timm:convnext_base"`` -> ``("timm", "convnext_base")``; names without ``:`` -> ``(name, None)``.

    Example:
        >>> split_variant("timm:resnet18"), split_variant("ddpm.lsun_cat")
        (('timm', 'resnet18'), ('ddpm.lsun_cat', None))
    """
    head, sep, variant = name.partition(":")
    return head, (variant if sep else None)


def resolve_name(name: str) -> tuple[type[Backbone], str | None, dict[str, Any]]:
    """``arch[.tag][:variant]`` -> (class, tag or None, constructor kwargs carried by the name).

    Example:
        >>> cls, tag, extra = resolve_name("pixels")
        >>> cls.name, tag, extra
        ('pixels', None, {})
    """
    head, variant = split_variant(name)
    arch, tag = split_name(head)
    cls = _lookup(arch)
    extra: dict[str, Any] = {}
    if variant is not None:
        if not cls.variant_arg:
            raise RegistryError(f"backbone {cls.name!r} takes no ':variant' in its name (got {name!r})")
        extra[cls.variant_arg] = variant
    return cls, tag, extra


def check_kwargs(cls: type[Backbone], kwargs: dict[str, Any]) -> None:
    """Refuse a setting the plugin's constructor does not take, with a "did you mean", before any work.

    Example:
        >>> check_kwargs(get_backbone_class("pixels"), {"tag": None})
        >>> check_kwargs(get_backbone_class("pixels"), {"bogus": 1})
        Traceback (most recent call last):
        bench.errors.RegistryError: backbone 'pixels' has no setting 'bogus' (its settings: none)
    """
    import inspect

    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    settable = [n for n in known if n not in ("tag", "pretrained", "device")]
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, settable, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RegistryError(f"backbone {cls.name!r} has no setting {key!r}{hint} (its settings: "
                                f"{', '.join(settable) or 'none'})")


def create_backbone(name: str, *, pretrained: bool = True, device: str = "cpu", **kwargs: Any) -> Backbone:
    """Build a backbone by name (``arch``, ``arch.tag`` or ``arch:variant``).

    ``pretrained=False`` builds the tag's architecture with random weights and downloads nothing.
    Extra keyword arguments go to the plugin (layers, timesteps, seed, checkpoint path, ...).

    Example:
        >>> bb = create_backbone("pixels")
        >>> bb.num_features
        5
    """
    cls, tag, extra = resolve_name(name)
    kwargs.update(extra)
    if tag is not None:
        kwargs["tag"] = tag
    check_kwargs(cls, kwargs)
    return cls(pretrained=pretrained, device=device, **kwargs)
