"""Typed command functions parsed by jsonargparse, as litgpt builds its CLI.

A command is a function with typed arguments and a docstring whose `Args:` section is the help text.
`parse` builds its parser from the signature, adds `--config FILE` (YAML with the same keys; flags after it
override it) and `--print_config`, and turns settings dataclasses (`DecodeOptions`, `BatchOptions`, ...)
into top-level flags named after their fields, so each default is written once, in the dataclass.

jsonargparse's own spelling is `--max_len_b 3`, `--quiet true`, `--ref '[a, b]'`. The spellings the
commands had under argparse still parse, rewritten before jsonargparse sees them: `--max-len-b`, short
aliases such as `-m`, a bare boolean flag (`--quiet`), a repeated list flag (`-r a -r b`), and bare words
for the command's one positional argument (`nmt-moe export CKPT`, `nmt-moe average A B C`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from nmt_moe.cli.errors import UsageError


@dataclass(frozen=True)
class Command:
    """How to parse one command: its function and the extras of its command line."""

    prog: str  # e.g. "nmt-moe translate"
    function: Callable[..., Any]
    # parameter -> dataclass whose fields become top-level flags (the parameter receives the instance)
    flat: Mapping[str, type] = field(default_factory=dict)
    skip: frozenset[str] = frozenset()  # dataclass fields the command fixes itself (no flag)
    aliases: Mapping[str, str] = field(default_factory=dict)  # e.g. {"-m": "--model"}
    positional: str | None = None  # the parameter bare words fill (a list parameter takes them all)


def build_parser(command: Command) -> ArgumentParser:
    doc = inspect.getdoc(command.function) or ""
    parser = ArgumentParser(
        prog=command.prog, description=doc.split("\n\n")[0], epilog=spellings(command), exit_on_error=False
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file of these options")
    parser.add_function_arguments(command.function, skip=set(command.flat), fail_untyped=True)
    for cls in command.flat.values():
        parser.add_class_arguments(cls, nested_key=None, skip=set(command.skip), fail_untyped=True)
    return parser


def spellings(command: Command) -> str:
    """The help's note on the other spellings `canonical_argv` accepts."""
    notes = [f"{short} for {long}" for short, long in command.aliases.items()]
    notes += ["dashes for underscores (--max-len-b 3)", "a bare boolean flag for true (--quiet)",
              "a list flag repeated (-m A -m B)"]  # fmt: skip
    if command.positional:
        notes.append(f"bare words for --{command.positional}")
    return "Also accepted: " + "; ".join(notes) + "."


def parse(command: Command, argv: Sequence[str]) -> dict[str, Any]:
    """The keyword arguments for `command.function` from `argv`; UsageError names what is wrong."""
    parser = build_parser(command)
    kinds = option_kinds(command)
    try:
        values = parser.parse_args(canonical_argv(argv, kinds, command.aliases, command.positional)).as_dict()
    except ArgumentError as error:
        raise UsageError(str(error)) from None
    kwargs = {}
    for name in inspect.signature(command.function).parameters:
        cls = command.flat.get(name)
        if cls is None:
            kwargs[name] = values[name]
            continue
        settings = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name not in command.skip}
        try:
            kwargs[name] = cls(**settings)
        except ValueError as error:  # the dataclass's own range checks
            raise UsageError(f"--{error}") from None
    return kwargs


# --- older spellings ---------------------------------------------------------------------------------------


def _kind(hint: Any) -> str:
    """ "bool", "list" or "value": how many command-line words an option of this type takes."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if bool in options:
        return "bool"
    if any(typing.get_origin(option) is list for option in options):
        return "list"
    return "value"


def option_kinds(command: Command) -> dict[str, str]:
    """`--name` -> kind for every flag of the command."""
    hints = typing.get_type_hints(command.function)
    kinds = {f"--{name}": _kind(hint) for name, hint in hints.items() if name not in command.flat}
    for cls in command.flat.values():
        for name, hint in typing.get_type_hints(cls).items():
            if name not in command.skip:
                kinds[f"--{name}"] = _kind(hint)
    kinds.pop("--return", None)
    kinds["--config"] = "value"
    return kinds


def _is_word(token: str) -> bool:
    """A value rather than a flag: anything not starting with "-", "-" itself, and negative numbers."""
    if not token.startswith("-") or token == "-":
        return True
    try:
        float(token)
    except ValueError:
        return False
    return True


def _items(value: str) -> list[str]:
    if value.startswith("["):
        try:
            loaded = json.loads(value)
        except json.JSONDecodeError:
            return [value]
        return [str(item) for item in loaded] if isinstance(loaded, list) else [value]
    return [value]


def canonical_argv(
    argv: Sequence[str], kinds: Mapping[str, str], aliases: Mapping[str, str], positional: str | None
) -> list[str]:
    """`argv` in jsonargparse's spelling (see the module docstring); order kept, so `--config` still
    comes before the flags that override it."""
    out: list[str] = []
    lists: dict[str, list[str]] = {}  # list flag -> its values, written where the flag first appeared
    slots: dict[int, str] = {}  # index in `out` -> the list flag whose JSON value goes there
    i = 0

    def add_to_list(name: str, values: list[str]) -> None:
        if name not in lists:
            lists[name] = []
            out.append(name)
            slots[len(out)] = name
            out.append("")
        lists[name].extend(values)

    while i < len(argv):
        token = argv[i]
        i += 1
        if _is_word(token):
            target = f"--{positional}" if positional else None
            if target is None:
                out.append(token)
            elif kinds.get(target) == "list":
                add_to_list(target, [token])
            else:
                out += [target, token]
            continue
        name, equals, value = token.partition("=")
        name = aliases.get(name, name)
        if name.startswith("--"):
            name = "--" + name[2:].replace("-", "_")
        kind = kinds.get(name)
        if kind in ("list", "value") and not equals and i < len(argv):
            value, equals = argv[i], "="
            i += 1
        if kind == "list" and equals:
            add_to_list(name, _items(value))
        elif kind == "bool" and not equals:
            has_value = i < len(argv) and argv[i].lower() in ("true", "false")
            out += [name, argv[i] if has_value else "true"]
            i += has_value
        elif equals:
            out.append(f"{name}={value}")  # one word: a value such as "-1" is not taken for a flag
        else:
            out.append(name)
    for index, name in slots.items():
        out[index] = json.dumps(lists[name])
    return out
