"""Chat templates: a conversation -> the prompt text the model continues.

Which template, in order:
  1. the checkpoint's own: ``chat_template`` in ``tokenizer_config.json`` (a string, or a list of named templates
     of which "default" is taken), else a ``chat_template.jinja`` file beside it;
  2. the built-in Shakespeare model's: the conversation as a scene of a play, which is what that model was
     trained on. A system message is a stage direction, then each turn is a speech under its speaker's name in
     capitals, and the reply is cued by ``ASSISTANT:``. A speech ends at a blank line, so replies stop there::

         A room in the castle.

         USER:
         Good morrow, sir. How fare you?

         ASSISTANT:
         <reply>
  3. otherwise a plain one: ``{role}: {content}`` lines, then ``assistant:``; replies stop at ``\\nuser:``.

Templates are rendered in jinja2's immutable sandbox (a template comes with a downloaded checkpoint), with the
names Hugging Face templates use: ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``,
``raise_exception`` and ``strftime_now``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import OverspillError

SHAKESPEARE = (
    "{% for m in messages %}"
    "{% if m.role in ('system', 'developer') %}{{ m.content }}\n\n"
    "{% else %}{{ m.role | upper }}:\n{{ m.content }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)

PLAIN = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class TemplateRaised(OverspillError):
    """The template refused the conversation (its ``raise_exception``), or failed to render."""


@dataclass
class ChatTemplate:
    source: str                                       # jinja2 text
    stop: list[str] = field(default_factory=list)     # stop strings every reply gets
    bos_token: str = ""
    eos_token: str = ""
    origin: str = "plain"                             # where it came from, for logs
    own: bool = False                                 # the checkpoint's: it writes its special tokens itself

    def __post_init__(self):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        # Hugging Face's tojson: no HTML escaping, optional indent
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, sort_keys=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
        self._template = env.from_string(self.source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """messages: ``{"role", "content"}`` dicts -> prompt text."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateRaised:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise TemplateRaised(f"the chat template ({self.origin}) failed: {type(e).__name__}: {e}") from None


def _raise(message: str) -> None:
    raise TemplateRaised(f"the chat template refused the conversation: {message}")


def _token_text(t) -> str:
    """tokenizer_config's special tokens are a string or ``{"content": ...}``."""
    if isinstance(t, dict):
        return str(t.get("content", ""))
    return t if isinstance(t, str) else ""


def load_template(model_dir: str, builtin: bool = False) -> ChatTemplate:
    """The template for a checkpoint directory (see the module docstring for the order)."""
    cfg: dict = {}
    path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise OverspillError(f"{path}: cannot read ({e})") from None
    src = cfg.get("chat_template")
    if isinstance(src, list):   # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in src if isinstance(t, dict)}
        src = named.get("default") or next(iter(named.values()), None)
    origin = path
    jinja_file = os.path.join(model_dir, "chat_template.jinja")
    if not src and os.path.exists(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            src, origin = f.read(), jinja_file
    bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
    try:
        if src:
            return ChatTemplate(src, [], bos, eos, origin, own=True)
    except TemplateError as e:
        raise OverspillError(f"{origin}: the chat template does not parse ({e})") from None
    if builtin:
        return ChatTemplate(SHAKESPEARE, ["\n\n"], origin="built-in Shakespeare scene")
    return ChatTemplate(PLAIN, ["\nuser:"], bos, eos, origin="plain role: content lines")
