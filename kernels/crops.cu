// Crop-and-resize of candidate windows into the classifier's NCHW f32 batch: plane p is a
// size x size grid of scale x scale block averages of one binary image, starting at (x, y)
// (which may lie outside: background). One thread per output value; params.c = size.

// Identical to CropPlane (src/preprocess/launch.rs).
struct Plane {
    int x;
    int y;
    unsigned int scale;
    unsigned int image;
};

extern "C" __global__ void crops(const Params params, const unsigned int* images,
                                 const Plane* planes, float* batch) {
    const unsigned int index = flat_index();
    if (index >= params.count) {
        return;
    }
    const unsigned int size = params.c;
    const Plane plane = planes[index / (size * size)];
    const unsigned int i = (index / size) % size;
    const unsigned int j = index % size;
    const unsigned int base = plane.image * params.height * params.words;
    unsigned int count = 0u;
    for (unsigned int by = 0u; by < plane.scale; by++) {
        const int y = plane.y + (int)(plane.scale * i + by);
        if (y < 0 || y >= (int)params.height) {
            continue;
        }
        for (unsigned int bx = 0u; bx < plane.scale; bx++) {
            const int x = plane.x + (int)(plane.scale * j + bx);
            if (x >= 0 && x < (int)params.width) {
                const unsigned int w = (unsigned int)x;
                count += (images[base + (unsigned int)y * params.words + w / 32u] >> (w % 32u)) & 1u;
            }
        }
    }
    // IEEE division (NVRTC's default --prec-div=true): exact, as the divisor is a power of two.
    batch[index] = (float)count / (float)(plane.scale * plane.scale);
}
