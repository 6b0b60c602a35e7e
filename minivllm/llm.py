"""LLM: vLLM's offline API. Every input is checked before any work starts, so a bad call leaves the
engine as it was."""

import itertools
import time
import warnings
from collections.abc import Sequence as SequenceABC

from jinja2 import TemplateError
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from minivllm.config import EngineConfig
from minivllm.distributed import check_invariant_splits
from minivllm.engine.llm_engine import LLMEngine
from minivllm.engine.model_runner import ModelRunner
from minivllm.engine.scheduler import ScheduledBatch
from minivllm.engine.tp_workers import start_tensor_parallel
from minivllm.model_loader import load_tokenizer, resolve_model
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams

Prompt = str | dict | list[int]


class LLM:
    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        tensor_parallel_size: int = 1,
        async_scheduling: bool = True,
        tp_invariant: int = 0,
    ):
        self.config = EngineConfig(
            model, tokenizer, dtype, device, seed, max_model_len, max_num_seqs, max_num_batched_tokens,
            block_size, num_kv_blocks, gpu_memory_utilization, enable_prefix_caching, enforce_eager,
            tensor_parallel_size, async_scheduling, tp_invariant,
        )
        source = resolve_model(model, tokenizer)
        if tp_invariant:
            check_invariant_splits(source.config, tp_invariant)
        self.hf_config = source.config
        self.tokenizer = load_tokenizer(source)
        dtype = self.config.resolve_dtype(getattr(source.config, "dtype", None))
        if self.config.tensor_parallel_size == 1:
            runner, self.workers = ModelRunner(self.config, source, dtype), None
        else:  # ranks 1..N-1 in processes of their own; stopped by shutdown(), garbage collection or exit
            runner, self.workers = start_tensor_parallel(self.config, source, dtype)
        if self.config.max_model_len and self.config.max_model_len > runner.max_model_len:
            warnings.warn(f"max_model_len capped at the model's {runner.max_model_len} positions", stacklevel=2)
        capacity = runner.num_kv_blocks * self.config.block_size
        if runner.max_model_len > capacity:
            warnings.warn(
                f"max_model_len {runner.max_model_len} capped to the KV cache's capacity of {capacity} tokens",
                stacklevel=2,
            )
            runner.max_model_len = capacity
        self.engine = LLMEngine(runner, self.tokenizer, eos_token_ids(source, self.tokenizer))
        self.vocab_size = source.config.vocab_size
        self._request_counter = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def get_tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.tokenizer

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes now (no-op at tensor_parallel_size 1)."""
        if self.workers is not None:
            self.workers.shutdown()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Completions for every prompt, in input order."""
        items = self._prompt_items(prompts)
        return self._run(items, self._params_for(items, sampling_params), use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template (with the generation prompt) to one or many conversations."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat() needs a tokenizer with a chat template; this model has none")
        if not isinstance(messages, list) or not messages:
            raise TypeError("messages must be a list of {'role', 'content'} dicts, or a list of such lists")
        conversations = messages if isinstance(messages[0], list) else [messages]
        items = []
        for conversation in conversations:
            if not all(isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content"))
                       for m in conversation):
                raise TypeError(f"each message must be a dict with str 'role' and 'content', got {conversation!r}")
            try:
                text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            except TemplateError as e:
                raise ValueError(f"the chat template cannot render this conversation: {e}") from e
            items.append((text, self._check_ids(self.tokenizer.encode(text, add_special_tokens=False))))
        return self._run(items, self._params_for(items, sampling_params), use_tqdm)

    # ----- validation -----------------------------------------------------------------------------------
    def _prompt_items(self, prompts: Prompt | list[Prompt]) -> list[tuple[str | None, list[int]]]:
        """(text, token ids) for each prompt, every one checked."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
            raise TypeError("a list of ints is ambiguous; pass {'prompt_token_ids': ids} or a list of such lists")
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError(f"prompts must be a str, a dict or a non-empty list of those, got {type(prompts).__name__}")
        return [self._prompt_item(p) for p in prompts]

    def _prompt_item(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):  # vLLM's TokensPrompt {"prompt_token_ids": ...} or TextPrompt {"prompt": ...}
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if not isinstance(prompt.get("prompt"), str):
                raise TypeError(f"a dict prompt needs 'prompt_token_ids' or a str 'prompt', got keys {sorted(prompt)}")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer files; pass prompts as {'prompt_token_ids': [...]}")
            if not prompt:
                raise ValueError("a prompt is empty; every prompt needs at least one token")
            return prompt, self._check_ids(self.tokenizer.encode(prompt))
        if isinstance(prompt, list):
            return None, self._check_ids(prompt)
        raise TypeError(f"a prompt must be a str, a dict with 'prompt_token_ids', or a list of ints, got {prompt!r}")

    def _check_ids(self, ids: list[int]) -> list[int]:
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

    @staticmethod
    def _params_for(items: list, params: SamplingParams | list[SamplingParams] | None) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * len(items)
        if isinstance(params, SamplingParams):
            return [params] * len(items)
        if not isinstance(params, SequenceABC) or not all(isinstance(p, SamplingParams) for p in params):
            raise TypeError("sampling_params must be a SamplingParams or a list of them")
        if len(params) != len(items):
            raise ValueError(f"{len(items)} prompts but {len(params)} SamplingParams; give one, or one per prompt")
        return list(params)

    # ----- running --------------------------------------------------------------------------------------
    def _run(self, items: list, params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        requests = [
            self.engine.add_request(str(next(self._request_counter)), text, ids, p)
            for (text, ids), p in zip(items, params)
        ]
        progress = Progress(len(requests), use_tqdm)
        outputs: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished:
                batch, num_sampled, finished = self.engine.step()
                progress.update(batch, num_sampled, len(finished))
                for request in finished:
                    outputs[request.request_id] = self.engine.output(request)
        except BaseException:
            self.engine.abort_all()
            raise
        finally:
            progress.close()
        return [outputs[r.request_id] for r in requests]


class Progress:
    """A tqdm bar over requests with live prompt and output tokens/s, and a one-line summary."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True) if enabled else None
        self.start = time.perf_counter()
        self.prompt_tokens = self.output_tokens = 0

    def update(self, batch: ScheduledBatch | None, num_sampled: int, num_finished: int) -> None:
        if batch is not None and batch.is_prefill:
            self.prompt_tokens += batch.num_tokens
        self.output_tokens += num_sampled
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(
                f"prompt {self.prompt_tokens / elapsed:.0f} tok/s, output {self.output_tokens / elapsed:.0f} tok/s",
                refresh=False,
            )
            self.bar.update(num_finished)

    def close(self) -> None:
        if self.bar is None:
            return
        self.bar.close()
        elapsed = time.perf_counter() - self.start
        print(
            f"{self.bar.n} requests: {self.prompt_tokens} prompt tokens, {self.output_tokens} output tokens in "
            f"{elapsed:.2f} s ({self.prompt_tokens / elapsed:.0f} prompt tok/s, "
            f"{self.output_tokens / elapsed:.0f} output tok/s)"
        )


def eos_token_ids(source, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """End-of-sequence ids from the config, the generation config and the tokenizer, as vLLM gathers them."""
    ids: set[int] = set()
    candidates = [getattr(source.config, "eos_token_id", None)]
    if source.weights_dir is not None:
        try:
            candidates.append(GenerationConfig.from_pretrained(source.weights_dir).eos_token_id)
        except OSError:
            pass  # no generation_config.json
    if tokenizer is not None:
        candidates.append(tokenizer.eos_token_id)
    for candidate in candidates:
        ids.update([candidate] if isinstance(candidate, int) else candidate or [])
    return sorted(ids)
