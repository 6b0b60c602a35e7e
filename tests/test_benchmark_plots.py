"""The benchmarks' --plot figures, the throughput breakdown's kernel classes and step bins, step_profile's kernel
times, and latency's floor, from small synthetic rows (no GPU)."""

import sys
from types import SimpleNamespace

import pytest
import torch
from matplotlib import image
from torch.autograd import DeviceType

from benchmarks import common, decode, latency, plot, prefill, step_profile, throughput, workload
from benchmarks.step_profile import Window, kernel_kind
from minivllm import SamplingParams
from minivllm.ops import reference
from tests.conftest import LLM, random_prompts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIRST_COLOURS = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C), (0xD6, 0x27, 0x28)]  # tab10's C0..C3


def drawn_colours(path) -> list[int]:
    """A checked PNG's pixel count in each of matplotlib's first four series colours."""
    with open(path, "rb") as f:
        data = f.read()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000
    rgb = torch.from_numpy(image.imread(path)[..., :3].copy()) * 255
    return [int(((rgb - torch.tensor(c)).abs().amax(-1) < 8).sum()) for c in FIRST_COLOURS]


def test_line_chart_draws_each_measured_series(tmp_path):
    path = tmp_path / "lines.png"
    panels = [
        plot.Panel("uniform", "context", {"a": ([512, 1024, 2048], [0.5, None, 0.9]), "never ran": ([512], [None]),
                                          "b": ([512, 1024], [0.1, 0.2])}, logx=True),
        plot.Panel("mixed", "batch", {"a": (["step 100", "step 400"], [0.7, 0.8])}, markers_only=True, logy=True),
    ]
    plot.line_chart(str(path), panels, title="t", gpu="GPU X", baseline="copy 1 GB/s", ylabel="y", ceiling=1.0)
    a, b, unused, _ = drawn_colours(path)
    assert a > 100 and b > 100 and unused == 0  # the all-None series takes no colour (b would take C2)


def test_stacked_bars_draw_every_part(tmp_path):
    path = tmp_path / "bars.png"
    plot.stacked_bars(str(path), ["0..99\nbatch 256", "100..199\nbatch 200"],
                      {"attention": [5.0, 4.0], "matmul": [1.0, 1.0], "rest": [0.5, 0.5], "host wait": [0.2, 1.0]},
                      title="t", gpu="GPU X", baseline="copy 1 GB/s", xlabel="steps", ylabel="ms")
    assert all(count > 100 for count in drawn_colours(path))


def test_benchmark_figures(tmp_path):
    decode_rows = [
        {"block": block, "batch": batch, "context": context, "of copy": 0.5 + 0.1 * i, "x vectorised": 20.0 + i}
        for block in (16, 256) for batch in (1, 64)
        for i, context in enumerate(["512", "8192", "32768", "mixed 128..8k", "workload step 100"])
    ]
    decode_rows[2]["x vectorised"] = None  # not measured there
    decode.draw(str(tmp_path / "decode.png"), decode_rows, "GPU X", 4000.0)
    prefill_rows = [
        {"heads": heads, "batch": label,
         **{f"{key}_tflops": 100.0 * (i + 1) + n / 100 for i, key in enumerate(prefill.METHOD_NAMES)},
         "naive_tflops": None if n > 4096 else 5.0}
        for heads in ("16/8/128", "9/3/64") for n, label in ((1024, "16x1024"), (8192, "2x8192"), (0, "mixed"))
    ]
    prefill.draw(str(tmp_path / "prefill.png"), prefill_rows, "GPU X", 4000.0, "bf16")
    latency_rows = [
        {"graphs": graphs, "context": context, "decode_ms_per_token": (1.0 if graphs else 12.0) + context / 1e4,
         "ttft_ms": 30.0, "batch": batch, "floor_ms": 0.3 + context / 1e5, "of_floor": 0.3}
        for graphs in (True, False) for batch, context in ((1, 128), (1, 1024), (1, 32768), (8, 1024))
    ]
    latency.draw(str(tmp_path / "latency.png"), latency_rows, "GPU X", 4000.0)
    latency.draw(str(tmp_path / "latency_graphs.png"), [r for r in latency_rows if r["graphs"]], "GPU X", 4000.0)
    breakdown = [{"decode steps": "1..79", "batch": "256..230", "attention ms": 5.0, "matmul ms": 1.0, "rest ms": 0.5,
                  "host wait ms": 0.3}]
    throughput.draw(str(tmp_path / "throughput.png"), breakdown, 20000.0, "GPU X", 4000.0)
    for name in ("decode", "prefill", "latency", "latency_graphs", "throughput"):  # four series or more each
        assert all(count > 50 for count in drawn_colours(tmp_path / f"{name}.png")), name


