"""A model's chat template, rendered as its tokenizer would, without loading the tokenizer.

The template is the model version's own (``chat_template`` in
``tokenizer_config.json``, or ``chat_template.jinja`` beside it, as
transformers 5 saves it); it is rendered by transformers' own renderer (a
sandboxed Jinja environment; torch is not imported), so the prompt equals
``tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=True)``.
The rendered text already holds the model's special tokens, so the replica
tokenizes it without adding more.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from tpm_fed.protocol.errors import InvalidRequest

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplate:
    """The template and special tokens of one model version."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        self.source = source
        self.special_tokens = special_tokens

    @classmethod
    def of(cls, model: str, read_file: Callable[[str], bytes | None]) -> ChatTemplate:
        """Read a model version's template through ``read_file(name)`` (None when the file is absent).

        Raises:
            InvalidRequest: The model has no chat template (use /v1/completions with a plain prompt).
        """
        raw = read_file("tokenizer_config.json")
        config = json.loads(raw) if raw else {}
        source = config.get("chat_template")
        jinja = read_file("chat_template.jinja")
        if jinja:
            source = jinja.decode()
        if isinstance(source, list):  # several named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if not source:
            raise InvalidRequest(f"model {model!r} has no chat template; send a plain prompt to /v1/completions")
        special = {}
        for name in SPECIAL_TOKENS:
            value = config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                special[name] = value
        return cls(source, special)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for ``messages``, ending where the assistant's answer begins.

        Raises:
            InvalidRequest: The template refused the conversation (e.g. roles out of order).
        """
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template([messages], chat_template=self.source, add_generation_prompt=True,
                                                **self.special_tokens)
        except Exception as error:  # the template's own raise_exception(), or a template error
            raise InvalidRequest(f"messages: the model's chat template refused them: {error}") from None
        return rendered[0]
