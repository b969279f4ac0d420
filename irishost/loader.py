"""Importing the user's handler class named by ``service.handler``.

Import failures are the most common first-run problem, and they happen inside
user code the operator may not own; the error therefore says which spec, which
config file and what went wrong, and keeps the user module's traceback for the
host to print.

The class is also checked against the config's ``[settings]``, which become
its keyword arguments (``Handler(**settings)``): only the imported class can
tell a misspelt or missing setting, and checking here finds one in
``--check``, at start and on reload, before any worker is forked.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import tempfile
import traceback
from typing import Any

from iris.handlers import ServiceHandler

from .config import Config, ConfigError


class HandlerImportError(Exception):
    """``service.handler`` cannot be turned into a ServiceHandler subclass.

    ``details`` holds the formatted traceback when the user's module raised
    while being imported, and is empty when the message already says it all.
    """

    def __init__(self, message: str, details: str = ""):
        super().__init__(message, details)
        self.details = details

    def __str__(self) -> str:
        message: str = self.args[0]
        return message


def load_handler(config: Config) -> type[ServiceHandler]:
    """Import and return the handler class named by ``config.service.handler``.

    Raises HandlerImportError if it cannot be imported, and ConfigError if it
    cannot be called with ``config.settings`` as keyword arguments.
    """
    spec = config.service.handler
    module_name, _, attribute = spec.partition(":")

    def fail(cause: str, details: str = "") -> HandlerImportError:
        return HandlerImportError(f'{config.file}: handler "{spec}": {cause}', details)

    _prepend_to_sys_path([str(entry) for entry in config.service.path])
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only the named module itself (or a parent package) being absent is a path problem;
        # a missing dependency of the user's module deserves its traceback like any error.
        if error.name is not None and _is_same_or_parent(error.name, module_name):
            searched = ", ".join(str(entry) for entry in config.service.path) or "(none)"
            raise fail(f"no module named {error.name!r} in service.path ({searched})") from error
        raise fail(f"importing {module_name!r} failed: {error}", _format(error)) from error
    # A module calling sys.exit() at import time (say, argparse at the top level) would
    # otherwise end the host with no hint of where the exit came from.
    except (Exception, SystemExit) as error:
        raise fail(
            f"importing {module_name!r} raised {type(error).__name__}: {error}", _format(error)
        ) from error

    handler = module
    names = attribute.split(".")
    for depth, name in enumerate(names, 1):
        try:
            handler = getattr(handler, name)
        except AttributeError as error:
            missing = ".".join(names[:depth])
            where = getattr(module, "__file__", None) or "no file"
            raise fail(f"module {module_name!r} ({where}) has no attribute {missing!r}") from error

    if not (isinstance(handler, type) and issubclass(handler, ServiceHandler)):
        raise fail(f"{attribute!r} is {handler!r}, not a subclass of iris.ServiceHandler")
    _check_settings(config, handler)
    return handler


def _check_settings(config: Config, handler: type) -> None:
    """ConfigError naming the setting unless ``handler(**config.settings)`` would bind."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):  # no signature to read (a class written in C): not checked
        return
    try:
        signature.bind(**config.settings)
    except TypeError as error:
        key, problem = _settings_problem(signature, config.settings, error)
        described = f"{config.service.handler}{signature}"
        raise ConfigError(config.file, key, f"{problem} (the handler is {described})") from None


def _settings_problem(
    signature: inspect.Signature, settings: dict[str, Any], error: TypeError
) -> tuple[str, str]:
    """The key to blame and why, for settings that ``signature`` did not bind."""
    parameters = signature.parameters
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key in settings:
        parameter = parameters.get(key)
        if parameter is None and takes_any:
            continue
        if parameter is None or parameter.kind not in by_keyword:
            return f"settings.{key}", "not a keyword argument of the handler class"
    for name, parameter in parameters.items():
        required = parameter.default is inspect.Parameter.empty
        if parameter.kind in by_keyword and required and name not in settings:
            return f"settings.{name}", "required by the handler class, but missing"
    return "settings", f"the handler class cannot take them: {error}"


def reload_handler(config: Config) -> type[ServiceHandler]:
    """Import the handler afresh, for a reload (SIGHUP) after a code change.

    Python caches modules, so a plain import would return the old code: the
    modules loaded from the config's import paths are forgotten first.
    Everything else (the standard library, installed packages) stays cached.

    The import also bypasses __pycache__: a cached .pyc is only checked
    against its source's mtime in whole seconds and its size, so an edit
    that keeps both (a deployment that preserves or fixes file times, or a
    one-character change within the second) would bring the old code back.
    An empty cache directory for the length of the import forces a compile
    from source; modules imported for the first time here merely compile.
    """
    roots = tuple(str(entry) + os.sep for entry in config.service.path)
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) or ""
        if file.startswith(roots):
            del sys.modules[name]
    importlib.invalidate_caches()
    saved = sys.pycache_prefix
    with tempfile.TemporaryDirectory(prefix="irishost-pycache-") as empty:
        sys.pycache_prefix = empty
        try:
            return load_handler(config)
        finally:
            sys.pycache_prefix = saved


def _prepend_to_sys_path(entries: list[str]) -> None:
    """Put the config's import paths first, keeping their order, without duplicating them.

    Loading twice (preloaded in the supervisor, then again in a worker) must not
    grow sys.path.
    """
    for entry in reversed(entries):
        if entry not in sys.path:
            sys.path.insert(0, entry)


def _is_same_or_parent(name: str, module_name: str) -> bool:
    return module_name == name or module_name.startswith(name + ".")


def _format(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))
