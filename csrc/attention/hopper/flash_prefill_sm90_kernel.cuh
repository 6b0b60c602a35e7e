// FlashAttention forward for sm_90a (H100/H200): TMA loads, wgmma products, a producer warpgroup feeding two
// consumer warpgroups through an mbarrier ring. Same contract as flash_prefill_kernel.cuh: packed varlen
// q, k/v packed or paged through a block table, GQA, causal masks aligned bottom-right, head_dim 64/128,
// fp16/bf16. Written correctness-first (v1); the choices below say what later versions should tune.
//
// Why this shape:
//  - One CTA = 128 query rows of one (sequence, head), the mma.sync kernel's tile, so the host sizes the grid
//    the same way. Rows are split between 2 consumer warpgroups of 64 (wgmma's M): each K/V tile in shared
//    memory then serves 128 queries, as before.
//  - kBlockN = 128 keys a tile: S (64x128 fp32) is 64 registers a consumer thread and O (64xD) 64 at D=128;
//    with P as 32 packed registers that needs the ~232 registers that setmaxnreg moves from the producer.
//    ptxas (CUDA 13.0, every instantiation): 168 registers at launch (the 384-thread cap), 0 bytes spilled;
//    shared memory 230,456 B at D=128 and 115,768 B at D=64, one CTA an SM.
//  - Warpgroup 0 is the producer: one thread issues TMA loads of Q (once) and of K/V tiles into a 3-stage
//    ring; "full" barriers (TMA bytes) and "empty" barriers (all 256 consumer threads arrive after their
//    last wgmma on the stage has completed) guard each stage. TMA computes addresses and bounds in
//    hardware, so the consumers issue no loads at all. Three stages, because a step reads K of one tile and V
//    of the one before (below): the third is the tile loading meanwhile. 3 x (32 KB K + 32 KB V) at D=128
//    plus Q's 32 KB is 224 KB of the 227 an SM has.
//  - Shared-memory tiles use the 128-byte swizzle both TMA (CU_TENSOR_MAP_SWIZZLE_128B) and wgmma (descriptor
//    swizzle mode 1) understand: a tile of D columns is stored as D/64 slabs of [rows][64 elements] (a
//    128-byte row), each slab a TMA box. S = Q K^T reads Q and K K-major; O += P V reads V MN-major (wgmma's
//    transposed B, allowed for 16-bit types), so V needs no transposition anywhere.
//  - P never leaves registers: the fp32 accumulator layout of S, rounded pairwise to T, is exactly the
//    register A operand layout of the next wgmma (as with mma.sync).
//  - Key tiles are walked last to first, as in the mma.sync kernel, so the masked diagonal and edge tiles
//    come first; tiles wholly above the diagonal of the CTA's last row are never loaded.
//  - GQA: query heads of a KV group are adjacent CTAs (heads fastest in blockIdx.x) reading the same K/V tiles
//    through L2, as today. Looping a group's heads inside one CTA would load each tile once; a tuning step.
//  - Packed varlen with one tensor map over all tokens: a tile may run past its sequence into the next one's
//    rows (or past the tensor's end, which TMA zero-fills). Keys past len_k are masked to -inf (weight 0)
//    and their rows of V zeroed in shared memory, so whatever they hold cannot reach O; query rows past
//    len_q are computed and never stored.
//  - Paged k/v: a 4-D map over the cache [blocks, block_size, Hkv, D]; the producer's first warp reads the block
//    table and loads a tile as 128 / block_size boxes (one for block_size >= 128), one per cache block, lane b
//    issuing box b. At block 16 one thread issuing all 32 boxes of a tile ran paged at 0.64..0.89 of packed;
//    lane by lane, 0.82..0.98 (seventh session; one box a lane of 32 was slower again). Boxes wholly past len_k
//    re-read the sequence's last block (an L2 hit), so the table is never read past its row and no box lies
//    wholly outside the map; those rows of V are zeroed like any key past len_k.
//  - Output: normalised in registers, staged through this warpgroup's rows of the Q tile (same swizzle, so
//    the 4-byte writes are conflict-free), then 16-byte stores bounded by the sequence's rows. A TMA store
//    would write the whole box, i.e. the next sequence's rows too.
//  - Overlap, as FA3's: a step issues S = Q K^T of one tile and O += P V of the tile before, then runs the
//    softmax of the first while the second runs on the tensor cores (intra-warpgroup); the two consumer
//    warpgroups take turns to issue through named barriers, so one's softmax overlaps the other's products
//    (ping-pong).
// Not yet (the next sessions): persistent CTAs with a dynamic tile queue (a short sequence's CTA is mostly prologue
// and epilogue, and at 225 KB of shared memory an SM holds one; a static schedule, branch experiment/prefill-next,
// lost 6..25% on long and mixed rows to imbalance, seventh session). Measured and reverted
// (benchmarks/NOTES_prefill.md, sixth and ninth sessions): K and V on full barriers of their own, so that S waits
// for K only; the producer warp's lanes reading a tile's block-table entries at once, before the empty wait;
// paged tiles of small blocks gathered by the whole producer warpgroup with cp.async instead of TMA boxes (slower
// than the boxes on almost every row, with the proxy fence in the consumers, in the producer, or none).
#pragma once

