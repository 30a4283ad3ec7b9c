"""Text a user hands us (a prompt, stdin, a data file) from its bytes: one rule for every tool.

UTF-8 with a few bad bytes (a Latin-1 é, a cut character) is text: those bytes become
U+FFFD and one warning line says so. Bytes that are plainly not text (a NUL byte, or more
than BINARY_FRACTION of them undecodable: an archive, a checkpoint, random bytes) are
refused in one line, since training on or scoring them would measure nothing.
"""

from __future__ import annotations

import click

from .errors import UserError

BINARY_FRACTION = 0.25  # undecodable share of the bytes above which they are no text at all


class NotTextError(UserError):
    """Bytes given as text that are binary; the message names where they came from."""


def decode_user_text(raw: bytes, where: str) -> str:
    """raw as text (bad bytes → U+FFFD, with a warning naming `where`); binary bytes are a NotTextError."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.count("\ufffd".encode())  # one per undecodable run of bytes
    nul = b"\0" in raw
    if nul or replaced > BINARY_FRACTION * len(raw):
        raise NotTextError(f"{where} is not text (binary data: {replaced:,} of its {len(raw):,} bytes are not "
                           f"UTF-8{', and it holds NUL bytes' if nul else ''}); give a UTF-8 text file")
    click.echo(f"warning: {where} is not valid UTF-8; undecodable bytes replaced by U+FFFD", err=True)
    return text
