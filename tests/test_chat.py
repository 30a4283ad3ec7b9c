"""Chat templates (runtime/chat.py): the plain one, and a Jinja template a bundle's manifest carries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from itera_runtime.bundle import load_bundle
from itera_runtime.chat import PLAIN, ChatError, chat_template

DATA = Path(__file__).resolve().parent / "data"
# a template in Hugging Face's convention, as a bundle imported from a checkpoint would carry it
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bundle_with(tmp_path, **keys):
    out = tmp_path / "bundle"
    shutil.copytree(DATA / "golden-itera", out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, **keys}))
    return load_bundle(out)


def test_a_bundle_without_a_template_gets_the_plain_one_whose_replies_continue_the_text():
    assert chat_template(load_bundle(DATA / "golden-itera")) is PLAIN
    history = [{"role": "user", "content": "Hi"}]
    prompt = PLAIN.render(history)
    assert prompt == "User: Hi\nAssistant:"
    after = PLAIN.render([*history, {"role": "assistant", "content": " Hello."}, {"role": "user", "content": "Bye"}])
    assert after.startswith(prompt + " Hello.")  # a reply sent back continues exactly where generation stopped
    assert PLAIN.stop == ("\nUser:",)
    with pytest.raises(ChatError):
        PLAIN.render([*history, {"role": "system", "content": "late"}])


def test_a_bundles_jinja_template_and_its_tokens_are_used(tmp_path):
    pytest.importorskip("jinja2")
    t = chat_template(bundle_with(tmp_path, chat_template=CHATML,
                                  special_tokens={"bos_token": "<s>", "eos_token": "<|im_end|>"}))
    assert t.name == "bundle" and t.stop == ("<|im_end|>",)
    assert t.render([{"role": "user", "content": "Hi"}]) == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_a_broken_bundle_template_is_refused_at_load_in_one_line(tmp_path):
    pytest.importorskip("jinja2")
    with pytest.raises(ChatError, match="not a valid Jinja template"):
        chat_template(bundle_with(tmp_path, chat_template="{% for m in messages %}"))
    with pytest.raises(ChatError, match="non-empty Jinja string"):
        chat_template(bundle_with(tmp_path / "2", chat_template=7))
