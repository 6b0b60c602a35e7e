"""LLMPredictor: one minivllm engine per Ray Data actor.

    ds.map_batches(LLMPredictor, fn_constructor_kwargs={"model": MODEL, "sampling_params": {"max_tokens": 64},
                   **engine_kwargs}, concurrency=N, batch_size=B, **replica_resources(tensor_parallel_size))
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from minivllm.llm import LLM
from minivllm.sampling_params import SamplingParams


class LLMPredictor:
    """Rows with `prompt` (a str) or `messages` (an OpenAI-style chat) in; the same rows out with
    `generated_text`, `generated_token_ids` and `num_generated_tokens` added (the first completion's)."""

    def __init__(self, model: str, sampling_params: Mapping[str, Any] | SamplingParams | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None, **engine_kwargs: Any):
        self.llm = LLM(model, **engine_kwargs)
        if sampling_params is None:
            self.params = self.llm.get_default_sampling_params()
        elif isinstance(sampling_params, SamplingParams):
            self.params = sampling_params
        else:
            self.params = SamplingParams(**sampling_params)
        self.chat_template_kwargs = chat_template_kwargs

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        columns = {name: list(values) for name, values in batch.items()}
        num_rows = len(next(iter(columns.values()), []))
        prompts, messages = columns.get("prompt", [None] * num_rows), columns.get("messages", [None] * num_rows)
        chats = [i for i in range(num_rows) if is_chat(messages[i])]
        texts = [i for i in range(num_rows) if not is_chat(messages[i])]
        for i in texts:
            if not isinstance(prompts[i], str):
                raise ValueError(f"row {i} has neither a prompt (str) nor messages; got prompt={prompts[i]!r}")
        outputs: list = [None] * num_rows
        if texts:
            for i, out in zip(texts, self.llm.generate([prompts[i] for i in texts], self.params, use_tqdm=False)):
                outputs[i] = out
        if chats:
            conversations = [as_messages(messages[i]) for i in chats]
            results = self.llm.chat(conversations, self.params, use_tqdm=False,
                                    chat_template_kwargs=self.chat_template_kwargs)
            for i, out in zip(chats, results):
                outputs[i] = out
        completions = [out.outputs[0] for out in outputs]
        return {**batch,
                "generated_text": np.array([c.text for c in completions], dtype=object),
                "generated_token_ids": as_object_array([list(c.token_ids) for c in completions]),
                "num_generated_tokens": np.array([len(c.token_ids) for c in completions], dtype=np.int64)}


def is_chat(value: Any) -> bool:
    """A cell of the messages column that holds a chat (a missing one is None, or NaN after Arrow)."""
    return isinstance(value, (list, tuple, np.ndarray))


def as_messages(value: Any) -> list[dict]:
    """A chat from a Ray Data cell (a list, or numpy's array of dicts) as plain dicts."""
    return [dict(message) for message in value]


def as_object_array(rows: list[list[int]]) -> np.ndarray:
    """A column of lists of differing lengths (numpy would try to make a 2-D array of equal ones)."""
    column = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):
        column[i] = row
    return column
