"""Every bad input of issue 2 section 6: a ValueError or TypeError that says what was wrong, raised before
any work starts, after which the same LLM keeps serving exactly as before."""

import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minivllm
from minivllm import SamplingParams
from tests.conftest import LLM, completions, random_prompts, token_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = random_prompts(3, 3, 40, seed=70)


@pytest.fixture(scope="module")
def baseline(llm) -> list[list[int]]:
    return completions(llm.generate(token_prompts(PROMPTS), GREEDY, use_tqdm=False))


def assert_untouched_and_serving(llm: minivllm.LLM, baseline: list[list[int]]) -> None:
    engine = llm.llm_engine
    assert not engine.scheduler.waiting and not engine.scheduler.running and not engine.requests
    assert engine.scheduler.block_manager.num_free_blocks == engine.runner.num_kv_blocks
    assert completions(llm.generate(token_prompts(PROMPTS), GREEDY, use_tqdm=False)) == baseline


# ----- SamplingParams ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(min_p=float("nan")), "min_p"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=-0.1), "min_p"),
        (dict(min_p=1.1), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
        (dict(stop=""), "stop"),
        (dict(seed=2**64), "seed"),
        (dict(seed=-(2**63) - 1), "seed"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(logprobs=21), "logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(allowed_token_ids=[]), "allowed_token_ids"),
        (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
        (dict(detokenize=False, stop=["x"]), "detokenize"),
    ],
)
def test_sampling_params_out_of_range(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature="hot"), "temperature"),
        (dict(top_p=None), "top_p"),
        (dict(top_k=2.5), "top_k"),
        (dict(n=1.0), "n"),
        (dict(max_tokens=1.5), "max_tokens"),
        (dict(max_tokens=True), "max_tokens"),
        (dict(logprobs=1.5), "logprobs"),
        (dict(presence_penalty="x"), "presence_penalty"),
        (dict(logit_bias={"a": 1.0}), "logit_bias"),
        (dict(logit_bias={1: "big"}), "logit_bias"),
        (dict(allowed_token_ids=[1.0]), "allowed_token_ids"),
        (dict(bad_words="word"), "bad_words"),
        (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
        (dict(seed="42"), "seed"),
        (dict(stop=7), "stop"),
        (dict(stop=["a", 3]), "stop"),
        (dict(stop_token_ids=["7"]), "stop_token_ids"),
    ],
)
def test_sampling_params_wrong_types(kwargs, field):
    with pytest.raises(TypeError, match=field):
        SamplingParams(**kwargs)


def test_extreme_seeds_run(llm):
    prompt = {"prompt_token_ids": [3, 4, 5]}
    for seed in (-(2**63), 2**63 - 1):
        params = SamplingParams(n=2, seed=seed, max_tokens=4, ignore_eos=True)
        assert len(llm.generate(prompt, params, use_tqdm=False)[0].outputs) == 2


def test_huge_top_k_is_off(llm):
    prompt = {"prompt_token_ids": [3, 4, 5]}
    huge = SamplingParams(top_k=2**70, seed=4, max_tokens=6, ignore_eos=True)
    off = SamplingParams(top_k=-1, seed=4, max_tokens=6, ignore_eos=True)
    assert completions(llm.generate(prompt, huge, use_tqdm=False)) == completions(llm.generate(prompt, off,
                                                                                              use_tqdm=False))


def test_sampling_params_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.max_tokens, p.min_tokens, p.stop_token_ids, p.ignore_eos, p.skip_special_tokens) == (
        16, 0, [], False, True,
    )
    assert SamplingParams(top_k=-1).top_k in (0, -1)
    assert SamplingParams(stop="x").stop_strings == ["x"]


