// Shared by every AOI kernel (prepended by the host): the launch parameters and the packed
// binary image layout. Pixel x of row y is bit x % 32 of word y * words + x / 32, the same
// bytes as the CPU's 64-bit words (little-endian), so images cross over without repacking.

struct Params {
    width: u32,
    height: u32,
    // 32-bit words per image row.
    words: u32,
    // Number of invocations that do work (the grid is rounded up to whole workgroups).
    count: u32,
    a: i32,
    b: i32,
    c: u32,
    d: u32,
}

@group(0) @binding(0) var<uniform> params: Params;

// Flat invocation index over a 2-D grid of 64-wide workgroups (one dimension is capped at 65535).
fn flat_index(id: vec3<u32>, groups: vec3<u32>) -> u32 {
    return id.x + id.y * groups.x * 64u;
}
