// Sensor rows to model inputs: out[r][c] = (source[r][columns[c]] - offset[c]) * scale[c],
// params.c = channels, params.d = values per source row. The first non-finite value (in
// row-major model order) is reported through `first_bad` (UINT_MAX when none).

extern "C" __global__ void scale_rows(const Params params, const float* source,
                                      const unsigned int* columns,
                                      // (offset, scale) pairs, WGSL's array<vec2<f32>>.
                                      const float* affine, float* scaled,
                                      unsigned int* first_bad) {
    const unsigned int index = flat_index();
    if (index >= params.count) {
        return;
    }
    const unsigned int row = index / params.c;
    const unsigned int channel = index % params.c;
    const float value = source[row * params.d + columns[channel]];
    // The WGSL twin's test: an all-ones exponent is non-finite.
    if ((__float_as_uint(value) & 0x7f800000u) == 0x7f800000u) {
        atomicMin(first_bad, index);
    }
    scaled[index] = (value - affine[2u * channel]) * affine[2u * channel + 1u];
}
