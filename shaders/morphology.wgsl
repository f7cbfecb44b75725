// Square morphology with a k x k element (k = params.c) anchored at lo = -((k - 1) / 2), the
// CPU's convention; pixels outside the image count as background.
//   erode:  out[y][x] = AND of src[y + o][x + p] for o, p in lo..lo+k
//   dilate: out[y][x] = OR  of src[y - o][x - p] for o, p in lo..lo+k

@group(0) @binding(1) var<storage, read> source: array<u32>;
@group(0) @binding(2) var<storage, read_write> result: array<u32>;

fn source_bit(x: i32, y: i32) -> bool {
    if (x < 0 || y < 0 || x >= i32(params.width) || y >= i32(params.height)) {
        return false;
    }
    let w = u32(x);
    return ((source[u32(y) * params.words + w / 32u] >> (w % 32u)) & 1u) == 1u;
}

// sign = 1: erosion (all set), sign = -1: dilation (any set).
fn morph_word(word: u32, sign: i32) -> u32 {
    let k = i32(params.c);
    let lo = -((k - 1) / 2);
    let y = i32(word / params.words);
    let x0 = (word % params.words) * 32u;
    var out = 0u;
    for (var b = 0u; b < 32u; b++) {
        let x = x0 + b;
        if (x >= params.width) {
            break;
        }
        var hit = sign > 0;
        for (var o = lo; o < lo + k; o++) {
            for (var p = lo; p < lo + k; p++) {
                let on = source_bit(i32(x) + sign * p, y + sign * o);
                if (sign > 0 && !on) {
                    hit = false;
                }
                if (sign < 0 && on) {
                    hit = true;
                }
            }
        }
        out |= select(0u, 1u << b, hit);
    }
    return out;
}

@compute @workgroup_size(64)
fn erode(@builtin(global_invocation_id) id: vec3<u32>,
         @builtin(num_workgroups) groups: vec3<u32>) {
    let word = flat_index(id, groups);
    if (word < params.count) {
        result[word] = morph_word(word, 1);
    }
}

@compute @workgroup_size(64)
fn dilate(@builtin(global_invocation_id) id: vec3<u32>,
          @builtin(num_workgroups) groups: vec3<u32>) {
    let word = flat_index(id, groups);
    if (word < params.count) {
        result[word] = morph_word(word, -1);
    }
}
