"""LLM: vLLM's offline API, a loop over the online engine (llm.llm_engine). Every input is checked before any
work starts, so a bad call leaves the engine as it was."""

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from dataclasses import replace
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from minivllm.chat import chat_options, render_chat
from minivllm.config import EngineArgs, refuse_vllm_only
from minivllm.engine.llm_engine import EngineStats, LLMEngine
from minivllm.inputs import ProcessedPrompt, Prompt
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

# generation_config.json's sampling fields, as vLLM reads them, by SamplingParams' names
GENERATION_DEFAULTS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
# vLLM's LLM methods minivllm lacks: each raises a ValueError saying so
VLLM_ONLY_METHODS = {
    "beam_search": "beam search; sample candidates with SamplingParams(n=..., seed=...) or decode greedily",
    "encode": "pooling or embedding models",
    "embed": "pooling or embedding models",
    "classify": "pooling or embedding models",
    "score": "pooling or embedding models",
    "reward": "pooling or embedding models",
    "sleep": "sleep mode",
    "wake_up": "sleep mode",
    "start_profile": "vLLM's profiler; use torch.profiler around generate()",
    "stop_profile": "vLLM's profiler; use torch.profiler around generate()",
}
UseTqdm = bool | Callable[..., tqdm]


class LLM:
    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        seed: int | None = 0,
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
        **vllm_kwargs: Any,
    ):
        """`vllm_kwargs`: vLLM's other arguments, accepted where their value asks for nothing minivllm lacks
        (trust_remote_code=False, quantization=None, ...), else refused with a ValueError saying so."""
        refuse_vllm_only("LLM", vllm_kwargs, known="see help(minivllm.LLM) for the arguments minivllm takes")
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
        self._default_sampling_params: SamplingParams | None = None

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.max_model_len

    def get_tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json sampling fields (temperature, top_p,
        top_k, min_p, repetition_penalty, max_new_tokens as max_tokens), as vLLM's: what generate() and chat()
        use when given no sampling_params. A copy each call."""
        if self._default_sampling_params is None:
            fields = {f.name for f in dataclasses.fields(SamplingParams) if f.init}
            found = self.config.source.generation_config
            defaults = {ours: found[theirs] for theirs, ours in GENERATION_DEFAULTS.items()
                        if found.get(theirs) is not None and ours in fields}
            try:
                self._default_sampling_params = SamplingParams(**defaults)
            except (TypeError, ValueError) as e:
                path = os.path.join(self.config.source.weights_dir or "", "generation_config.json")
                raise ValueError(f"{path} holds sampling defaults SamplingParams refuses: {e}") from e
            if defaults:
                logger.info("default sampling parameters from the checkpoint's generation_config.json: %s", defaults)
        return replace(self._default_sampling_params)

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes now (no-op at tensor_parallel_size 1)."""
        self.llm_engine.shutdown()

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: UseTqdm = True,
        lora_request: None = None,
        priority: list[int] | None = None,
        **vllm_kwargs: Any,
    ) -> list[RequestOutput]:
        """Completions for every prompt, in input order. `use_tqdm`: a progress bar (on stderr), False for none,
        or a callable that makes one, as vLLM's (e.g. functools.partial(tqdm, leave=False))."""
        refuse_vllm_only("generate", {"lora_request": lora_request, "priority": priority, **vllm_kwargs})
        check_use_tqdm(use_tqdm)
        inputs = self.llm_engine.inputs
        prompts = inputs.as_list(prompts)
        params = self._params_for(prompts, sampling_params)
        items = [inputs.process(prompt, p.truncate_prompt_tokens) for prompt, p in zip(prompts, params)]
        return self._run(items, params, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: UseTqdm = True,
        lora_request: None = None,
        chat_template: str | None = None,
        chat_template_content_format: str = "auto",
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: None = None,
        **vllm_kwargs: Any,
    ) -> list[RequestOutput]:
        """One or many conversations (OpenAI-style messages) rendered by the chat template, then generated.

        `chat_template`: a Jinja template (or a file holding one) instead of the tokenizer's;
        `add_generation_prompt`: end with the assistant's turn opening; `continue_final_message`: leave the last
        message open for the model to continue (with add_generation_prompt=False); `tools`: OpenAI tool schemas
        for the template; `chat_template_kwargs`: more variables for it (Qwen3: enable_thinking=False).
        Content may be a str, a list of text parts ({"type": "text", "text": ...}, joined with newlines), or
        None for an assistant message (one with tool_calls)."""
        refuse_vllm_only("chat", {"lora_request": lora_request, "mm_processor_kwargs": mm_processor_kwargs,
                                  "chat_template_content_format": chat_template_content_format, **vllm_kwargs})
        check_use_tqdm(use_tqdm)
        template_kwargs = chat_options(chat_template, add_generation_prompt, continue_final_message, tools,
                                       chat_template_kwargs)
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat() needs a tokenizer (with a chat template); this model has no tokenizer files")
        if template_kwargs.get("chat_template") is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat() needs a chat template: this model's tokenizer has none; pass chat_template=")
        if not isinstance(messages, list) or not messages:
            raise TypeError("messages must be a list of {'role', 'content'} dicts, or a list of such lists")
        conversations = messages if isinstance(messages[0], list) else [messages]
        items = []
        for conversation in conversations:
            text = render_chat(tokenizer, conversation, template_kwargs)
            ids = self.llm_engine.inputs.check_ids(tokenizer.encode(text, add_special_tokens=False))
            items.append(ProcessedPrompt(text, ids))
        return self._run(items, self._params_for(items, sampling_params), use_tqdm)

    def _params_for(self, items: list, params: SamplingParams | list[SamplingParams] | None) -> list[SamplingParams]:
        if params is None:
            return [self.get_default_sampling_params()] * len(items)
        if isinstance(params, SamplingParams):
            return [params] * len(items)
        if not isinstance(params, SequenceABC) or not all(isinstance(p, SamplingParams) for p in params):
            raise TypeError("sampling_params must be a SamplingParams or a list of them")
        if len(params) != len(items):
            raise ValueError(f"{len(items)} prompts but {len(params)} SamplingParams; give one, or one per prompt")
        return list(params)

    def _run(self, items: list[ProcessedPrompt], params: list[SamplingParams], use_tqdm: UseTqdm
             ) -> list[RequestOutput]:
        """Add every request, then step the engine until each has finished."""
        engine = self.llm_engine
        # as vLLM, only the final output of each; made anew, so a SamplingParams changed since it was made is
        # checked again here, before any request is added
        finals = [replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params]
        ids = [str(next(self._request_counter)) for _ in items]
        outputs: dict[str, RequestOutput] = {}
        progress = Progress(len(items), use_tqdm, engine.stats)
        try:
            for request_id, item, p in zip(ids, items, finals):
                engine.add_request(request_id, item, p)
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


