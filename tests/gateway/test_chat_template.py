"""The chat template renders as transformers' apply_chat_template does on the same tokenizer
files: the checkpoint's own template, and templates in the style of real ones (special tokens,
loop controls, `tojson`, system-message handling, raise_exception)."""
from __future__ import annotations

import json
import shutil

import pytest

from gateway.chat import ChatTemplate
from gateway.errors import GatewayError
from mesh.engine.tokenizer import Tokenizer

MESSAGES = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "Be brief <b>&</b> 'kind'."}, {"role": "user", "content": "Héllo\nthere"},
     {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "  Again  "}],
]
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{% if loop.index0 == 0 and m['role'] == 'system' %}"
          "{% set content = '<|start_header_id|>system<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' %}"
          "{% else %}{% set content = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] | trim + '<|eot_id|>' %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
JSONISH = ("{% for m in messages %}\n  {% if m['role'] == 'assistant' and loop.last %}{% break %}{% endif %}\n"
           "  {{ m | tojson }}\n{% endfor %}\n{% if add_generation_prompt %}<assistant>{% endif %}")
ALTERNATING = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
               "[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}")


@pytest.fixture
def with_template(checkpoint, tmp_path):
    def make(template: str | None):
        folder = tmp_path / "tok"
        shutil.copytree(checkpoint("llama", "float32"), folder, dirs_exist_ok=True)
        if template is not None:
            path = folder / "tokenizer_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": template}))
        return folder
    return make


@pytest.mark.parametrize("template", [None, LLAMA3, JSONISH, ALTERNATING], ids=["checkpoint", "llama3", "tojson",
                                                                                "alternating"])
@pytest.mark.parametrize("messages", MESSAGES, ids=["one", "four"])
def test_rendering_equals_transformers_apply_chat_template(with_template, template, messages):
    from transformers import AutoTokenizer

    folder = with_template(template)
    hf = AutoTokenizer.from_pretrained(folder)
    try:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template refused the messages: so must pdmesh, with the template's words
        with pytest.raises(GatewayError, match="roles must alternate"):
            ChatTemplate(Tokenizer(folder)).render(messages)
        assert "roles must alternate" in str(e)
        return
    assert ChatTemplate(Tokenizer(folder)).render(messages) == expected
