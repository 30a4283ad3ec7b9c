"""itera-bench's option types and shared options: each value parsed once, at the command line.

A list option (`-p 128,512 -t 1,2`) arrives as a list of ints, the form the sweep and the
record use; `render` gives the text back, so an `Invocation` can pass typed values on.
"""

from __future__ import annotations

import click


class IntList(click.ParamType):
    """Comma-separated integers >= `low` ("128,512" → [128, 512]), as llama-bench takes them."""

    name = "list"

    def __init__(self, low: int = 1):
        self.low = low

    def convert(self, value, param, ctx) -> list[int]:
        if isinstance(value, (list, tuple)):  # a default, or a value already converted
            values = list(value)
        else:
            try:
                values = [int(v) for v in str(value).split(",") if v.strip()]
            except ValueError:
                self.fail(f"expected comma-separated integers, got {value!r}", param, ctx)
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= self.low for v in values):
            self.fail(f"expected integers >= {self.low}, got {value!r}", param, ctx)
        return values

    @staticmethod
    def render(value) -> str:
        return ",".join(map(str, value))


class IntPair(click.ParamType):
    """"P,G" → (P, G), integers >= 1: one prompt-then-generate request (llama-bench -pg)."""

    name = "P,G"

    def convert(self, value, param, ctx) -> tuple[int, int]:
        pair = IntList(1).convert(value, param, ctx)
        if len(pair) != 2:
            self.fail(f"expected P,G (prompt tokens, generated tokens), got {value!r}", param, ctx)
        return pair[0], pair[1]

    @staticmethod
    def render(value) -> str:
        return f"{value[0]},{value[1]}"


THREADS = IntList(1)  # onnxruntime intra-op threads; checked against this machine's CPUs where it runs here
COUNTS = IntList(0)  # token counts, where 0 skips a test (-p 0) or means no context (-d 0)


def _list_option(*decls: str, default: tuple[int, ...], type_: IntList, help: str):
    # The default as it would be typed: the help shows "128,2048", and the type parses it like any value.
    return click.option(*decls, type=type_, default=IntList.render(default), show_default=True,
                        metavar="N[,N...]", help=help)


def threads_option(default: tuple[int, ...] = (1,)):
    return _list_option("-t", "--threads", default=default, type_=THREADS, help="onnxruntime intra-op threads (list)")


def n_depth_option(default: tuple[int, ...], help: str = "tokens already in the context (list)"):
    """-d: the same option in every subcommand; each has the default that fits what it measures."""
    return _list_option("-d", "--n-depth", default=default, type_=COUNTS, help=help)


def n_prompt_option(default: tuple[int, ...]):
    return _list_option("-p", "--n-prompt", default=default, type_=COUNTS,
                        help="prompt tokens per prefill test (list; 0 skips)")


def n_gen_option(default: tuple[int, ...]):
    return _list_option("-n", "--n-gen", default=default, type_=COUNTS,
                        help="decode steps per generation test (list; 0 skips)")
