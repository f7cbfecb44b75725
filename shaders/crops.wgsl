// Crop-and-resize of candidate windows into the classifier's NCHW f32 batch: plane p is a
// size x size grid of scale x scale block averages of one binary image, starting at (x, y)
// (which may lie outside: background). One invocation per output value; params.c = size.

struct Plane {
    x: i32,
    y: i32,
    scale: u32,
    image: u32,
}

@group(0) @binding(1) var<storage, read> images: array<u32>;
@group(0) @binding(2) var<storage, read> planes: array<Plane>;
@group(0) @binding(3) var<storage, read_write> batch: array<f32>;

@compute @workgroup_size(64)
fn crops(@builtin(global_invocation_id) id: vec3<u32>,
              @builtin(num_workgroups) groups: vec3<u32>) {
    let index = flat_index(id, groups);
    if (index >= params.count) {
        return;
    }
    let size = params.c;
    let plane = planes[index / (size * size)];
    let i = (index / size) % size;
    let j = index % size;
    let base = plane.image * params.height * params.words;
    var count = 0u;
    for (var by = 0u; by < plane.scale; by++) {
        let y = plane.y + i32(plane.scale * i + by);
        if (y < 0 || y >= i32(params.height)) {
            continue;
        }
        for (var bx = 0u; bx < plane.scale; bx++) {
            let x = plane.x + i32(plane.scale * j + bx);
            if (x >= 0 && x < i32(params.width)) {
                let w = u32(x);
                count += (images[base + u32(y) * params.words + w / 32u] >> (w % 32u)) & 1u;
            }
        }
    }
    batch[index] = f32(count) / f32(plane.scale * plane.scale);
}
