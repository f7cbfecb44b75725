// 256-bin histogram of grey pixels (packed four to a word), the input of Otsu's threshold.
// params.count: words of pixels; params.c: pixels (the last word may be partly padding).

@group(0) @binding(1) var<storage, read> pixels: array<u32>;
@group(0) @binding(2) var<storage, read_write> bins: array<atomic<u32>, 256>;

var<workgroup> local_bins: array<atomic<u32>, 256>;

@compute @workgroup_size(64)
fn histogram(@builtin(global_invocation_id) id: vec3<u32>,
             @builtin(local_invocation_index) lane: u32,
             @builtin(num_workgroups) groups: vec3<u32>) {
    // Counting in workgroup memory first keeps global atomics to 256 per workgroup.
    for (var i = lane; i < 256u; i += 64u) {
        atomicStore(&local_bins[i], 0u);
    }
    workgroupBarrier();
    let word = flat_index(id, groups);
    if (word < params.count) {
        let packed = pixels[word];
        for (var k = 0u; k < 4u; k++) {
            if (word * 4u + k < params.c) {
                atomicAdd(&local_bins[(packed >> (8u * k)) & 0xffu], 1u);
            }
        }
    }
    workgroupBarrier();
    for (var i = lane; i < 256u; i += 64u) {
        let n = atomicLoad(&local_bins[i]);
        if (n > 0u) {
            atomicAdd(&bins[i], n);
        }
    }
}
