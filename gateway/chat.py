"""Chat messages to a prompt, with the checkpoint's own chat template (tokenizer_config.json),
rendered in a sandbox as Hugging Face's apply_chat_template does (its loop controls, `tojson`
without HTML escapes, `strftime_now` and `raise_exception`); a plain role-prefixed layout when
the checkpoint has none."""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gateway.errors import GatewayError
from mesh import Tokenizer

FALLBACK = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
ROLES = ("system", "user", "assistant", "tool", "developer")


def _raise(message: str):
    raise GatewayError("invalid_argument", f"the chat template refused the messages: {message}")


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
        env.filters["tojson"] = _tojson
        self.from_checkpoint = tokenizer.chat_template is not None
        self.template = env.from_string(tokenizer.chat_template or FALLBACK)
        self.bos_token, self.eos_token = tokenizer.bos_token or "", tokenizer.eos_token or ""

    def render(self, messages) -> str:
        """messages: [{"role", "content": str or [{"type": "text", "text": str}]}] as OpenAI sends them."""
        if not isinstance(messages, list) or not messages:
            raise GatewayError("invalid_argument", "messages must be a non-empty list of {role, content} objects")
        plain = [_plain(i, m) for i, m in enumerate(messages)]
        try:
            return self.template.render(messages=plain, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise GatewayError("invalid_argument", f"the chat template failed on these messages: {e}") from None


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _plain(i: int, message) -> dict:
    if not isinstance(message, dict):
        raise GatewayError("invalid_argument", f"messages[{i}] must be an object with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise GatewayError("invalid_argument", f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise GatewayError("invalid_argument", f"messages[{i}].content[{j}]: only text parts "
                                                       "({type: text, text: ...}) are supported")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise GatewayError("invalid_argument", f"messages[{i}].content must be a string or a list of text parts")
    return {"role": role, "content": content}
