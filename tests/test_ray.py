"""minivllm on Ray: Ray Data's LLMPredictor and `run-batch` over replicas, on a real local Ray cluster (CPU).

One cluster for the module (ray.init(num_cpus=4)); every replica is a tiny checkpoint's engine on the CPU. Each
result is compared with one in-process engine's greedy output, line for line.
"""

import json
import logging
import os
import subprocess
import sys

import pytest
import ray
import ray.data
from ray import cloudpickle

from minivllm.entrypoints.run_batch import BatchRunner
from minivllm.ray import LLMPredictor, replica_resources
from minivllm.ray.batch import BatchReplica, run_on_replicas
from tests.conftest import LLM

ENGINE = dict(device="cpu", max_model_len=128, max_num_seqs=16, num_kv_blocks=64)
PROMPTS = ["The capital of France is", "def fib(n):", "Once upon a time", "1, 2, 3,", "Hello", "Ray is"]
CHATS = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Count to three."}]]
GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
NO_THINKING = {"enable_thinking": False}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the replica subclasses below travel to the actors by value (the workers need not import tests/)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def offline(tokenizer_model_dir):
    """One in-process engine: the oracle (and the replicas=1 runner)."""
    llm = LLM(tokenizer_model_dir, **{k: v for k, v in ENGINE.items() if k != "device"})
    yield llm
    llm.shutdown()


def greedy_texts(llm) -> tuple[list[str], list[list[int]], list[str]]:
    from minivllm import SamplingParams

    params = SamplingParams(**GREEDY)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    chats = llm.chat(CHATS, params, use_tqdm=False, chat_template_kwargs=NO_THINKING)
    return [o.outputs[0].text for o in outs], [list(o.outputs[0].token_ids) for o in outs], \
        [o.outputs[0].text for o in chats]


def batch_lines(model: str) -> list[str]:
    lines = [json.dumps({"custom_id": f"cmpl-{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": model, "prompt": prompt, **GREEDY}}) for i, prompt in enumerate(PROMPTS)]
    lines += [json.dumps({"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"model": model, "messages": chat, "chat_template_kwargs": NO_THINKING, **GREEDY}})
              for i, chat in enumerate(CHATS)]
    return lines


BAD_LINES = {  # custom_id (None: not found in the line) -> (line, status, param)
    None: ("{this is not json", 400, None),
    "bad-url": (json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings",
                            "body": {"input": "x"}}), 404, "url"),
    "bad-body": (json.dumps({"custom_id": "bad-body", "method": "POST", "url": "/v1/completions",
                             "body": {"prompt": "x", "max_tokens": "many"}}), 400, "max_tokens"),
    "bad-temperature": (json.dumps({"custom_id": "bad-temperature", "method": "POST", "url": "/v1/completions",
                                    "body": {"prompt": "x", "temperature": -1}}), 400, "temperature"),
    "no-custom-id": (json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}), 400,
                     "custom_id"),
}


def check_answers(answers: list[dict], lines: list[str], texts, chats) -> None:
    """Every line answered once, in order: the good ones with the offline engine's text, the bad with errors."""
    assert len(answers) == len(lines)
    for line, answer in zip(lines, answers):
        assert set(answer) == {"id", "custom_id", "response", "error"}
        try:
            custom_id = json.loads(line).get("custom_id")
        except json.JSONDecodeError:
            custom_id = None
        assert answer["custom_id"] == custom_id
        response = answer["response"]
        if custom_id in BAD_LINES or custom_id is None:
            expected = next(v for k, v in BAD_LINES.items() if v[0] == line)
            assert response["status_code"] == expected[1], answer
            assert response["body"]["error"]["param"] == expected[2], answer
            assert response["body"]["error"]["message"]
            continue
        assert answer["error"] is None and response["status_code"] == 200, answer
        kind, index = custom_id.split("-")
        body = response["body"]
        if kind == "cmpl":
            assert body["object"] == "text_completion"
            assert body["choices"][0]["text"] == texts[int(index)]
        else:
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["message"]["content"] == chats[int(index)]
        assert body["usage"]["completion_tokens"] == GREEDY["max_tokens"]


def test_ray_data_two_replicas_equal_one_engine(cluster, offline, tokenizer_model_dir):
    texts, token_ids, chats = greedy_texts(offline)
    rows = [{"row": i, "prompt": prompt, "messages": None} for i, prompt in enumerate(PROMPTS)]
    rows += [{"row": len(PROMPTS) + i, "prompt": None, "messages": chat} for i, chat in enumerate(CHATS)]
    ds = ray.data.from_items(rows).map_batches(
        LLMPredictor, fn_constructor_kwargs={"model": tokenizer_model_dir, "sampling_params": GREEDY,
                                             "chat_template_kwargs": NO_THINKING, **ENGINE},
        concurrency=2, batch_size=3, **replica_resources(1, "cpu"))
    out = sorted(ds.take_all(), key=lambda row: row["row"])
    assert [row["row"] for row in out] == list(range(len(rows)))
    assert [row["prompt"] for row in out[:len(PROMPTS)]] == PROMPTS  # input columns kept
    assert [row["generated_text"] for row in out] == texts + chats
    assert [list(row["generated_token_ids"]) for row in out[:len(PROMPTS)]] == token_ids
    assert all(row["num_generated_tokens"] == GREEDY["max_tokens"] for row in out)


