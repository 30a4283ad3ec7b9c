"""Chat messages to prompt text: the bundle's own template when it has one, else a plain one.

A bundle carries its template as the manifest's top-level `"chat_template"`: a Jinja string
in Hugging Face's convention (`tokenizer_config.json`'s field, rendered with `messages`,
`add_generation_prompt`, `bos_token` and `eos_token`), with the two token strings from the
manifest's `"special_tokens": {"bos_token": ..., "eos_token": ...}` where present. A bundle
made from a Hugging Face checkpoint copies both there (branch i27); rendering one needs
jinja2 (the `serve` extra), sandboxed as transformers renders it.

Bundles without one (every model this project trains: none saw a chat format) use PLAIN:

    {system}\\n\\n            (when the first message is a system message)
    User: {content}\\n
    Assistant:{content}\\n    (an assistant message's content follows the colon verbatim)
    Assistant:               (the generation prompt)

and generation stops at "\\nUser:". An assistant reply sent back unchanged therefore renders
as exactly the text the model continued, which is what lets a session (`itera-serve`) carry
on from its state instead of reading the conversation again.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .bundle import Bundle
from .errors import UserError

__all__ = ["ChatTemplate", "ChatError", "PLAIN", "chat_template", "ROLES"]

ROLES = ("system", "user", "assistant")


class ChatError(UserError, ValueError):
    """Messages a template cannot render, or a bundle's template that cannot be used."""


@dataclass(frozen=True)
class ChatTemplate:
    """How messages become prompt text, and the stop strings that end a reply."""

    name: str
    stop: tuple[str, ...]
    jinja: str | None = None
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt for the next assistant reply (`messages`: role and text content each)."""
        if self.jinja is None:
            return _plain(messages)
        return _render_jinja(self, messages)


PLAIN = ChatTemplate("plain", stop=("\nUser:",))


def _plain(messages: Sequence[Mapping[str, str]]) -> str:
    parts = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            if i != 0:
                raise ChatError("the plain chat template takes a system message first only")
            parts.append(f"{content}\n\n")
        elif role == "user":
            parts.append(f"User: {content}\n")
        else:
            parts.append(f"Assistant:{content}\n")
    return "".join(parts) + "Assistant:"


def chat_template(bundle: Bundle) -> ChatTemplate:
    """The bundle's template (manifest "chat_template"), else PLAIN."""
    extra = bundle.manifest.extra
    source = extra.get("chat_template")
    if source is None:
        return PLAIN
    where = f"{bundle.manifest_path}: chat_template"
    if not isinstance(source, str) or not source.strip():
        raise ChatError(f"{where} must be a non-empty Jinja string")
    tokens = extra.get("special_tokens") or {}
    if not isinstance(tokens, Mapping):
        raise ChatError(f"{bundle.manifest_path}: special_tokens must be an object")
    bos, eos = tokens.get("bos_token") or "", tokens.get("eos_token") or ""
    if not isinstance(bos, str) or not isinstance(eos, str):
        raise ChatError(f"{bundle.manifest_path}: special_tokens.bos_token/eos_token must be strings")
    template = ChatTemplate("bundle", stop=(eos,) if eos else (), jinja=source, bos_token=bos, eos_token=eos)
    _compile(template.jinja, where)  # a broken template is refused at load, not at the first request
    return template


@functools.lru_cache(maxsize=16)
def _compile(source: str, where: str = "chat_template") -> Any:
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatError(f"{where}: rendering the bundle's chat template needs jinja2 "
                        "(pip install 'itera-lite[serve]')") from None

    def raise_exception(message):  # transformers' templates call this on bad input
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ChatError(f"{where}: not a valid Jinja template ({e})") from None


def _render_jinja(t: ChatTemplate, messages: Sequence[Mapping[str, str]]) -> str:
    from jinja2 import TemplateError

    try:
        return _compile(t.jinja or "").render(messages=[dict(m) for m in messages], add_generation_prompt=True,
                                              bos_token=t.bos_token, eos_token=t.eos_token)
    except TemplateError as e:
        raise ChatError(f"the bundle's chat template refused these messages: {e}") from None
