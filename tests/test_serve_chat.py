"""Chat templates: the checkpoint's own (tokenizer_config.json, its list form, chat_template.jinja), the built-in
model's play scene, the plain default; refusals and sandbox escapes become one-line errors."""
from __future__ import annotations

import json

import pytest

from overspill.api import default_model_path
from overspill.errors import OverspillError
from overspill.serve.chat import TemplateRaised, load_template

# the shape of a ChatML template as checkpoints ship it
CHATML = ("{% for m in messages %}{% if m['role'] == 'assistant' and loop.first %}"
          "{{ raise_exception('the first message must not be the assistant') }}{% endif %}"
          "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def _dir(tmp_path, cfg: dict | None = None, jinja: str | None = None):
    if cfg is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    return str(tmp_path)


def test_checkpoint_template(tmp_path):
    t = load_template(_dir(tmp_path, {"chat_template": CHATML, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    assert t.own and t.stop == [] and t.bos_token == "<s>" and t.eos_token == "</s>"
    assert t.render(MSGS) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                              "<|im_start|>assistant\n")
    assert not t.render(MSGS, add_generation_prompt=False).endswith("assistant\n")
    with pytest.raises(TemplateRaised, match="must not be the assistant"):
        t.render([{"role": "assistant", "content": "x"}])


def test_named_templates_and_jinja_file(tmp_path):
    named = load_template(_dir(tmp_path, {"chat_template": [{"name": "tool_use", "template": "TOOLS"},
                                                            {"name": "default", "template": "DEFAULT"}]}))
    assert named.render(MSGS) == "DEFAULT"
    (tmp_path / "tokenizer_config.json").unlink()
    assert load_template(_dir(tmp_path, jinja="{{ messages | length }} messages")).render(MSGS) == "2 messages"


def test_builtin_scene_and_plain_default(tmp_path):
    scene = load_template(default_model_path(), builtin=True)
    assert scene.render(MSGS) == "Be brief.\n\nUSER:\nHi\n\nASSISTANT:\n" and scene.stop == ["\n\n"]
    plain = load_template(str(tmp_path))
    assert plain.render(MSGS) == "system: Be brief.\nuser: Hi\nassistant:" and not plain.own


def test_sandbox_and_broken_templates(tmp_path):
    escape = load_template(_dir(tmp_path, {"chat_template": "{{ messages.__class__.__mro__[1].__subclasses__() }}"}))
    with pytest.raises(TemplateRaised):
        escape.render(MSGS)
    with pytest.raises(OverspillError, match="does not parse"):
        load_template(_dir(tmp_path, {"chat_template": "{% for %}"}))