#include <cmath>

#include "attention/flash_kernel_traits.cuh"
#include "attention/flash_params.cuh"
#include "attention/prefill_tile.cuh"
#include "common/ptx.cuh"
#include "common/ptx_sm90.cuh"

namespace minivllm::flash {

// Kernel parameter: the tensor maps must sit in parameter (or constant/global) memory for TMA, hence one
// __grid_constant__ struct.
struct FlashSm90Params {
  CUtensorMap q_map;  // [Tq, Hq, D], box 64 x 1 x q_box_rows
  CUtensorMap k_map;  // packed [Tk, Hkv, D], box 64 x 1 x kv_box_rows; paged [blocks, block_size, Hkv, D], box
                      // 64 x 1 x min(block_size, kBlockN) x 1
  CUtensorMap v_map;  // as k_map
  FlashParams p;
  // Rows of one Q box and one packed K/V box: kBlockM and kBlockN, or the tensor's rows where it has fewer (a
  // box no larger than its tensor is all the driver documents; the tile's rows past the box are never
  // stored (Q) or are masked and zeroed (K/V)). They set the bytes the full barriers expect.
  int q_box_rows;
  int kv_box_rows;
};

template <typename T, int D>
struct FlashSm90Traits {
  static_assert(D == 64 || D == 128, "flash prefill supports head_dim 64 and 128");
  using Element = T;
  static constexpr int kHeadDim = D;
  static constexpr int kBlockM = kFlashPrefillBlockM;
  static constexpr int kWarpgroupRows = 64;  // wgmma's M
  static constexpr int kConsumerWarpgroups = kBlockM / kWarpgroupRows;
  static constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
  static constexpr int kThreads = 128 + kConsumerThreads;  // warpgroup 0 produces
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 3;
  static constexpr int kSlabCols = 64;                   // elements in one 128-byte swizzled row
  static constexpr int kSlabs = D / kSlabCols;
  static constexpr int kQSlabBytes = kBlockM * 128;
  static constexpr int kKVSlabBytes = kBlockN * 128;
  static constexpr int kQBytes = kSlabs * kQSlabBytes;
  static constexpr int kKVBytes = kSlabs * kKVSlabBytes;  // one K (or V) tile
  // Offsets from the 1024-byte aligned base (the swizzle atom; the descriptors' base offset is then 0).
  static constexpr int kOffsetK = kQBytes;
  static constexpr int kOffsetV = kOffsetK + kStages * kKVBytes;
  static constexpr int kOffsetBarriers = kOffsetV + kStages * kKVBytes;  // q_full, full[kStages], empty[kStages]
  static constexpr int kSmemBytes = 1024 + kOffsetBarriers + 8 * (1 + 2 * kStages);  // 1024: alignment slack
  static_assert(kSmemBytes <= 227 * 1024, "the tiles exceed an sm_90 CTA's 227 KB of shared memory");
  // 128 * 40 + 256 * 232 = 64512 of the SM's 65536 registers.
  static constexpr int kProducerRegisters = 40;
  static constexpr int kConsumerRegisters = 232;
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    flash_prefill_sm90_kernel(const __grid_constant__ FlashSm90Params params) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Traits::Element;
  using namespace ptx;
  constexpr int D = Traits::kHeadDim;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages;
  const FlashParams& p = params.p;