@pytest.mark.parametrize("name, kind", [
    ("void paged_decode_kernel<__nv_bfloat16, 128, 3>(KernelParams<__nv_bfloat16>)", "attention"),
    ("void flash_prefill_kernel<FlashTraits<128, 64, 64, 4, __nv_bfloat16> >(FlashParams)", "attention"),
    ("nvjet_tst_128x64_64x8_2x1_v_bz_coopB_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64_warpgroupsize1x1x1_execute_segment_k_off", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8>(Params)", "matmul"),
    ("void small_m_linear_kernel<__nv_bfloat16, 4>(SmallMParams)", "matmul"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>(Params)", "matmul"),
    ("triton_poi_fused_add_mul_silu_0", "rest"),
    ("void qk_norm_rope_cache_kernel<__nv_bfloat16, 128>(Params)", "rest"),
    ("void reshape_and_cache_kernel<__nv_bfloat16>(...)", "rest"),
    ("Memcpy DtoD (Device -> Device)", "rest"),
    ("void at::native::reduce_kernel<512, 1, ReduceOp<float, ArgMaxOps<float> > >(...)", "rest"),
])
def test_kernel_kind(name, kind):
    assert kernel_kind(name) == kind


def window(first_step: int, batch: int, wall_ms: float, steps: int = 4, prefill: int = 0) -> Window:
    kernels = {"void paged_decode_kernel<bf16>": 4000.0, "nvjet_tst_64x8": 1500.0,
               "void small_m_linear_kernel<1>": 500.0, "triton_poi_fused_mul_0": 800.0,
               "Memcpy HtoD (Pageable -> Device)": 200.0}
    us = {k: v * steps / 4 for k, v in kernels.items()}
    # the small-M product ran inside the kernels before it (a dependent launch): it adds nothing to the busy span
    exposed = {k: 0.0 if "small_m" in k else v for k, v in us.items()}
    times = step_profile.KernelTimes(us, exposed, dict.fromkeys(kernels, steps))
    return Window(first_step, steps, prefill, batch, wall_ms, times)


def test_kernel_times_count_an_overlap_once():
    """A kernel that starts inside the one before it (a dependent launch waiting) is exposed only past its end."""
    def event(name, start, end, device=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))
    events = [event("b", 8.0, 14.0), event("a", 0.0, 10.0), event("host", 0.0, 50.0, DeviceType.CPU),
              event("c", 11.0, 12.0), event("a", 20.0, 25.0)]
    times = step_profile.kernel_times_us(SimpleNamespace(events=lambda: events))
    assert times.us == {"a": 15.0, "b": 6.0, "c": 1.0}
    assert times.exposed_us == {"a": 15.0, "b": 4.0, "c": 0.0}
    assert times.calls == {"a": 2, "b": 1, "c": 1}


def test_breakdown_bins_windows_by_decode_step():
    """Bins of windows by their first step; each kind's ms is its kernels' exposed time (what they add to the busy
    span), so the kinds and the host wait add up to the wall time even where launches overlap."""
    windows = [window(1, 256, 10.0), window(26, 250, 12.0), window(51, 240, 10.0, prefill=1),
               window(101, 200, 9.0), window(126, 180, 7.0, steps=2), window(151, 170, 0.0, steps=0)]
    first, second = throughput.breakdown_rows(windows, bin_steps=100)
    assert first == {"decode steps": "1..54", "batch": "256..240", "profiled steps": 12, "wall ms": 32.0 / 12,
                     "attention ms": 1.0, "matmul ms": 0.375, "rest ms": 0.25, "host wait ms": 32.0 / 12 - 1.625,
                     "prefill steps": 1}
    assert second["decode steps"] == "101..127" and second["batch"] == "200..180"
    assert second["profiled steps"] == 6 and second["wall ms"] == pytest.approx(16.0 / 6)
    assert second["attention ms"] == pytest.approx(1.0) and second["host wait ms"] == pytest.approx(16.0 / 6 - 1.625)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_profile_run_windows(qwen3_dir, monkeypatch):
    """On the CPU engine (no kernels to see): a window starts after the first decode step at or past its start; the
    starts an open window passed give one window at its end; the run's end cuts the last one short."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    llm = LLM(qwen3_dir, max_model_len=128)
    engine = llm.llm_engine
    clock = step_profile.StepClock(engine)
    prompts = random_prompts(3, 5, 20, seed=3)
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * len(prompts)
    windows = step_profile.profile_run(engine, clock, prompts, params, [0, 2, 3, 10, 12, 21], steps=4)
    assert [(w.first_step, w.prefill_steps, w.batch) for w in windows] == [(1, 0, 3), (5, 0, 3), (10, 0, 3),
                                                                         (14, 0, 3), (21, 0, 3)]
    assert [w.decode_steps for w in windows[:4]] == [4, 4, 4, 4] and all(w.wall_ms > 0 for w in windows)
    assert windows[4].decode_steps == clock.decode_steps - 21 < 4
    assert not engine.has_unfinished_requests()


def test_latency_floor():
    # 1 GB of weights and 8 sequences of 1,000 tokens at 100 kB a token: 1.8 GB at 4,000 GB/s
    assert latency.floor_ms(10**9, 10**5, [1000] * 8, 4000.0) == pytest.approx(0.45)
    assert latency.floor_ms(10**9, 10**5, [0], 1000.0) == pytest.approx(1.0)


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_prefill_paged_cache_holds_the_packed_keys(block_size):
    """The paged rows' cache and block table give the reference attention the packed rows' exact output."""
    torch.manual_seed(0)
    lengths = [5, 33, 16, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), h, 8) for h in (4, 2, 2))
    k_cache, v_cache, table = prefill.paged_cache(k, v, lengths, block_size)
    assert table.dtype == torch.int32 and sorted(table[table > 0].tolist()) == sorted(set(table[table > 0].tolist()))
    args = (cu, cu, max(lengths), max(lengths), 8**-0.5, True)
    packed = reference.flash_attn_varlen(q, k, v, *args, None)
    assert torch.equal(reference.flash_attn_varlen(q, k_cache, v_cache, *args, table), packed)


def test_streamed_bytes(llm):
    """The weights and the K/V a token that a decode step reads, from the model's own shapes."""
    config = llm.llm_engine.config.source.config
    weight_bytes, kv_bytes_per_token = workload.streamed_bytes(llm.llm_engine.runner)
    assert weight_bytes == sum(t.numel() * t.element_size() for t in llm.llm_engine.runner.model.parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert kv_bytes_per_token == (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
                                  * torch.get_default_dtype().itemsize)


@pytest.mark.parametrize("module", [decode, throughput, prefill, latency])
def test_plot_without_matplotlib_fails_before_gpu_work(module, monkeypatch, capsys):
    def gpu_work(*args, **kwargs):
        raise AssertionError("GPU work began before the arguments were checked")

    for owner in (module, common):
        for name in ("require_cuda", "copy_bandwidth_gbs"):
            monkeypatch.setattr(owner, name, gpu_work, raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(sys, "argv", [module.__name__, "--plot", "out.png"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def test_plot_path_with_matplotlib():
    assert plot.plot_path("out.png") == "out.png"
