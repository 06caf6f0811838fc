"""Where `serve`'s settings come from: flags, `AITBC_*` environment variables, a TOML file.

Every option of the `serve` parser is covered by walking the parser's actions, so a flag added
later is configurable the same three ways with nothing to add here:

- the flag itself, `--max-pending 10`;
- the environment, `AITBC_` and the flag's name upper-cased with dashes as underscores
  (`AITBC_MAX_PENDING=10`); switches take 1/0, true/false, yes/no, on/off; repeatable flags a
  comma-separated list;
- a TOML file, keys the flag names with dashes or underscores (`max-pending = 10`,
  `no-miner = true`, `model = ["a=/x.gguf"]`): `--config PATH`, else `$AITBC_CONFIG`, else
  `$XDG_CONFIG_HOME/aitbc-node/config.toml` (`~/.config/...`) when it exists.

Precedence is flag > env > file > default; a repeatable flag given on the command line replaces
the env and file lists rather than adding to them. Every value goes through the flag's own
`type=` and `choices`, so a bad one is refused as on the command line, naming where it came
from. An unknown file key is an error that suggests the nearest option, never ignored.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "AITBC_"
CONFIG_ENV = "AITBC_CONFIG"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
# Options that say how to read or show the configuration rather than being part of it.
NOT_CONFIGURABLE = frozenset({"help", "version", "config", "print_config"})
# An option whose name says it holds a secret is shown as *** by --print-config.
SECRET_WORDS = ("key", "secret", "password", "token")


class ConfigError(Exception):
    """A configuration source holds something `serve` cannot take; the message says where."""


@dataclass(frozen=True)
class Option:
    """One configurable option of a parser, and its names in the three sources."""

    action: argparse.Action

    @property
    def name(self) -> str:
        """The long flag without its dashes (`max-pending`): the TOML key."""
        long = next(s for s in self.action.option_strings if s.startswith("--"))
        return long[2:]

    @property
    def env(self) -> str:
        """The environment variable (`AITBC_MAX_PENDING`)."""
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return self.action.dest

    @property
    def is_switch(self) -> bool:
        """A flag that takes no value (store_true and the like)."""
        return self.action.nargs == 0

    @property
    def is_list(self) -> bool:
        """A repeatable flag (action="append")."""
        return isinstance(self.action, argparse._AppendAction)

    @property
    def secret(self) -> bool:
        return any(self.name.endswith(word) or word + "-" in self.name for word in SECRET_WORDS)

    def switch_value(self, on: bool) -> Any:
        """What the namespace holds when the switch is given (`on`) or not."""
        if isinstance(self.action, argparse.BooleanOptionalAction):
            return on
        return self.action.const if on else self.action.default


def options(parser: argparse.ArgumentParser) -> list[Option]:
    """The parser's options that env and file may set, in the parser's order."""
    return [
        Option(action)
        for action in parser._actions
        if action.dest not in NOT_CONFIGURABLE
        and any(s.startswith("--") for s in action.option_strings)
    ]


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one sub-command (`serve`) of the top-level parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    raise KeyError(command)


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_CONFIG_HOME/aitbc-node/config.toml`, else `~/.config/aitbc-node/config.toml`."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "aitbc-node" / "config.toml"


# -- converting one value ------------------------------------------------------------------


def _convert(option: Option, raw: str, where: str) -> Any:
    """`raw` through the option's `type=` and `choices`, as argparse converts a flag's value."""
    convert = option.action.type or str
    try:
        value = convert(raw)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError):
        type_name = getattr(convert, "__name__", repr(convert))
        raise ConfigError(f"{where}: invalid {type_name} value: {raw!r}") from None
    choices = option.action.choices
    if choices is not None and value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{where}: invalid choice: {raw!r} (choose from {shown})")
    return value


def _switch_word(option: Option, word: str, where: str) -> Any:
    lowered = word.strip().lower()
    if lowered in TRUE_WORDS:
        return option.switch_value(True)
    if lowered in FALSE_WORDS:
        return option.switch_value(False)
    raise ConfigError(
        f"{where}: expected one of 1/0, true/false, yes/no, on/off for a switch, got {word!r}"
    )


def from_env(option: Option, raw: str) -> Any:
    """The value the environment variable's text `raw` gives the option."""
    where = option.env
    if option.is_switch:
        return _switch_word(option, raw, where)
    if option.is_list:
        return [_convert(option, item.strip(), where) for item in raw.split(",") if item.strip()]
    return _convert(option, raw, where)