  const auto [head, seq, q_start, len_q, row0, k_start, len_k, diag, n_blocks] = prefill_tile<kBlockM, kBlockN>(p);
  if (row0 >= len_q) return;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t smem_raw_address = smem_address(smem_raw);
  const uint32_t base = (smem_raw_address + 1023) & ~1023u;
  unsigned char* smem = smem_raw + (base - smem_raw_address);  // generic pointer to `base`, for the epilogue
  const uint32_t q_full = base + Traits::kOffsetBarriers;
  auto full = [&](int stage) { return q_full + 8 * (1 + stage); };
  auto empty = [&](int stage) { return q_full + 8 * (1 + kStages + stage); };

  if (threadIdx.x == 0) {
    mbarrier_init(q_full, 1);
#pragma unroll
    for (int stage = 0; stage < kStages; ++stage) {
      mbarrier_init(full(stage), 1);
      mbarrier_init(empty(stage), Traits::kConsumerThreads);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    setmaxnreg_dec<Traits::kProducerRegisters>();
    // One thread issues the loads of Q and of packed K/V. A paged tile of small blocks is many boxes (8 a slab
    // at block 16), so there the first warp issues them, lane b box b, once lane 0 has announced the tile's bytes.
    if (threadIdx.x >= 32 || (p.block_table == nullptr && threadIdx.x != 0)) return;
    const int lane = threadIdx.x;
    if (lane == 0) {
      prefetch_tensor_map(&params.q_map);
      prefetch_tensor_map(&params.k_map);
      prefetch_tensor_map(&params.v_map);
      mbarrier_arrive_expect_tx(q_full, Traits::kSlabs * params.q_box_rows * 128);
#pragma unroll
      for (int slab = 0; slab < Traits::kSlabs; ++slab) {
        tma_load_3d(base + slab * Traits::kQSlabBytes, &params.q_map, q_full, slab * Traits::kSlabCols, head,
                    q_start + row0);
      }
    }
    const int kv_head = head / p.group_size;
    const int* block_table = p.block_table == nullptr ? nullptr : p.block_table + seq * p.block_table_stride;
    // Paged: a tile of kBlockN keys is kBlockN / rows boxes of `rows` keys, each from one cache block, landing
    // rows * 128 bytes apart (a multiple of the 1024-byte swizzle atom, so together they are the one-box layout).
    const int block_size = 1 << p.block_size_log2;
    const int rows = min(block_size, kBlockN);
    const int boxes = kBlockN / rows;  // at most 8: flash_attn_varlen takes block sizes of 16 and up
    for (int it = 0; it < n_blocks; ++it) {
      const int stage = it % kStages;
      const int key0 = (n_blocks - 1 - it) * kBlockN;  // in the sequence
      const uint32_t k_tile = base + Traits::kOffsetK + stage * Traits::kKVBytes;
      const uint32_t v_tile = base + Traits::kOffsetV + stage * Traits::kKVBytes;
      if (block_table == nullptr) {
        mbarrier_wait(empty(stage), ((it / kStages) & 1) ^ 1);
        mbarrier_arrive_expect_tx(full(stage), 2 * Traits::kSlabs * params.kv_box_rows * 128);
#pragma unroll
        for (int slab = 0; slab < Traits::kSlabs; ++slab) {
          const int col = slab * Traits::kSlabCols;
          const int key = k_start + key0;
          tma_load_3d(k_tile + slab * Traits::kKVSlabBytes, &params.k_map, full(stage), col, kv_head, key);
          tma_load_3d(v_tile + slab * Traits::kKVSlabBytes, &params.v_map, full(stage), col, kv_head, key);
        }
        continue;
      }
      // A box wholly past the sequence re-reads its last block: the table row may end there, and its keys are
      // masked (V's rows zeroed) anyway. The table read goes ahead of the wait.
      const int key = key0 + lane * rows;
      const int block = lane < boxes ? block_table[min(key, len_k - 1) >> p.block_size_log2] : 0;
      if (lane == 0) {
        mbarrier_wait(empty(stage), ((it / kStages) & 1) ^ 1);
        mbarrier_arrive_expect_tx(full(stage), 2 * Traits::kKVBytes);  // kBlockN / rows whole boxes
      }
      __syncwarp();  // the stage is free and its bytes announced before any lane's box lands
      if (lane < boxes) {
        const int in_block = key & (block_size - 1);
#pragma unroll
        for (int slab = 0; slab < Traits::kSlabs; ++slab) {
          const int col = slab * Traits::kSlabCols;
          const uint32_t dst = lane * rows * 128 + slab * Traits::kKVSlabBytes;
          tma_load_4d(k_tile + dst, &params.k_map, full(stage), col, kv_head, in_block, block);
          tma_load_4d(v_tile + dst, &params.v_map, full(stage), col, kv_head, in_block, block);
        }
      }
    }
    return;
  }
  setmaxnreg_inc<Traits::kConsumerRegisters>();

  // Named barrier ids: 1 + wg syncs one consumer warpgroup; 3 both; 4 + wg is warpgroup wg's turn to issue.
  constexpr int kZeroedVBarrier = 3;
  constexpr int kTurnBarrier = 4;
  const int wg = warpgroup - 1;        // consumer index: rows wg*64 .. wg*64+63 of the CTA's tile
  const int tid = threadIdx.x % 128;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int lane_row = 16 * warp + lane / 4;  // accumulator row of registers 4i, 4i+1 (4i+2, 4i+3: +8)
  const int lane_col = 2 * (lane % 4);        // first of the two columns a lane holds in each 8-column block
  const int wg_row0 = row0 + wg * Traits::kWarpgroupRows;
  const uint32_t q_tile = base + wg * Traits::kWarpgroupRows * 128;
  auto k_tile = [&](int stage) { return base + Traits::kOffsetK + stage * Traits::kKVBytes; };
  auto v_tile = [&](int stage) { return base + Traits::kOffsetV + stage * Traits::kKVBytes; };

  float acc_o[D / 2] = {};
  float s[kBlockN / 2] = {};  // scores, then probabilities, of the current key tile
  uint32_t p_frag[kBlockN / 16][4];  // the previous tile's probabilities as T: the A operand of its P V
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this lane's partial sums; the 4 lanes of a row are reduced at the end
  float correction[2];

  // S = Q K^T over D in steps of 16: step kk is 32 bytes into the rows of slab kk / 4; the first step overwrites
  // S (scale-d 0). Issued only: the caller commits and waits.
  auto issue_s = [&](int stage) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t offset = (kk % 4) * 32;
      wgmma_ss<T, kBlockN>(s, smem_desc_sw128(q_tile + (kk / 4) * Traits::kQSlabBytes + offset, 16, 1024),
                           smem_desc_sw128(k_tile(stage) + (kk / 4) * Traits::kKVSlabBytes + offset, 16, 1024),
                           kk > 0);
    }
  };
  // O += P V: step kk is keys 16kk..16kk+15, 16 rows (2048 bytes) into every slab of V.
  auto issue_pv = [&](int stage) {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      wgmma_rs_b_mn_major<T, D>(acc_o, p_frag[kk],
                                smem_desc_sw128(v_tile(stage) + kk * 16 * 128, Traits::kKVSlabBytes, 1024));
    }
  };
  // Registers a wgmma reads or writes are pinned before its fence and after its wait (ptx_sm90.cuh).
  auto pin_p = [&] {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) wgmma_fence_operands(p_frag[kk]);
  };

  // Masks S (the key-edge tile and tiles crossing this warpgroup's causal diagonal), then the online softmax, as
  // in the mma.sync kernel: the 4 lanes of a quad hold one row between them. Leaves P in s and the factor by
  // which O must be rescaled in `correction`.
  auto softmax = [&](int n_block) {
    const int col0 = n_block * kBlockN;
    if (col0 + kBlockN > len_k || (p.causal && col0 + kBlockN - 1 > wg_row0 + diag)) {
#pragma unroll
      for (int i = 0; i < kBlockN / 8; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = col0 + 8 * i + lane_col + (e & 1);
          const int row = wg_row0 + lane_row + 8 * (e / 2);
          if (col >= len_k || (p.causal && col > row + diag)) s[4 * i + e] = -INFINITY;
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m = row_max[h];
#pragma unroll
      for (int i = 0; i < kBlockN / 8; ++i) m = fmaxf(m, fmaxf(s[4 * i + 2 * h], s[4 * i + 2 * h + 1]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
      // A row that has seen only masked keys keeps max -inf; subtract 0 so exp2 gives 0, not NaN.
      const float m_scaled = m == -INFINITY ? 0.f : m * p.scale_log2;
      correction[h] = exp2f(row_max[h] * p.scale_log2 - m_scaled);
      row_max[h] = m;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kBlockN / 8; ++i) {
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          s[4 * i + e] = exp2f(fmaf(s[4 * i + e], p.scale_log2, -m_scaled));
          sum += s[4 * i + e];
        }
      }
      row_sum[h] = row_sum[h] * correction[h] + sum;
    }
  };
  // P rounded to T: two adjacent 8-column blocks of S are the A fragment of one 16-key step.
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
#pragma unroll
      for (int r = 0; r < 4; ++r) p_frag[kk][r] = pack2<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
    }
  };

  // A CTA whose rows see no key (causal, len_k < len_q) loads nothing and stores zeros.
  if (n_blocks > 0) {
    // Tile 0 (the key-edge tile: walked first). Its rows past len_k hold the next sequence's keys (packed), a cache
    // block's stale slots (paged) or, past a box shorter than the tile, whatever shared memory held; not zeros.
    // Their P is 0, but 0 * NaN is NaN in the P V product, so zero those rows of V, as the mma.sync kernel's
    // zero-fill does (K's rows only reach masked scores). Nothing has read the stage yet; both consumer warpgroups
    // read V, so all 256 threads zero it, fence it to the async proxy (wgmma reads through it) and meet before
    // either reads it.
    mbarrier_wait(q_full, 0);
    mbarrier_wait(full(0), 0);
    const int keys_in_tile = len_k - (n_blocks - 1) * kBlockN;
    if (keys_in_tile < kBlockN) {
      const int consumer_tid = threadIdx.x - 128;
      const int stale_chunks = (kBlockN - keys_in_tile) * 8;  // 16-byte chunks of the stale rows, per slab
      unsigned char* stale_rows = smem + (v_tile(0) - base) + keys_in_tile * 128;
#pragma unroll
      for (int slab = 0; slab < Traits::kSlabs; ++slab) {
        for (int c = consumer_tid; c < stale_chunks; c += Traits::kConsumerThreads) {
          *reinterpret_cast<uint4*>(stale_rows + slab * Traits::kKVSlabBytes + c * 16) = make_uint4(0, 0, 0, 0);
        }
      }
      fence_proxy_async_shared();
      named_barrier_sync(kZeroedVBarrier, Traits::kConsumerThreads);
    }
    wgmma_fence_operands(s);
    wgmma_fence();
    issue_s(0);
    wgmma_commit_group();
    wgmma_wait_group<0>();
    wgmma_fence_operands(s);
    softmax(n_blocks - 1);
    pack_p();

    // Each later step issues S for tile `it` and P V for tile it - 1, then runs tile it's softmax while that P V
    // runs on the tensor cores (FA3's intra-warpgroup overlap). The two warpgroups take turns to issue (the turn
    // barriers), so one's softmax overlaps the other's products (FA3's ping-pong). Warpgroup 0 takes the first
    // turn; warpgroup 1 hands none back after its last, so no barrier is left half-arrived at exit.
    if (wg == 0 && n_blocks > 1) named_barrier_arrive(kTurnBarrier, Traits::kConsumerThreads);
    for (int it = 1; it < n_blocks; ++it) {
      const int stage = it % kStages;
      const int prev = (it - 1) % kStages;
      mbarrier_wait(full(stage), (it / kStages) & 1);
      named_barrier_sync(kTurnBarrier + wg, Traits::kConsumerThreads);
      wgmma_fence_operands(s);
      wgmma_fence_operands(acc_o);
      pin_p();
      wgmma_fence();
      issue_s(stage);
      wgmma_commit_group();
      issue_pv(prev);
      wgmma_commit_group();
      if (wg == 0 || it + 1 < n_blocks) named_barrier_arrive(kTurnBarrier + (1 - wg), Traits::kConsumerThreads);
      wgmma_wait_group<1>();  // S is ready
      wgmma_fence_operands(s);
      softmax(n_blocks - 1 - it);
      wgmma_wait_group<0>();  // P V is done: O may be rescaled, P overwritten, the previous stage released
      wgmma_fence_operands(acc_o);
      pin_p();
      mbarrier_arrive(empty(prev));
      pack_p();
#pragma unroll
      for (int i = 0; i < D / 2; ++i) acc_o[i] *= correction[(i / 2) % 2];
    }
    const int last = (n_blocks - 1) % kStages;
    wgmma_fence_operands(acc_o);
    pin_p();
    wgmma_fence();
    issue_pv(last);
    wgmma_commit_group();
    wgmma_wait_group<0>();
    wgmma_fence_operands(acc_o);
    mbarrier_arrive(empty(last));
  }

  // Epilogue: O / rowsum rounded to T, staged in this warpgroup's 64 rows of the Q tile with its swizzle
  // (16-byte chunk j of row r at chunk j ^ (r % 8)), then stored in 16-byte chunks. A row that saw no key is
  // written as zeros. The barrier first: no warp of this warpgroup may still be reading Q.
  named_barrier_sync(1 + wg, 128);
  unsigned char* stage_o = smem + wg * Traits::kWarpgroupRows * 128;
  auto chunk_in_stage = [&](int r, int chunk) {
    return stage_o + (chunk / 8) * Traits::kQSlabBytes + r * 128 + (((chunk % 8) ^ (r % 8)) * 16);
  };
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = row_sum[h];
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    sum += __shfl_xor_sync(0xffffffff, sum, 2);
    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
    const int r = lane_row + 8 * h;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      *reinterpret_cast<uint32_t*>(chunk_in_stage(r, i) + lane_col * 2) =
          pack2<T>(acc_o[4 * i + 2 * h] * inv_sum, acc_o[4 * i + 2 * h + 1] * inv_sum);
    }
  }
  named_barrier_sync(1 + wg, 128);
  T* out = static_cast<T*>(p.out) + q_start * p.out_token_stride + head * p.out_head_stride;
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int j = 0; j < Traits::kWarpgroupRows * kChunks / 128; ++j) {
    const int idx = tid + 128 * j;
    const int r = idx / kChunks;
    const int chunk = idx % kChunks;
    if (wg_row0 + r < len_q) {
      *reinterpret_cast<uint4*>(out + (wg_row0 + r) * p.out_token_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(chunk_in_stage(r, chunk));
    }
  }
#elif defined(__CUDA_ARCH__)
  // Other archs compile this empty stub, which the host never launches (it checks for an sm_90 GPU and a
  // build with sm_90a code). Should a driver ever pick this binary on an sm_90 GPU, fail loudly.
  __trap();
#endif
}

}  // namespace minivllm::flash
