"""Options shared by several commands, and options derived from a config dataclass (one per field), so that a
command's flags, its `--config FILE` and the config it builds cannot drift apart."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated

import typer

from compactlm.core.config import Located, build, field_keys, fields_of, load_yaml, overlay, read_fields

ModelArg = Annotated[str, typer.Argument(help="A checkpoint directory or a bundled model's name (e.g. smollm2-135m).")]
DataOpt = Annotated[
    str,
    typer.Option(help="A bundled corpus (python-docs, linux-docs), a .txt/.jsonl file or a folder of them."),
]
SamplesOpt = Annotated[
    int, typer.Option(help="Number of packed sequences (the paper uses 1024; CPU default is smaller).")
]
SeqLenOpt = Annotated[int, typer.Option(help="Tokens per packed sequence.")]
BatchOpt = Annotated[int, typer.Option(help="Sequences per forward pass.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="A YAML file with any of this command's options; flags override it.")
]


def _optional(hint):
    """`X | None` for a field's hint (every derived flag defaults to None: not given)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        return hint
    return hint | None


def config_options(*classes, skip: tuple[str, ...] = ()):
    """Give a typer command one `--field-name` option per field of each dataclass in `classes` (help from the
    field's metadata, shown with its default). The command receives them as keyword arguments, None when not
    given, so the dataclass's own default applies."""

    def decorate(fn):
        signature = inspect.signature(fn, eval_str=True)
        params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in params} | set(skip)
        annotations = {p.name: p.annotation for p in params if p.annotation is not inspect.Parameter.empty}
        for cls in classes:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if f.name in taken or not f.init:
                    continue
                taken.add(f.name)
                default = "none" if f.default is None else f.default
                help_text = f"{f.metadata.get('help', '')} (default: {default})"
                panel = f"{cls.__name__} options"
                option = typer.Option(help=help_text, show_default=False, rich_help_panel=panel)
                annotation = Annotated[_optional(hints[f.name]), option]
                params.append(
                    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
                )
                annotations[f.name] = annotation

        @functools.wraps(fn)
        def command(*args, **kwargs):
            return fn(*args, **kwargs)

        command.__signature__ = signature.replace(parameters=params)
        command.__annotations__ = annotations
        return command

    return decorate


def options_file(path: Path | None, hints: dict, flags: dict) -> Located:
    """The values of `--config FILE` (keys checked against `hints`) with the flags given laid over them; each
    value remembers where it came from (file:line or the flag) for error messages."""
    located = load_yaml(path, "options file", empty_ok=True) if path else Located({}, {}, "")
    located = field_keys(located, hints)  # `seq-len:` is the --seq-len option
    read_fields(hints, located, what="the options file")  # unknown keys and ill-typed values, with their line
    given = {k: v for k, v in flags.items() if v is not None}
    where = {k: f"--{k.replace('_', '-')} {v}" for k, v in given.items()}
    return overlay(located, Located(given, where, ""))


def build_config(cls, located: Located):
    """`cls` from the keys of `located` that are its fields (the rest belong to the command)."""
    names = fields_of(cls)
    mine = Located({k: v for k, v in located.data.items() if k in names}, located.where, located.origin)
    return build(cls, mine, what="the options")


def command_hints(command) -> dict:
    """Option name -> type (Annotated stripped) of every option a typer command takes."""
    hints = typing.get_type_hints(command)
    return {name: hints[name] for name in inspect.signature(command).parameters if name in hints}
