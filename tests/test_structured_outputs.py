"""Structured outputs: grammars as token masks over the real Qwen3 vocabulary, with no model.

A random "model" (fresh standard-normal logits every step, sampled at temperature 1.0) is steered only by the
bitmask, so whatever it writes that conforms does so because of the mask: without the mask it would almost
never even sample a stop token (2 of 151936).
"""

import ast
import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from minivllm.presets import qwen3_tokenizer_dir
from minivllm.structured_outputs import (
    GrammarCompiler,
    GrammarMatcher,
    StructuredOutputsParams,
    allocate_bitmask,
    apply_bitmask,
)

MODEL_VOCAB = 151936  # Qwen3's logits width; the tokenizer has 151669 ids
STOP_IDS = [151643, 151645]  # <|endoftext|>, <|im_end|>
SEEDS = range(4)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(qwen3_tokenizer_dir())


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, MODEL_VOCAB, stop_token_ids=STOP_IDS)


def allowed_ids(bitmask: torch.Tensor, row: int) -> set[int]:
    bits = (bitmask[row].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.flatten().nonzero().flatten().tolist())


def sample(compiler, tokenizer, params, seed, max_tokens=200) -> tuple[str | None, list[int]]:
    """Random logits, masked, sampled at temperature 1 until the matcher terminates: (text, ids), text None
    when max_tokens came first."""
    matcher = GrammarMatcher(compiler.compile(params))
    bitmask = allocate_bitmask(1, MODEL_VOCAB)
    generator = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(max_tokens):
        matcher.fill_bitmask(bitmask, 0)
        logits = torch.randn(1, MODEL_VOCAB, generator=generator)
        apply_bitmask(logits, bitmask)
        token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).item()
        assert matcher.accept(token), f"a token the mask allowed was refused: {token}"
        ids.append(token)
        if matcher.is_terminated():
            assert ids[-1] in STOP_IDS  # terminated by sampling a stop token, which is not part of the text
            return tokenizer.decode(ids[:-1]), ids
    return None, ids


# ----- conformance under random sampling ----------------------------------------------------------------------
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
    },
    "required": ["name", "age", "member", "tags"],
}


def check_schema(value, schema) -> None:
    """The subset of JSON Schema SCHEMA uses."""
    if "enum" in schema:
        assert value in schema["enum"]
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict)
        assert set(schema["required"]) <= set(value) <= set(schema["properties"])
        for key, item in value.items():
            check_schema(item, schema["properties"][key])
    elif kind == "array":
        assert isinstance(value, list) and len(value) <= schema["maxItems"]
        for item in value:
            check_schema(item, schema["items"])
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema["maxLength"]
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool)
        assert schema["minimum"] <= value <= schema["maximum"]
    elif kind == "boolean":
        assert isinstance(value, bool)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("as_text", [False, True])
def test_json_schema_conforms(compiler, tokenizer, seed, as_text):
    schema = json.dumps(SCHEMA) if as_text else SCHEMA
    # Any whitespace would let a random model write whitespace without end.
    text, _ = sample(compiler, tokenizer, StructuredOutputsParams(json=schema, disable_any_whitespace=True), seed)
    assert text is not None, "did not finish within max_tokens"
    value = json.loads(text)
    check_schema(value, SCHEMA)
    assert list(value) == list(SCHEMA["properties"])  # the schema's order, as xgrammar generates it


def test_json_schema_any_whitespace_by_default(compiler, tokenizer):
    """vLLM's default allows whitespace between JSON tokens; disable_any_whitespace takes it away."""
    space = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    bitmask = allocate_bitmask(1, MODEL_VOCAB)
    for disable, newline_allowed in ((False, True), (True, False)):
        matcher = GrammarMatcher(compiler.compile(StructuredOutputsParams(json=space, disable_any_whitespace=disable)))
        assert matcher.accept(tokenizer.convert_tokens_to_ids("{"))
        matcher.fill_bitmask(bitmask, 0)
        assert (tokenizer.convert_tokens_to_ids("Ċ") in allowed_ids(bitmask, 0)) == newline_allowed  # "\n"


REGEXES = [r"[a-z]{1,6}@[a-z]{1,5}\.(com|org)", r"\d{3}-\d{4}", r"(cat|dog)s? [A-Z][a-z]{0,4}!?"]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("regex", REGEXES)
def test_regex_conforms(compiler, tokenizer, seed, regex):
    text, _ = sample(compiler, tokenizer, StructuredOutputsParams(regex=regex), seed)
    assert text is not None and re.fullmatch(regex, text), text


CHOICES = ["yes", "yes!", "no", 'say "hi"', "back\\slash", "two\nlines", "café"]


@pytest.mark.parametrize("seed", range(8))
def test_choice_conforms(compiler, tokenizer, seed):
    text, _ = sample(compiler, tokenizer, StructuredOutputsParams(choice=CHOICES), seed)
    assert text in CHOICES


