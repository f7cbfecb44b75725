// Binarisation: bit set where pixel > params.c. One thread per output word.

extern "C" __global__ void threshold(const Params params, const unsigned int* pixels,
                                     unsigned int* bits) {
    const unsigned int word = flat_index();
    if (word >= params.count) {
        return;
    }
    const unsigned int y = word / params.words;
    const unsigned int x0 = (word % params.words) * 32u;
    unsigned int out = 0u;
    for (unsigned int b = 0u; b < 32u; b++) {
        const unsigned int x = x0 + b;
        if (x < params.width) {
            const unsigned int i = y * params.width + x;
            const unsigned int pixel = (pixels[i / 4u] >> (8u * (i % 4u))) & 0xffu;
            out |= pixel > params.c ? 1u << b : 0u;
        }
    }
    bits[word] = out;
}
