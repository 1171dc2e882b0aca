"""Load YAML into the typed config: includes, command-line overrides, strict validation.

A stage file may ``include:`` other files (paths relative to itself); later sources override
earlier ones, and the including file overrides what it includes. Overrides given as
``dotted.key=value`` apply last. Every leaf remembers where it came from, so that an error names
the file (or the ``--set`` item) that must be fixed together with the dotted field.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from pali3_train.config.schema import Config, FieldError

T = TypeVar("T")

Origins = dict[str, str]


class ConfigError(ValueError):
    """A configuration that cannot be used, with the source and dotted field at fault.

    ``source`` a ``ConfigSource`` (what ``load_with_sources`` returns): the error names the file
    or ``--set`` item that gave ``field_path``; with ``also`` (the other fields a rule between
    fields read), the ``--set`` item that gave one of them if any did, since that is what
    changed (``--set train.steps=10: train.warmup_steps: warmup_steps=50 exceeds steps=10``)."""

    def __init__(self, source: str, field_path: str, message: str, also: Sequence[str] = ()):
        if isinstance(source, ConfigSource):
            source = source.blame(field_path, also)
        super().__init__(
            f"{source}: {field_path}: {message}" if field_path else f"{source}: {message}"
        )
        self.source = source
        self.field_path = field_path


class ConfigSource(str):
    """The config file's name (a ``str``: it prints, joins and opens as one) that also knows
    where each field came from: an included file or a ``--set`` item."""

    origins: Origins

    def __new__(cls, path: str | Path, origins: Origins) -> ConfigSource:
        named = super().__new__(cls, str(path))
        named.origins = origins
        return named

    def of(self, dotted: str) -> str:
        """The file or ``--set`` item that gave ``dotted`` (or its section)."""
        return _source(self.origins, dotted, str(self))

    def blame(self, dotted: str, also: Sequence[str] = ()) -> str:
        return _blame(self.origins, dotted, also, str(self))


def one_line(text: str) -> str:
    """A message that may span lines (YAML's, a library's) as one line of a refusal."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _yaml_error(path: str, exc: yaml.YAMLError) -> ConfigError:
    """One line naming path:line:column and YAML's problem (PyYAML's own text spans lines)."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return ConfigError(path, "", f"invalid YAML: {one_line(exc)}")
    problem = getattr(exc, "problem", None) or "cannot be read"
    context = getattr(exc, "context", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}"
    return ConfigError(where, "", f"invalid YAML: {problem}" + (f" ({context})" if context else ""))


# ------------------------------------------------------------------------------ reading sources


def _read_yaml(path: Path, stack: tuple[Path, ...] = ()) -> tuple[dict, Origins]:
    path = path.resolve()
    if path in stack:
        cycle = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(str(path), "include", f"include cycle: {cycle}")
    if not path.is_file():
        raise ConfigError(str(path), "", "no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise _yaml_error(str(path), exc) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "", "the top level must be a mapping of sections")

    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(str(path), "include", "must be a path or a list of paths")

    merged: dict = {}
    origins: Origins = {}
    for include in includes:
        sub, sub_origins = _read_yaml(path.parent / include, (*stack, path))
        _merge(merged, origins, sub, sub_origins)
    _merge(merged, origins, data, _origins_of(data, str(path)))
    return merged, origins


def _origins_of(data: dict, source: str, prefix: str = "") -> Origins:
    origins: Origins = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        origins[dotted] = source
        if isinstance(value, dict):
            origins.update(_origins_of(value, source, dotted + "."))
    return origins


def _merge(
    into: dict, into_origins: Origins, new: dict, new_origins: Origins, prefix: str = ""
) -> None:
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into_origins[dotted] = new_origins[dotted]
            _merge(into[key], into_origins, value, new_origins, dotted + ".")
        else:
            into[key] = value
            for k in [k for k in into_origins if k == dotted or k.startswith(dotted + ".")]:
                del into_origins[k]
            into_origins.update(
                {k: v for k, v in new_origins.items() if k == dotted or k.startswith(dotted + ".")}
            )


def add_overrides_option(parser: argparse.ArgumentParser, applies: str = "") -> None:
    """``--set a.b=1 c=2``, repeatable (every occurrence applies), for ``load_config``;
    ``applies`` says to what, where that needs saying."""
    help_text = "config overrides, dotted.key=value (may repeat)" + (f"; {applies}" * bool(applies))
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help=help_text)  # fmt: skip


def apply_overrides(data: dict, origins: Origins, overrides: Sequence[str]) -> None:
    """Apply ``a.b.c=value`` items; the value is parsed as YAML (``1e-4`` stays a string
    here and is converted when the field is typed)."""
    for item in overrides:
        source = f"--set {item}"
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(source, "", "an override must look like dotted.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(source, key, f"invalid value: {one_line(exc)}") from None
        parts = key.strip().split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(source, ".".join(parts[: depth + 1]), "is not a section")
            node = child
        node[parts[-1]] = value
        dotted = ".".join(parts)
        for stale in [k for k in origins if k.startswith(dotted + ".")]:
            del origins[stale]
        origins[dotted] = source


# --------------------------------------------------------------------------- typed conversion


def _source(origins: Origins, dotted: str, default: str) -> str:
    while dotted:
        if dotted in origins:
            return origins[dotted]
        if dotted.endswith("]"):  # data.sources[0].shards -> data.sources[0] -> data.sources
            dotted = dotted.rpartition("[")[0]
        else:
            dotted = dotted.rpartition(".")[0]
    return default


def _blame(origins: Origins, dotted: str, also: Sequence[str], default: str) -> str:
    """The source to name for an error on ``dotted`` by a rule that also read ``also``: the
    ``--set`` item that gave one of them if any did (the change that broke the rule), else the
    file that gave ``dotted``."""
    for field_path in (dotted, *also):
        source = _source(origins, field_path, default)
        if source.startswith("--set "):
            return source
    return _source(origins, dotted, default)


def _convert(tp: Any, value: Any, dotted: str, origins: Origins, default_source: str) -> Any:
    def fail(message: str) -> typing.NoReturn:
        raise ConfigError(_source(origins, dotted, default_source), dotted, message)

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, dotted, origins, default_source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, dotted, origins, default_source)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on / off as a boolean
        if value not in choices:
            fail(f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            fail(f"must be a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(value) != len(args):
            fail(f"must have {len(args)} items, got {len(value)}")
        return tuple(
            _convert(a, v, f"{dotted}[{i}]", origins, default_source)
            for i, (a, v) in enumerate(zip(args, value))
        )
    if tp is bool:
        if not isinstance(value, bool):
            fail(f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(f"must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {dotted}")


def _build(cls: type, data: Any, prefix: str, origins: Origins, default_source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            _source(origins, prefix, default_source),
            prefix,
            f"must be a mapping, got {type(data).__name__} {data!r}",
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(
                _source(origins, dotted, default_source), dotted, f"unknown key{hint}"
            )
        kwargs[key] = _convert(hints[key], value, dotted, origins, default_source)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            dotted = f"{prefix}.{f.name}" if prefix else f.name
            raise ConfigError(
                _source(origins, prefix, default_source), dotted, "missing (required)"
            )
    try:
        return cls(**kwargs)
    except FieldError as exc:
        dotted, *also = (f"{prefix}.{f}" if prefix else f for f in (exc.field_path, *exc.also))
        source = _blame(origins, dotted, also, default_source)
        raise ConfigError(source, dotted, exc.message) from None


# ------------------------------------------------------------------------------------ public API


def config_from_dict(data: dict, origins: Origins | None = None, source: str = "<dict>") -> Config:
    return _build(Config, data, "", origins or {}, source)


def load_config(path: str | Path, overrides: Sequence[str] = (), schema: type[T] = Config) -> T:
    """Read ``path`` (with its includes), apply ``overrides`` and validate everything into
    ``schema`` (a run's ``Config``, or another dataclass such as a curriculum)."""
    return load_with_sources(path, overrides, schema)[0]


def load_with_sources(
    path: str | Path, overrides: Sequence[str] = (), schema: type[T] = Config
) -> tuple[T, ConfigSource]:
    """``load_config``, and ``path`` as a ``ConfigSource``: later checks that pass it as their
    ``where`` name the file or ``--set`` item each field came from."""
    data, origins = _read_yaml(Path(path))
    apply_overrides(data, origins, overrides)
    return _build(schema, data, "", origins, str(path)), ConfigSource(path, origins)


def load_config_or_exit(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """For command-line entry points: a bad config ends the process with exit code 2 and one
    line naming the file and field, before anything expensive starts."""
    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict/list/scalars (tuples become lists) for YAML, JSON or MLflow."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
