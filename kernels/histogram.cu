// 256-bin histogram of grey pixels (packed four to a word), the input of Otsu's threshold.
// params.count: words of pixels; params.c: pixels (the last word may be partly padding).

extern "C" __global__ void histogram(const Params params, const unsigned int* pixels,
                                     unsigned int* bins) {
    // Counting in shared memory first keeps global atomics to 256 per block.
    __shared__ unsigned int local_bins[256];
    for (unsigned int i = threadIdx.x; i < 256u; i += GROUP_SIZE) {
        local_bins[i] = 0u;
    }
    __syncthreads();
    const unsigned int word = flat_index();
    if (word < params.count) {
        const unsigned int packed = pixels[word];
        for (unsigned int k = 0u; k < 4u; k++) {
            if (word * 4u + k < params.c) {
                atomicAdd(&local_bins[(packed >> (8u * k)) & 0xffu], 1u);
            }
        }
    }
    __syncthreads();
    for (unsigned int i = threadIdx.x; i < 256u; i += GROUP_SIZE) {
        const unsigned int n = local_bins[i];
        if (n > 0u) {
            atomicAdd(&bins[i], n);
        }
    }
}
