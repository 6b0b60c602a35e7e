"""Translation between the OpenAI protocol and the engine: a request body to prompts and SamplingParams, the
engine's RequestOutputs to response bodies and stream chunks. No I/O here: api_server.py does that."""

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import pydantic
from transformers import PreTrainedTokenizerBase

from minivllm.chat import chat_options, render_chat
from minivllm.entrypoints import protocol as p
from minivllm.inputs import TokensPrompt
from minivllm.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from minivllm.sampling_params import RequestOutputKind, SamplingParams
from minivllm.structured_outputs import StructuredOutputsParams


class RequestError(Exception):
    """An error the client gets as OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return p.ErrorResponse(error=p.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code)).model_dump()


def bad_request(error: Exception, param: str | None = None) -> RequestError:
    """A 400 from an engine ValueError/TypeError, naming the field when the message does (SamplingParams.top_p)."""
    message = " ".join(str(error).split())
    named = re.match(r"SamplingParams\.(\w+)", message)
    return RequestError(400, message, param or (named.group(1) if named else None))


def refused(error: Exception) -> RequestError:
    """A 400 for a request the engine refused when it was added: the prompt, or a grammar that does not compile."""
    return bad_request(error, "structured_outputs" if str(error).startswith("structured outputs") else "prompt")


# ----- requests ---------------------------------------------------------------------------------------------------
def parse_json(body: bytes | str) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None


def validate_request(data: Any, model: type[pydantic.BaseModel], served_model_name: str):
    """The parsed body validated as `model`, naming the field at fault when it is not; a 404 for another model."""
    try:
        parsed = model.model_validate(data)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise RequestError(400, f"{param}: {first['msg']}" if param else first["msg"], param) from None
    if getattr(parsed, "model", None) not in (None, served_model_name):
        raise RequestError(404, f"The model {parsed.model!r} does not exist; this server serves "
                           f"{served_model_name!r}", "model", code="model_not_found")
    return parsed


def prepare_completion(body: p.CompletionRequest, tokenizer: PreTrainedTokenizerBase | None, max_model_len: int,
                       model_name: str) -> tuple[list[TokensPrompt], SamplingParams, "Collector"]:
    """A /v1/completions body's prompts, SamplingParams and the Collector of its response."""
    prompts = completion_prompts(body, tokenizer)
    for prompt in prompts:
        check_length(prompt, body.max_tokens, max_model_len, "max_tokens")
    wants_prompt_logprobs = body.echo and body.logprobs is not None
    params = sampling_params(body, body.max_tokens, body.logprobs, body.logprobs if wants_prompt_logprobs else None)
    # an echoed prompt's first token has no logprob (nothing comes before it), so no text from the engine: as vLLM
    first_tokens = ([tokenizer.decode(prompt["prompt_token_ids"][:1]) for prompt in prompts]
                    if wants_prompt_logprobs and tokenizer is not None else [])
    collector = Collector("completion", model_name, params.n, echo=body.echo, stream_options=body.stream_options,
                          first_prompt_tokens=first_tokens)
    return prompts, params, collector


