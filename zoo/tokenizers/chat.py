"""Chat templates: `tokenizer_config.json`'s `chat_template` rendered with jinja2 as HF
transformers renders it.

    text = zoo.apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True)
    ids = zoo.apply_chat_template(tokenizer, messages, add_generation_prompt=True, tokenize=True)

The environment is transformers' (`transformers.utils.chat_template_utils`): jinja2's
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks and the loopcontrols
extension; `raise_exception(message)`, `strftime_now(format)`, a `tojson` filter that does not
escape HTML (with `indent`, `separators`, `sort_keys`), and a `{% generation %}` block (kept
as plain text). The template sees `messages` (keys whose value is None dropped), `tools`,
`documents`, `add_generation_prompt`, the tokenizer's special tokens (`bos_token`,
`eos_token`, `unk_token`, `pad_token`) and any extra keyword arguments.

The template comes from `chat_template.jinja` beside the tokenizer (transformers >= 4.43
writes it there), else from `tokenizer_config.json` (`chat_template`: a string, or a list of
{name, template} from which "default" is used unless a name is asked for).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence, Union

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
Message = dict[str, Any]


def read_chat_template(folder: Path, config: dict[str, Any]) -> Optional[Union[str, dict[str, str]]]:
    """The chat template(s) stored with a tokenizer: a string, a {name: template} dict, or None."""
    jinja = Path(folder) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {}
        for entry in template:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ValueError(f"{folder}/tokenizer_config.json: chat_template list entries must be "
                                 f"{{'name': ..., 'template': ...}}, got {entry!r}")
            named[entry["name"]] = entry["template"]
        return named
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{folder}/tokenizer_config.json: chat_template must be a string or a list of "
                         f"named templates, got {type(template).__name__}")
    return template


def special_token_strings(*configs: dict[str, Any]) -> dict[str, str]:
    """bos_token, eos_token, unk_token, pad_token as text, from tokenizer_config.json and
    special_tokens_map.json (each a string or an AddedToken dict with `content`); first wins."""
    found: dict[str, str] = {}
    for config in configs:
        for name in SPECIAL_TOKEN_NAMES:
            value = config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and name not in found:
                found[name] = value
    return found


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def compile_template(source: str):
    """A jinja2 Template for `source` in transformers' sandboxed chat environment."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks): its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"the chat template is not valid jinja: {error} (line {error.lineno})") from None


def render_chat(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                tools: Optional[list[dict]] = None, documents: Optional[list[dict]] = None,
                special_tokens: Optional[dict[str, str]] = None, **kwargs: Any) -> str:
    """The text `template` renders for `messages` (what transformers' apply_chat_template gives
    with tokenize=False). A `raise_exception` in the template is a ValueError with its message."""
    from jinja2.exceptions import TemplateError

    if isinstance(messages, dict) or not all(isinstance(m, dict) for m in messages):
        raise TypeError("messages must be a list of dicts such as {'role': 'user', 'content': 'Hi'}")
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return compile_template(template).render(
            messages=messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
            **{**(special_tokens or {}), **kwargs})
    except TemplateError as error:
        raise ValueError(f"the chat template refused these messages: {error}") from None


def apply_chat_template(tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                        tokenize: bool = False, chat_template: Optional[str] = None,
                        tools: Optional[list[dict]] = None, documents: Optional[list[dict]] = None,
                        **kwargs: Any) -> Union[str, list[int]]:
    """`messages` rendered with the tokenizer's chat template (or `chat_template`: a template
    string, or the name of one of the tokenizer's named templates).

    add_generation_prompt: end with the header of the assistant's turn (to generate a reply).
    tokenize: return token ids (special tokens in the text recognised, no BOS added: the
    template writes it), as transformers' `apply_chat_template(tokenize=True)`; else the text.
    Raises ValueError when the tokenizer has no template (naming where one is looked for).
    """
    template = _choose_template(getattr(tokenizer, "chat_template", None), chat_template)
    text = render_chat(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                       documents=documents, special_tokens=getattr(tokenizer, "chat_special_tokens", {}),
                       **kwargs)
    if not tokenize:
        return text
    return tokenizer.encode(text, add_bos=False, allow_special=True)


def _choose_template(stored: Optional[Union[str, dict[str, str]]], asked: Optional[str]) -> str:
    if isinstance(stored, dict):
        if asked is None:
            if "default" not in stored:
                raise ValueError(f"the tokenizer has named chat templates {sorted(stored)} and none is "
                                 f"'default'; pass chat_template=<name>")
            return stored["default"]
        if asked in stored:
            return stored[asked]
    if asked is not None:
        return asked
    if stored is None:
        raise ValueError("this tokenizer has no chat template (looked for chat_template.jinja and "
                         "tokenizer_config.json's 'chat_template'); pass chat_template=<jinja string>")
    return stored
