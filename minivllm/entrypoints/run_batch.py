"""`minivllm run-batch`: an OpenAI batch file answered offline, as the server would answer each line.

Input: one JSON object a line, `{"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
"body"}` (OpenAI's batch format, as vLLM's run_batch reads it). Output: one line per input line, in input order:
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`. A line the server would refuse
(not JSON, an unknown url, a bad body) has the server's status code and OpenAI error body in `response`; `error`
is for failures that are not the request's (a replica lost for good), with `response` null.

One replica: every line's requests go to one in-process engine at once, and it runs them batched. More: the lines
are spread over Ray actors (minivllm.ray.batch), each such an engine.
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

from minivllm.entrypoints import protocol as p
from minivllm.entrypoints.serving import (
    Collector,
    RequestError,
    parse_json,
    prepare_chat,
    prepare_completion,
    refused,
    validate_request,
)
from minivllm.sampling_params import RequestOutputKind

logger = logging.getLogger("minivllm")

ENDPOINTS = {"/v1/completions": p.CompletionRequest, "/v1/chat/completions": p.ChatCompletionRequest}


class BatchLine(p.Request):
    custom_id: str
    method: str
    url: str
    body: dict[str, Any]


def custom_id_of(line: str) -> str | None:
    """The line's custom_id where it has one (for the answer to a line that is not a valid request)."""
    try:
        data = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    custom_id = data.get("custom_id") if isinstance(data, dict) else None
    return custom_id if isinstance(custom_id, str) else None


def answer(custom_id: str | None, status: int, body: dict) -> dict:
    return {"id": p.random_id("batch_req"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": p.random_id("batch"), "body": body}, "error": None}


def failed(custom_id: str | None, code: str, message: str) -> dict:
    """A line that got no response: not the request's fault (its replica was lost)."""
    return {"id": p.random_id("batch_req"), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


@dataclass
class Pending:
    """One line in the engine: its answer's collector and the number of its prompts still running."""

    index: int
    custom_id: str
    collector: Collector
    remaining: int


class BatchRunner:
    """Answers batch lines on one engine: every line's requests are added at once, then the engine steps until all
    have finished, so the lines run batched as the engine schedules them."""

    def __init__(self, llm, model_name: str, chat_template: str | None = None):
        self.llm, self.engine = llm, llm.llm_engine
        self.model_name, self.chat_template = model_name, chat_template

    def prepare(self, line: str) -> tuple[str, list, Any, Collector]:
        """The line's custom_id, prompts, SamplingParams and collector; a RequestError as the server gives."""
        request = validate_request(parse_json(line), BatchLine, self.model_name)
        if request.method.upper() != "POST":
            raise RequestError(405, f"method {request.method!r} is not supported; batch lines are POST", "method")
        if request.url not in ENDPOINTS:
            raise RequestError(404, f"url {request.url!r} is not supported; use one of {', '.join(ENDPOINTS)}", "url")
        body = validate_request(request.body, ENDPOINTS[request.url], self.model_name)
        if body.stream:
            raise RequestError(400, "stream is not supported in a batch", "stream")
        tokenizer, max_model_len = self.engine.tokenizer, self.engine.max_model_len
        if request.url == "/v1/completions":
            prompts, params, collector = prepare_completion(body, tokenizer, max_model_len, self.model_name)
        else:
            prompts, params, collector = prepare_chat(body, tokenizer, max_model_len, self.model_name,
                                                      self.chat_template)
        return request.custom_id, prompts, params, collector

    def answer(self, lines: list[str]) -> list[dict]:
        """One answer per line, in order."""
        answers: list[dict | None] = [None] * len(lines)
        running: dict[str, tuple[Pending, int]] = {}  # engine request id -> its line, its prompt's index
        try:
            for index, line in enumerate(lines):
                try:
                    custom_id, prompts, params, collector = self.prepare(line)
                    # nothing streams here: the final output alone, rather than a delta a step for every request
                    params = replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
                    pending = Pending(index, custom_id, collector, len(prompts))
                    added = []
                    try:
                        for j, prompt in enumerate(prompts):
                            self.engine.add_request(f"{collector.id}-{j}", prompt, params)
                            added.append(f"{collector.id}-{j}")
                    except (ValueError, TypeError) as e:
                        self.engine.abort_request(added)
                        raise refused(e) from e
                    running.update((request_id, (pending, j)) for j, request_id in enumerate(added))
                except RequestError as e:
                    answers[index] = answer(custom_id_of(line), e.status, e.body())
            while running:
                for output in self.engine.step():
                    pending, prompt_index = running.get(output.request_id, (None, 0))
                    if pending is None:
                        continue
                    pending.collector.add(prompt_index, output)
                    if output.finished:
                        del running[output.request_id]
                        pending.remaining -= 1
                        if pending.remaining == 0:
                            body = pending.collector.response().model_dump()
                            answers[pending.index] = answer(pending.custom_id, 200, body)
        except BaseException:
            self.engine.abort_request(list(running))
            raise
        return answers


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line for line in (raw.strip() for raw in f) if line]


def run_batch(args: argparse.Namespace) -> int:
    """`minivllm run-batch`: exit 0 once every line is answered (errors included), 2 for a bad command."""
    from minivllm.entrypoints.cli import engine_kwargs

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    model_name = args.served_model_name or args.model
    try:
        lines = read_lines(args.input_file)
        start = time.perf_counter()
        if args.replicas == 1:
            from minivllm.llm import LLM

            runner = BatchRunner(LLM(args.model, **engine_kwargs(args)), model_name, args.chat_template)
            logger.info("run-batch: engine ready in %.2f s", time.perf_counter() - start)
            start = time.perf_counter()
            answers = runner.answer(lines)
        else:
            from minivllm.ray.batch import run_on_replicas  # raises ImportError naming the package without Ray

            if args.ray_address is None:  # a local cluster sees this machine's files: check the model here, at once,
                from minivllm.config import EngineArgs, EngineConfig  # rather than as replicas that fail to start

                EngineConfig.resolve(EngineArgs(model=args.model, **engine_kwargs(args)))
            answers = run_on_replicas(lines, args.replicas, args.model, model_name, args.chat_template,
                                      engine_kwargs(args), ray_address=args.ray_address)
    except (ValueError, TypeError, ImportError, OSError) as e:
        print(f"minivllm run-batch: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    with open(args.output_file, "w", encoding="utf-8") as f:
        for line in answers:
            f.write(json.dumps(line) + "\n")
    ok = [a["response"]["body"] for a in answers if a["response"] is not None and a["response"]["status_code"] == 200]
    elapsed = time.perf_counter() - start
    generated = sum(body["usage"]["completion_tokens"] for body in ok)
    logger.info("run-batch: %d lines (%d answered 200) in %.2f s on %d replica(s): %d output tokens, %.0f tokens/s",
                len(answers), len(ok), elapsed, args.replicas, generated, generated / elapsed)
    return 0
