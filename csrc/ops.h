// The C++ entry points of minivllm's kernels. Schemas are registered in torch_bindings.cpp;
// each function lives in the .cu file of its kernel family.
#pragma once

#include <optional>
#include <tuple>

// Only tensors and allocation: <torch/all.h> would make nvcc parse torch's whole C++ frontend once per GPU
// arch for every .cu file, which dominated the build time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

namespace torch {  // the names <torch/types.h> would give, without the C++ frontend around it
using namespace at;
constexpr auto kInt32 = at::kInt;
constexpr auto kInt64 = at::kLong;
constexpr auto kFloat32 = at::kFloat;
}  // namespace torch
// key/value [T, Hkv, D] -> k_cache/v_cache [num_blocks, block_size, Hkv, D] at slot_mapping[T] (int64,
// a slot < 0 is skipped).
void reshape_and_cache(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& k_cache,
                       torch::Tensor& v_cache, const torch::Tensor& slot_mapping);

// In place on the fused qkv projection output [T, (num_heads + 2 * num_kv_heads) * D]: per-head RMSNorm of q
// and k (when their weights are given), neox rotary embedding from the fp32 cos/sin tables [max_position, D]
// at positions[T] (int64); then k and v into the caches as reshape_and_cache does (skipped for empty caches).
void qk_norm_rope_cache(torch::Tensor& qkv, const torch::Tensor& positions, const torch::Tensor& cos,
                        const torch::Tensor& sin, const std::optional<torch::Tensor>& q_weight,
                        const std::optional<torch::Tensor>& k_weight, double eps, torch::Tensor& k_cache,
                        torch::Tensor& v_cache, const torch::Tensor& slot_mapping, int64_t num_heads,
                        int64_t num_kv_heads);

// out[M, N] = x[M, K] @ weight[N, K]^T (+ bias[N]) for decode's few rows, 1 <= M <= 16; fp16/bf16 with fp32
// accumulation, out in the weight's dtype or, with fp32_out, in fp32. Fusions (see small_m_linear.cu):
// norm_weight [K]: x is rms_norm(x, norm_weight, eps) first (x may then be fp32); residual [M, N] fp32 (needs
// fp32_out): out = product + residual; silu_gate: weight = [gate; up] [2I, K], out [M, I] = silu(gate) * up.
torch::Tensor small_m_linear(const torch::Tensor& x, const torch::Tensor& weight,
                             const std::optional<torch::Tensor>& bias, bool fp32_out,
                             const std::optional<torch::Tensor>& norm_weight, double eps,
                             const std::optional<torch::Tensor>& residual, bool silu_gate);

// The elementwise ops between the products (norm_act.cu), over rows [T, N] with N % 8 == 0, in 16-byte chunks.
// rms_norm: x fp32, fp16 or bf16, out in the weight's (fp16 or bf16) dtype. add_rms_norm: residual (fp32,
// contiguous) += x in place, then out = rms_norm(residual). silu_and_mul: gate_up [T, 2I] -> silu(gate) * up [T, I].
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor add_rms_norm(const torch::Tensor& x, torch::Tensor& residual, const torch::Tensor& weight, double eps);
torch::Tensor silu_and_mul(const torch::Tensor& gate_up);

// Packed variable-length attention; with block_table, k and v are the paged caches. With out (q's shape and
// dtype), the result is written there and out is returned.
torch::Tensor flash_attn_varlen(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                const torch::Tensor& cu_seqlens_q, const torch::Tensor& cu_seqlens_k,
                                int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal,
                                const std::optional<torch::Tensor>& block_table,
                                const std::optional<torch::Tensor>& out);

// Whether flash_attn_varlen can run its sm_90a (TMA + wgmma) kernel on the current device: the build holds
// sm_90a code and the GPU is sm_90. It then runs unless MINIVLLM_PREFILL_SM90=0.
bool flash_prefill_sm90_available();

// One query token per sequence against its paged context. total_context_len, the sum of context_lens on
// the device, only sizes the context splits; when absent, it is computed here.
torch::Tensor paged_attention_decode(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, double scale,
                                     const std::optional<torch::Tensor>& total_context_len,
                                     std::optional<int64_t> split_kv_heads);

// The naive prefill kernel (attention/naive_prefill.cu) is a baseline for benchmarks and tests, not used by
// the engine: causal, packed k and v, one row of fp32 scores per (query, head) in a global scratch.
torch::Tensor naive_attention_varlen(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                     const torch::Tensor& cu_seqlens_q, const torch::Tensor& cu_seqlens_k,
                                     int64_t max_seqlen_q, int64_t max_seqlen_k, double scale);

// The sampler's row reductions over fp32 logits [B, V] (sampler.cu). sampler_gumbel_argmax: each row's token
// (int64 [B]), argmax over v of penalized(logits) / max(temperatures, 1e-5) - log(noise) with the first index
// on ties, the penalties (output_counts int32 and in_prompt bool [num_slots, V] at slots[B] int64; presence,
// frequency, repetition fp32 [B]) all given or none, as layers/penalties.py's penalized().
// sampler_logsumexp_rank: each row's fp32 log-sum-exp and the count (int64) of its logits above
// logits[b, tokens[b]].
torch::Tensor sampler_gumbel_argmax(const torch::Tensor& logits, const torch::Tensor& noise,
                                    const torch::Tensor& temperatures,
                                    const std::optional<torch::Tensor>& output_counts,
                                    const std::optional<torch::Tensor>& in_prompt,
                                    const std::optional<torch::Tensor>& slots,
                                    const std::optional<torch::Tensor>& presence,
                                    const std::optional<torch::Tensor>& frequency,
                                    const std::optional<torch::Tensor>& repetition);
std::tuple<torch::Tensor, torch::Tensor> sampler_logsumexp_rank(const torch::Tensor& logits,
                                                                const torch::Tensor& tokens);

// Every decoder layer of a decode step of 1..8 sequences in one persistent kernel (decode_layers.cu; sm_90 and
// later): residual [M, hidden] fp32 goes in as the embeddings and comes out as the stream after the last layer;
// this step's K/V go into each layer's cache. layers [num_layers, 10] int64 holds each layer's device pointers:
// input norm, qkv, q norm, k norm (0: none), o, post-attention norm, gate_up, down weights, k cache, v cache, all
// contiguous in kv_cache's dtype; kv_cache [2, num_layers, blocks, block_size, kv_heads, 128] is every layer's
// cache as one tensor (the engine's), whose views the table's cache pointers are. The caller checks the weights'
// shapes; the kernel checks everything else. timings (int64, [SMs, num_layers, 5, 7], optionally followed by
// [SMs, 4096, 5]), if given, gets each CTA's global-timer stamps of each stage, and in the second part those of its
// first 4096 ring slots (see decode_layers.cu).
void decode_layers(torch::Tensor& residual, const torch::Tensor& layers, const torch::Tensor& kv_cache,
                   const torch::Tensor& positions, const torch::Tensor& slot_mapping,
                   const torch::Tensor& context_lens, const torch::Tensor& block_tables, const torch::Tensor& cos,
                   const torch::Tensor& sin, int64_t num_heads, int64_t intermediate, double eps, double scale,
                   const std::optional<torch::Tensor>& timings);

// Whether decode_layers runs on the current device (sm_90 or later).
bool decode_layers_available();
