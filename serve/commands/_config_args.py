"""Command-line flags and reference tables derived from the pydantic config classes.

A config field's type, default and attribute docstring are written once, in its class;
:func:`add_config_arguments` turns chosen fields into ``--field-name`` flags (type, choices,
``--x/--no-x`` for booleans, several values for tuples and lists; help = the docstring and the
default), :func:`config_from_args` builds the config from the flags actually given, and
:func:`render_table` writes the Markdown field table that ``docs/operations.md`` holds
(``scripts/render_config_docs`` refreshes it; ``tests/unit/test_config_docs.py`` checks it).

Every flag has ``default=None`` so that a flag not given leaves the config's default (or a YAML
file's value) alone.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Iterable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from registry.errors import MoseError

_REGISTERED = "_config_flags"  # args attribute: {config class name: [(field path, dest), ...]}


# ---------------------------------------------------------------- fields


def field_info(config_cls: type[BaseModel], path: str) -> tuple[FieldInfo, Any]:
    """The field at a dotted ``path`` (``http.port``) and its default in a default instance."""
    model: type[BaseModel] = config_cls
    default: Any = _default_instance(config_cls)
    info: FieldInfo | None = None
    for part in path.split("."):
        if info is not None:
            model = _model_of(info.annotation)
        if model is None or part not in model.model_fields:
            raise KeyError(f"{config_cls.__name__} has no field {path!r}")
        info = model.model_fields[part]
        default = getattr(default, part, None) if default is not None else None
    assert info is not None
    return info, default


def _default_instance(config_cls: type[BaseModel]) -> BaseModel | None:
    try:
        return config_cls()
    except Exception:  # a config with required fields: defaults come from the fields alone
        return None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *_non_none(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _non_none(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(annotation) if a is not type(None))
    return (annotation,)


def description(info: FieldInfo) -> str:
    """The field's docstring (or ``description=``) on one line, Sphinx roles as plain code."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"``\1``", info.description or "")
    return re.sub(r"\s+", " ", text).strip()


def format_default(value: Any) -> str:
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, (tuple, list)):
        return " ".join(format_default(v) for v in value) if value else "(none)"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_default(v)}" for k, v in value.items()) + "}" if value else "{}"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def type_name(annotation: Any) -> str:
    """A short readable name of a field's type: ``int``, ``float | None``, ``"auto" | "yes"``."""
    args = _non_none(annotation)
    if len(args) != 1:
        return " | ".join(type_name(a) for a in args)
    optional = args[0] is not annotation
    inner = args[0]
    origin = typing.get_origin(inner)
    if origin is Literal:
        text = " | ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in typing.get_args(inner))
    elif origin in (tuple, list):
        text = f"list of {type_name(typing.get_args(inner)[0])}"
    elif origin is dict:
        key, value = typing.get_args(inner)
        text = f"map {type_name(key)} -> {type_name(value)}"
    elif isinstance(inner, type):
        text = {SecretStr: "secret", Path: "path"}.get(inner, inner.__name__)
    else:
        text = str(inner)
    return f"{text} | None" if optional else text


# ---------------------------------------------------------------- flags


def _argparse_kwargs(annotation: Any) -> dict[str, Any]:
    """``type``/``choices``/``nargs``/``action`` for a field's annotation."""
    args = _non_none(annotation)
    if len(args) != 1:
        raise TypeError(f"no command-line form for {annotation!r}")
    inner = args[0]
    origin = typing.get_origin(inner)
    if origin in (tuple, list):
        return {**_argparse_kwargs(typing.get_args(inner)[0]), "nargs": "+"}
    if origin is Literal:
        choices = typing.get_args(inner)
        return {"type": type(choices[0]), "choices": list(choices)}
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if inner in (int, float, str):
        return {"type": inner}
    if inner is Path:
        return {"type": str}
    raise TypeError(f"no command-line form for {annotation!r}")


