// Test-vs-template comparison: the template shifted by (params.a, params.b) = (dx, dy)
// (aligned[y][x] = template[y - dy][x - dx], background outside) and the difference
// (test XOR aligned) restricted to where the shifted template has a source pixel.

__device__ __forceinline__ unsigned int template_bit(const Params& params,
                                                     const unsigned int* template_bits, int x,
                                                     int y) {
    const unsigned int w = (unsigned int)x;
    return (template_bits[(unsigned int)y * params.words + w / 32u] >> (w % 32u)) & 1u;
}

extern "C" __global__ void compare(const Params params, const unsigned int* test_bits,
                                   const unsigned int* template_bits, unsigned int* aligned,
                                   unsigned int* difference) {
    const unsigned int word = flat_index();
    if (word >= params.count) {
        return;
    }
    const unsigned int y = word / params.words;
    const unsigned int x0 = (word % params.words) * 32u;
    const int sy = (int)y - params.b;
    unsigned int shifted = 0u;
    unsigned int valid = 0u;
    for (unsigned int b = 0u; b < 32u; b++) {
        const unsigned int x = x0 + b;
        const int sx = (int)x - params.a;
        if (x < params.width && sx >= 0 && sx < (int)params.width && sy >= 0 &&
            sy < (int)params.height) {
            valid |= 1u << b;
            shifted |= template_bit(params, template_bits, sx, sy) << b;
        }
    }
    aligned[word] = shifted;
    difference[word] = (test_bits[word] ^ shifted) & valid;
}
