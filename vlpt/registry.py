"""The objective registry.

Objectives come from three places, all ending in :func:`register_objective`:

1. installed packages, through the ``vlpt.objectives`` entry-point group (vlpt's
   own built-ins in ``objectives/`` register exactly this way);
2. a recipe's ``plugins:`` list: importable module names or ``.py`` file paths;
3. any code that imports a module using the decorator.

The registry is strict: a name registered twice by different classes raises, an
unknown name raises and lists the known ones, nothing ever returns ``None``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Callable, TypeVar

from .errors import UserError, did_you_mean
from .objective import MODALITIES, Objective

ENTRY_POINT_GROUP = "vlpt.objectives"

_REGISTRY: dict[str, type[Objective]] = {}
_SOURCES: dict[str, str] = {}
_entry_points_loaded = False
_loading_source: list[str] = []

T = TypeVar("T", bound=type[Objective])


def register_objective(name: str) -> Callable[[T], T]:
    """Class decorator: register an :class:`Objective` subclass under ``name``."""

    def wrap(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, Objective)):
            raise TypeError(f"@register_objective('{name}') must decorate an Objective subclass, got {cls!r}")
        unknown = set(cls.needs) - MODALITIES
        if unknown:
            raise UserError(f"objective '{name}' needs unknown modalities {sorted(unknown)}; use {sorted(MODALITIES)}")
        # a package's module may import a sibling that registers too: name the class's own module
        source = _loading_source[-1].replace("{module}", cls.__module__) if _loading_source else cls.__module__
        old = _REGISTRY.get(name)
        if old is not None and _identity(old) != _identity(cls):
            raise UserError(
                f"objective name '{name}' is registered twice: by {old.__qualname__} ({_SOURCES.get(name)}) "
                f"and by {cls.__qualname__} ({source}); rename one of them"
            )
        cls.name = name
        _REGISTRY[name] = cls
        _SOURCES[name] = source
        return cls

    return wrap


def _identity(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def load_entry_points() -> None:
    """Import every objective advertised in the ``vlpt.objectives`` group (once).

    Each entry point names a module (or an ``Objective`` class) whose import registers
    the objective called like the entry point. Two packages advertising one name, a
    module that fails to import, or a module that registers no objective of its entry
    point's name raise a :class:`UserError` naming the package.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    entry_points = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    seen: dict[str, tuple[str, str]] = {}  # name -> (package, value): clashes are found before importing anything
    for ep in entry_points:
        package = _package(ep)
        if ep.name in seen and seen[ep.name][1] != ep.value:
            other_pkg, other_value = seen[ep.name]
            raise UserError(
                f"objective name '{ep.name}' is advertised twice in the '{ENTRY_POINT_GROUP}' entry points: "
                f"by package {other_pkg} ({other_value}) and by package {package} ({ep.value}); uninstall one of them"
            )
        seen[ep.name] = (package, ep.value)
    for ep in entry_points:
        package = _package(ep)
        source = f"package {package} ({{module}})"  # the module that registers, filled in by register_objective
        _loading_source.append(source)
        try:
            obj = ep.load()
        except UserError:  # e.g. a name it registers is taken: the message already says by whom
            raise
        except Exception as e:  # a broken third-party package must not hide which one
            raise UserError(
                f"objective plugin '{ep.value}' from package {package} failed to import: {e!r} (fix or uninstall {package})"
            ) from e
        finally:
            _loading_source.pop()
        if isinstance(obj, type) and issubclass(obj, Objective) and obj.name != ep.name:
            _loading_source.append(source)
            try:
                register_objective(ep.name)(obj)
            finally:
                _loading_source.pop()
        if ep.name not in _REGISTRY:
            raise UserError(
                f"entry point '{ep.name}' of package {package} points at '{ep.value}', which registers no objective "
                f"named '{ep.name}' (decorate the class with @register_objective('{ep.name}'))"
            )


def _package(ep) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "?"


def load_plugin(spec: str, base_dir: Path | None = None) -> None:
    """Import a plugin given as a module name (``my_pkg.objectives``) or a ``.py`` path.

    Relative paths are tried as given, then relative to ``base_dir`` (the recipe's
    folder). Installed objectives load first, so a plugin that reuses one of their
    names is the one the error names. Plugins are code by design: importing one runs it.
    """
    load_entry_points()
    _loading_source.append(f"plugin {spec}")
    try:
        if spec.endswith(".py") or "/" in spec or "\\" in spec:
            path = Path(spec).expanduser()
            if not path.is_absolute() and base_dir is not None and not path.exists():
                path = base_dir / path
            if not path.is_file():
                where = f" (looked in the current folder and in {base_dir})" if base_dir is not None else ""
                raise UserError(f"plugins: file '{spec}' not found{where}")
            path = path.resolve()
            _loading_source[-1] = f"plugin {path}"
            mod_name = "vlpt_plugin_" + "".join(c if c.isalnum() else "_" for c in str(path.with_suffix("")))
            if mod_name in sys.modules:
                return
            mspec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = module
            try:
                mspec.loader.exec_module(module)
            except UserError:
                del sys.modules[mod_name]
                raise
            except Exception as e:
                del sys.modules[mod_name]
                raise UserError(f"plugins: '{spec}' failed to import: {e!r}") from e
        else:
            try:
                importlib.import_module(spec)
            except ModuleNotFoundError as e:
                if e.name and spec.startswith(e.name):
                    raise UserError(f"plugins: module '{spec}' not found (is it installed or on PYTHONPATH?)") from e
                raise UserError(f"plugins: '{spec}' failed to import: {e!r}") from e
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"plugins: '{spec}' failed to import: {e!r}") from e
    finally:
        _loading_source.pop()


def get_objective(name: str) -> type[Objective]:
    """The class registered as ``name``; raises a :class:`UserError` listing known names."""
    load_entry_points()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UserError(f"unknown objective '{name}'{did_you_mean(name, _REGISTRY)}; registered: {known}")
    return _REGISTRY[name]


def registered_objectives() -> dict[str, type[Objective]]:
    load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def objective_source(name: str) -> str:
    return _SOURCES.get(name, "?")
