"""minivllm serve: a real uvicorn process on a free loopback port, driven by the official openai client and httpx.
Every wait is bounded; every server is killed in its fixture's finalizer."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from minivllm import SamplingParams
from minivllm.entrypoints.launcher import ServerProcess
from tests.conftest import FAILING_STEP_PRELUDE, LLM

MAX_MODEL_LEN = 256
FLAGS = ("--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "128", "--max-num-seqs", "64")
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,", "def main():"]
# `minivllm serve` whose engine step fails on demand (conftest.FAILING_STEP_PRELUDE)
FAULTY = FAILING_STEP_PRELUDE + """
if __name__ == "__main__":
    from minivllm.entrypoints.cli import main
    sys.exit(main(sys.argv[1:]))
"""


class Server(ServerProcess):
    def __init__(self, model_dir: str, *flags: str, code: str | None = None, env: dict | None = None):
        super().__init__(model_dir, *FLAGS, *flags, code=code, env={"OMP_NUM_THREADS": "1", **(env or {})})

    def client(self, api_key: str = "none", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, timeout=60, max_retries=0, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(minivllm:\w+) (\S+)$", text, re.M) if m}


def metric(server: Server, name: str) -> float:
    return server.metrics()[name]


def wait_idle(server: Server, timeout: float = 10) -> dict[str, float]:
    """The metrics once nothing runs or waits (within timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = m["minivllm:num_requests_running"] == 0 and m["minivllm:num_requests_waiting"] == 0
        if idle and m["minivllm:kv_cache_usage_perc"] == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tokenizer_model_dir):
    s = Server(tokenizer_model_dir)
    yield s
    s.kill()


@pytest.fixture(scope="module")
def offline(tokenizer_model_dir):
    return LLM(tokenizer_model_dir, max_model_len=MAX_MODEL_LEN)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


# ----- what it answers ----------------------------------------------------------------------------------------------
def test_completions_equal_llm_generate_greedy_and_usage_matches_the_tokenizer(server, offline, tokenizer_model_dir):
    got = server.client().completions.create(model=tokenizer_model_dir, prompt=PROMPTS, max_tokens=12, temperature=0)
    want = offline.generate(PROMPTS, greedy(12), use_tqdm=False)
    assert [c.text for c in got.choices] == [o.outputs[0].text for o in want]
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    tokenizer = offline.get_tokenizer()
    assert got.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in PROMPTS)
    assert got.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in want)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.id.startswith("cmpl-") and got.created > 0 and got.object == "text_completion"


def test_chat_equals_llm_chat_greedy(server, offline, tokenizer_model_dir):
    messages = [{"role": "user", "content": "Say hello."}]
    got = server.client().chat.completions.create(model=tokenizer_model_dir, messages=messages, max_tokens=10,
                                                  temperature=0)
    want = offline.chat(messages, greedy(10), use_tqdm=False)[0]
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == 10


def test_streamed_chunks_concatenate_to_the_non_streamed_text(server, tokenizer_model_dir):
    client = server.client()
    args = dict(model=tokenizer_model_dir, max_tokens=16, temperature=0)
    whole = client.completions.create(prompt=PROMPTS[1], **args)
    chunks = list(client.completions.create(prompt=PROMPTS[1], stream=True,
                                            stream_options={"include_usage": True}, **args))
    assert len(chunks) > 3  # one a step, not one at the end
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    messages = [{"role": "user", "content": "Count to five."}]
    whole = client.chat.completions.create(messages=messages, **args)
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **args))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.usage is None for c in chunks)


