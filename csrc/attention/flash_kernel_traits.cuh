// Tile shapes of the flash prefill kernel, one type per (element type, head dim).
#pragma once

namespace minivllm::flash {

// Query rows per CTA, shared by every instantiation: the host sizes the grid from it.
constexpr int kFlashPrefillBlockM = 128;

// A CTA computes kBlockM query rows of one head, 16 per warp, walking the keys kBlockN at a time.
// kBlockM = 128 (8 warps) lets every K/V tile brought into shared memory serve 128 queries, halving the
// L2 traffic of a 64-row tile; kBlockN = 64 keeps the score tile (32 floats a thread) beside the output
// accumulator in registers. K and V tiles are double-buffered; Q is loaded once into registers and its
// shared-memory tile is reused to stage the output.
template <typename T, int D>
struct FlashPrefillTraits {
  static_assert(D == 64 || D == 128, "flash prefill supports head_dim 64 and 128");
  using Element = T;
  static constexpr int kHeadDim = D;
  static constexpr int kBlockM = kFlashPrefillBlockM;
  static constexpr int kBlockN = 64;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = 2;
  // D=128 needs ~200 registers a thread (64 output, 32 score and 32 query-fragment registers), so one CTA
  // per SM; D=64 fits in 128, so two CTAs share an SM and hide each other's barriers.
  static constexpr int kMinBlocksPerSM = D == 64 ? 2 : 1;
  static constexpr int kChunksPerRow = D / 8;  // 16-byte chunks in a tile row
  static constexpr int kSmemQ = kBlockM * D;
  static constexpr int kSmemKV = kBlockN * D;
  static constexpr int kSmemBytes = (kSmemQ + 2 * kStages * kSmemKV) * static_cast<int>(sizeof(T));
};

}  // namespace minivllm::flash