def prepare_chat(body: p.ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase | None, max_model_len: int,
                 model_name: str, chat_template: str | None) -> tuple[list[TokensPrompt], SamplingParams, "Collector"]:
    """A /v1/chat/completions body's prompt (one), SamplingParams and the Collector of its response."""
    prompt = chat_prompt(body, tokenizer, chat_template)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    check_length(prompt, max_tokens, max_model_len, param, "messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, top)
    collector = Collector("chat", model_name, params.n, top_logprobs=top, stream_options=body.stream_options)
    return [prompt], params, collector


# request fields that are SamplingParams fields of the same name, passed on when given
SAME_NAME = ("temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
             "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output",
             "skip_special_tokens", "allowed_token_ids", "bad_words")


def sampling_params(request: p.SamplingRequest, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The request's SamplingParams (DELTA outputs: the server streams, and sums what it collects)."""
    given = {name: getattr(request, name) for name in SAME_NAME if getattr(request, name) is not None}
    try:
        bias = {int(token): value for token, value in request.logit_bias.items()} if request.logit_bias else None
    except ValueError:
        raise RequestError(400, "logit_bias keys must be token ids", "logit_bias") from None
    try:
        return SamplingParams(**given, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                              logit_bias=bias, structured_outputs=structured_outputs(request),
                              output_kind=RequestOutputKind.DELTA)
    except (ValueError, TypeError) as e:
        raise bad_request(e) from e


def structured_outputs(request: p.SamplingRequest) -> StructuredOutputsParams | None:
    """vLLM's structured_outputs field, else OpenAI's response_format (json_object, json_schema): JSON with
    whitespace only where the default separators put it, so that a model fond of whitespace still ends it."""
    try:
        if request.structured_outputs is not None:
            return StructuredOutputsParams(**request.structured_outputs)
    except (ValueError, TypeError) as e:
        raise bad_request(e, "structured_outputs") from e
    form = request.response_format
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    if form.json_schema is None or form.json_schema.schema_ is None:
        raise RequestError(400, "response_format json_schema needs json_schema.schema", "response_format")
    return StructuredOutputsParams(json=form.json_schema.schema_, disable_any_whitespace=True)


def completion_prompts(request: p.CompletionRequest, tokenizer: PreTrainedTokenizerBase | None
                       ) -> list[TokensPrompt]:
    """Each prompt (a str, a list of str, token ids, a list of those) as token ids with its text."""
    prompt = request.prompt
    items = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
    if not items:
        raise RequestError(400, "prompt must not be empty", "prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            if tokenizer is None:
                raise RequestError(400, "this model has no tokenizer; send the prompt as token ids", "prompt")
            prompts.append(TokensPrompt(prompt_token_ids=tokenizer.encode(item), prompt=item))
        else:
            text = tokenizer.decode(item) if tokenizer is not None and request.echo else None
            prompts.append(TokensPrompt(prompt_token_ids=item, **({"prompt": text} if text is not None else {})))
    return prompts


def chat_prompt(request: p.ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase | None,
                chat_template: str | None) -> TokensPrompt:
    """The conversation rendered by the chat template (as LLM.chat renders it), as token ids with its text."""
    if tokenizer is None:
        raise RequestError(400, "chat needs a tokenizer with a chat template; this model has none", "messages")
    try:
        options = chat_options(chat_template, request.add_generation_prompt, request.continue_final_message,
                               request.tools, request.chat_template_kwargs)
        text = render_chat(tokenizer, request.messages, options)
    except (ValueError, TypeError) as e:
        raise bad_request(e, "messages") from e
    return TokensPrompt(prompt_token_ids=tokenizer.encode(text, add_special_tokens=False), prompt=text)


def check_length(prompt: TokensPrompt, max_tokens: int | None, max_model_len: int, param: str,
                 prompt_param: str = "prompt") -> None:
    """A 400 naming the limit when the prompt, or the prompt and max_tokens, do not fit in the context."""
    num_prompt = len(prompt["prompt_token_ids"])
    if num_prompt > max_model_len:
        raise RequestError(400, f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                           f"{num_prompt} tokens. Shorten the prompt.", prompt_param)
    if max_tokens is not None and num_prompt + max_tokens > max_model_len:
        raise RequestError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                           f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} "
                           f"in the completion). Reduce the prompt or {param}.", param)


# ----- logprobs ---------------------------------------------------------------------------------------------------
# Plain dicts in the protocol's shapes (protocol.py's models, fields in their order): a stream chunk is built for
# every output of every request, and a pydantic model a chunk cost more than the rest of its path together.
def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs | None], offset: int,
                        first_text: str = "") -> dict:
    """The legacy shape (p.CompletionLogprobs); offset: the characters before the first token (an echoed prompt,
    earlier chunks); first_text: the text of a position without logprobs (an echoed prompt's first token)."""
    result = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for token, entry in zip(token_ids, positions):
        text = entry[token].decoded_token or "" if entry is not None else first_text
        result["tokens"].append(text)
        result["token_logprobs"].append(entry[token].logprob if entry is not None else None)
        result["top_logprobs"].append({lp.decoded_token or "": lp.logprob for lp in entry.values()}
                                      if entry is not None else None)
        result["text_offset"].append(offset)
        offset += len(text)
    return result


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top: int) -> dict:
    """p.ChatLogprobs' shape."""
    content = []
    for token, entry in zip(token_ids, positions):
        ranked = sorted((lp for lp in entry.values() if lp.rank <= top), key=lambda lp: lp.rank)
        content.append({**top_logprob(entry[token]), "top_logprobs": [top_logprob(lp) for lp in ranked]})
    return {"content": content}


def top_logprob(lp) -> dict:
    """p.TopLogprob's shape."""
    text = lp.decoded_token or ""
    return {"token": text, "logprob": max(lp.logprob, -9999.0), "bytes": list(text.encode())}


def prompt_index(request_id: str) -> int:
    """The prompt index i of the engine request id f"{base_id}-{i}" the server gives prompt i of a request."""
    return int(request_id.rpartition("-")[2])


# ----- outputs ----------------------------------------------------------------------------------------------------
COMPACT_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # as pydantic writes JSON, made once


@dataclass
class Choice:
    """One choice as its deltas arrive: its text so far (for offsets), its token count, whether it ended."""

    text_len: int = 0
    num_tokens: int = 0
    finished: bool = False
    final: tuple[str | None, int | str | None] = (None, None)  # finish_reason, stop_reason