def test_logprobs_and_top_logprobs(server, offline, tokenizer_model_dir):
    client = server.client()
    got = client.completions.create(model=tokenizer_model_dir, prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                    logprobs=3)
    want = offline.generate(PROMPTS[0], greedy(6, logprobs=3), use_tqdm=False)[0].outputs[0]
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    expected = [entry[token].logprob for token, entry in zip(want.token_ids, want.logprobs)]
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert all(len(top) >= 3 for top in lp.top_logprobs)
    assert "".join(lp.tokens) == got.choices[0].text

    chat = client.chat.completions.create(model=tokenizer_model_dir, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.logprob - 1e-6 or
               t.logprob == t.top_logprobs[0].logprob for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content


def test_n_2_and_echo(server, tokenizer_model_dir):
    client = server.client()
    got = client.completions.create(model=tokenizer_model_dir, prompt=PROMPTS[2], max_tokens=8, n=2, seed=7,
                                    temperature=1.0)
    assert [c.index for c in got.choices] == [0, 1]
    assert got.choices[0].text != got.choices[1].text
    assert got.usage.completion_tokens == 16
    echoed = client.completions.create(model=tokenizer_model_dir, prompt=PROMPTS[2], max_tokens=4, temperature=0,
                                       echo=True)
    plain = client.completions.create(model=tokenizer_model_dir, prompt=PROMPTS[2], max_tokens=4, temperature=0)
    assert echoed.choices[0].text == PROMPTS[2] + plain.choices[0].text


def test_echo_with_logprobs_gives_the_prompt_tokens_text(server, tokenizer_model_dir, offline):
    """The echoed prompt's tokens come first, its first one (which has no logprob) with its text too."""
    got = server.client().completions.create(model=tokenizer_model_dir, prompt=PROMPTS[2], max_tokens=3,
                                             temperature=0, echo=True, logprobs=1)
    lp = got.choices[0].logprobs
    ids = offline.get_tokenizer().encode(PROMPTS[2])
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[0] == offline.get_tokenizer().decode(ids[:1]) != ""
    assert lp.text_offset[1] == len(lp.tokens[0])


def test_json_schema_response_parses(server, tokenizer_model_dir):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "pick": {"enum": ["a", "b"]}},
              "required": ["ok", "pick"], "additionalProperties": False}
    got = server.client().chat.completions.create(
        model=tokenizer_model_dir, messages=[{"role": "user", "content": "JSON please"}], max_tokens=40, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    parsed = json.loads(got.choices[0].message.content)
    assert set(parsed) == {"ok", "pick"} and isinstance(parsed["ok"], bool) and parsed["pick"] in ("a", "b")


def test_metrics_are_vllms_names_without_created_series(server):
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert "minivllm:time_to_first_token_seconds_bucket" in text
    assert "minivllm:e2e_request_latency_seconds_count" in text
    assert "_created" not in text


def test_models_tokenize_detokenize(server, offline, tokenizer_model_dir):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [tokenizer_model_dir]
    got = httpx.post(f"{server.url}/tokenize", json={"prompt": "hello world"}, timeout=10).json()
    ids = offline.get_tokenizer().encode("hello world")
    assert got == {"tokens": ids, "count": len(ids), "max_model_len": MAX_MODEL_LEN}
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}, timeout=10).json()
    assert back == {"prompt": "hello world"}


# ----- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, param, words", [
    (b'{"prompt": "x", ', 400, None, "not valid JSON"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "integer"),
    ({"prompt": "x", "top_p": 3}, 400, "top_p", "top_p"),
    ({"prompt": "word " * 300}, 400, "prompt", f"{MAX_MODEL_LEN} tokens"),
    ({"prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", f"{MAX_MODEL_LEN} tokens"),
    ({"prompt": [[5, 999999]]}, 400, "prompt", "vocabulary"),
    ({"prompt": "x", "model": "nope"}, 404, "model", "nope"),
    ({"prompt": "x", "structured_outputs": {"json": "{not json"}}, 400, "structured_outputs", "JSON"),
    ({"prompt": "x", "structured_outputs": {"regex": "(unclosed"}}, 400, "structured_outputs", "regex"),
])
def test_bad_requests_get_openai_error_bodies(server, body, status, param, words):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/completions", content=body, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"]
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200  # and it serves on


def test_bad_chat_requests(server):
    for body, param in [({"messages": "hi"}, "messages"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
                        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 999},
                         "max_completion_tokens")]:
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_a_body_over_the_limit_is_413(server):
    response = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "' + b"x" * (9 << 20) + b'"}',
                          timeout=30)
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


def test_disconnect_mid_stream_aborts_and_frees_blocks(server, tokenizer_model_dir):
    before = metric(server, "minivllm:generation_tokens_total")
    body = {"model": tokenizer_model_dir, "prompt": PROMPTS[0], "max_tokens": 240, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert metric(server, "minivllm:kv_cache_usage_perc") > 0
    m = wait_idle(server, timeout=5)
    assert m["minivllm:num_requests_running"] == 0 and m["minivllm:kv_cache_usage_perc"] == 0
    assert m["minivllm:generation_tokens_total"] - before < 240  # stopped, not run to the end


def test_load_every_streaming_request_answered_correctly_no_block_leaked(server, offline, tokenizer_model_dir):
    num_requests, concurrency, max_tokens = 256, 64, 6
    want = [o.outputs[0].text for o in offline.generate(PROMPTS, greedy(max_tokens), use_tqdm=False)]
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=60, max_retries=0,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=concurrency)))

    async def one(i: int, slots: asyncio.Semaphore) -> tuple[int, str, str | None]:
        async with slots:
            stream = await client.completions.create(model=tokenizer_model_dir, prompt=PROMPTS[i % len(PROMPTS)],
                                                     max_tokens=max_tokens, temperature=0, stream=True)
            text, finish = "", None
            async for chunk in stream:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            return i, text, finish

    async def run_all():
        slots = asyncio.Semaphore(concurrency)
        return await asyncio.wait_for(asyncio.gather(*(one(i, slots) for i in range(num_requests))), timeout=120)

    results = asyncio.run(run_all())
    assert len(results) == num_requests
    assert all(text == want[i % len(PROMPTS)] and finish == "length" for i, text, finish in results)
    m = wait_idle(server)
    assert m["minivllm:num_requests_running"] == 0 and m["minivllm:kv_cache_usage_perc"] == 0
    assert m["minivllm:e2e_request_latency_seconds_count"] >= num_requests


