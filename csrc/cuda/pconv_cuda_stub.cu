// Placeholder until the CUDA backend lands (issue 3): proves the nvcc leg of the build without pulling in
// torch headers. The ops have no CUDA kernels yet; pconv_cuda/ops.py turns a CUDA call into a clear error.
__global__ void pconv_cuda_build_probe_kernel(int* out) { *out = 1; }

int pconv_cuda_compiled_archs_probe() { return 1; }
