"""Chat templates: the real templates of several model families (tests/fixtures/chat_templates)
rendered by `zoo.apply_chat_template` exactly as transformers' `apply_chat_template` renders
them (text and token ids), with and without the generation prompt, tools, dates and the
templates' own refusals; `kvzoo generate --chat` prompts the model with that rendering.

transformers is the oracle: it renders each template in its sandboxed jinja2 environment from
the same tokenizer folder.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from helpers.assets import require_module
from helpers.hf_folders import save_tokenizer

import zoo

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
SPECIALS = ("<|endoftext|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|im_start|>", "<|im_end|>", "<s>", "</s>")
# family -> (fixture, tokenizer's special tokens as its tokenizer_config.json names them)
FAMILIES = {
    "llama3": ("llama3.jinja", dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")),
    "llama3.2": ("llama3.2.jinja", dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")),
    "qwen2.5": ("qwen2.5.jinja", dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")),
    "mistral": ("mistral-instruct.jinja", dict(bos_token="<s>", eos_token="</s>")),
    "llama2": ("llama2-chat.jinja", dict(bos_token="<s>", eos_token="</s>")),
    "tinyllama": ("tinyllama-zephyr.jinja", dict(bos_token="<s>", eos_token="</s>")),
    "smollm2": ("smollm2.jinja", dict(bos_token="<|im_start|>", eos_token="<|im_end|>")),
}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  What is 2+2?  "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Tell me a story\nabout a fox 🦊, naïvely."}],
    [{"role": "system", "content": "Sys"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c", "name": None}],
    [{"role": "assistant", "content": "I start"}],  # refused by templates that insist on alternation
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <in> a city & more",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CHAT = [{"role": "user", "content": "Weather in Zürich?"},
             {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                 "name": "get_weather", "arguments": {"city": "Zürich"}}}]},
             {"role": "tool", "content": "{\"temp\": 21}"}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (folder with the tokenizer and its template, transformers' tokenizer read from it)."""
    require_module("transformers")
    from transformers import AutoTokenizer

    made = {}

    def get(family):
        if family not in made:
            fixture, tokens = FAMILIES[family]
            folder = tmp_path_factory.mktemp(family)
            save_tokenizer(folder, special_tokens=SPECIALS, chat_template=(TEMPLATES / fixture).read_text(), **tokens)
            made[family] = (folder, AutoTokenizer.from_pretrained(str(folder)))
        return made[family]

    return get


def hf_render(hf, messages, **kwargs):
    """transformers' rendering, or the error it raises."""
    try:
        return hf.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as error:  # the template's raise_exception: jinja2's TemplateError
        return error


def assert_same_rendering(tokenizer, hf, messages, **kwargs):
    expected = hf_render(hf, messages, **kwargs)
    if isinstance(expected, Exception):
        with pytest.raises(ValueError, match="refused") as caught:
            zoo.apply_chat_template(tokenizer, messages, **kwargs)
        assert str(expected) in str(caught.value)
        return None
    assert zoo.apply_chat_template(tokenizer, messages, **kwargs) == expected
    return expected


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_rendering_equals_transformers(folders, family, add_generation_prompt):
    folder, hf = folders(family)
    tokenizer = zoo.load_tokenizer(folder)
    rendered = [assert_same_rendering(tokenizer, hf, chat, add_generation_prompt=add_generation_prompt,
                                      date_string="26 Jul 2024") for chat in CONVERSATIONS]
    assert sum(r is not None for r in rendered) >= 2  # Mistral refuses system messages


@pytest.mark.parametrize("family", list(FAMILIES))
def test_token_ids_equal_transformers(folders, family):
    folder, hf = folders(family)
    tokenizer = zoo.load_tokenizer(folder)
    chat = CONVERSATIONS[2]
    text = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = zoo.apply_chat_template(tokenizer, chat, add_generation_prompt=True, tokenize=True)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert any(i in ids for i in tokenizer.special_tokens.values())  # the template's markers are tokens


@pytest.mark.parametrize("family", ["qwen2.5", "llama3.2"])
def test_tools_and_tool_calls_render_as_transformers(folders, family):
    folder, hf = folders(family)
    tokenizer = zoo.load_tokenizer(folder)
    for chat in (TOOL_CHAT[:1], TOOL_CHAT[:2] if family == "llama3.2" else TOOL_CHAT):
        text = assert_same_rendering(tokenizer, hf, chat, tools=TOOLS, add_generation_prompt=True,
                                     date_string="1 Jan 2025")
        assert text is not None and "get_weather" in text and "Zürich" in text  # tojson keeps non-ASCII


