"""Structured outputs: a grammar (JSON schema, regex, choice, EBNF) becomes a mask over the next token.

xgrammar does the work, as in vLLM: a GrammarCompiler turns the request's StructuredOutputsParams into a
CompiledGrammar once per distinct grammar; each sequence keeps a GrammarMatcher that advances on every
accepted token and writes the allowed set of the next one into a row of a packed int32 bitmask (bit j of
word i allows token 32*i + j); apply_bitmask then sets the logits of every other token to -inf.

Stop tokens are part of the grammar: the matcher allows them exactly when the grammar can end, and only
them once it must end, so the model finishes by sampling one. Accepting it terminates the matcher.
"""

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

_FIELDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """What the output must match, in vLLM's names; exactly one field is set."""

    json: dict[str, Any] | str | None = None  # a JSON schema
    regex: str | None = None
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # EBNF (GBNF), root rule "root"
    json_object: bool | None = None  # any JSON object
    # JSON only: whitespace just where the default separators put it. Any whitespace (vLLM's default) lets a
    # model that favours it (Qwen, at times) emit it without end.
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Cheap checks only (types, exactly one field); whether the grammar compiles is the compiler's."""
        given = [name for name in _FIELDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"StructuredOutputsParams needs exactly one of {', '.join(_FIELDS)}; got "
                f"{', '.join(given) if given else 'none'}"
            )
        if not isinstance(self.json, dict | str | None):
            raise TypeError(f"json must be a JSON schema as a dict or str, not {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            if not isinstance(getattr(self, name), str | None):
                raise TypeError(f"{name} must be a str, not {type(getattr(self, name)).__name__}")
        for name in ("json_object", "disable_any_whitespace"):
            if not isinstance(getattr(self, name), bool | None):
                raise TypeError(f"{name} must be a bool, not {type(getattr(self, name)).__name__}")
        if self.choice is not None:
            if not isinstance(self.choice, list | tuple) or not all(isinstance(c, str) for c in self.choice):
                raise TypeError(f"choice must be a list of str, not {self.choice!r}")
            if not self.choice:
                raise ValueError("choice must hold at least one string")


# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the user needs only what follows.
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")
_KIND_NAMES = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer and model vocabulary; identical ones compile once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, *,
                 stop_token_ids: list[int] | None = None, cache_size: int = 256):
        """vocab_size is the model's (the logits' width), which may exceed the tokenizer's: the extra ids are
        never allowed. stop_token_ids default to the tokenizer's eos; pass the engine's eos ids."""
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        # One thread: compiling runs on the engine's thread, and a second cache under ours would only cost memory.
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self._compile_cached = functools.lru_cache(maxsize=cache_size)(self._compile_source)

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The compiled grammar of params; a ValueError naming the problem when it cannot be compiled."""
        params.validate()  # it may have been changed since it was built
        return self._compile_cached(*_grammar_source(params), not params.disable_any_whitespace)

    def cache_info(self) -> functools._CacheInfo:
        return self._compile_cached.cache_info()

    def _compile_source(self, kind: str, source: str, any_whitespace: bool) -> xgr.CompiledGrammar:
        try:
            if kind == "json":
                return self._compiler.compile_json_schema(source, any_whitespace=any_whitespace)
            if kind == "regex":
                return self._compiler.compile_regex(source)
            return self._compiler.compile_grammar(source)
        except RuntimeError as error:
            reason = _XGRAMMAR_PREFIX.sub("", str(error)).strip()
            raise ValueError(f"structured outputs: cannot compile the {_KIND_NAMES[kind]}: {reason}") from None


def _grammar_source(params: StructuredOutputsParams) -> tuple[str, str]:
    """(kind, text) for xgrammar: the content the cache is keyed on, so equal params share one grammar."""
    if params.json is not None:
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as error:
                raise ValueError(f"structured outputs: the JSON schema is not valid JSON: {error}") from None
        return "json", json.dumps(schema)  # key order kept: it is the order the properties are generated in
    if params.json_object:
        return "json", '{"type": "object"}'
    if params.regex is not None:
        return "regex", params.regex
    if params.choice is not None:
        # JSON string escapes are also EBNF literal escapes
        return "grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
    return "grammar", params.grammar


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, compiled: xgr.CompiledGrammar):
        self._matcher = xgr.GrammarMatcher(compiled)
        self._stop_token_ids = self._matcher.stop_token_ids

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (and no change) if the grammar does not allow it."""
        if self._matcher.is_terminated():
            return False  # xgrammar would log a warning for it
        return self._matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        """A stop token was accepted: the output is complete and nothing may follow."""
        return self._matcher.is_terminated()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into bitmask[row] (CPU, int32); call after the last token's accept."""
        if self._matcher.is_terminated():
            # xgrammar refuses; a step too many (async scheduling) may still ask: allow only a stop token
            bitmask[row].zero_()
            for token_id in self._stop_token_ids:
                bit = 1 << (token_id % 32)
                bitmask[row, token_id // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32 sign bit
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A CPU bitmask of rows x ceil(vocab_size / 32) int32 words, all tokens allowed; pinned when CUDA is
    available, so that apply_bitmask's copy to the GPU is asynchronous."""
    return torch.full(xgr.get_bitmask_shape(rows, vocab_size), -1, dtype=torch.int32,
                      pin_memory=torch.cuda.is_available())


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None) -> None:
    """Set logits[r, j] to -inf, in place, for every token j that bitmask[r] disallows, for r in rows (all rows
    when None). logits: [B, V], fp32, bf16 or fp16, CPU or CUDA; bitmask: as allocate_bitmask gives, row r
    for logits row r. The copy to the GPU is queued on the current stream: refill the bitmask only once this
    step's sampled tokens are back on the host (the next fill needs them anyway)."""
    if rows is not None and not rows:
        return
    vocab_size = logits.shape[-1]
    if bitmask.shape[-1] * 32 < vocab_size:
        raise ValueError(f"the bitmask covers {bitmask.shape[-1] * 32} tokens, the logits {vocab_size}")
    bitmask = bitmask[: logits.shape[0]].to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size, indices=rows)