def add_config_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config_cls: type[BaseModel],
    fields: Iterable[str],
    *,
    prefix: str = "",
    names: Mapping[str, str | tuple[str, ...]] | None = None,
    metavars: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per field in ``fields`` (dotted paths reach nested sections).

    The flag is ``--{prefix}{last-part-of-the-path}`` with dashes, or ``names[field]`` (one name
    or several, e.g. a short old name kept working). Help: the field's docstring and default.
    """
    names = names or {}
    metavars = metavars or {}
    registered: list[tuple[str, str]] = []
    for path in fields:
        info, default = field_info(config_cls, path)
        given = names.get(path) or f"--{prefix}{path.rsplit('.', 1)[-1].replace('_', '-')}"
        option_strings = (given,) if isinstance(given, str) else tuple(given)
        dest = f"{config_cls.__name__}.{path}"
        kwargs = _argparse_kwargs(info.annotation)
        if path in metavars:
            kwargs["metavar"] = metavars[path]
        elif "action" not in kwargs and "choices" not in kwargs:
            kwargs["metavar"] = path.rsplit(".", 1)[-1].upper()
        text = description(info).replace("%", "%%")
        parser.add_argument(
            *option_strings, dest=dest, default=None, help=f"{text} (default: {format_default(default)})", **kwargs
        )
        registered.append((path, dest))
    current = dict(parser.get_default(_REGISTERED) or {})
    current[config_cls.__name__] = current.get(config_cls.__name__, []) + registered
    parser.set_defaults(**{_REGISTERED: current})


def overrides_from_args(config_cls: type[BaseModel], args: argparse.Namespace) -> dict[str, Any]:
    """The values of ``config_cls``'s flags that were given, as a nested dict."""
    overrides: dict[str, Any] = {}
    for path, dest in (getattr(args, _REGISTERED, None) or {}).get(config_cls.__name__, []):
        value = getattr(args, dest, None)
        if value is None:
            continue
        *parents, last = path.split(".")
        section = overrides
        for part in parents:
            section = section.setdefault(part, {})
        section[last] = value
    return overrides


def config_from_args(
    config_cls: type[BaseModel],
    args: argparse.Namespace,
    base: BaseModel | Mapping[str, Any] | None = None,
    what: str | None = None,
    **extra: Any,
) -> BaseModel:
    """``config_cls`` from ``base`` (a config or a dict), the flags given, then ``extra``.

    A value the config refuses is a :class:`MoseError` naming the field (``mose`` prints it and
    exits with status 2).
    """
    from experts.types import validate

    data: dict[str, Any] = base.model_dump() if isinstance(base, BaseModel) else dict(base or {})
    data = _deep_merge(data, overrides_from_args(config_cls, args))
    data = _deep_merge(data, extra)
    return validate(config_cls, data, what or f"{config_cls.__name__} settings")


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


# ---------------------------------------------------------------- reference tables


def table_rows(config_cls: type[BaseModel], prefix: str = "", default: Any = None) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) of every field; sections whose default is a config are
    flattened into dotted names."""
    if default is None and not prefix:
        default = _default_instance(config_cls)
    rows = []
    for name, info in config_cls.model_fields.items():
        value = getattr(default, name, info.default) if default is not None else info.default
        if isinstance(value, BaseModel):
            rows.append((f"{prefix}{name}", "section", "", description(info)))
            rows += table_rows(type(value), f"{prefix}{name}.", value)
            continue
        rows.append((f"{prefix}{name}", type_name(info.annotation), format_default(value), description(info)))
        section = _model_of(info.annotation)
        if section is None and typing.get_origin(info.annotation) is dict:
            section = _model_of(typing.get_args(info.annotation)[1])
            name = f"{name}.<NAME>"
        if section is not None:  # an optional section (None by default) or a map of sections
            rows += table_rows(section, f"{prefix}{name}.", _default_instance(section))
    return rows


def render_table(config_cls: type[BaseModel]) -> str:
    """The Markdown field table of ``config_cls`` (without the markers around it)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    lines += [
        f"| `{name}` | {cell(kind)} | {f'`{cell(value)}`' if value else ''} | {cell(text)} |"
        for name, kind, value, text in table_rows(config_cls)
    ]
    return "\n".join(lines)


MARKER = re.compile(r"(<!-- config-table:(\w+) -->\n)(.*?)(<!-- /config-table -->)", re.S)


def render_document(text: str, configs: Mapping[str, type[BaseModel]]) -> str:
    """``text`` with the table between each ``<!-- config-table:NAME -->`` and
    ``<!-- /config-table -->`` pair rendered again from ``configs[NAME]``."""

    def replace(match: re.Match) -> str:
        name = match.group(2)
        if name not in configs:
            raise MoseError(f"config table {name!r}: no such config (known: {', '.join(sorted(configs))})")
        return f"{match.group(1)}{render_table(configs[name])}\n{match.group(4)}"

    return MARKER.sub(replace, text)


def documented_configs() -> dict[str, type[BaseModel]]:
    """The configs whose tables ``docs/operations.md`` holds."""
    from experts.finetune import FinetuneConfig
    from jury.calibrator import CalibratorConfig
    from router_model.config import RouterConfig
    from serve.config import ServeConfig

    return {cls.__name__: cls for cls in (ServeConfig, FinetuneConfig, RouterConfig, CalibratorConfig)}
