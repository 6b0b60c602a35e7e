"""vLLM's offline examples (basic, chat, logprobs, structured outputs), written the way vLLM's docs write them,
run with only the import changed (vllm -> minivllm) and the model pointed at a tiny local checkpoint."""

import pytest

BASIC = '''
from minivllm import LLM, SamplingParams

prompts = ["Hello, my name is", "The president of the United States is", "The capital of France is",
           "The future of AI is"]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
llm = LLM(model=MODEL)
outputs = llm.generate(prompts, sampling_params)
for output in outputs:
    print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")
RESULT = outputs
'''

CHAT = '''
from minivllm import LLM, SamplingParams

llm = LLM(model=MODEL)
sampling_params = SamplingParams(temperature=0.5)
conversation = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hello! How can I assist you today?"},
    {"role": "user", "content": "Write an essay about the importance of higher education."},
]
outputs = llm.chat(conversation, sampling_params, use_tqdm=False)
conversations = [conversation for _ in range(3)]
outputs += llm.chat(conversations, sampling_params, use_tqdm=True)
for output in outputs:
    print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")
RESULT = outputs
'''

LOGPROBS = '''
from minivllm import LLM, SamplingParams

llm = LLM(model=MODEL)
sampling_params = SamplingParams(max_tokens=8, logprobs=5, prompt_logprobs=2, temperature=0)
outputs = llm.generate(["The capital of France is"], sampling_params)
for output in outputs:
    for position in output.prompt_logprobs[1:]:
        print({token_id: (lp.decoded_token, lp.logprob, lp.rank) for token_id, lp in position.items()})
    for token_id, position in zip(output.outputs[0].token_ids, output.outputs[0].logprobs):
        print(position[token_id].decoded_token, position[token_id].logprob)
    print("cumulative", output.outputs[0].cumulative_logprob)
RESULT = outputs
'''

STRUCTURED = '''
from pydantic import BaseModel

from minivllm import LLM, SamplingParams
from minivllm.sampling_params import StructuredOutputsParams

llm = LLM(model=MODEL, max_model_len=256)

choice = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["Positive", "Negative"]))
regex = SamplingParams(structured_outputs=StructuredOutputsParams(regex=r"\\w+@\\w+\\.com\\n"), stop=["\\n"])


class CarDescription(BaseModel):
    brand: str
    model: str


json_schema = CarDescription.model_json_schema()
json = SamplingParams(structured_outputs=StructuredOutputsParams(json=json_schema), max_tokens=64)
grammar = SamplingParams(structured_outputs=StructuredOutputsParams(grammar='root ::= ("SELECT" | "select") " x"'))
RESULT = [llm.generate("Classify this sentiment: minivllm is wonderful!", choice)[0],
          llm.generate("Generate an example email address for Alan Turing:", regex)[0],
          llm.generate("Generate a JSON with the brand and model of a car:", json)[0],
          llm.generate("Write a SQL query:", grammar)[0]]
for output in RESULT:
    print(output.outputs[0].text)
'''


def run(example: str, model: str) -> list:
    namespace = {"MODEL": model}
    exec(compile(example, "<vllm example>", "exec"), namespace)
    return namespace["RESULT"]


@pytest.mark.parametrize("name", ["basic", "chat", "logprobs"])
def test_vllm_example_runs_with_the_import_changed(tokenizer_model_dir, name):
    outputs = run({"basic": BASIC, "chat": CHAT, "logprobs": LOGPROBS}[name], tokenizer_model_dir)
    assert outputs and all(out.finished and out.outputs[0].token_ids for out in outputs)
    if name == "logprobs":
        assert len(outputs[0].outputs[0].logprobs) == 8 and outputs[0].prompt_logprobs[0] is None


def test_vllm_structured_outputs_example_conforms(tokenizer_model_dir):
    import json
    import re

    choice, regex, car, sql = (out.outputs[0] for out in run(STRUCTURED, tokenizer_model_dir))
    assert choice.text in ("Positive", "Negative")
    assert regex.finish_reason == "length" or re.fullmatch(r"\w+@\w+\.com", regex.text)
    assert car.finish_reason == "length" or set(json.loads(car.text)) == {"brand", "model"}
    assert sql.text in ("SELECT x", "select x")
