"""LLM: vLLM's offline API, a loop over the online engine (llm.llm_engine). Every input is checked before any
work starts, so a bad call leaves the engine as it was."""

import itertools
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import replace

from jinja2 import TemplateError
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from minivllm.config import EngineArgs
from minivllm.engine.llm_engine import EngineStats, LLMEngine
from minivllm.inputs import ProcessedPrompt, Prompt
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import RequestOutputKind, SamplingParams


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
        args = EngineArgs(
            model=model, tokenizer=tokenizer, dtype=dtype, device=device, seed=seed, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
            num_kv_blocks=num_kv_blocks, gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size, async_scheduling=async_scheduling, tp_invariant=tp_invariant,
        )
        self.llm_engine = LLMEngine.from_engine_args(args, stacklevel=2)
        self.config = self.llm_engine.config
        self._request_counter = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.max_model_len

    def get_tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.llm_engine.tokenizer

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes now (no-op at tensor_parallel_size 1)."""
        self.llm_engine.shutdown()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Completions for every prompt, in input order."""
        items = self.llm_engine.inputs.process_all(prompts)
        return self._run(items, self._params_for(items, sampling_params), use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template (with the generation prompt) to one or many conversations."""
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
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
                text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            except TemplateError as e:
                raise ValueError(f"the chat template cannot render this conversation: {e}") from e
            ids = self.llm_engine.inputs.check_ids(tokenizer.encode(text, add_special_tokens=False))
            items.append(ProcessedPrompt(text, ids))
        return self._run(items, self._params_for(items, sampling_params), use_tqdm)

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

    def _run(self, items: list[ProcessedPrompt], params: list[SamplingParams], use_tqdm: bool) -> list[RequestOutput]:
        """Add every request, then step the engine until each has finished."""
        engine = self.llm_engine
        ids = [str(next(self._request_counter)) for _ in items]
        outputs: dict[str, RequestOutput] = {}
        progress = Progress(len(items), use_tqdm, engine.stats)
        try:
            for request_id, item, p in zip(ids, items, params):  # as vLLM, only the final output of each
                engine.add_request(request_id, item, replace(p, output_kind=RequestOutputKind.FINAL_ONLY))
            mine = set(ids)
            while len(outputs) < len(ids):
                finished = [out for out in engine.step() if out.finished and out.request_id in mine]
                outputs.update((out.request_id, out) for out in finished)
                progress.update(len(finished))
        except BaseException:
            engine.abort_request(ids)
            raise
        finally:
            progress.close()
        return [outputs[request_id] for request_id in ids]


class Progress:
    """A tqdm bar over requests with live prompt and output tokens/s, and a one-line summary."""

    def __init__(self, total: int, enabled: bool, stats: EngineStats):
        self.enabled, self.stats = enabled, stats
        self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True) if enabled else None
        self.start = time.perf_counter()
        self.first = replace(stats)  # the engine's totals before this call

    def counts(self) -> tuple[int, int]:
        return (self.stats.prompt_tokens - self.first.prompt_tokens,
                self.stats.generation_tokens - self.first.generation_tokens)

    def update(self, num_finished: int) -> None:
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            prompt, output = self.counts()
            self.bar.set_postfix_str(
                f"prompt {prompt / elapsed:.0f} tok/s, output {output / elapsed:.0f} tok/s", refresh=False
            )
            self.bar.update(num_finished)

    def close(self) -> None:
        if self.bar is None:
            return
        self.bar.close()
        elapsed = time.perf_counter() - self.start
        prompt, output = self.counts()
        print(
            f"{self.bar.n} requests: {prompt} prompt tokens, {output} output tokens in {elapsed:.2f} s "
            f"({prompt / elapsed:.0f} prompt tok/s, {output / elapsed:.0f} output tok/s)"
        )
