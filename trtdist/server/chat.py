"""Chat templates from the checkpoint's tokenizer config, rendered with jinja2 as
transformers does (sandboxed, trim_blocks, lstrip_blocks)."""

from __future__ import annotations

from datetime import datetime
from functools import cached_property
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from trtdist.server.protocol import APIError


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None, eos_token: str | None) -> None:
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token

    @cached_property
    def _template(self):  # type: ignore[no-untyped-def]
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.source)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "",
                                         eos_token=self.eos_token or "")
        except TemplateError as e:
            raise APIError(400, f"the chat template rejected the messages: {e}",
                           param="messages") from None
