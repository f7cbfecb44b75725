// Shared by every kernel (prepended by the host, like shaders/common.wgsl): the launch
// parameters and the packed binary image layout. Pixel x of row y is bit x % 32 of word
// y * words + x / 32, the same bytes as the CPU's 64-bit words (little-endian).

// Identical to LaunchParams (src/preprocess/launch.rs), passed by value as argument 0.
struct Params {
    unsigned int width;
    unsigned int height;
    // 32-bit words per image row.
    unsigned int words;
    // Number of threads that do work (the grid is rounded up to whole blocks).
    unsigned int count;
    int a;
    int b;
    unsigned int c;
    unsigned int d;
};

#define GROUP_SIZE 64u

// Flat thread index over a 2-D grid of 64-wide blocks (one dimension is capped at 65535).
__device__ __forceinline__ unsigned int flat_index() {
    return blockIdx.x * GROUP_SIZE + threadIdx.x + blockIdx.y * gridDim.x * GROUP_SIZE;
}