# Arithmetic with one level of parentheses: the random walk of a grammar that nests without bound need not end.
ARITHMETIC = r"""
root ::= expr
expr ::= atom (op atom)*
atom ::= number | "(" number (op number)* ")"
op ::= "+" | "-" | "*" | "/"
number ::= "0" | [1-9] [0-9]*
"""


def check_arithmetic(text: str) -> None:
    """Integers joined by + - * /, with parentheses nested at most once (a tiny parser: Python's)."""
    def check(node: ast.expr) -> None:
        if isinstance(node, ast.Constant):
            assert type(node.value) is int
        else:
            assert isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div)
            check(node.left)
            check(node.right)

    assert re.fullmatch(r"[0-9+\-*/]*(\([0-9+\-*/]+\)[0-9+\-*/]*)*", text), text  # no nesting, no spaces
    check(ast.parse(text, mode="eval").body)  # well-formed, and no leading zeros


@pytest.mark.parametrize("seed", SEEDS)
def test_grammar_conforms(compiler, tokenizer, seed):
    text, _ = sample(compiler, tokenizer, StructuredOutputsParams(grammar=ARITHMETIC), seed)
    assert text is not None, "did not finish within max_tokens"
    check_arithmetic(text)


def test_json_object_conforms(compiler, tokenizer):
    """Any JSON object: a random walk often never closes its first string, so only the finished ones are
    checked, and at least two must finish."""
    finished = []
    for seed in range(8):
        text, _ = sample(compiler, tokenizer, StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
                         seed, max_tokens=120)
        if text is not None:
            assert isinstance(json.loads(text), dict), text
            finished.append(text)
    assert len(finished) >= 2


def test_json_object_starts_with_a_brace(compiler, tokenizer):
    matcher = GrammarMatcher(compiler.compile(StructuredOutputsParams(json_object=True)))
    bitmask = allocate_bitmask(1, MODEL_VOCAB)
    matcher.fill_bitmask(bitmask, 0)
    first = [tokenizer.decode([i]) for i in allowed_ids(bitmask, 0)]
    assert first and all(text.startswith("{") for text in first)
    assert not matcher.accept(tokenizer.encode("[")[0])  # an array is JSON but not an object


# ----- the matcher: stop tokens, refusals, termination ---------------------------------------------------------
def test_stop_tokens_allowed_exactly_when_the_grammar_can_end(compiler, tokenizer):
    matcher = GrammarMatcher(compiler.compile(StructuredOutputsParams(regex=r"[0-9]{3}(px)?")))
    bitmask = allocate_bitmask(1, MODEL_VOCAB)
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "123"]
    for i, token in enumerate([*digits, tokenizer.convert_tokens_to_ids("px")]):
        matcher.fill_bitmask(bitmask, 0)
        allowed = allowed_ids(bitmask, 0)
        assert (allowed & set(STOP_IDS)) == (set(STOP_IDS) if i == 3 else set()), i  # complete after "123"
        assert token in allowed
        assert matcher.accept(token)
        assert not matcher.is_terminated()
    matcher.fill_bitmask(bitmask, 0)
    assert allowed_ids(bitmask, 0) == set(STOP_IDS)  # "123px": complete, and nothing may follow
    assert matcher.accept(STOP_IDS[1]) and matcher.is_terminated()


def test_refused_token_leaves_the_state(compiler, tokenizer):
    matcher = GrammarMatcher(compiler.compile(StructuredOutputsParams(choice=["alpha", "beta"])))
    assert not matcher.accept(tokenizer.encode("gamma")[0])
    assert not matcher.accept(MODEL_VOCAB - 1)  # a padding id of the model, beyond the tokenizer
    assert not matcher.accept(STOP_IDS[0])  # the grammar cannot end yet
    for token in tokenizer.encode("beta"):
        assert matcher.accept(token)
    assert matcher.accept(STOP_IDS[0]) and matcher.is_terminated()


def test_terminated_matcher_allows_only_stop_tokens(compiler, tokenizer):
    matcher = GrammarMatcher(compiler.compile(StructuredOutputsParams(choice=["ok"])))
    for token in [*tokenizer.encode("ok"), STOP_IDS[1]]:
        assert matcher.accept(token)
    assert matcher.is_terminated()
    assert not matcher.accept(STOP_IDS[1])
    bitmask = allocate_bitmask(2, MODEL_VOCAB)
    matcher.fill_bitmask(bitmask, 1)
    assert allowed_ids(bitmask, 1) == set(STOP_IDS)
    assert (bitmask[0] == -1).all()  # other rows untouched


def test_padding_ids_never_allowed(compiler):
    """The model's vocabulary is wider than the tokenizer's: those ids have no text and are always masked."""
    matcher = GrammarMatcher(compiler.compile(StructuredOutputsParams(regex=r"(.|\n)*")))
    bitmask = allocate_bitmask(1, MODEL_VOCAB)
    matcher.fill_bitmask(bitmask, 0)
    allowed = allowed_ids(bitmask, 0)
    assert len(allowed) > 100_000 and max(allowed) < 151669