# ----- auth, back-pressure, faults, shutdown -------------------------------------------------------------------
def test_api_key_and_a_full_queue(tokenizer_model_dir):
    server = Server(tokenizer_model_dir, "--api-key", "sesame", "--max-pending-requests", "2")
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").completions.create(model=tokenizer_model_dir, prompt="x", max_tokens=2)
        assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=10).status_code == 401
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # open without the key
        client = server.client("sesame")
        assert client.completions.create(model=tokenizer_model_dir, prompt="x", max_tokens=2).usage.completion_tokens
        streams = [client.completions.create(model=tokenizer_model_dir, prompt="x", max_tokens=240,
                                             extra_body={"ignore_eos": True}, stream=True) for _ in range(2)]
        with pytest.raises(openai.APIStatusError) as excinfo:
            client.completions.create(model=tokenizer_model_dir, prompt="x", max_tokens=2)
        assert excinfo.value.status_code == 503
        for stream in streams:
            stream.close()
        wait_idle(server)
        assert client.completions.create(model=tokenizer_model_dir, prompt="x", max_tokens=2).choices
    finally:
        server.kill()


def test_engine_failure_answers_500_and_health_fails(tokenizer_model_dir, tmp_path):
    flag = tmp_path / "fail"
    server = Server(tokenizer_model_dir, code=FAULTY, env={"MINIVLLM_TEST_FAIL": str(flag)})
    try:
        body = {"prompt": "x", "max_tokens": 240, "ignore_eos": True}
        results = {}
        thread = threading.Thread(target=lambda: results.update(
            plain=httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)))
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                          timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            thread.start()
            time.sleep(0.3)
            flag.touch()
            rest = [line for line in lines if line]
        thread.join(timeout=30)
        assert any('"error"' in line for line in rest) and rest[-1] == "data: [DONE]"
        assert results["plain"].status_code == 500
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 500
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=10).status_code == 500
    finally:
        server.kill()


def test_sigterm_under_load_exits_0_within_seconds(tokenizer_model_dir):
    server = Server(tokenizer_model_dir, "--shutdown-timeout", "1")
    try:
        ended = []

        def stream() -> None:
            body = {"prompt": "x", "max_tokens": 240, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as response:
                    for _ in response.iter_lines():
                        pass
            except httpx.HTTPError:
                pass
            ended.append(True)

        threads = [threading.Thread(target=stream) for _ in range(8)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while metric(server, "minivllm:num_requests_running") < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=15) == 0
        assert time.monotonic() - start < 10
        for thread in threads:
            thread.join(timeout=10)
        assert len(ended) == 8
    finally:
        server.kill()


def test_cli_help_and_the_demo_still_answer():
    serve = subprocess.run([sys.executable, "-m", "minivllm", "serve", "--help"], capture_output=True, text=True,
                           timeout=60)
    assert serve.returncode == 0 and "--api-key" in serve.stdout and "--max-num-seqs" in serve.stdout
    demo = subprocess.run([sys.executable, "-m", "minivllm", "--help"], capture_output=True, text=True, timeout=60)
    assert demo.returncode == 0 and "--prompt" in demo.stdout


def test_serving_benchmark_smoke_run(tokenizer_model_dir, tmp_path):
    out = tmp_path / "serving.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--model", tokenizer_model_dir, "--device", "cpu",
                          "--num-prompts", "3", "--max-input-len", "100", "--max-output-len", "100",
                          "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "64", "--json", str(out)],
                         capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["run"] for r in rows] == ["offline (LLM.generate)", "max concurrency", "poisson"]
    assert rows[0]["output_tok_s"] > 0 and rows[0]["of_offline"] == 1
    assert all(r["output_tok_s"] > 0 and r["ttft_ms_p50"] > 0 and r["itl_ms_p99"] >= r["itl_ms_p50"] for r in rows[1:])
    assert all(r["of_offline"] == pytest.approx(r["output_tok_s"] / rows[0]["output_tok_s"]) for r in rows)