def test_run_batch_two_replicas_answers_every_line_as_offline(cluster, offline, tokenizer_model_dir, tmp_path):
    """Through the command line, on this module's cluster (--ray-address)."""
    texts, _, chats = greedy_texts(offline)
    lines = batch_lines(tokenizer_model_dir)
    lines[3:3] = [line for line, _, _ in BAD_LINES.values()]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    address = ray.get_runtime_context().gcs_address
    done = subprocess.run([sys.executable, "-m", "minivllm", "run-batch", "-i", str(source), "-o", str(target),
                           "--replicas", "2", "--ray-address", address, "--model", tokenizer_model_dir,
                           *engine_flags()], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in target.read_text().splitlines()]
    check_answers(answers, lines, texts, chats)
    # one engine in this process answers the same, apart from the ids
    local = BatchRunner(offline, tokenizer_model_dir).answer(lines)
    assert [strip_ids(a) for a in answers] == [strip_ids(a) for a in local]


def strip_ids(answer: dict) -> dict:
    answer = json.loads(json.dumps(answer))
    answer.pop("id")
    if answer["response"] is not None:
        answer["response"].pop("request_id")
        answer["response"]["body"].pop("id", None)
        answer["response"]["body"].pop("created", None)
    return answer


class DyingReplica(BatchReplica):
    """Dies once, in the whole cluster, after running its first chunk and before answering it."""

    marker = ""  # a file made by the replica that dies

    def answer(self, lines):
        answers = super().answer(lines)
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return answers
        os._exit(1)


def test_a_killed_replica_loses_no_line_and_duplicates_none(cluster, offline, tokenizer_model_dir, tmp_path):
    texts, _, chats = greedy_texts(offline)
    marker = tmp_path / "died"
    replica = type("DyingHere", (DyingReplica,), {"marker": str(marker)})
    lines = batch_lines(tokenizer_model_dir)
    answers = run_on_replicas(lines, 2, tokenizer_model_dir, tokenizer_model_dir, None, ENGINE,
                              replica_cls=replica, chunk_size=2)
    assert marker.exists()  # a replica did die
    assert sorted(a["custom_id"] for a in answers) == sorted(json.loads(line)["custom_id"] for line in lines)
    check_answers(answers, lines, texts, chats)


class LostReplica(BatchReplica):
    """The first replica to answer dies at each answer, restarts included, until Ray gives it up."""

    marker = ""  # holds the doomed actor's id

    def answer(self, lines):
        me = ray.get_runtime_context().get_actor_id()
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, me.encode())
            os.close(fd)
        except FileExistsError:
            pass
        with open(self.marker) as f:
            if f.read() == me:
                os._exit(1)
        return super().answer(lines)


def test_a_replica_lost_for_good_has_its_lines_run_on_another(cluster, offline, tokenizer_model_dir, tmp_path,
                                                             caplog):
    texts, _, chats = greedy_texts(offline)
    replica = type("LostHere", (LostReplica,), {"marker": str(tmp_path / "doomed")})
    lines = batch_lines(tokenizer_model_dir)
    with caplog.at_level(logging.WARNING, logger="minivllm"):
        answers = run_on_replicas(lines, 2, tokenizer_model_dir, tokenizer_model_dir, None, ENGINE,
                                  replica_cls=replica, chunk_size=2)
    assert any("a replica was lost" in record.message for record in caplog.records)
    check_answers(answers, lines, texts, chats)


def test_a_tensor_parallel_replica_answers_as_one_engine(cluster, offline, tokenizer_model_dir):
    """A replica of tensor_parallel_size 2 (on the CPU: the actor and the rank it spawns, two CPUs asked of Ray)."""
    texts, _, chats = greedy_texts(offline)
    lines = batch_lines(tokenizer_model_dir)
    answers = run_on_replicas(lines, 1, tokenizer_model_dir, tokenizer_model_dir, None,
                              {**ENGINE, "tensor_parallel_size": 2})
    check_answers(answers, lines, texts, chats)


def test_replica_resources():
    assert replica_resources(1, "cpu") == {"num_cpus": 1}
    assert replica_resources(2, "cuda") == {"num_cpus": 1, "num_gpus": 2}
    assert replica_resources(4, None) == {"num_cpus": 1, "num_gpus": 4}
    assert replica_resources(2, "cpu") == {"num_cpus": 2}


def engine_flags() -> list[str]:
    return [item for name, value in ENGINE.items() for item in (f"--{name.replace('_', '-')}", str(value))]


WITHOUT_RAY = "import sys; sys.modules['ray'] = None; from minivllm.__main__ import main; sys.exit(main(sys.argv[1:]))"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m minivllm ...` in a process where `import ray` fails."""
    return subprocess.run([sys.executable, "-c", WITHOUT_RAY, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_run_batch_one_replica_cli_without_ray(offline, tokenizer_model_dir, tmp_path):
    texts, _, chats = greedy_texts(offline)
    lines = batch_lines(tokenizer_model_dir)
    lines[1:1] = [line for line, _, _ in BAD_LINES.values()]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n\n")  # a blank line is no request
    flags = ["-i", str(source), "-o", str(target), "--model", tokenizer_model_dir, *engine_flags()]
    done = run_cli("run-batch", *flags)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in target.read_text().splitlines()]
    check_answers(answers, lines, texts, chats)

    missing = run_cli("run-batch", *flags, "--replicas", "2")
    assert missing.returncode == 2
    assert "pip install 'minivllm[ray]'" in missing.stderr and "Traceback" not in missing.stderr


def test_run_batch_with_replicas_refuses_a_bad_model_at_once(tmp_path):
    """Checked in the driver before any replica starts: one line and exit 2, not lines lost with failed actors."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                  "body": {"model": "m", "prompt": "hi"}}) + "\n")
    done = subprocess.run([sys.executable, "-m", "minivllm", "run-batch", "-i", str(source), "-o",
                           str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "nope"), "--replicas", "2"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "not found" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out.jsonl").exists()
