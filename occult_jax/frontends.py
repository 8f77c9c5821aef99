"""Config front ends: python config files (ml_collections) and gin, one config tree.

A gin binding `section.field = value` sets `config.section.field` (sections: the config's
sub-dicts, e.g. `model`, `moe`, `optim`, `data`, `mesh`); top-level fields are bound as
`config.field = value`. So `--gin_param='moe.top_k=4'` and `--config.moe.top_k=4` are the same
change. This module never imports ml_collections: it works on the ConfigDict it is given.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

TOP = "config"  # gin scope of the top-level fields
_registered: set[str] = set()


def load_config(spec: str) -> Any:
    """`path/to/config.py[:arg]` → that file's `get_config(arg)` (or `get_config()`)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist.")
    module_spec = importlib.util.spec_from_file_location(
        "_occult_config_" + os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _is_dict(value: Any) -> bool:
    return hasattr(value, "items") and hasattr(value, "keys")


def _sections(config: Any) -> list[str]:
    return [k for k, v in config.items() if _is_dict(v)]


def _register(name: str) -> None:
    import gin

    if name in _registered:
        return

    def bindings(**kwargs):  # never called: only a gin name to bind fields to
        return kwargs

    bindings.__name__ = name
    gin.external_configurable(bindings, name=name, module="occult_jax.config")
    _registered.add(name)


def gin_bindings(config: Any, files: Sequence[str] = (),
                 params: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """{section: {field: value}} bound by the gin `files` and `params` (TOP for top level)."""
    import gin

    for name in (TOP, *_sections(config)):
        _register(name)
    for path in files:
        if not os.path.isfile(path):
            raise ValueError(f"gin file {path!r} does not exist.")
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(list(files), list(params), finalize_config=False)
        bound = {name: dict(gin.get_bindings(f"occult_jax.config.{name}"))
                 for name in (TOP, *_sections(config))}
    except (ValueError, SyntaxError, KeyError) as e:
        raise ValueError(f"gin: {str(e).splitlines()[0]}") from None
    finally:
        gin.clear_config()
    return {name: values for name, values in bound.items() if values}


def apply_gin(config: Any, files: Sequence[str] = (), params: Sequence[str] = ()) -> Any:
    """A copy of `config` with the gin bindings applied; unknown fields are one-line errors."""
    config = config.copy_and_resolve_references()
    for section, values in gin_bindings(config, files, params).items():
        target = config if section == TOP else config[section]
        for field, value in values.items():
            where = field if section == TOP else f"{section}.{field}"
            if section == TOP and field in target and _is_dict(target[field]):
                raise ValueError(f"gin binding {section}.{field}: {field!r} is a section; "
                                 f"bind its fields as {field}.<name> = value.")
            if field not in target:
                raise ValueError(f"gin binding {section}.{field}: the config has no field "
                                 f"{where!r}.")
            try:
                target[field] = value
            except TypeError as e:
                raise ValueError(f"gin binding {section}.{field}={value!r}: "
                                 f"{str(e).splitlines()[0]}") from None
    return config


def to_gin(config: Any) -> str:
    """The config as gin bindings (what configs/default.gin holds for the default config)."""
    lines = [f"{TOP}.{k} = {v!r}" for k, v in config.items() if not _is_dict(v)]
    for section in _sections(config):
        lines.append("")
        lines.extend(f"{section}.{k} = {v!r}" for k, v in config[section].items())
    return "\n".join(lines) + "\n"
