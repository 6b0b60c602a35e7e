// Registers minivllm's ops with the torch dispatcher as torch.ops.minivllm.<name>, which CUDA graphs capture
// like any torch op. They have no fake (meta) implementations, so torch.compile cannot trace through them.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(minivllm, m) {
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping) -> ()");
  m.def(
      "qk_norm_rope_cache(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, Tensor? q_weight, "
      "Tensor? k_weight, float eps, Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot_mapping, int num_heads, "
      "int num_kv_heads) -> ()");
  m.def(
      "small_m_linear(Tensor x, Tensor weight, Tensor? bias, bool fp32_out, Tensor? norm_weight=None, "
      "float eps=0.0, Tensor? residual=None, bool silu_gate=False) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def(
      "flash_attn_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, bool causal, Tensor? block_table, Tensor(a!)? out=None) -> Tensor");
  m.def("flash_prefill_sm90_available() -> bool", &flash_prefill_sm90_available);
  m.def(
      "naive_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale) -> Tensor");
  m.def(
      "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor context_lens, float scale, Tensor? total_context_len=None, int? split_kv_heads=None) -> Tensor");
  m.def(
      "sampler_gumbel_argmax(Tensor logits, Tensor noise, Tensor temperatures, Tensor? output_counts=None, "
      "Tensor? in_prompt=None, Tensor? slots=None, Tensor? presence=None, Tensor? frequency=None, "
      "Tensor? repetition=None) -> Tensor");
  m.def("sampler_logsumexp_rank(Tensor logits, Tensor tokens) -> (Tensor, Tensor)");
  m.def(
      "decode_layers(Tensor(a!) residual, Tensor layers, Tensor(b!) kv_cache, Tensor positions, Tensor slot_mapping, "
      "Tensor context_lens, Tensor block_tables, Tensor cos, Tensor sin, int num_heads, int intermediate, float eps, "
      "float scale, Tensor(c!)? timings=None) -> ()");
  m.def("decode_layers_available() -> bool", &decode_layers_available);
}

TORCH_LIBRARY_IMPL(minivllm, CUDA, m) {
  m.impl("reshape_and_cache", &reshape_and_cache);
  m.impl("qk_norm_rope_cache", &qk_norm_rope_cache);
  m.impl("small_m_linear", &small_m_linear);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("flash_attn_varlen", &flash_attn_varlen);
  m.impl("naive_attention_varlen", &naive_attention_varlen);
  m.impl("paged_attention_decode", &paged_attention_decode);
  m.impl("sampler_gumbel_argmax", &sampler_gumbel_argmax);
  m.impl("sampler_logsumexp_rank", &sampler_logsumexp_rank);
  m.impl("decode_layers", &decode_layers);
}

// An importable module: `import minivllm._C` loads the library and runs the registrations above.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
  return PyModule_Create(&module);
}