def refuse_method(name: str, feature: str) -> Callable:
    def method(self, *args, **kwargs):
        raise ValueError(f"LLM.{name}(): minivllm does not support {feature}")

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"vLLM's LLM.{name}: minivllm does not support {feature}, and raises a ValueError saying so."
    return method


for _name, _feature in VLLM_ONLY_METHODS.items():
    setattr(LLM, _name, refuse_method(_name, _feature))


def check_use_tqdm(use_tqdm: UseTqdm) -> None:
    if not isinstance(use_tqdm, bool) and not callable(use_tqdm):
        raise TypeError(f"use_tqdm must be a bool or a callable that makes a tqdm bar, got {use_tqdm!r}")


class Progress:
    """A tqdm bar over requests with live prompt and output tokens/s, and a summary logged at the end."""

    def __init__(self, total: int, use_tqdm: UseTqdm, stats: EngineStats):
        self.stats = stats
        make_bar = use_tqdm if callable(use_tqdm) else tqdm
        self.bar = make_bar(total=total, desc="Processed prompts", dynamic_ncols=True) if use_tqdm else None
        self.start = time.perf_counter()
        self.first = replace(stats)  # the engine's totals before this call
        self.done = 0

    def counts(self) -> tuple[int, int]:
        return (self.stats.prompt_tokens - self.first.prompt_tokens,
                self.stats.generation_tokens - self.first.generation_tokens)

    def update(self, num_finished: int) -> None:
        self.done += num_finished
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
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        prompt, output = self.counts()
        logger.info("%d requests: %d prompt tokens, %d output tokens in %.2f s (%.0f prompt tok/s, %.0f output tok/s)",
                    self.done, prompt, output, elapsed, prompt / elapsed, output / elapsed)
