"""YAML recipes: the options of a command written down, so that a run can be repeated exactly.

Keys are the command's option names (dashes or underscores). An unknown key is an error naming the key and
its line; explicit command-line flags override the recipe.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import yaml

from compress.errors import CompactLMError


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


def read_yaml(path: Path, what: str):
    """The YAML node tree (for line numbers) and the values of a file, with one-line errors naming `what`."""
    try:
        text = path.read_text()
        return yaml.compose(text, Loader=_Loader), yaml.load(text, Loader=_Loader)  # noqa: S506 (SafeLoader)
    except FileNotFoundError as exc:
        raise CompactLMError(f"{what} {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise CompactLMError(f"{what} {path} is not valid YAML: {exc}") from exc


def load_recipe(path: str | os.PathLike, allowed: set[str] | dict) -> dict:
    """Read a flat YAML mapping of option -> value, checking every key against `allowed` (underscored names).

    When `allowed` maps names to defaults, a value of another type than a non-None default is refused.
    """
    path = Path(path)
    node, values = read_yaml(path, "recipe")
    if values is None:
        return {}
    if not isinstance(values, dict) or not isinstance(node, yaml.MappingNode):
        raise CompactLMError(f"recipe {path} must be a mapping of option: value")
    result = {}
    for key_node, _ in node.value:
        key = str(key_node.value).replace("-", "_")
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CompactLMError(
                f"{path}:{key_node.start_mark.line + 1}: unknown key {key_node.value!r}{hint}; "
                f"known keys: {', '.join(sorted(allowed))}"
            )
        value = values[key_node.value]
        default = allowed.get(key) if isinstance(allowed, dict) else None
        if default is not None and value is not None and not _same_kind(value, default):
            raise CompactLMError(
                f"{path}:{key_node.start_mark.line + 1}: {key_node.value} must be a {type(default).__name__}, "
                f"not {value!r}"
            )
        result[key] = float(value) if isinstance(default, float) and isinstance(value, int) else value
    return result


def _same_kind(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def merge(defaults: dict, recipe: dict, flags: dict) -> dict:
    """defaults < recipe < flags given on the command line (None = not given)."""
    merged = dict(defaults)
    merged.update({k: v for k, v in recipe.items()})
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged
