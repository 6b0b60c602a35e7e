"""OpenAI-style chat messages rendered with a tokenizer's chat template: shared by LLM.chat() and the server."""

import json
import os
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

# apply_chat_template's own arguments, which chat_template_kwargs must not set (the rest reach the template)
NOT_TEMPLATE_KWARGS = ("conversation", "tokenize", "padding", "truncation", "max_length", "return_tensors",
                       "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs")
TEXT_PARTS = {"text": "text", "refusal": "refusal"}  # OpenAI content part types that are text, and their key


def chat_options(chat_template: str | None, add_generation_prompt: bool, continue_final_message: bool,
                 tools: list[dict] | None, chat_template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """apply_chat_template's keyword arguments, checked; chat_template_kwargs override the others, as vLLM's."""
    for name, value in (("add_generation_prompt", add_generation_prompt),
                        ("continue_final_message", continue_final_message)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template:
            raise TypeError(f"chat_template must be a non-empty str (a template or its file), got {chat_template!r}")
        path = os.path.expanduser(chat_template)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                chat_template = f.read()
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise TypeError(f"tools must be a list of OpenAI tool dicts or None, got {str(tools)[:80]}")
    extra = chat_template_kwargs or {}
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise TypeError(f"chat_template_kwargs must be a dict with str keys or None, got {chat_template_kwargs!r}")
    reserved = sorted(set(extra) & set(NOT_TEMPLATE_KWARGS))
    if reserved:
        raise ValueError(f"chat_template_kwargs cannot set {', '.join(reserved)}: chat() renders text and tokenizes")
    options = dict(chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                   continue_final_message=continue_final_message, tools=tools, **extra)
    if options["add_generation_prompt"] and options["continue_final_message"]:
        raise ValueError("continue_final_message=True continues the last message, add_generation_prompt=True starts "
                         "a new assistant turn: pass add_generation_prompt=False with it")
    return options


def render_chat(tokenizer: PreTrainedTokenizerBase, conversation: list[dict], options: dict[str, Any]) -> str:
    messages = [chat_message(m, i) for i, m in enumerate(conversation)]
    if options["continue_final_message"] and not messages:
        raise ValueError("continue_final_message=True needs a message to continue")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except TemplateError as e:
        raise ValueError(f"the chat template cannot render this conversation: {e}") from e
    except ValueError as e:  # transformers' own checks (continue_final_message on a message the template drops)
        raise ValueError(f"chat template: {e}") from e
    if not isinstance(text, str):
        raise ValueError(f"the chat template rendered {type(text).__name__}, not text")
    return text


def chat_message(message: Any, index: int) -> dict:
    """An OpenAI-style message as chat templates take it (vLLM's "string" content format): text parts joined
    with newlines, None content (an assistant's tool call) as "", tool-call arguments as dicts."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise TypeError(f"each message must be a dict with a str 'role' and a 'content', got {message!r}")
    role, content = message["role"], message.get("content")
    if content is None:
        if role != "assistant":
            raise TypeError(f"message {index} ({role}) has no content; only an assistant message may have None")
        content = ""
    elif isinstance(content, list):
        content = "\n".join(text_part(part, index) for part in content)
    elif not isinstance(content, str):
        raise TypeError(f"message {index}: content must be a str, a list of text parts or None (assistant), "
                        f"got {type(content).__name__}")
    rendered = {**message, "content": content}
    if role == "assistant" and isinstance(message.get("tool_calls"), list):
        rendered["tool_calls"] = [tool_call(call, index) for call in message["tool_calls"]]
    return rendered


def text_part(part: Any, index: int) -> str:
    if isinstance(part, str):
        return part
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in TEXT_PARTS:
        what = f"type {kind!r}" if isinstance(part, dict) else f"{type(part).__name__} {part!r}"
        raise ValueError(f"message {index}: content part {what} is not supported; minivllm takes text parts "
                         "({'type': 'text', 'text': ...}) only (no multi-modal inputs)")
    text = part.get(TEXT_PARTS[kind])
    if not isinstance(text, str):
        raise TypeError(f"message {index}: a {kind!r} content part needs a str {TEXT_PARTS[kind]!r}, got {part!r}")
    return text


def tool_call(call: Any, index: int) -> Any:
    """A tool call whose JSON-string arguments are parsed, as vLLM hands them to chat templates."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return call
    arguments = function.get("arguments")
    if isinstance(arguments, (dict, list)):
        return call
    try:
        parsed = json.loads(arguments) if arguments else {}
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"message {index}: tool call arguments are not JSON: {arguments!r}") from e
    return {**call, "function": {**function, "arguments": parsed}}
