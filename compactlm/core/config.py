"""The one YAML -> frozen-dataclass loader: job recipes, chain files, sweep files and command-line options files
all go through it.

    located = load_yaml(path, "sweep file")       # the values, and where each key was written (file:line)
    located = overlay(located, set_values(["distill.tokens=4096"]))
    sweep = build(Sweep, located)

`build` reads a mapping into a dataclass by its type hints (int, float, str, bool, X | None, tuple[...],
dict[str, X], nested dataclasses, tuples of them): keys may use dashes or underscores; an unknown key is refused
with its line, the keys known there and the closest one ("did you mean"); a value of the wrong kind is refused
with its dotted name and line; a field without a default must be given. The dataclass validates itself in
`__post_init__`: a `CompactLMError(..., key="field")` it raises gets that field's line.

A dataclass may define `config_prepare(cls, data: dict) -> dict` (a classmethod) to rewrite its raw mapping
before it is read (e.g. a shorthand form of a field), and may hide a field from files with
`field(metadata={"config": False})`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compactlm.core.errors import CompactLMError


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: `1e-3` is a number (PyYAML's YAML 1.1 would read it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def option(default, help: str, exclusive: str | None = None):
    """A dataclass field with its help text, which every surface shows (a command's --help, the docs).

    Fields of one `exclusive` group are alternatives (a run's length in tokens or in steps): a file that gives one
    of them clears the others, whatever defaults a subclass set for them."""
    return field(default=default, metadata={"help": help, "exclusive": exclusive})


def default(cls, name: str, value):
    """A subclass's own default for field `name` of dataclass `cls`, keeping that field's help and group."""
    parent = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field(default=value, metadata=parent.metadata)


def parse_yaml(text: str):
    """Values from YAML text with the loader every compactlm file is read with (safe, YAML 1.2 floats)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


@dataclass(frozen=True)
class Located:
    """Values read from YAML (or given as overrides), with where each one was written."""

    data: dict
    where: dict[str, str] = field(default_factory=dict)
    """Dotted key (`distill.lr`, `stages[0].prune`) -> `file:line` or `--set KEY=VALUE`."""
    origin: str = ""
    """The file (for errors that name no key)."""

    def at(self, key: str) -> str:
        """Where `key` (dotted) was written, else where its nearest enclosing key was, else the file."""
        while key:
            if key in self.where:
                return self.where[key]
            key = re.sub(r"(\.[^.\[]+|\[\d+\])$", "", key) if re.search(r"(\.|\[)", key) else ""
        return self.origin


def read_yaml(path: str | os.PathLike, what: str):
    """The YAML node tree (for line numbers) and the values of a file, with one-line errors naming `what`."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise CompactLMError(f"{what} {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise CompactLMError(f"{what} {path} is a folder, not a YAML file") from exc
    except UnicodeDecodeError as exc:
        raise CompactLMError(f"{what} {path} is not a text file") from exc
    try:
        return yaml.compose(text, Loader=_Loader), parse_yaml(text)
    except yaml.YAMLError as exc:
        raise CompactLMError(f"{what} {path} is not valid YAML: {' '.join(str(exc).split())}") from exc


def load_yaml(path: str | os.PathLike, what: str, empty_ok: bool = False) -> Located:
    """A YAML file that must hold a mapping, with the line of every key."""
    path = Path(path).expanduser()
    node, data = read_yaml(path, what)
    if data is None and empty_ok:
        return Located({}, {}, str(path))
    if not isinstance(data, dict):
        raise CompactLMError(f"{what} {path} must be a mapping of key: value")
    return Located(data, _lines(node, str(path)), str(path))


def _lines(node, origin: str, prefix: str = "") -> dict[str, str]:
    """Dotted key -> `file:line` for every mapping key and sequence item of a YAML node tree."""
    found = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            dotted = f"{prefix}.{key.value}" if prefix else str(key.value)
            found[dotted] = f"{origin}:{key.start_mark.line + 1}"
            found.update(_lines(value, origin, dotted))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            dotted = f"{prefix}[{i}]"
            found[dotted] = f"{origin}:{item.start_mark.line + 1}"
            found.update(_lines(item, origin, dotted))
    return found


def overlay(base: Located, top: Located) -> Located:
    """`top` laid over `base`: mappings merge key by key, anything else replaces; `where` follows the values."""
    data = _copy(base.data)
    where = dict(base.where)
    _merge(data, top.data, where, top.where, "")
    return Located(data, where, base.origin)


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _merge(base: dict, top: dict, where: dict, top_where: dict, prefix: str) -> None:
    for key, value in top.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if dotted in top_where:
            where[dotted] = top_where[dotted]
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, where, top_where, dotted)
            continue
        base[key] = _copy(value)
        for sub in [k for k in where if k.startswith((dotted + ".", dotted + "["))]:
            del where[sub]  # the replaced value's own keys are gone
        where.update({k: v for k, v in top_where.items() if k.startswith((dotted + ".", dotted + "["))})


def part(located: Located, prefix: str) -> Located:
    """The mapping at `prefix` (empty when absent) with its `where` entries made relative to it."""
    try:
        data = _at(located.data, prefix)
    except (KeyError, IndexError, TypeError):
        data = {}
    inner = {
        k[len(prefix) :].removeprefix("."): v
        for k, v in located.where.items()
        if k.startswith((prefix + ".", prefix + "["))
    }
    return Located(data if data is not None else {}, inner, located.origin)


def put(located: Located, prefix: str, value: Located) -> Located:
    """`located` with the value at `prefix` replaced by `value` (its `where` entries moved under `prefix`)."""
    where = {k: v for k, v in located.where.items() if not k.startswith((prefix + ".", prefix + "["))}
    where.update({prefix + ("" if k.startswith("[") else ".") + k: v for k, v in value.where.items()})
    return Located(_replace_at(located.data, prefix, value.data), where, located.origin)


def set_values(items: list[str] | tuple[str, ...]) -> Located:
    """`--set a.b=value` overrides (values read as YAML: numbers, lists, null) as one mapping."""
    data: dict = {}
    where: dict[str, str] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise CompactLMError(f"--set {item!r}: write it as section.key=value (e.g. distill.tokens=40960)")
        try:
            value = parse_yaml(text)
        except yaml.YAMLError as exc:
            raise CompactLMError(
                f"--set {item!r}: {text!r} is not a YAML value ({' '.join(str(exc).split())})"
            ) from exc
        *parents, last = key.split(".")
        target = data
        for i, part in enumerate(parents):
            here = ".".join(parents[: i + 1])
            if not isinstance(target.get(part, {}), dict):
                raise CompactLMError(f"--set {item!r}: {here} is set to a value, not a section, by an earlier --set")
            target = target.setdefault(part, {})
        target[last] = value
        for dotted in [key] + [f"{key}.{k}" for k in (value if isinstance(value, dict) else {})]:
            where[dotted] = f"--set {item}"
    return Located(data, where, "--set")


# -- reading a mapping into a dataclass


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def describe(hint) -> str:
    """A type hint in words: `an integer or null`, `a list`, ..."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(h) for h in typing.get_args(hint))
    if origin is tuple:
        return "a list"
    if origin is dict or hint is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    if hint is Path:
        return "a path"
    return _KINDS.get(hint, getattr(hint, "__name__", str(hint)))


def fields_of(cls) -> dict[str, object]:
    """The settable fields of a dataclass (name -> type hint), in order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.metadata.get("config", True)}


def unknown_key(key: str, known, at: str, where: str) -> CompactLMError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return CompactLMError(f"{at}: unknown key {key!r} in {where}{hint}; known keys there: {', '.join(sorted(known))}")


def field_keys(located: Located, names, prefix: str = "") -> Located:
    """The mapping at `prefix` with a key written with dashes (`seq-len`) renamed to the field it names (`seq_len`),
    its line kept; keys that are data (a student's name, an engine's) are left as written."""
    data = _at(located.data, prefix)
    if not isinstance(data, dict):
        return located
    renamed = {k: str(k).replace("-", "_") for k in data if k not in names and str(k).replace("-", "_") in names}
    if not renamed:
        return located
    taken = [new for old, new in renamed.items() if new in data]
    if taken:
        at = located.at(f"{prefix}.{taken[0]}" if prefix else taken[0])
        raise CompactLMError(
            f"{at}: {taken[0]!r} is given twice (also as {taken[0].replace('_', '-')!r}): write it once"
        )
    fixed = {renamed.get(k, k): v for k, v in data.items()}
    where = dict(located.where)
    for old, new in renamed.items():
        before, after = (f"{prefix}.{old}", f"{prefix}.{new}") if prefix else (old, new)
        for key in [k for k in where if k == before or k.startswith((before + ".", before + "["))]:
            where[after + key[len(before) :]] = where.pop(key)
    return Located(_replace_at(located.data, prefix, fixed), where, located.origin)


def read_fields(hints: dict[str, object], located: Located, prefix: str = "", what: str = "the file") -> dict:
    """The values of the mapping at `prefix`, each checked against its type hint; unknown keys refused."""
    data = _at(located.data, prefix)
    here = prefix or what
    if not isinstance(data, dict):
        raise CompactLMError(f"{located.at(prefix)}: {here} must be a mapping of key: value, not {data!r}")
    located = field_keys(located, hints, prefix)
    values = {}
    for key, value in _at(located.data, prefix).items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            raise unknown_key(str(key), hints, located.at(dotted), here)
        values[key] = convert(value, hints[key], located, dotted)
    return values


def _at(data, prefix: str):
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", prefix):
        data = data[int(part[1:-1])] if part.startswith("[") else data[part]
    return data


def build(cls, located: Located, prefix: str = "", what: str = "the file"):
    """The dataclass `cls` from the mapping at `prefix` of `located` (see the module doc)."""
    hints = fields_of(cls)
    located = field_keys(located, typing.get_type_hints(cls), prefix)
    data = _at(located.data, prefix)
    prepare = getattr(cls, "config_prepare", None)
    if prepare is not None and isinstance(data, dict):
        try:
            prepared = prepare(dict(data))
        except CompactLMError as exc:
            raise _locate(exc, located, prefix) from exc
        every = typing.get_type_hints(cls)  # what the hook wrote may be a field that files cannot set themselves
        hints |= {k: every[k] for k in set(prepared) - set(data) if k in every}
        located = Located(_replace_at(located.data, prefix, prepared), located.where, located.origin)
    values = read_fields(hints, located, prefix, what)
    for group in {f.metadata.get("exclusive") for f in dataclasses.fields(cls) if f.name in values} - {None}:
        for f in dataclasses.fields(cls):
            if f.metadata.get("exclusive") == group and f.name not in values:
                values[f.name] = None
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise CompactLMError(f"{located.at(prefix)}: {prefix or what} needs {', '.join(missing)}")
    try:
        return cls(**values)
    except CompactLMError as exc:
        raise _locate(exc, located, prefix) from exc


def _replace_at(data: dict, prefix: str, value) -> dict:
    if not prefix:
        return value
    data = _copy(data)
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", prefix)
    target = data
    for part in parts[:-1]:
        target = target[int(part[1:-1])] if part.startswith("[") else target[part]
    last = parts[-1]
    target[int(last[1:-1]) if last.startswith("[") else last] = value
    return data


def _locate(exc: CompactLMError, located: Located, prefix: str) -> CompactLMError:
    """A validation error with the line of the key it names (or of its section); located only once."""
    if getattr(exc, "located", False):
        return exc
    key = getattr(exc, "key", None)
    dotted = ".".join(p for p in (prefix, key) if p)
    at = located.at(dotted)
    error = CompactLMError(f"{at}: {exc}" if at else str(exc), key=key)
    error.located = True
    return error


def convert(value, hint, located: Located, dotted: str):
    """`value` checked against a type hint; lists become tuples, mappings become dataclasses where hinted."""
    origin = typing.get_origin(hint)
    if hint is typing.Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(value, option, located, dotted)
            except CompactLMError as exc:
                if getattr(exc, "located", False) and isinstance(value, (dict, list)):
                    raise  # a nested structure's own error says more than "must be X or Y"
        raise _wrong(value, hint, located, dotted)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _wrong(value, hint, located, dotted)
        return build(hint, located, dotted)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _wrong(value, hint, located, dotted)
        args = typing.get_args(hint)
        item = args[1] if len(args) == 2 else typing.Any
        return {str(k): convert(v, item, located, f"{dotted}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            raise _wrong(value, hint, located, dotted)
        args = typing.get_args(hint)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise _error(located, dotted, f"{dotted} must have {len(items)} items, not {len(value)}")
        return tuple(
            convert(v, t, located, f"{dotted}[{i}]") for i, (v, t) in enumerate(zip(value, items, strict=True))
        )
    if hint is Path:
        if not isinstance(value, str):
            raise _wrong(value, hint, located, dotted)
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
            raise _wrong(value, hint, located, dotted)
        return value
    if hint is type(None):
        if value is not None:
            raise _wrong(value, hint, located, dotted)
        return None
    return value


def _error(located: Located, dotted: str, message: str) -> CompactLMError:
    at = located.at(dotted)
    error = CompactLMError(f"{at}: {message}" if at else message)
    error.located = True
    return error


def _wrong(value, hint, located: Located, dotted: str) -> CompactLMError:
    shown = value if not isinstance(value, (dict, list)) else f"a {type(value).__name__}"
    return _error(located, dotted, f"{dotted} must be {describe(hint)}, not {shown!r}")


def load(cls, path: str | os.PathLike, what: str, overrides: Located | None = None):
    """Read a YAML file into the dataclass `cls`, with `overrides` laid over it first."""
    located = load_yaml(path, what)
    if overrides is not None:
        located = overlay(located, overrides)
    return build(cls, located, what=f"the {what}")
