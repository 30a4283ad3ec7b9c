"""One run of an itera-bench subcommand as a value: the command, its bundles and typed options.

`itera-bench all` runs its subcommands as invocations (each in a fresh process), and a run on
a device is the invocation typed here with device paths put in: both turn it into argv with
`argv()`, which click parses back into the same values (`parse`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click


@dataclass(frozen=True)
class Invocation:
    """`itera-bench NAME BUNDLES... OPTIONS`, with the option values as the command's function gets them."""

    command: click.Command
    bundles: tuple[str, ...]
    options: Mapping[str, Any]  # click parameter name → value
    given: frozenset[str] = field(default_factory=frozenset)  # options typed on the command line

    @property
    def name(self) -> str:
        return self.command.name or ""

    @classmethod
    def from_context(cls, ctx: click.Context) -> Invocation:
        """The invocation click has just parsed (in a subcommand's function)."""
        options = dict(ctx.params)
        bundles = tuple(options.pop("bundles", ()))
        given = frozenset(k for k in options
                          if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE)
        return cls(ctx.command, bundles, options, given)

    @classmethod
    def parse(cls, command: click.Command, argv: list[str]) -> Invocation:
        """`argv` (bundles and options, without the subcommand's name) parsed as click parses it."""
        with command.make_context(command.name, list(argv)) as ctx:
            return cls.from_context(ctx)

    @classmethod
    def of(cls, command: click.Command, bundles, **options) -> Invocation:
        """The command on `bundles` with its defaults, these `options` replacing them."""
        return cls(command, tuple(map(str, bundles)), _defaults(command)).replace(**options)

    def replace(self, bundles=None, **options) -> Invocation:
        """A copy with other bundles and option values (only options the command has)."""
        unknown = set(options) - set(self.options)
        if unknown:
            raise TypeError(f"itera-bench {self.name} has no option {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, bundles=self.bundles if bundles is None else tuple(map(str, bundles)),
                                   options={**self.options, **options})

    def with_shared(self, values: Mapping[str, Any]) -> Invocation:
        """A copy with the values of `values` whose name is an option of this command."""
        return self.replace(**{k: v for k, v in values.items() if k in self.options})

    def files(self) -> dict[str, Path]:
        """Options whose value, typed on the command line, names a local file (a text to score):
        a run elsewhere needs the file sent with it."""
        return {k: Path(v) for k, v in self.options.items()
                if k in self.given and isinstance(v, str) and os.path.isfile(v)}

    def argv(self) -> list[str]:
        """NAME BUNDLES... and every option typed on the command line or whose value is not the default."""
        defaults = _defaults(self.command)
        out = [self.name, *self.bundles]
        for param in self.command.params:
            if not isinstance(param, click.Option) or param.name not in self.options:
                continue
            value = self.options[param.name]
            if value is None or (value == defaults.get(param.name) and param.name not in self.given):
                continue
            flag = max(param.opts, key=len)
            if param.is_flag:
                out.append(flag if value else max(param.secondary_opts, key=len))
                continue
            render = getattr(param.type, "render", str)
            for v in (value if param.multiple else [value]):
                out += [flag, render(v)]
        return out


def _defaults(command: click.Command) -> dict[str, Any]:
    """Each option's default as its type converts it (environment variables not read)."""
    ctx = click.Context(command)
    unset = getattr(click.core, "UNSET", None)  # click >= 8.3: "no default", where older clicks say None
    out: dict[str, Any] = {}
    for param in command.params:
        if isinstance(param, click.Option) and param.name:
            value = param.get_default(ctx)
            if value is None or value is unset:
                out[param.name] = () if param.multiple else None
            else:
                out[param.name] = param.type_cast_value(ctx, value)
    return out