@dataclass
class Collector:
    """Turns one HTTP request's DELTA RequestOutputs (one engine request a prompt) into response bodies or
    stream chunks, and counts usage. Choice i of prompt j is index j * n + i, as vLLM numbers them."""

    kind: str  # "completion" or "chat"
    model: str
    n: int
    echo: bool = False
    top_logprobs: int | None = None  # chat: logprobs=True with this many alternatives
    stream_options: p.StreamOptions | None = None
    first_prompt_tokens: list[str] = field(default_factory=list)  # echo with logprobs: each prompt's first token
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    choices: dict[int, Choice] = field(default_factory=dict)
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    texts: dict[int, list[str]] = field(default_factory=dict)  # non-streaming: the pieces of each choice
    logprobs: dict[int, list] = field(default_factory=dict)
    chunk_head: str = field(init=False)  # every stream chunk's JSON up to its choices

    def __post_init__(self) -> None:
        self.id = self.id or p.random_id("cmpl" if self.kind == "completion" else "chatcmpl")
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        self.chunk_head = COMPACT_JSON.encode(head)[:-1] + ',"choices":'

    def usage(self) -> dict:
        """p.Usage's shape."""
        prompt, completion = sum(self.prompt_tokens.values()), sum(c.num_tokens for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def completion_tokens(self, prompt_index: int) -> int:
        """The most tokens any of a prompt's completions has so far (its TPOT's count)."""
        return max(self.choices[prompt_index * self.n + i].num_tokens for i in range(self.n)
                   if prompt_index * self.n + i in self.choices)

    def chunk_choices(self, prompt_index: int, output: RequestOutput) -> list[dict]:
        """The stream choices of one engine output: those with new text, logprobs or a finish reason."""
        first = prompt_index not in self.prompt_tokens
        self.prompt_tokens[prompt_index] = len(output.prompt_token_ids)
        choices = []
        for completion in output.outputs:
            index = prompt_index * self.n + completion.index
            choice = self.choices.setdefault(index, Choice())
            prefix = ""
            if first and self.echo:
                prefix = output.prompt or ""
            new_finish = completion.finish_reason is not None and not choice.finished
            if not (completion.text or completion.token_ids or prefix or new_finish or first):
                continue
            choices.append(self.stream_choice(index, choice, completion, output, prefix, first))
            choice.num_tokens += len(completion.token_ids)
            choice.text_len += len(prefix) + len(completion.text)
            choice.finished = completion.finish_reason is not None
        return choices

    def stream_choice(self, index: int, choice: Choice, completion: CompletionOutput, output: RequestOutput,
                      prefix: str, first: bool) -> dict:
        """A stream chunk's choice as a dict: a chat.completion.chunk's, or p.CompletionChoice's shape."""
        finish = completion.finish_reason if completion.finish_reason is not None and not choice.finished else None
        stop_reason = completion.stop_reason if finish else None
        if self.kind == "chat":
            logprobs = (chat_logprobs(completion.token_ids, completion.logprobs, self.top_logprobs)
                        if completion.logprobs is not None else None)
            return {"index": index, "delta": {"role": "assistant" if first else None, "content": completion.text},
                    "logprobs": logprobs, "finish_reason": finish, "stop_reason": stop_reason}
        logprobs = None
        if completion.logprobs is not None:
            ids, positions = completion.token_ids, completion.logprobs
            first_text = ""
            if prefix and output.prompt_logprobs is not None:
                ids, positions = output.prompt_token_ids + ids, [*output.prompt_logprobs, *positions]
                first_text = self.first_prompt_tokens[index // self.n]
            logprobs = completion_logprobs(ids, positions, choice.text_len, first_text)
        return {"index": index, "text": prefix + completion.text, "logprobs": logprobs, "finish_reason": finish,
                "stop_reason": stop_reason}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        """A stream chunk's JSON: OpenAI's chat.completion.chunk, or a text_completion with these choices."""
        return f"{self.chunk_head}{COMPACT_JSON.encode(choices)},\"usage\":{COMPACT_JSON.encode(usage)}}}"

    def add(self, prompt_index: int, output: RequestOutput) -> None:
        """Non-streaming: keep the output's pieces for response()."""
        for choice in self.chunk_choices(prompt_index, output):
            piece = choice["delta"]["content"] if self.kind == "chat" else choice["text"]
            self.texts.setdefault(choice["index"], []).append(piece or "")
            self.logprobs.setdefault(choice["index"], []).append(choice["logprobs"])
            self.choices[choice["index"]].final = (choice["finish_reason"], choice["stop_reason"])

    def response(self) -> Any:
        choices = []
        for index in sorted(self.choices):
            text, (finish, stop_reason) = "".join(self.texts[index]), self.choices[index].final
            pieces = [lp for lp in self.logprobs[index] if lp is not None]
            if self.kind == "chat":
                logprobs = p.ChatLogprobs(content=[t for lp in pieces for t in lp["content"]]) if pieces else None
                choices.append(p.ChatChoice(index=index, message=p.ChatMessage(content=text), logprobs=logprobs,
                                            finish_reason=finish, stop_reason=stop_reason))
            else:
                logprobs = p.CompletionLogprobs(**{key: [x for lp in pieces for x in lp[key]]
                                                   for key in p.CompletionLogprobs.model_fields}) if pieces else None
                choices.append(p.CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish,
                                                  stop_reason=stop_reason))
        cls = p.ChatCompletionResponse if self.kind == "chat" else p.CompletionResponse
        return cls(id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage())
