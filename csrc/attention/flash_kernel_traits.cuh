// Tile shapes of the flash prefill kernel, one type per (element type, head dim).
#pragma once

namespace minivllm::flash {

// Query rows per CTA, shared by every instantiation: the host sizes the grid from it.
constexpr int kFlashPrefillBlockM = 128;

// Shared-memory tile layouts. Both let the 8 consecutive rows an ldmatrix phase (or the 8 lanes of a
// cp.async phase) touch at one chunk index fall in 8 different 16-byte bank groups.
//  - kPaddedRows: rows padded by one 16-byte chunk. The offset is linear in row and chunk, so every fragment
//    address of the unrolled loops is one per-lane base plus an immediate. The XOR'd addresses of a swizzle
//    pin ~24 registers, and at D=128 (255 registers) the kernel spilled with them: 132 spilled bytes with the
//    swizzle, 20 with padding (ptxas, sm_90).
//  - kSwizzledRows: unpadded rows, chunk XOR (row % 8). 6 KB less shared memory: at D=128 the padded tiles
//    need 102 KB a CTA, more than sm_86/sm_89 give a block (99 KB), so those GPUs run this layout.
enum class TileLayout { kPaddedRows, kSwizzledRows };

// A CTA computes kBlockM query rows of one head, walking the keys kBlockN at a time. Each warp owns
// kRowTilesPerWarp tiles of 16 rows: every K/V fragment a warp reads from shared memory with ldmatrix then
// feeds that many mma's, and shared-memory bandwidth (128 B/clk/SM), not the tensor cores, is what a
// 16-row warp runs out of first. kBlockM = 128 lets each K/V tile brought into shared memory serve 128
// queries (half the L2 traffic of 64); kBlockN = 64 keeps the score tile beside the output accumulator in
// registers. K and V tiles are double-buffered; Q stays in shared memory, where it is re-read each tile,
// and its tile is reused to stage the output.
template <typename T, int D, TileLayout kLayout = TileLayout::kPaddedRows>
struct FlashPrefillTraits {
  static_assert(D == 64 || D == 128, "flash prefill supports head_dim 64 and 128");
  using Element = T;
  static constexpr int kHeadDim = D;
  static constexpr int kBlockM = kFlashPrefillBlockM;
  static constexpr int kBlockN = 64;
  static constexpr int kRowTilesPerWarp = 2;
  static constexpr int kWarps = kBlockM / (16 * kRowTilesPerWarp);
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = 2;
  // Two CTAs an SM, so one CTA's barrier wait is covered by the other's work.
  static constexpr int kMinBlocksPerSM = 2;
  static constexpr int kChunksPerRow = D / 8;  // 16-byte chunks in a tile row
  static constexpr int kSmemRowStride = kLayout == TileLayout::kPaddedRows ? D + 8 : D;  // elements
  static constexpr int kSmemQ = kBlockM * kSmemRowStride;
  static constexpr int kSmemKV = kBlockN * kSmemRowStride;
  static constexpr int kSmemBytes = (kSmemQ + 2 * kStages * kSmemKV) * static_cast<int>(sizeof(T));

  // Element offset of (row, 16-byte chunk) in a shared-memory tile.
  __device__ __forceinline__ static int tile_offset(int row, int chunk) {
    if constexpr (kLayout == TileLayout::kPaddedRows) return row * kSmemRowStride + chunk * 8;
    return (row * kChunksPerRow + (chunk ^ (row & 7))) * 8;
  }
};

}  // namespace minivllm::flash
