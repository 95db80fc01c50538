"""Dataclass -> command line and YAML: every field of a config dataclass becomes a flag, so a stage's flags, its YAML
file and its saved config always agree.

``lr`` -> ``--lr``, ``embed_dim`` -> ``--embed-dim``; the comment beside a field is its help, a comment line after a
blank line opens a help section. Precedence: dataclass defaults < ``--config FILE.yaml`` < explicit flags. Bad input
is a one-line ``ConfigError`` (the CLI prints it and exits 2). The schemas themselves live in ``ranking.core.config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import io
import math
import os
import re
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from ranking.core.errors import ConfigError
from ranking.core.files import write_text_atomically

C = TypeVar("C")


def at_least(name: str, value: float, least: float) -> None:
    """The one bound check of config values and flags."""
    if value < least:
        raise ConfigError(f"{name} must be at least {least}; got {value}")


def at_most(name: str, value: float, most: float) -> None:
    if value > most:
        raise ConfigError(f"{name} must be at most {most}; got {value}")


def not_empty(name: str, value: str) -> None:
    """An empty path would silently mean the current folder."""
    if not value.strip():
        raise ConfigError(f"{name} must not be empty (an empty path would mean the current folder)")


def finite(name: str, value: float) -> None:
    """NaN and infinities pass ``<`` comparisons silently; every float of a config is checked with this first."""
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value}")


def above(name: str, value: float, bound: float) -> None:
    if not value > bound:
        raise ConfigError(f"{name} must be greater than {bound}; got {value}")


def below(name: str, value: float, bound: float) -> None:
    if not value < bound:
        raise ConfigError(f"{name} must be less than {bound}; got {value}")


def finite_floats(config: Any) -> None:
    """Every float field of a config dataclass is finite (``.nan``, ``.inf`` in YAML or flags are refused)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float):
            finite(f.name, value)


def _is_bool(tp: Any) -> bool:
    return tp is bool or tp == "bool"


