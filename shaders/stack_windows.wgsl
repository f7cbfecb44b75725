// Sensor windows from scaled rows: out[w][k][c] = rows[source_row(w, k)][c] with
// source_row = max(last[w] + 1 + k - window, first[w]) (rows before a unit's first row repeat
// it, the padding policy). params.c = values per row, params.d = window.

struct Span {
    last: u32,
    first: u32,
}

@group(0) @binding(1) var<storage, read> rows: array<f32>;
@group(0) @binding(2) var<storage, read> spans: array<Span>;
@group(0) @binding(3) var<storage, read_write> windows: array<f32>;

@compute @workgroup_size(64)
fn stack_windows(@builtin(global_invocation_id) id: vec3<u32>,
                 @builtin(num_workgroups) groups: vec3<u32>) {
    let index = flat_index(id, groups);
    if (index >= params.count) {
        return;
    }
    let per_window = params.d * params.c;
    let span = spans[index / per_window];
    let k = (index % per_window) / params.c;
    let channel = index % params.c;
    // last + 1 + k - window without going below zero in unsigned arithmetic.
    let end = span.last + 1u + k;
    var row = span.first;
    if (end >= params.d) {
        row = max(end - params.d, span.first);
    }
    windows[index] = rows[row * params.c + channel];
}
