// The online softmax step of a warp's mma.m16n8k16 score tiles, in base 2 (FlashAttention-2's), shared by paged
// decode and decode_layers' attention.
#pragma once

namespace minivllm {

// s: kTiles accumulator tiles of scores (already scaled to base 2; masked ones -inf). Lane (g, t) holds rows g
// (h = 0: elements 0, 1) and g + 8 (h = 1: elements 2, 3) of each tile; a row lives in the 4 lanes of a quad.
// Each row's max and sum take the tiles in, s becomes the probabilities exp2(s - max), and correction[h] is what
// the row's earlier output must be multiplied by. Every row needs a finite score among the tiles, so that its new
// max is finite and the first correction is exp2(-inf) = 0.
template <int kTiles>
__device__ __forceinline__ void online_softmax_step(float (&s)[kTiles][4], float (&row_max)[2], float (&row_sum)[2],
                                                    float (&correction)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float m = row_max[h];
#pragma unroll
    for (int j = 0; j < kTiles; ++j) m = fmaxf(m, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    correction[h] = exp2f(row_max[h] - m);
    row_max[h] = m;
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < kTiles; ++j) {
      s[j][2 * h] = exp2f(s[j][2 * h] - m);
      s[j][2 * h + 1] = exp2f(s[j][2 * h + 1] - m);
      sum += s[j][2 * h] + s[j][2 * h + 1];
    }
    row_sum[h] = row_sum[h] * correction[h] + sum;
  }
}

}  // namespace minivllm
