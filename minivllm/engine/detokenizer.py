"""A sequence's output text, grown one token at a time, and the stop strings looked for in it.

Only sequences that need text before they finish have one: those with stop strings, and those whose request
streams its outputs. The others are decoded once, when they finish.
"""

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from minivllm.sampling_params import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, params: SamplingParams):
        self.tokenizer, self.params = tokenizer, params
        # the tokenizers library's own streaming decoder: about a microsecond a token, and it holds back the
        # bytes of a character that is not complete yet
        self.stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self.text = ""
        # held back from what is streamed, so that text reported before a stop string is found never has to be
        # taken back: a stop string may begin in text already seen
        self.hold = max(map(len, params.stop_strings), default=1) - 1

    def add(self, token_id: int, num_output_tokens: int) -> str | None:
        """Decode one more output token (the num_output_tokens-th); the stop string that now ends the text, if
        any, with the text cut before it."""
        piece = self.stream.step(self.tokenizer.backend_tokenizer, token_id)
        if not piece:
            return None  # an incomplete character: wait for the next token
        checked = len(self.text)
        self.text += piece
        if not self.params.stop_strings or num_output_tokens <= self.params.min_tokens:
            return None  # as vLLM: only text after the first min_tokens tokens can end in a stop string
        # a stop string must end in the new text: text before it was checked (or is within min_tokens)
        hits = [(self.text.find(s, max(0, checked - len(s) + 1)), s) for s in self.params.stop_strings]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return None
        pos, stop = min(hits)
        self.text = self.text[:pos]
        return stop

    def streamed_text(self) -> str:
        """The text so far less what a stop string might still claim."""
        return self.text[: len(self.text) - self.hold] if self.hold else self.text