def _optional(tp: Any) -> Any:
    """``X`` of ``X | None`` (a field that may stay unset), else ``tp``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def choices(tp: Any) -> tuple[str, ...] | None:
    """The values a ``Literal[...]`` field admits, else None."""
    tp = _optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def field_docs(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """(field -> its comment, field -> its section) read from the class's source, so that the comments beside the
    fields are the flags' help. A comment line after a blank line opens a section ("# model"); other comment
    lines above a field, and the comment at the end of its line, describe the field."""
    try:
        lines = textwrap.dedent(inspect.getsource(cls)).splitlines()
    except (OSError, TypeError):  # no source (a frozen build): flags without help text
        return {}, {}
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0] - 1] = token.string.lstrip("#").strip()
    docs: dict[str, str] = {}
    sections: dict[str, str] = {}
    section, pending = "", list[str]()
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#") and number in comments:
            above = lines[number - 1].strip() if number else ""
            if (not above or above.startswith("class ")) and not pending:
                section = comments[number]
            else:
                pending.append(comments[number])
            continue
        match = re.match(r"    (\w+)\s*:", line)
        if match and not stripped.startswith(("def ", "@")):
            text = " ".join(pending + ([comments[number]] if number in comments else []))
            docs[match[1]], sections[match[1]] = text, section
        elif stripped.startswith(("def ", "@")):
            section = ""
        pending = []
    return docs, sections


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "unset"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return repr(value) if value == "" else str(value)


POSITIONAL = "positional"  # field(metadata={"positional": True}): a positional argument, not a --flag


def is_positional(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get(POSITIONAL))


def is_required(f: dataclasses.Field) -> bool:
    """A field without a default must be given (on the command line, or in the YAML file for a flag)."""
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def metavar(f: dataclasses.Field) -> str:
    """How a positional field is named in usage, help and errors: ``metadata["metavar"]``, else the name in capitals."""
    return str(f.metadata.get("metavar", f.name.upper()))


def flag_name(f: dataclasses.Field) -> str:
    """``--embed-dim`` for a flag, ``RUN`` for a positional field."""
    return metavar(f) if is_positional(f) else "--" + f.name.replace("_", "-")


def usage(cls: type, prog: str, config_file: bool) -> str:
    """``prog [--config FILE.yaml] POSITIONAL... --required X [--FLAG VALUE ...]``."""
    parts = [prog, *(["[--config FILE.yaml]"] if config_file else [])]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if is_positional(f):
            name = metavar(f) + (f" [{metavar(f)} ...]" if typing.get_origin(_optional(hints[f.name])) is list else "")
            parts.append(name if is_required(f) else f"[{name}]")
    parts += [
        f"{flag_name(f)} {f.name.upper()}" for f in dataclasses.fields(cls) if is_required(f) and not is_positional(f)
    ]
    optional = any(not is_positional(f) and not is_required(f) for f in dataclasses.fields(cls))
    return " ".join([*parts, *(["[--FLAG VALUE ...]"] if optional else [])])


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field, with the field's comment, default and choices as help, grouped by the class's section
    comments; the default is None so that only flags the user gave override the YAML. A positional field
    (``metadata={"positional": True}``) is a positional argument instead: required without a default, optional
    with one, one or more values for a list."""
    hints = typing.get_type_hints(cls)
    docs, sections = field_docs(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = _optional(hints[f.name])
        plural = typing.get_origin(tp) is list
        shown = "(required)" if is_required(f) else f"(default: {_shown(default_of(f))})"
        help_text = (docs.get(f.name, "") + " " + shown).strip().replace("%", "%%")
        if is_positional(f):
            options: dict[str, Any] = {"choices": choices(tp)} if choices(tp) is not None else {}
            if not plural and not options:
                options["type"] = tp
            nargs = ("+" if is_required(f) else "*") if plural else (None if is_required(f) else "?")
            parser.add_argument(f.name, nargs=nargs, default=None, metavar=metavar(f), help=help_text, **options)
            continue
        section = sections.get(f.name, "")
        if section not in groups:
            groups[section] = parser.add_argument_group(section) if section else parser
        group = groups[section]
        flag = flag_name(f)
        if _is_bool(tp):
            group.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
        elif plural:
            group.add_argument(flag, dest=f.name, default=None, nargs="*", metavar="TEXT", help=help_text)
        elif choices(tp) is not None:
            group.add_argument(flag, dest=f.name, default=None, choices=choices(tp), help=help_text)
        else:
            shown_type = {str: "TEXT"}.get(tp, tp.__name__.upper())
            group.add_argument(flag, dest=f.name, default=None, type=tp, metavar=shown_type, help=help_text)


class ArgumentParser(argparse.ArgumentParser):
    """argparse as the stages use it: no abbreviations (``--step`` is not ``--steps``), an unknown flag names the
    nearest known one, and a bad flag is a one-line ConfigError (the CLI prints it once and exits 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        args = self.sweep_style(sys.argv[1:] if args is None else list(args))
        for arg in args[: args.index("--") if "--" in args else len(args)]:
            # before argparse looks for missing positionals, so that a misspelt flag is named first
            if arg.startswith("--") and arg.split("=", 1)[0] not in self._option_string_actions:
                self.error(self.unknown_message([arg]))
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(self.unknown_message(unknown))
        return parsed

    def sweep_style(self, args: list[str]) -> list[str]:
        """Flags as a W&B sweep agent writes them: ``--trunk_lr_scale=0.1`` is ``--trunk-lr-scale 0.1`` and
        ``--pretrained=True`` / ``=false`` is ``--pretrained`` / ``--no-pretrained``."""
        switches = {
            option
            for option, action in self._option_string_actions.items()
            if isinstance(action, argparse.BooleanOptionalAction)
        }
        normalized = []
        for arg in args:
            if not arg.startswith("--") or arg == "--":
                normalized.append(arg)
                continue
            name, has_value, value = arg.partition("=")
            name = "--" + name[2:].replace("_", "-")
            if has_value and name in switches and not name.startswith("--no-"):
                truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
                if value.lower() not in truth:
                    self.error(f"{name} takes true or false, got {value!r}")
                normalized.append(name if truth[value.lower()] else "--no-" + name[2:])
            else:
                normalized.append(f"{name}={value}" if has_value else name)
        return normalized

    def unknown_message(self, unknown: list[str]) -> str:
        flag = next((arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")), None)
        if flag is None:
            return f"unexpected argument {unknown[0]!r}"
        nearest = difflib.get_close_matches(
            flag, [o for o in self._option_string_actions if o.startswith("--")], n=1, cutoff=0.6
        )
        return f"unknown flag {flag}" + (f"; did you mean {nearest[0]}?" if nearest else "")

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    tp = hints[name]
    if value is None and _optional(tp) is not tp:
        return None
    tp = _optional(tp)
    if _is_bool(tp):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
        return [str(v) for v in value]
    allowed = choices(tp)
    if allowed is not None:
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        return value
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {name} must be {tp.__name__}, got {value!r}")
    return value


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start : e.start + 1]!r}): save it as UTF-8"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def missing(cls: type, values: dict) -> list[str]:
    """The required fields (no default) that ``values`` lacks, named as on the command line."""
    return [flag_name(f) for f in dataclasses.fields(cls) if is_required(f) and values.get(f.name) is None]


def build(cls: type[C], yaml_path: str | os.PathLike | None = None, overrides: dict | None = None) -> C:
    """defaults < YAML file < overrides (None values in overrides are ignored)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict = {}
    if yaml_path:
        for key, value in load_yaml(yaml_path).items():
            key = key.replace("-", "_")
            if key in getattr(cls, "saved_alongside", ()):  # a run's config.yaml given back: not settings
                continue
            if key not in fields:
                raise ConfigError(f"{yaml_path}: unknown key {key!r} for {cls.__name__}")
            values[key] = _coerce(cls, key, value, str(yaml_path))
    for key, value in (overrides or {}).items():
        if value is not None and key in fields:
            values[key] = _coerce(cls, key, value, flag_name(fields[key]))
    absent = missing(cls, values)
    if absent:
        raise ConfigError(f"{cls.__name__}: missing {', '.join(absent)}")
    implied = getattr(cls, "implied", None)
    if implied is not None:
        values = implied(values)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def save(config: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp name, then rename)."""
    write_text_atomically(Path(path), yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def alternatives(cls: type, given: dict) -> None:
    """Pairs of fields that say one thing two ways (``cls.alternatives``: --images or --steps): a flag for one sets
    the other to its default, overriding a config file's value; both as flags are refused."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for one, other in getattr(cls, "alternatives", ()):
        if given.get(one) is not None and given.get(other) is not None:
            raise ConfigError(
                f"{flag_name(fields[one])} and {flag_name(fields[other])} say the same thing two ways: give one"
            )
        if given.get(one) is not None:
            given[other] = default_of(fields[other])
        elif given.get(other) is not None:
            given[one] = default_of(fields[one])


def parse(cls: type[C], argv: list[str] | None, prog: str, description: str, config_file: bool = True) -> C:
    """Parse ``[--config FILE.yaml] [POSITIONAL ...] [--flag value ...]`` into a validated config of type ``cls``.

    Every stage's command line goes through here: help by section with each flag's default, no abbreviations, the
    nearest flag named for a misspelt one, W&B-agent spellings (``--embed_dim=8``), one-line errors.
    ``config_file``: offer ``--config FILE.yaml`` (stages whose options make a recipe worth keeping).
    """
    parser = ArgumentParser(prog=prog, description=description, usage=usage(cls, prog, config_file))
    if config_file:
        parser.add_argument(
            "--config",
            default=None,
            metavar="FILE.yaml",
            help="YAML file of config keys (the flags' names with _ or -); flags override it",
        )
    add_dataclass_flags(parser, cls)
    given = vars(parser.parse_args(argv))
    yaml_path = given.pop("config", None)
    alternatives(cls, given)
    if yaml_path is None:  # with a file, build names what neither the file nor the flags gave
        absent = missing(cls, given)
        if absent:
            parser.error(f"the following arguments are required: {', '.join(absent)}")
    return build(cls, yaml_path, given)
