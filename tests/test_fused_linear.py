"""The fused small-M products on the CPU: their references give the unfused layers' numbers bit for bit (fp32 and
bf16), the decoder's fused wiring (forced on the CPU, where it runs those references) gives the unfused decoder's
hidden states bit for bit, and the decoder leaves the CPU, tensor parallelism and tp_invariant on the unfused
path."""

import pytest
import torch

from minivllm import ops
from minivllm.distributed import TensorParallel
from minivllm.layers.attention import AttentionMetadata
from minivllm.layers.linear import ColumnParallelLinear, RowParallelLinear, Split
from minivllm.layers.norm import RMSNorm
from minivllm.models.decoder import DecoderLayer, DecoderModel
from tests.conftest import LLM, write_checkpoint

DTYPES = [torch.float32, torch.bfloat16]


def layers(dtype: torch.dtype, hidden: int = 64, out: int = 48, seed: int = 0):
    """An RMSNorm with a random weight and a column- and a row-parallel linear with biases, in dtype."""
    torch.manual_seed(seed)
    norm = RMSNorm(hidden, 1e-6)
    column = ColumnParallelLinear(hidden, [out, out], True, [Split(), Split()])
    row = RowParallelLinear(out, hidden, True, TensorParallel())
    for module in (norm, column, row):
        for param in module.parameters():
            param.data.normal_(1.0 if param is norm.weight else 0.0, 0.3)
    return norm.to(dtype), column.to(dtype), row.to(dtype)


def stream(tokens: int, hidden: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's input x (model dtype) and the fp32 residual before it."""
    return torch.randn(tokens, hidden).to(dtype) * 2, torch.randn(tokens, hidden) * 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_linear_is_the_norm_then_the_product(dtype):
    norm, column, _ = layers(dtype)
    x, residual = stream(5, 64, dtype)
    normed, new_residual = norm(x, residual)
    fused = ops.norm_linear(new_residual, norm.weight, norm.eps, column.weight, column.bias)
    assert torch.equal(fused, column(normed))


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_gate_up_silu_is_the_mlp_front(dtype):
    norm, column, _ = layers(dtype)
    x, residual = stream(3, 64, dtype)
    normed, new_residual = norm(x, residual)
    fused = ops.norm_gate_up_silu(new_residual, norm.weight, norm.eps, column.weight, column.bias)
    assert fused.shape == (3, 48) and torch.equal(fused, ops.silu_and_mul(column(normed)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_add_residual_is_the_product_then_the_add(dtype):
    """The unfused path rounds the product to the model's dtype, then the next norm adds it to the residual."""
    norm, _, row = layers(dtype)
    x, residual = torch.randn(4, 48).to(dtype), torch.randn(4, 64) * 3
    _, expected = norm(row(x), residual)
    fused = ops.linear_add_residual(x, row.weight, residual, row.bias)
    assert fused.dtype == torch.float32 and torch.equal(fused, expected)


def test_the_cpu_never_takes_the_kernel():
    weight = torch.randn(64, 64).bfloat16()
    assert not ops.small_m_weights_fit(4, torch.device("cpu"), weight, None, ops.SMALL_M_FUSED_MAX_OUTPUTS)


FUSED_FAMILIES = [
    ("qwen3", {}),
    ("qwen2", {}),  # bias on q/k/v
    ("llama", {"attention_bias": True, "mlp_bias": True}),  # bias on every product
]


@pytest.fixture(scope="module", params=FUSED_FAMILIES, ids=[f for f, _ in FUSED_FAMILIES])
def checkpoint(request, tmp_path_factory) -> str:
    family, overrides = request.param
    path, _ = write_checkpoint(tmp_path_factory.mktemp(family), family, seed=3, **overrides)
    return path


def hidden_states(path: str, dtype: str, fused: bool, monkeypatch) -> torch.Tensor:
    """The model's hidden states over a 12-token prompt, with runs_fused forced either way."""
    with monkeypatch.context() as patch:
        patch.setattr(DecoderModel, "runs_fused", lambda self, x: fused)
        llm = LLM(path, dtype=dtype, max_model_len=64, num_kv_blocks=8)
        model = llm.llm_engine.runner.model
        ids = torch.randint(2, 512, (12,), generator=torch.Generator().manual_seed(0))
        cu = torch.tensor([0, 12], dtype=torch.int32)
        meta = AttentionMetadata(True, torch.full_like(ids, -1), cu, cu, 12, 12)
        with torch.inference_mode():
            return model(ids, torch.arange(12), meta)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_wiring_matches_the_unfused_decoder(checkpoint, dtype, monkeypatch):
    """fused_forward through the references is the unfused decoder, bit for bit: every norm, residual add and
    bias in its place (a norm weight or residual taken from the wrong layer, or a bias dropped, changes the bits)."""
    fused = hidden_states(checkpoint, dtype, True, monkeypatch)
    unfused = hidden_states(checkpoint, dtype, False, monkeypatch)
    assert unfused.abs().max() > 0.1
    assert torch.equal(fused, unfused)


@pytest.mark.parametrize("tp, fused", [
    (TensorParallel(), True),
    (TensorParallel(rank=0, size=2), False),  # the row-parallel all-reduce would add the residual twice
    (TensorParallel(invariant_splits=2), False),  # tp_invariant's fixed K-slice tree
])
def test_runs_fused_only_on_one_gpu_without_tp_invariant(llm, tp, fused, monkeypatch):
    """With the kernels taking every product (as on a GPU), the fused path still needs a single rank."""
    monkeypatch.setattr(DecoderLayer, "fused_products_fit", lambda self, num_tokens, device: True)
    model = llm.llm_engine.runner.model.model
    monkeypatch.setattr(model, "tp", tp)
    assert model.runs_fused(torch.zeros(4, 64)) is fused


def test_the_cpu_decoder_stays_unfused(llm):
    model = llm.llm_engine.runner.model.model
    assert not model.runs_fused(torch.zeros(1, 64))


@pytest.mark.parametrize("mode, rows, chosen", [
    ("auto", 1, True),  # one sequence: where it is measured faster
    ("auto", 2, False),
    ("1", 8, True),
    ("1", 9, False),  # beyond the kernel's 8 rows
    ("0", 1, False),
])
def test_runs_decode_layers_by_mode_and_rows(llm, mode, rows, chosen, monkeypatch):
    """With the kernel taking the layers (as on an sm_90 GPU), MINIVLLM_DECODE_LAYERS's mode and the step's rows
    decide; a prefill never runs it, nor more than one rank."""
    monkeypatch.setattr(DecoderLayer, "decode_layers_fit", lambda self: True)
    model = llm.llm_engine.runner.model.model
    monkeypatch.setattr(model, "decode_layers_inputs", lambda: (torch.zeros(1), torch.zeros(1)))
    monkeypatch.setattr(ops, "DECODE_LAYERS", mode)
    decode, prefill = AttentionMetadata(False, torch.zeros(rows)), AttentionMetadata(True, torch.zeros(rows))
    assert model.runs_decode_layers(torch.zeros(rows, 64), decode) is chosen
    assert not model.runs_decode_layers(torch.zeros(rows, 64), prefill)
    monkeypatch.setattr(model, "tp", TensorParallel(rank=0, size=2))
    assert not model.runs_decode_layers(torch.zeros(rows, 64), decode)


def test_the_cpu_decoder_never_runs_decode_layers(llm):
    model = llm.llm_engine.runner.model.model
    assert not model.runs_decode_layers(torch.zeros(1, 64), AttentionMetadata(False, torch.zeros(1)))