# ----- prompts and their params ------------------------------------------------------------------------
BAD_PROMPTS = {
    "empty ids": ({"prompt_token_ids": []}, ValueError, "empty"),
    "empty list of ids": ([[]], ValueError, "empty"),
    "negative id": ({"prompt_token_ids": [3, -1, 4]}, ValueError, "vocabulary"),
    "id == vocab": ({"prompt_token_ids": [3, 512]}, ValueError, "vocabulary"),
    "huge id": ([[10**9]], ValueError, "vocabulary"),
    "float id": ({"prompt_token_ids": [3, 4.0]}, TypeError, "int"),
    "bool id": ({"prompt_token_ids": [True]}, TypeError, "int"),
    "too long": ({"prompt_token_ids": [5] * 129}, ValueError, "max_model_len"),
    "dict without ids": ({"token_ids": [1, 2]}, (TypeError, ValueError), "prompt"),
    "number": (42, TypeError, "prompt"),
    "no prompts": ([], (TypeError, ValueError), "prompt"),
    "text without tokenizer": ("hello", ValueError, "tokenizer"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_prompt_rejected_and_llm_keeps_serving(llm, baseline, case):
    prompt, error, message = BAD_PROMPTS[case]
    with pytest.raises(error, match=message):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    assert_untouched_and_serving(llm, baseline)


@pytest.mark.parametrize("bad_index", [0, 2])
def test_one_bad_prompt_in_a_batch_adds_nothing(llm, baseline, bad_index):
    prompts = token_prompts(random_prompts(3, 5, 10, seed=71))
    prompts[bad_index] = {"prompt_token_ids": [1, 2, 99999]}
    with pytest.raises(ValueError, match="99999"):
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_untouched_and_serving(llm, baseline)


def test_params_list_length_mismatch(llm, baseline):
    with pytest.raises(ValueError, match="3 prompts but 2"):
        llm.generate(token_prompts(PROMPTS), [GREEDY, GREEDY], use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate(token_prompts(PROMPTS), [GREEDY, GREEDY, {"temperature": 0}], use_tqdm=False)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate(token_prompts(PROMPTS), {"temperature": 0}, use_tqdm=False)
    assert_untouched_and_serving(llm, baseline)


def test_prompt_that_could_never_fit_the_kv_cache(qwen3_dir):
    with pytest.warns(UserWarning):
        small = LLM(qwen3_dir, max_model_len=128, num_kv_blocks=2)
    with pytest.raises(ValueError, match="max_model_len=32"):
        small.generate({"prompt_token_ids": [5] * 33}, GREEDY, use_tqdm=False)
    # the longest prompt that fits still runs, and stops at max_model_len
    out = small.generate({"prompt_token_ids": [5] * 32}, GREEDY, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    assert small.llm_engine.scheduler.block_manager.num_free_blocks == 2


def test_empty_text_prompt_and_bad_chat(tok_llm):
    before = tok_llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="empty"):
        tok_llm.generate("", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        tok_llm.generate(["Hello", ""], GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match="role"):
        tok_llm.chat([{"content": "no role"}], GREEDY, use_tqdm=False)
    with pytest.raises(TypeError):
        tok_llm.chat("just a string", GREEDY, use_tqdm=False)
    assert not tok_llm.llm_engine.requests and not tok_llm.llm_engine.scheduler.waiting
    assert tok_llm.generate("Hello", GREEDY, use_tqdm=False)[0].outputs[0].token_ids == before


def test_chat_without_template_is_refused(llm, baseline):
    with pytest.raises(ValueError, match="chat template"):
        llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)
    assert_untouched_and_serving(llm, baseline)


def test_interrupted_generate_leaves_engine_serving(llm, baseline):
    runner = llm.llm_engine.runner
    execute, calls = runner.execute, []

    def interrupted(step):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return execute(step)

    runner.execute = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(token_prompts(PROMPTS * 3), GREEDY, use_tqdm=False)
    finally:
        del runner.execute
    assert_untouched_and_serving(llm, baseline)


# ----- models, dtypes, devices, engine arguments -----------------------------------------------------------
def test_missing_model_directory(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not found") as err:
        LLM(missing)
    assert "nowhere" in str(err.value) and "qwen3-0.6b" in str(err.value)
    with pytest.raises(ValueError, match="not found"):
        LLM("no-such-org/no-such-model")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(tmp_path))


def test_directory_without_weights(qwen3_dir, tmp_path):
    shutil.copy(os.path.join(qwen3_dir, "config.json"), tmp_path)
    with pytest.raises(ValueError, match="safetensors"):
        LLM(str(tmp_path))


def test_bin_only_checkpoint_is_refused_with_conversion_hint(qwen3_dir, tmp_path):
    shutil.copy(os.path.join(qwen3_dir, "config.json"), tmp_path)
    torch.save({"model.embed_tokens.weight": torch.randn(512, 64)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safe_serialization|convert|Convert") as err:
        LLM(str(tmp_path))
    assert ".bin" in str(err.value)


@pytest.mark.parametrize(
    "config",
    [
        dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=512, n_embd=64, n_layer=2, n_head=2),
        dict(
            architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=512, hidden_size=64,
            intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        ),
    ],
    ids=["gpt2", "mistral"],
)
def test_unsupported_architecture(tmp_path, config):
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="unsupported architecture") as err:
        LLM(str(tmp_path))
    assert config["architectures"][0] in str(err.value) and "Qwen3ForCausalLM" in str(err.value)


@pytest.mark.parametrize("dtype", ["int8", "fp8", torch.int8, torch.float64])
def test_unsupported_dtype(qwen3_dir, dtype):
    with pytest.raises(ValueError, match="dtype"):
        LLM(qwen3_dir, dtype=dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is visible")
@pytest.mark.parametrize("device", ["mps", "tpu", "cuda", "cuda:0", "gpu", "meta"])
def test_unsupported_device(qwen3_dir, device):
    with pytest.raises(ValueError, match="device"):
        LLM(qwen3_dir, device=device)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(block_size=7), ValueError, "block_size"),
        (dict(block_size=8), ValueError, "block_size"),
        (dict(max_num_seqs=0), ValueError, "max_num_seqs"),
        (dict(max_num_seqs="4"), TypeError, "max_num_seqs"),
        (dict(max_num_batched_tokens=0), ValueError, "max_num_batched_tokens"),
        (dict(max_model_len=0), ValueError, "max_model_len"),
        (dict(num_kv_blocks=0), ValueError, "num_kv_blocks"),
        (dict(gpu_memory_utilization=1.5), ValueError, "gpu_memory_utilization"),
        (dict(tensor_parallel_size=0), ValueError, "tensor_parallel_size"),
        (dict(tensor_parallel_size="2"), (TypeError, ValueError), "tensor_parallel_size"),
        (dict(async_scheduling="yes"), TypeError, "async_scheduling"),
    ],
)
def test_bad_engine_arguments(qwen3_dir, kwargs, error, message):
    with pytest.raises(error, match=message):
        LLM(qwen3_dir, **kwargs)


def test_fp16_and_bf16_run_on_cpu(qwen3_dir, baseline):
    """Not bad input: half precisions are supported (through the reference ops) and stay close to fp32."""
    for dtype in ("bfloat16", "float16"):
        half = LLM(qwen3_dir, max_model_len=128, dtype=dtype)
        assert half.llm_engine.runner.dtype == getattr(torch, dtype)
        out = completions(half.generate(token_prompts(PROMPTS), GREEDY, use_tqdm=False))
        assert [len(c) for c in out] == [8, 8, 8]
        assert out[0][:2] == baseline[0][:2]


def test_interrupted_prefill_does_not_poison_the_prefix_cache(qwen3_dir):
    """Blocks published for a step that never ran hold no K/V: a later prompt must not hit them."""
    llm = LLM(qwen3_dir, max_model_len=128)
    prompts = token_prompts(random_prompts(2, 40, 60, seed=72))
    expected = completions(LLM(qwen3_dir, max_model_len=128).generate(prompts, GREEDY, use_tqdm=False))
    runner = llm.llm_engine.runner

    def interrupted(step):
        raise KeyboardInterrupt

    runner.execute = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, GREEDY, use_tqdm=False)
    finally:
        del runner.execute
    assert completions(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected


# ----- fuzzing the prompt and params arguments -------------------------------------------------------------
token = st.one_of(st.integers(-3, 600), st.booleans(), st.floats(allow_nan=False), st.none(), st.text(max_size=2))
token_lists = st.lists(token, max_size=4)
prompt_like = st.one_of(
    st.text(max_size=3),
    token_lists,
    st.dictionaries(st.sampled_from(["prompt_token_ids", "prompt", "x"]), st.one_of(token_lists, st.text(max_size=3),
                                                                                     st.none()), max_size=2),
    st.none(),
    st.integers(),
    st.tuples(st.integers(0, 10)),
)
params_like = st.one_of(
    st.none(),
    st.just(GREEDY),
    st.lists(st.one_of(st.just(GREEDY), st.none(), st.integers()), max_size=3),
    st.dictionaries(st.just("temperature"), st.floats(allow_nan=False), max_size=1),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(prompt_like, st.lists(prompt_like, max_size=3)), params_like)
def test_fuzzed_arguments_are_served_or_refused_cleanly(llm, prompts, params):
    """Any argument either runs or raises TypeError/ValueError before work starts; nothing else escapes."""
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    except (TypeError, ValueError):
        engine = llm.llm_engine
        assert not engine.scheduler.waiting and not engine.scheduler.running and not engine.requests
    else:
        assert outputs and all(o.finished for o in outputs)
    assert llm.llm_engine.scheduler.block_manager.num_free_blocks == llm.llm_engine.runner.num_kv_blocks


@pytest.mark.parametrize(
    "content",
    [None, [{"type": "image_url", "image_url": {"url": "x.png"}}], [42], {"text": "a dict"}],
    ids=["none", "image-part", "int-part", "dict"],
)  # (a list of text parts is OpenAI's form, and runs: tests/test_api_parity.py)
def test_chat_message_content_the_template_cannot_render(tok_llm, content):
    with pytest.raises((TypeError, ValueError)):
        tok_llm.chat([{"role": "user", "content": content}], GREEDY, use_tqdm=False)
    assert not tok_llm.llm_engine.requests and not tok_llm.llm_engine.scheduler.waiting


number = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.just(2**70))
sampling_kwargs = st.fixed_dictionaries(
    {},
    optional=dict(
        n=st.integers(-1, 3),
        temperature=number,
        top_p=number,
        top_k=st.one_of(st.integers(-3, 600), st.just(2**70)),
        min_p=number,
        seed=st.one_of(st.none(), st.integers(-(2**64), 2**64)),
        max_tokens=st.one_of(st.integers(-1, 8), st.just(2**70)),
        min_tokens=st.one_of(st.integers(-1, 8), st.just(2**70)),
        stop_token_ids=st.lists(st.one_of(st.integers(-(2**70), 2**70), st.integers(0, 511)), max_size=3),
        ignore_eos=st.booleans(),
    ),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sampling_kwargs)
def test_fuzzed_sampling_params_are_refused_or_run(llm, kwargs):
    """SamplingParams either refuses its arguments or the request runs to the end: nothing fails mid-generate."""
    try:
        params = SamplingParams(**kwargs)
    except (TypeError, ValueError):
        return
    outputs = llm.generate({"prompt_token_ids": [7, 8, 9]}, params, use_tqdm=False)
    assert outputs[0].finished and len(outputs[0].outputs) == params.n
    for completion in outputs[0].outputs:
        assert 1 <= len(completion.token_ids) <= min(params.max_tokens, llm.max_model_len - 3)
        assert all(0 <= t < 512 for t in completion.token_ids)
