"""Prompts as vLLM takes them, checked and tokenized before any work starts."""

from dataclasses import dataclass
from typing import TypedDict

from transformers import PreTrainedTokenizerBase
from typing_extensions import NotRequired

from minivllm.config import refuse_vllm_only


class TextPrompt(TypedDict):
    prompt: str


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    prompt: NotRequired[str]  # the text, if the caller has it: reported back in the output


Prompt = str | TextPrompt | TokensPrompt


@dataclass(frozen=True)
class ProcessedPrompt:
    text: str | None
    token_ids: list[int]


class InputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int, max_model_len: int):
        self.tokenizer, self.vocab_size, self.max_model_len = tokenizer, vocab_size, max_model_len

    @staticmethod
    def as_list(prompts: Prompt | list[Prompt]) -> list[Prompt]:
        """One or many prompts as a list, before each is processed."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
            raise TypeError("a list of ints is ambiguous; pass {'prompt_token_ids': ids} or a list of such lists")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError(f"prompts must be a str, a dict or a non-empty list of those, got {type(prompts).__name__}")
        return list(prompts)

    def process(self, prompt: Prompt | list[int] | ProcessedPrompt, truncate: int | None = None) -> ProcessedPrompt:
        """The prompt checked and tokenized; with `truncate` (SamplingParams.truncate_prompt_tokens), only its last
        `truncate` tokens (and no text: it no longer matches), which must then fit max_model_len."""
        if isinstance(prompt, ProcessedPrompt):
            if truncate is None or len(prompt.token_ids) <= truncate:
                return prompt
            return ProcessedPrompt(None, prompt.token_ids[-truncate:])
        if isinstance(prompt, dict):  # vLLM's TokensPrompt {"prompt_token_ids": ...} or TextPrompt {"prompt": ...}
            extra = {k: v for k, v in prompt.items() if k not in ("prompt", "prompt_token_ids")}
            refuse_vllm_only("prompt", extra, known="it takes 'prompt' (a str) or 'prompt_token_ids' (a list of ints)")
            if "prompt_token_ids" in prompt:
                return self.checked(prompt.get("prompt"), prompt["prompt_token_ids"], truncate)
            if not isinstance(prompt.get("prompt"), str):
                raise TypeError(f"a dict prompt needs 'prompt_token_ids' or a str 'prompt', got keys {sorted(prompt)}")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer files; pass prompts as {'prompt_token_ids': [...]}")
            if not prompt:
                raise ValueError("a prompt is empty; every prompt needs at least one token")
            return self.checked(prompt, self.tokenizer.encode(prompt), truncate)
        if isinstance(prompt, list):
            return self.checked(None, prompt, truncate)
        raise TypeError(f"a prompt must be a str, a dict with 'prompt_token_ids', or a list of ints, got {prompt!r}")

    def checked(self, text: str | None, ids: list[int], truncate: int | None) -> ProcessedPrompt:
        if truncate is not None and isinstance(ids, (list, tuple)) and len(ids) > truncate:
            text, ids = None, ids[-truncate:]  # the text no longer matches the tokens
        return ProcessedPrompt(text, self.check_ids(ids))

    def check_ids(self, ids: list[int]) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError(f"prompt token ids must be a list of ints, got {str(ids)[:80]}")
        if not ids:
            raise ValueError("a prompt is empty; every prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) > self.max_model_len:
            raise ValueError(
                f"a prompt of {len(ids)} tokens is longer than max_model_len={self.max_model_len}; shorten it or "
                "raise max_model_len (within the model's positions and the KV cache's capacity)"
            )
        return list(ids)
