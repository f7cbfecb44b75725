// Sensor windows from scaled rows: out[w][k][c] = rows[source_row(w, k)][c] with
// source_row = max(last[w] + 1 + k - window, first[w]) (rows before a unit's first row repeat
// it, the padding policy). params.c = values per row, params.d = window.

// WindowSpan (src/sensors/window.rs) and the WGSL twin's Span.
struct Span {
    unsigned int last;
    unsigned int first;
};

extern "C" __global__ void stack_windows(const Params params, const float* rows,
                                         const Span* spans, float* windows) {
    const unsigned int index = flat_index();
    if (index >= params.count) {
        return;
    }
    const unsigned int per_window = params.d * params.c;
    const Span span = spans[index / per_window];
    const unsigned int k = (index % per_window) / params.c;
    const unsigned int channel = index % params.c;
    // last + 1 + k - window without going below zero in unsigned arithmetic.
    const unsigned int end = span.last + 1u + k;
    const unsigned int row = end >= params.d ? max(end - params.d, span.first) : span.first;
    windows[index] = rows[row * params.c + channel];
}
