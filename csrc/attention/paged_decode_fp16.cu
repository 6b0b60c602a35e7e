// fp16 instantiations of the paged decode kernel (one file per dtype so builds run in parallel).
#include "paged_decode_kernel.cuh"

namespace minivllm::decode {
template void launch_paged_decode<at::Half, 64>(const DecodeArgs&, const c10::Device&);
template void launch_paged_decode<at::Half, 128>(const DecodeArgs&, const c10::Device&);
}  // namespace minivllm::decode
