// Square morphology with a k x k element (k = params.c) anchored at lo = -((k - 1) / 2), the
// CPU's convention; pixels outside the image count as background.
//   erode:  out[y][x] = AND of src[y + o][x + p] for o, p in lo..lo+k
//   dilate: out[y][x] = OR  of src[y - o][x - p] for o, p in lo..lo+k

__device__ __forceinline__ bool source_bit(const Params& params, const unsigned int* source,
                                           int x, int y) {
    if (x < 0 || y < 0 || x >= (int)params.width || y >= (int)params.height) {
        return false;
    }
    const unsigned int w = (unsigned int)x;
    return ((source[(unsigned int)y * params.words + w / 32u] >> (w % 32u)) & 1u) == 1u;
}

// sign = 1: erosion (all set), sign = -1: dilation (any set).
__device__ unsigned int morph_word(const Params& params, const unsigned int* source,
                                   unsigned int word, int sign) {
    const int k = (int)params.c;
    const int lo = -((k - 1) / 2);
    const int y = (int)(word / params.words);
    const unsigned int x0 = (word % params.words) * 32u;
    unsigned int out = 0u;
    for (unsigned int b = 0u; b < 32u; b++) {
        const unsigned int x = x0 + b;
        if (x >= params.width) {
            break;
        }
        bool hit = sign > 0;
        for (int o = lo; o < lo + k; o++) {
            for (int p = lo; p < lo + k; p++) {
                const bool on = source_bit(params, source, (int)x + sign * p, y + sign * o);
                if (sign > 0 && !on) {
                    hit = false;
                }
                if (sign < 0 && on) {
                    hit = true;
                }
            }
        }
        out |= hit ? 1u << b : 0u;
    }
    return out;
}

extern "C" __global__ void erode(const Params params, const unsigned int* source,
                                 unsigned int* result) {
    const unsigned int word = flat_index();
    if (word < params.count) {
        result[word] = morph_word(params, source, word, 1);
    }
}

extern "C" __global__ void dilate(const Params params, const unsigned int* source,
                                  unsigned int* result) {
    const unsigned int word = flat_index();
    if (word < params.count) {
        result[word] = morph_word(params, source, word, -1);
    }
}
