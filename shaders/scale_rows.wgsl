// Sensor rows to model inputs: out[r][c] = (source[r][columns[c]] - offset[c]) * scale[c],
// params.c = channels, params.d = values per source row. The first non-finite value (in
// row-major model order) is reported through `first_bad` (u32 max when none).

@group(0) @binding(1) var<storage, read> source: array<f32>;
@group(0) @binding(2) var<storage, read> columns: array<u32>;
@group(0) @binding(3) var<storage, read> affine: array<vec2<f32>>;
@group(0) @binding(4) var<storage, read_write> scaled: array<f32>;
@group(0) @binding(5) var<storage, read_write> first_bad: atomic<u32>;

@compute @workgroup_size(64)
fn scale_rows(@builtin(global_invocation_id) id: vec3<u32>,
              @builtin(num_workgroups) groups: vec3<u32>) {
    let index = flat_index(id, groups);
    if (index >= params.count) {
        return;
    }
    let row = index / params.c;
    let channel = index % params.c;
    let value = source[row * params.d + columns[channel]];
    // WGSL has no isinf/isnan: an all-ones exponent is the non-finite test.
    if ((bitcast<u32>(value) & 0x7f800000u) == 0x7f800000u) {
        atomicMin(&first_bad, index);
    }
    scaled[index] = (value - affine[channel].x) * affine[channel].y;
}
