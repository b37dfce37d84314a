"""The tokenizer and chat template as the runtime uses them (Hugging Face tokenizers, jinja2)."""

from __future__ import annotations

from typing import Any

from llmc.errors import LlmcError, UsageError


class Tokenizer:
    def __init__(self, json_text: str, info: dict):
        from tokenizers import Tokenizer as HFTokenizer

        self._tokenizer = HFTokenizer.from_str(json_text)
        self.info = info
        self.bos_token_id = info.get("bos_token_id")
        self.eos_token_ids = list(info.get("eos_token_ids") or [])

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise UsageError(f"a text prompt must be a str, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UsageError(f"the text is not valid Unicode: {exc.object[exc.start:exc.end]!r} at position "
                            f"{exc.start} is {exc.reason} (a lone surrogate: text decoded with errors="
                            "'surrogateescape' or 'surrogatepass'?); pass valid text") from None
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if self.info.get("add_bos_token") and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def takes_tools(self) -> bool:
        """Whether the chat template reads a ``tools`` list (function definitions for the model)."""
        return "tools" in (self.info.get("chat_template") or "")

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        messages = check_messages(messages)
        template = self.info.get("chat_template")
        if not template:
            raise LlmcError("this model has no chat template: use generate() with a plain prompt")
        if tools and not self.takes_tools:
            raise LlmcError("this model's chat template takes no tools: send the request without them")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise LlmcError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(template).render(
                messages=messages, add_generation_prompt=True, **({"tools": tools} if tools else {}),
                bos_token=self.info.get("bos_token") or "", eos_token=self.info.get("eos_token") or "")
        except jinja2.TemplateError as exc:
            raise LlmcError(f"the model's chat template failed: {exc}") from None


ROLES = ("system", "user", "assistant", "tool", "developer")


def check_messages(messages) -> list[dict[str, Any]]:
    """Chat messages as a template takes them, or an LlmcError saying what is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UsageError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise UsageError(f"message {i} needs a role, one of {', '.join(ROLES)}")
        content = message.get("content")
        if not (content is None and message.get("tool_calls")) and not isinstance(content, str):
            raise UsageError(f"message {i}'s content must be a string")
    return list(messages)