def test_strftime_now_gives_todays_date(folders):
    folder, hf = folders("llama3.2")
    tokenizer = zoo.load_tokenizer(folder)
    text = assert_same_rendering(tokenizer, hf, CONVERSATIONS[0], add_generation_prompt=True)
    assert datetime.now().strftime("%d %b %Y") in text


def test_template_file_beside_the_tokenizer_and_named_templates(folders, tmp_path):
    """transformers 5 writes chat_template.jinja; older folders hold a list of named templates."""
    folder, hf = folders("smollm2")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in config
    named = tmp_path / "named"
    named.mkdir()
    for name in ("tokenizer.json", "special_tokens_map.json"):
        if (folder / name).exists():
            (named / name).write_bytes((folder / name).read_bytes())
    config["chat_template"] = [{"name": "default", "template": (TEMPLATES / "smollm2.jinja").read_text()},
                               {"name": "shout", "template": "{{ messages[0]['content'] | upper }}"}]
    (named / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = zoo.load_tokenizer(named)
    assert zoo.apply_chat_template(tokenizer, CONVERSATIONS[0]) == hf_render(hf, CONVERSATIONS[0])
    assert zoo.apply_chat_template(tokenizer, CONVERSATIONS[0], chat_template="shout") == "HELLO!"


def test_sandbox_and_missing_template_are_clear_errors(folders, tmp_path):
    folder, _ = folders("llama3")
    tokenizer = zoo.load_tokenizer(folder)
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        zoo.apply_chat_template(tokenizer, CONVERSATIONS[0], chat_template="{{ messages.__class__.__mro__ }}"
                                "{{ ''.__class__.__subclasses__() }}")
    with pytest.raises(ValueError, match="not valid jinja"):
        zoo.apply_chat_template(tokenizer, CONVERSATIONS[0], chat_template="{% for %}")
    with pytest.raises(TypeError, match="list of dicts"):
        zoo.apply_chat_template(tokenizer, "Hello")
    plain = tmp_path / "plain"
    save_tokenizer(plain)
    with pytest.raises(ValueError, match="no chat template"):
        zoo.apply_chat_template(zoo.load_tokenizer(plain), CONVERSATIONS[0])


def test_generate_chat_prompts_with_the_rendered_template(folders, tmp_path, capsys):
    import mlx.core as mx  # noqa: F401  (zoo imports it; keeps the order of imports obvious)

    from zoo.cli import main as kvzoo

    folder, _ = folders("qwen2.5")
    tokenizer = zoo.load_tokenizer(folder)
    model = zoo.build("llama", preset="tiny", vocab_size=tokenizer.vocab_size, seed=3)
    zoo.save(model, folder)
    chat = [{"role": "user", "content": "Hello!"}]
    ids = zoo.apply_chat_template(tokenizer, chat, add_generation_prompt=True, tokenize=True)
    expected = zoo.generate(model, tokenizer, ids, max_tokens=6)
    assert kvzoo(["generate", "--model", str(folder), "--prompt", "Hello!", "--chat", "--max-tokens", "6",
                  "--dtype", "float32"]) == 0
    out = capsys.readouterr()
    assert out.out == expected + "\n"
    assert f"Prompt: {len(ids)} tokens" in out.err
    assert kvzoo(["generate", "--model", str(folder), "--prompt", "Hi", "--chat", "--system", "Be brief",
                  "--max-tokens", "2"]) == 0


def test_gguf_chat_template_is_read_and_rendered_as_transformers(tmp_path):
    """llama.cpp keeps the HF template in the GGUF's `tokenizer.chat_template`; BOS/EOS text
    comes from the embedded vocabulary (stories260K: <s>, </s>)."""
    from helpers.assets import require_asset
    from helpers.gguf_files import rewrite

    gguf = require_module("gguf")
    require_module("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    source = require_asset("stories260K/stories260K.gguf")
    template = (TEMPLATES / "mistral-instruct.jinja").read_text()
    rewrite(source, tmp_path / "plain.gguf", lambda name, array: (array, None))
    reader = gguf.GGUFReader(str(tmp_path / "plain.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "chat.gguf"), arch="llama")
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            vtype = field.types[0]
            writer.add_key_value(key, field.contents(), vtype,
                                 sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    writer.add_chat_template(template)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, tokenizer = zoo.load(tmp_path / "chat.gguf")
    assert tokenizer.chat_template == template
    chat = CONVERSATIONS[2]
    (expected,), _ = render_jinja_template([chat], chat_template=template, bos_token="<s>", eos_token="</s>",
                                           add_generation_prompt=True)
    assert zoo.apply_chat_template(tokenizer, chat, add_generation_prompt=True) == expected
    assert expected.startswith("<s>[INST] Hi [/INST]Hello, how can I help?</s>")
    ids = zoo.apply_chat_template(tokenizer, chat, add_generation_prompt=True, tokenize=True)
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
