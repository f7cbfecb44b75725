// Test-vs-template comparison: the template shifted by (params.a, params.b) = (dx, dy)
// (aligned[y][x] = template[y - dy][x - dx], background outside) and the difference
// (test XOR aligned) restricted to where the shifted template has a source pixel.

@group(0) @binding(1) var<storage, read> test_bits: array<u32>;
@group(0) @binding(2) var<storage, read> template_bits: array<u32>;
@group(0) @binding(3) var<storage, read_write> aligned: array<u32>;
@group(0) @binding(4) var<storage, read_write> difference: array<u32>;

fn template_bit(x: i32, y: i32) -> u32 {
    let w = u32(x);
    return (template_bits[u32(y) * params.words + w / 32u] >> (w % 32u)) & 1u;
}

@compute @workgroup_size(64)
fn compare(@builtin(global_invocation_id) id: vec3<u32>,
           @builtin(num_workgroups) groups: vec3<u32>) {
    let word = flat_index(id, groups);
    if (word >= params.count) {
        return;
    }
    let y = word / params.words;
    let x0 = (word % params.words) * 32u;
    let sy = i32(y) - params.b;
    var shifted = 0u;
    var valid = 0u;
    for (var b = 0u; b < 32u; b++) {
        let x = x0 + b;
        let sx = i32(x) - params.a;
        if (x < params.width && sx >= 0 && sx < i32(params.width) && sy >= 0 && sy < i32(params.height)) {
            valid |= 1u << b;
            shifted |= template_bit(sx, sy) << b;
        }
    }
    aligned[word] = shifted;
    difference[word] = (test_bits[word] ^ shifted) & valid;
}
