"""YAML recipes: the options of a command written down, so that a run can be repeated exactly.

Keys are the command's option names (dashes or underscores). An unknown key is an error naming the key and
its line; explicit command-line flags override the recipe.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml

from compress.errors import CompactLMError


def load_recipe(path: str | os.PathLike, allowed: set[str]) -> dict:
    """Read a flat YAML mapping of option -> value, checking every key against `allowed` (underscored names)."""
    path = Path(path)
    try:
        text = path.read_text()
        node = yaml.compose(text)
        values = yaml.safe_load(text)
    except FileNotFoundError as exc:
        raise CompactLMError(f"recipe {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise CompactLMError(f"recipe {path} is not valid YAML: {exc}") from exc
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
        result[key] = values[key_node.value]
    return result


def merge(defaults: dict, recipe: dict, flags: dict) -> dict:
    """defaults < recipe < flags given on the command line (None = not given)."""
    merged = dict(defaults)
    merged.update({k: v for k, v in recipe.items()})
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged
