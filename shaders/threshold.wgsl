// Binarisation: bit set where pixel > params.c. One invocation per output word.

@group(0) @binding(1) var<storage, read> pixels: array<u32>;
@group(0) @binding(2) var<storage, read_write> bits: array<u32>;

@compute @workgroup_size(64)
fn threshold(@builtin(global_invocation_id) id: vec3<u32>,
             @builtin(num_workgroups) groups: vec3<u32>) {
    let word = flat_index(id, groups);
    if (word >= params.count) {
        return;
    }
    let y = word / params.words;
    let x0 = (word % params.words) * 32u;
    var out = 0u;
    for (var b = 0u; b < 32u; b++) {
        let x = x0 + b;
        if (x < params.width) {
            let i = y * params.width + x;
            let pixel = (pixels[i / 4u] >> (8u * (i % 4u))) & 0xffu;
            out |= select(0u, 1u << b, pixel > params.c);
        }
    }
    bits[word] = out;
}
