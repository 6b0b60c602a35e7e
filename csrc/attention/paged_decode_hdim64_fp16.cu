// One instantiation of the paged decode kernel per file, so the build compiles them in parallel.
#include "paged_decode_launch.cuh"

template void minivllm::decode::launch_paged_decode<at::Half, 64>(const DecodeArgs&, const c10::Device&);
