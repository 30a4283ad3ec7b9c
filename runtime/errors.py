"""The error edge of every console script: errors a user can cause end in one line, bugs keep their traceback.

An exception class for something a user can cause (a bad path, a tampered bundle, an
unreachable host, a bad option value) derives from `UserError`; `OneLineErrors` (the click
command class of every console script) prints it as one `error:` line and exits 1. Anything
else is a bug and propagates with its traceback. Torch-free: the base install uses it.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click


class UserError(Exception):
    """Something the user can fix; its message is one line that says what and, where it can, how."""


class UsageError(UserError, ValueError):
    """A value a user gave that is out of range or malformed (a ValueError, for callers that catch those)."""


def first_line(e: BaseException) -> str:
    """The exception's message on one line (whitespace folded), or its type name when it has none."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def fail(message: str | BaseException, code: int = 1) -> NoReturn:
    """One `error:` line on stderr and exit `code`: how every user-facing error ends."""
    text = first_line(message) if isinstance(message, BaseException) else " ".join(str(message).split())
    click.echo(f"error: {text}", err=True)
    sys.exit(code)


def _handled(invoke, usage_exit_code: int):
    try:
        return invoke()
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        fail("interrupted", 130)
    except click.UsageError as e:  # a bad option or value: the same one line as every other error
        fail(e.format_message(), usage_exit_code)
    except click.ClickException as e:
        fail(e.format_message())
    except UserError as e:
        fail(e)


class OneLineErrors(click.Command):
    """A console script's command: click usage errors and UserErrors end in one `error:` line."""

    usage_exit_code = 1

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        return _handled(lambda: super(OneLineErrors, self).main(*args, standalone_mode=False, **kwargs),
                        self.usage_exit_code)


class OneLineErrorsGroup(click.Group):
    """The same for a group of subcommands (itera-bench, itera-devices)."""

    command_class = OneLineErrors
    usage_exit_code = 2  # click's own: scripts around itera-bench tell a bad option from a failed run by it

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        return _handled(lambda: super(OneLineErrorsGroup, self).main(*args, standalone_mode=False, **kwargs),
                        self.usage_exit_code)