def _toml_scalar(option: Option, value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        kind = "true/false" if isinstance(value, bool) else type(value).__name__
        raise ConfigError(f"{where}: expected a value for --{option.name}, got {kind}")
    return str(value)


def from_file(option: Option, value: Any, where: str) -> Any:
    """The value a TOML file's `value` gives the option."""
    if option.is_switch:
        if isinstance(value, bool):
            return option.switch_value(value)
        if isinstance(value, str | int) and str(value).strip().lower() in TRUE_WORDS | FALSE_WORDS:
            return _switch_word(option, str(value), where)
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if option.is_list:
        items = value if isinstance(value, list) else [value]
        return [_convert(option, _toml_scalar(option, item, where), where) for item in items]
    if isinstance(value, list | dict):
        raise ConfigError(f"{where}: --{option.name} takes one value, not a list or table")
    return _convert(option, _toml_scalar(option, value, where), where)


# -- the file ------------------------------------------------------------------------------


def read_file(path: Path, opts: Sequence[Option]) -> dict[str, Any]:
    """The options a TOML file sets, by dest, converted; unknown keys are errors."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    by_name = {o.name: o for o in opts}
    values: dict[str, Any] = {}
    keys_seen: dict[str, str] = {}
    for key, value in data.items():
        name = key.replace("_", "-")
        option = by_name.get(name)
        if option is None:
            raise ConfigError(f"{path}: {_unknown(key, by_name)}")
        if name in keys_seen:
            raise ConfigError(f"{path}: {key!r} and {keys_seen[name]!r} set the same option")
        keys_seen[name] = key
        values[option.dest] = from_file(option, value, f"{path}: {key}")
    return values


def _unknown(key: str, by_name: Mapping[str, Option]) -> str:
    name = key.replace("_", "-")
    if name.replace("-", "_") in NOT_CONFIGURABLE:
        return f"{key!r} cannot be set in a config file"
    close = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "see `aitbc-node serve --help`"
    return f"unknown option {key!r} ({hint})"


# -- all sources together ------------------------------------------------------------------


@dataclass
class Resolved:
    """The effective settings and where each came from."""

    options: list[Option]
    sources: dict[str, str] = field(default_factory=dict)  # dest -> flag / env X / file P / default
    config_path: Path | None = None  # the file read, if any
    config_note: str = ""  # why no file was read

    def render(self, args: argparse.Namespace) -> str:
        """`--print-config`'s text: TOML a config file may start from, each value's source
        in a comment after it (secrets as ***, unset options commented out)."""
        header = [
            "# aitbc-node serve: effective settings (precedence: flag > env > file > default)",
            f"# config file: {self.config_path or self.config_note}",
        ]
        rows: list[tuple[str, str]] = []
        for option in self.options:
            value = getattr(args, option.dest, None)
            if value is None:
                left = f"# {option.name} (not set)"
            else:
                if option.secret and value:
                    value = "***"
                left = f"{option.name} = {_toml_value(value)}"
            rows.append((left, self.sources.get(option.dest, "default")))
        width = max(len(left) for left, _ in rows)
        return "\n".join(header + [f"{left:<{width}}  # {source}" for left, source in rows])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def _given_on_command_line(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> argparse.Namespace:
    """Only what `argv` itself sets: the parser again, with every default suppressed."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return parser.parse_args(list(argv))
    finally:
        for action, default in saved:
            action.default = default


def resolve(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Fill `args`, parsed from `argv` by `parser` (with its plain defaults), with the env and
    file values of every option no flag set; return where each value came from.

    Raises ConfigError naming the source of a bad value, an unknown file key, or a missing
    config file that was asked for by `--config` or `$AITBC_CONFIG`.
    """
    environ = os.environ if environ is None else environ
    opts = options(parser)
    given = _given_on_command_line(parser, argv)
    explicit = getattr(given, "config", None) or environ.get(CONFIG_ENV) or None
    resolved = Resolved(opts)
    file_values: dict[str, Any] = {}
    if explicit is not None:
        resolved.config_path = Path(explicit).expanduser()
        file_values = read_file(resolved.config_path, opts)
    else:
        default = default_config_path(environ)
        if default.is_file():
            resolved.config_path = default
            file_values = read_file(default, opts)
        else:
            resolved.config_note = f"none ({default} does not exist)"
    # An empty variable counts as unset, as $AITBC_DATA_DIR always has.
    env_values = {
        o.dest: from_env(o, environ[o.env]) for o in opts if environ.get(o.env, "").strip()
    }
    for option in opts:
        dest = option.dest
        if hasattr(given, dest):
            # For a repeatable flag this is the command line's list alone: it replaces the
            # env and file lists instead of adding to them.
            setattr(args, dest, getattr(given, dest))
            resolved.sources[dest] = "flag"
        elif dest in env_values:
            setattr(args, dest, env_values[dest])
            resolved.sources[dest] = f"env {option.env}"
        elif dest in file_values:
            setattr(args, dest, file_values[dest])
            resolved.sources[dest] = f"file {resolved.config_path}"
        else:
            resolved.sources[dest] = "default"
    return resolved