# ----- the bitmask -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [None, [0, 2]])
def test_apply_bitmask_matches_reference(dtype, rows):
    vocab = 1000  # not a multiple of 32
    generator = torch.Generator().manual_seed(0)
    bitmask = allocate_bitmask(5, vocab)  # more rows than the batch: a buffer sized for the largest batch
    bitmask.copy_(torch.randint(-2**31, 2**31, bitmask.shape, generator=generator, dtype=torch.int64).int())
    logits = torch.randn(3, vocab, generator=generator).to(dtype)
    expected = logits.clone()
    for row in rows if rows is not None else range(3):
        masked = [j for j in range(vocab) if not (int(bitmask[row, j // 32]) >> (j % 32)) & 1]
        expected[row, masked] = float("-inf")
    apply_bitmask(logits, bitmask, rows)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    apply_bitmask(logits, bitmask, [])  # nothing to mask
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_apply_bitmask_refuses_a_narrow_bitmask():
    with pytest.raises(ValueError, match="covers 64 tokens"):
        apply_bitmask(torch.zeros(1, 100), allocate_bitmask(1, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_bitmask_cuda_matches_cpu():
    generator = torch.Generator().manual_seed(0)
    bitmask = allocate_bitmask(4, MODEL_VOCAB)
    bitmask.copy_(torch.randint(-2**31, 2**31, bitmask.shape, generator=generator, dtype=torch.int64).int())
    logits = torch.randn(4, MODEL_VOCAB, generator=generator).bfloat16()
    on_gpu = logits.cuda()
    apply_bitmask(logits, bitmask, [1, 3])
    apply_bitmask(on_gpu, bitmask, [1, 3])
    torch.testing.assert_close(on_gpu.cpu(), logits, rtol=0, atol=0)


# ----- errors and the cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one of json, regex, choice, grammar, json_object; got none"),
    ({"json_object": False}, "got none"),
    ({"regex": "a", "choice": ["a"]}, "got regex, choice"),
    ({"json": {}, "json_object": True}, "got json, json_object"),
    ({"choice": []}, "at least one string"),
])
def test_params_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"regex": 5}, "regex must be a str, not int"),
    ({"grammar": ["root ::= x"]}, "grammar must be a str, not list"),
    ({"json": ["type"]}, "json must be a JSON schema as a dict or str, not list"),
    ({"choice": "yes"}, "choice must be a list of str"),
    ({"choice": ["yes", 1]}, "choice must be a list of str"),
    ({"json_object": "yes"}, "json_object must be a bool, not str"),
    ({"regex": "a", "disable_any_whitespace": 1}, "disable_any_whitespace must be a bool"),
])
def test_params_type_errors(kwargs, match):
    with pytest.raises(TypeError, match=match):
        StructuredOutputsParams(**kwargs)


@pytest.mark.parametrize("params, match", [
    (StructuredOutputsParams(json={"type": "nope"}), r'cannot compile the JSON schema: Unsupported type "nope"'),
    (StructuredOutputsParams(json='{"type": "object"'), "the JSON schema is not valid JSON"),
    (StructuredOutputsParams(regex="([a-z]+"), r"cannot compile the regex: .*position"),
    (StructuredOutputsParams(grammar='root ::= "a" digit'), r'the grammar: .*Rule "digit" is not defined'),
    (StructuredOutputsParams(grammar="start ::= [a-z]+"), 'cannot compile the grammar: .*root rule'),
])
def test_uncompilable_is_a_value_error(compiler, params, match):
    with pytest.raises(ValueError, match=match) as error:
        compiler.compile(params)
    assert not str(error.value).split(": ", 1)[1].startswith("["), "xgrammar's log prefix leaked into the message"


def test_changed_params_are_checked_again(compiler):
    params = StructuredOutputsParams(regex="a+")
    params.choice = ["a"]
    with pytest.raises(ValueError, match="got regex, choice"):
        compiler.compile(params)


def test_identical_params_compile_once(tokenizer):
    compiler = GrammarCompiler(tokenizer, MODEL_VOCAB)
    first = compiler.compile(StructuredOutputsParams(json=SCHEMA))
    assert compiler.compile(StructuredOutputsParams(json=json.loads(json.dumps(SCHEMA)))) is first
    assert compiler.compile(StructuredOutputsParams(json=json.dumps(SCHEMA, indent=2))) is first
    assert compiler.compile(StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)) is not first
    regex = compiler.compile(StructuredOutputsParams(regex="a+"))
    assert compiler.compile(StructuredOutputsParams(regex="a+")) is regex
    info = compiler.cache_info()
    assert (info.misses, info.hits) == (3, 3)
