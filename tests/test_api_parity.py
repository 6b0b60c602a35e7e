"""vLLM's offline API as a vLLM user meets it (issue 13, sections 3-7): chat() options and OpenAI messages,
default sampling parameters from generation_config.json, vLLM arguments minivllm lacks (refused by name),
errors that name the file or argument before any work, nothing on stdout, warnings that point at the
user's line, the demo CLI, and the build's refusal to give a kernel-less wheel quietly."""

import dataclasses
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
from tqdm import tqdm

import minivllm
from minivllm import SamplingParams
from minivllm.__main__ import main as demo_main
from minivllm.config import VLLM_ONLY, EngineArgs
from minivllm.presets import PRESETS
from tests.conftest import LLM, random_prompts, token_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = SamplingParams(temperature=0, max_tokens=1)
USER = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def chat_llm(tokenizer_model_dir):
    """Room for the Qwen3 template's tool preamble."""
    return LLM(tokenizer_model_dir, max_model_len=256, max_num_seqs=8)


def rendered(llm, messages, **kwargs) -> str:
    """The prompt chat() ran (one greedy token, so the prompt is what is checked)."""
    return llm.chat(messages, ONE, use_tqdm=False, **kwargs)[0].prompt


def template(llm, messages, **kwargs) -> str:
    return llm.get_tokenizer().apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Building the runner (model, weights, KV cache) fails the test: a check must come before it."""
    def heavy(config):
        raise AssertionError("the runner was built before the bad input was refused")

    monkeypatch.setattr("minivllm.engine.llm_engine.start_executor", heavy)


def engine_idle(llm) -> bool:
    engine = llm.llm_engine
    return not engine.requests and not engine.scheduler.waiting and not engine.scheduler.running


# ----- 3. chat() and inputs -------------------------------------------------------------------------------
def test_chat_text_parts_are_joined_as_vllm_joins_them(chat_llm):
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 2?"}]
    got = rendered(chat_llm, [{"role": "user", "content": parts}])
    assert got == template(chat_llm, [{"role": "user", "content": "What is\n2 + 2?"}], add_generation_prompt=True)


@pytest.mark.parametrize("kind", ["image_url", "input_audio", "video_url"])
def test_chat_non_text_part_is_refused_by_type(chat_llm, kind):
    parts = [{"type": "text", "text": "Describe"}, {"type": kind, kind: {"url": "x"}}]
    with pytest.raises(ValueError, match=kind):
        chat_llm.chat([{"role": "user", "content": parts}], ONE, use_tqdm=False)
    assert engine_idle(chat_llm)


def test_chat_assistant_tool_call_with_none_content(chat_llm):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
    conversation = USER + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
    ]
    got = rendered(chat_llm, conversation)
    assert '"name": "add"' in got and '"a": 2' in got and "<tool_response>\n4\n</tool_response>" in got
    assert got.endswith("<|im_start|>assistant\n")
    with pytest.raises(TypeError, match="only an assistant"):
        chat_llm.chat([{"role": "user", "content": None}], ONE, use_tqdm=False)


def test_chat_add_generation_prompt_false_and_continue_final_message(chat_llm):
    conversation = USER + [{"role": "assistant", "content": "The answer is"}]
    closed = rendered(chat_llm, conversation, add_generation_prompt=False)
    assert closed == template(chat_llm, conversation, add_generation_prompt=False)
    assert not closed.endswith("<|im_start|>assistant\n")
    continued = rendered(chat_llm, conversation, add_generation_prompt=False, continue_final_message=True)
    assert continued.endswith("The answer is") and continued != closed
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        chat_llm.chat(conversation, ONE, use_tqdm=False, continue_final_message=True)
    with pytest.raises(TypeError, match="add_generation_prompt"):
        chat_llm.chat(conversation, ONE, use_tqdm=False, add_generation_prompt="no")


def test_chat_template_override_as_text_and_as_file(chat_llm, tmp_path):
    text = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}>{% endif %}")
    assert rendered(chat_llm, USER, chat_template=text) == "[user] What is 2 + 2?\n>"
    path = tmp_path / "template.jinja"
    path.write_text(text)
    assert rendered(chat_llm, USER, chat_template=str(path), add_generation_prompt=False) == "[user] What is 2 + 2?\n"


def test_chat_template_kwargs_reach_the_qwen3_template(chat_llm):
    thinking = rendered(chat_llm, USER)
    plain = rendered(chat_llm, USER, chat_template_kwargs={"enable_thinking": False})
    assert plain == thinking + "<think>\n\n</think>\n\n"
    assert plain == template(chat_llm, USER, add_generation_prompt=True, enable_thinking=False)
    with pytest.raises(ValueError, match="tokenize"):
        chat_llm.chat(USER, ONE, use_tqdm=False, chat_template_kwargs={"tokenize": True})
    with pytest.raises(TypeError, match="chat_template_kwargs"):
        chat_llm.chat(USER, ONE, use_tqdm=False, chat_template_kwargs=["enable_thinking"])


def test_chat_tools_reach_the_template(chat_llm):
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    tool = {"type": "function",
            "function": {"name": "get_weather", "description": "Weather in a city", "parameters": parameters}}
    got = rendered(chat_llm, USER, tools=[tool])
    assert "<tools>" in got and "get_weather" in got and "<tools>" not in rendered(chat_llm, USER)
    with pytest.raises(TypeError, match="tools"):
        chat_llm.chat(USER, ONE, use_tqdm=False, tools="get_weather")


def test_text_and_tokens_prompt_typed_dicts(chat_llm):
    from minivllm.inputs import TextPrompt, TokensPrompt

    assert minivllm.TextPrompt is TextPrompt and minivllm.TokensPrompt is TokensPrompt
    ids = chat_llm.get_tokenizer().encode("Hello there")
    by_text = chat_llm.generate(TextPrompt(prompt="Hello there"), ONE, use_tqdm=False)[0]
    by_ids = chat_llm.generate(TokensPrompt(prompt_token_ids=ids), ONE, use_tqdm=False)[0]
    assert by_text.prompt_token_ids == by_ids.prompt_token_ids == ids
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids


def write_generation_config(src: str, dst, **fields) -> str:
    path = shutil.copytree(src, dst)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 1, **fields}, f)
    return str(path)


def test_default_sampling_params_from_generation_config(qwen3_dir, tmp_path, monkeypatch):
    fields = dict(temperature=0.6, top_p=0.95, top_k=20, min_p=0.05, repetition_penalty=1.1, max_new_tokens=7)
    llm = LLM(write_generation_config(qwen3_dir, tmp_path / "gen", **fields), max_model_len=64)
    defaults = llm.get_default_sampling_params()
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    expected = {("max_tokens" if k == "max_new_tokens" else k): v for k, v in fields.items()}
    expected = {k: v for k, v in expected.items() if k in known}  # repetition_penalty: once SamplingParams has it
    assert {k: getattr(defaults, k) for k in expected} == expected
    defaults.temperature = 0.0  # a copy: changing it changes nothing for the next call
    assert llm.get_default_sampling_params().temperature == 0.6
    seen = []
    add = llm.llm_engine.add_request
    monkeypatch.setattr(llm.llm_engine, "add_request", lambda rid, p, sp: seen.append(sp) or add(rid, p, sp))
    out = llm.generate(token_prompts(random_prompts(1, 4, 8, seed=5)), use_tqdm=False)  # as vLLM: the defaults
    assert (seen[0].temperature, seen[0].top_k, seen[0].max_tokens) == (0.6, 20, 7)
    assert len(out[0].outputs[0].token_ids) <= 7
    # a checkpoint whose generation config sets none of them: SamplingParams()
    assert LLM(qwen3_dir, max_model_len=64).get_default_sampling_params() == SamplingParams()


def test_generation_config_with_bad_defaults_is_named(qwen3_dir, tmp_path):
    llm = LLM(write_generation_config(qwen3_dir, tmp_path / "gen", top_p=5.0), max_model_len=64)
    with pytest.raises(ValueError, match="generation_config.json") as err:
        llm.get_default_sampling_params()
    assert "top_p" in str(err.value)


# ----- 4. vLLM arguments minivllm lacks --------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(quantization="awq"), dict(trust_remote_code=True), dict(enable_lora=True), dict(kv_cache_dtype="fp8"),
    dict(pipeline_parallel_size=2), dict(speculative_config={"method": "ngram"}), dict(revision="v2"),
    dict(enable_chunked_prefill=False), dict(swap_space=16), dict(num_gpu_blocks_override=8),
    dict(hf_overrides={"rope_theta": 1.0}), dict(runner="pooling"),
], ids=lambda kwargs: next(iter(kwargs)))
def test_unsupported_llm_argument_is_refused_by_name(qwen3_dir, no_heavy_work, kwargs):
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=f"does not support {name}=") as err:
        LLM(qwen3_dir, **kwargs)
    assert repr(value)[:10] in str(err.value)


@pytest.mark.parametrize("kwargs", [
    dict(trust_remote_code=False), dict(quantization=None), dict(enable_lora=False), dict(tokenizer_mode="auto"),
    dict(kv_cache_dtype="auto"), dict(pipeline_parallel_size=1), dict(disable_log_stats=True),
])
def test_vllm_arguments_that_ask_for_nothing_missing_are_accepted(qwen3_dir, kwargs):
    assert LLM(qwen3_dir, max_model_len=64, **kwargs).generate(token_prompts([[5, 6, 7]]), ONE, use_tqdm=False)


def test_unknown_argument_is_a_clear_type_error(qwen3_dir, no_heavy_work):
    with pytest.raises(TypeError, match="'no_such_option'"):
        LLM(qwen3_dir, no_such_option=1)
    with pytest.raises(TypeError, match="trust_remote_code"):  # a known one, but a typo of it is not
        LLM(qwen3_dir, trust_remote_codes=False)


def test_every_vllm_only_entry_refuses_something():
    """Each entry accepts its no-op values only: a made-up object is refused everywhere."""
    for where, table in VLLM_ONLY.items():
        for name, entry in table.items():
            assert not entry.accepts(object()), (where, name)


@pytest.mark.parametrize("kwargs, name", [
    (dict(lora_request=object()), "lora_request"), (dict(priority=[1]), "priority"),
    (dict(tokenization_kwargs={"truncation": True}), "tokenization_kwargs"),
    (dict(prompt_adapter_request=object()), "prompt_adapter_request"),
])
def test_unsupported_generate_argument_is_refused_by_name(llm, kwargs, name):
    with pytest.raises(ValueError, match=f"does not support {name}="):
        llm.generate(token_prompts([[5, 6]]), ONE, use_tqdm=False, **kwargs)
    assert engine_idle(llm)
    with pytest.raises(TypeError, match="'beams'"):
        llm.generate(token_prompts([[5, 6]]), ONE, use_tqdm=False, beams=2)


def test_priority_zero_is_first_come_first_served(llm):
    assert len(llm.generate(token_prompts([[5, 6], [7, 8]]), ONE, use_tqdm=False, priority=[0, 0])) == 2


@pytest.mark.parametrize("key, value", [
    ("multi_modal_data", {"image": "x.png"}), ("prompt_embeds", [[0.0]]), ("cache_salt", "tenant-1"),
    ("mm_processor_kwargs", {"num_crops": 4}),
])
def test_unsupported_prompt_dict_key_is_refused(llm, key, value):
    with pytest.raises(ValueError, match=f"does not support {key}="):
        llm.generate({"prompt_token_ids": [5, 6], key: value}, ONE, use_tqdm=False)
    with pytest.raises(TypeError, match="'promt'"):
        llm.generate({"prompt_token_ids": [5, 6], "promt": "typo"}, ONE, use_tqdm=False)
    assert engine_idle(llm)


def test_unsupported_chat_arguments_and_methods(chat_llm):
    with pytest.raises(ValueError, match="does not support lora_request="):
        chat_llm.chat(USER, ONE, use_tqdm=False, lora_request=object())
    with pytest.raises(ValueError, match="chat_template_content_format"):
        chat_llm.chat(USER, ONE, use_tqdm=False, chat_template_content_format="openai")
    assert rendered(chat_llm, USER, chat_template_content_format="string") == rendered(chat_llm, USER)
    for method in ("beam_search", "embed", "encode", "score"):
        with pytest.raises(ValueError, match=f"LLM.{method}\\(\\): minivllm does not support"):
            getattr(chat_llm, method)(["hi"])
    assert engine_idle(chat_llm)


# ----- 5. errors, raised before any work ---------------------------------------------------------------------
def test_nonexistent_absolute_path_names_where_it_looked(no_heavy_work):
    with pytest.raises(ValueError, match="not found") as err:
        LLM("/nope")
    assert type(err.value) is ValueError and "/nope" in str(err.value) and "Hugging Face cache" in str(err.value)
    for name in ("./nope/", "../x/y/z", "nope//x"):
        with pytest.raises(ValueError, match="not found"):
            LLM(name)


def test_tilde_is_expanded_in_model_and_tokenizer_paths(qwen3_dir, tokenizer_model_dir, tmp_path, monkeypatch):
    shutil.copytree(qwen3_dir, tmp_path / "ckpt")
    shutil.copytree(tokenizer_model_dir, tmp_path / "tok")
    monkeypatch.setenv("HOME", str(tmp_path))
    llm = LLM("~/ckpt", tokenizer="~/tok", max_model_len=64)
    assert llm.config.source.weights_dir == str(tmp_path / "ckpt") and llm.get_tokenizer() is not None
    with pytest.raises(ValueError, match=str(tmp_path / "missing")):
        LLM("~/missing")


def test_seed_none_is_one_random_seed(qwen3_dir):
    first, second = EngineArgs(model=qwen3_dir, seed=None), EngineArgs(model=qwen3_dir, seed=None)
    assert isinstance(first.seed, int) and first.seed != second.seed
    llm = LLM(qwen3_dir, seed=None, max_model_len=64)
    assert isinstance(llm.config.args.seed, int)
    params = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True)
    assert len(llm.generate(token_prompts([[5, 6, 7]]), params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    with pytest.raises(TypeError, match="seed"):
        LLM(qwen3_dir, seed="1")


def test_truncated_safetensors_is_named(qwen3_dir, tmp_path, no_heavy_work):
    path = shutil.copytree(qwen3_dir, tmp_path / "cut")
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(ValueError, match="model.safetensors") as err:
        LLM(str(path))
    assert "safetensors" in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("text", ['{"architectures": ["Qwen3ForCausalLM"], ', "", "[1, 2]",
                                  '{"model_type": "no-such-model-type"}'], ids=["cut", "empty", "list", "type"])
def test_broken_config_json_is_named(qwen3_dir, tmp_path, no_heavy_work, text):
    path = shutil.copytree(qwen3_dir, tmp_path / "broken")
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match="config.json") as err:
        LLM(str(path))
    assert str(path) in str(err.value)


def test_broken_generation_config_json_is_named(qwen3_dir, tmp_path, no_heavy_work):
    path = shutil.copytree(qwen3_dir, tmp_path / "broken")
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        f.write('{"eos_token_id": ')
    with pytest.raises(ValueError, match="generation_config.json"):
        LLM(str(path))


def test_mutated_sampling_params_are_refused_when_generate_starts(llm):
    params = SamplingParams(max_tokens=4)
    params.top_p = 7.0
    with pytest.raises(ValueError, match="top_p"):
        llm.generate(token_prompts([[5, 6], [7, 8]]), [SamplingParams(max_tokens=4), params], use_tqdm=False)
    assert engine_idle(llm)


# ----- 6. output hygiene -----------------------------------------------------------------------------------
def test_nothing_on_stdout(chat_llm, capsys):
    chat_llm.generate("Hello", ONE)  # use_tqdm=True: the bar goes to stderr, the summary to the log
    chat_llm.chat(USER, ONE)
    captured = capsys.readouterr()
    assert captured.out == "" and "Processed prompts" in captured.err


def test_use_tqdm_takes_a_callable_that_makes_the_bar(llm):
    made = []

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, file=io.StringIO(), **kwargs)
            made.append(self)

    llm.generate(token_prompts([[5, 6], [7, 8], [9, 10]]), ONE, use_tqdm=Bar)
    assert len(made) == 1 and made[0].total == 3 and made[0].n == 3
    with pytest.raises(TypeError, match="use_tqdm"):
        llm.generate(token_prompts([[5, 6]]), ONE, use_tqdm="yes")


def test_random_weights_warning_points_at_the_users_line(monkeypatch):
    monkeypatch.setitem(PRESETS, "qwen3-test-tiny", (64, 128, 1, 8, True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LLM("qwen3-test-tiny", max_model_len=64, max_num_seqs=4)
    random_weights = [w for w in caught if "RANDOM" in str(w.message)]
    assert len(random_weights) == 1 and random_weights[0].filename == __file__


def test_max_model_len_warning_only_when_asked_for_more(qwen3_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails
        assert LLM(qwen3_dir).max_model_len == 256
        assert LLM(qwen3_dir, num_kv_blocks=4).max_model_len == 64  # the cap is the default's, not a request
        assert LLM(qwen3_dir, max_model_len=256).max_model_len == 256
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LLM(qwen3_dir, max_model_len=1000)
    capped = [w for w in caught if "max_model_len" in str(w.message)]
    assert len(capped) == 1 and capped[0].filename == __file__ and "256" in str(capped[0].message)


IMPORT_WITHOUT_KERNELS = """
import sys, warnings
warnings.simplefilter("always")
sys.modules["minivllm._C"] = None  # as if never built
import torch
torch.cuda.is_available = lambda: {gpu}
import minivllm
import minivllm.llm
"""


def test_import_warns_once_on_a_gpu_without_kernels():
    code = IMPORT_WITHOUT_KERNELS.format(gpu=True)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("kernels (minivllm._C) are not built") == 1, result.stderr
    assert "<string>:7: UserWarning" in result.stderr and "--no-build-isolation" in result.stderr


def test_no_kernel_warning_without_a_gpu_or_with_the_kernels(monkeypatch):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        if importlib.util.find_spec("minivllm._C") is not None:
            minivllm._warn_if_kernels_missing()  # built: nothing to say
        monkeypatch.setitem(sys.modules, "minivllm._C", None)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        minivllm._warn_if_kernels_missing()  # no GPU: the references are the CPU path
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        with pytest.raises(UserWarning, match="not built"):
            minivllm._warn_if_kernels_missing()


# ----- 7. the demo CLI and the build -------------------------------------------------------------------------
def demo(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minivllm", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_demo_runs_your_prompt(tokenizer_model_dir):
    result = demo("--device", "cpu", "--num-prompts", "1", "--max-tokens", "2", "--prompt", "hi",
                  "--model", tokenizer_model_dir)
    assert result.returncode == 0, result.stderr
    assert "--- prompt: '<|im_start|>user\\nhi<|im_end|>" in result.stdout
    assert "main job: 1 prompts, 2 output tokens" in result.stdout


def test_demo_bad_flag_is_a_one_line_error():
    result = demo("--num-prompts", "0")
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["python -m minivllm: error: argument --num-prompts: must be at least 1, got 0"], result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--max-tokens", "-3"], "--max-tokens: must be at least 1, got -3"),
    (["--num-prompts", "many"], "--num-prompts: must be a whole number"),
    (["--model", "/nope"], "model '/nope' not found"),
    (["--device", "tpu"], "device 'tpu' is not a device"),
    (["--temperature", "-1"], "temperature must be finite, >= 0"),
])
def test_demo_bad_flags_and_engine_errors_are_one_line(flags, message, capsys):
    try:
        code = demo_main(flags)
    except SystemExit as e:  # argparse's errors
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], captured.err


def test_demo_help_shows_defaults():
    result = demo("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "(default: 256)" in text and "(default: qwen3-0.6b)" in text and "(default: 0.6)" in text
    assert "--prompt TEXT" in text and "(default: None)" not in text


SETUP_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # what pip's build isolation shows setup.py: no torch
sys.argv = ["setup.py", "--version"]
exec(compile(open("setup.py").read(), "setup.py", "exec"))
"""


def run_setup(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SETUP_WITHOUT_TORCH], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})


def test_isolated_build_with_a_cuda_toolkit_fails_with_the_command(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    result = run_setup({"CUDA_HOME": str(tmp_path)})
    assert result.returncode != 0
    assert "pip install --no-build-isolation ." in result.stderr and "MINIVLLM_NO_KERNELS=1" in result.stderr
    no_kernels = run_setup({"CUDA_HOME": str(tmp_path), "MINIVLLM_NO_KERNELS": "1"})
    assert no_kernels.returncode == 0 and "NOT built" in no_kernels.stderr
    assert no_kernels.stdout.strip() == minivllm.__version__
