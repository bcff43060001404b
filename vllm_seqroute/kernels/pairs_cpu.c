/* The CPU experts' per-token combine (vllm_glue/compact_experts.py): the expert kernel ran one
 * top-1 row per selected (token, expert) pair, token-major; each token's output is the sum of its
 * ``counts[t]`` rows, in row order, in float32, rounded once to the output's dtype (0 rows: an
 * exact 0).
 *
 * torch.segment_reduce did this in about 1.4 ms per MoE layer call of a prefill step on the
 * 2-core CPU box, after a float32 copy of the rows: 11 % of a seqtopk step on seqtopk-moe. Here
 * it is one pass that reads the model-dtype rows and writes the output. Rounding to bfloat16 is
 * round-to-nearest-even with NaN kept quiet, as c10::BFloat16 rounds. */
#include <stdint.h>
#include <string.h>

enum { F32 = 0, BF16 = 1 };

static inline float from_bf16(uint16_t x) {
    uint32_t b = (uint32_t)x << 16;
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static inline uint16_t to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    if ((b & 0x7F800000u) == 0x7F800000u && (b & 0x007FFFFFu)) return 0x7FC0; /* NaN */
    return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

static inline void load_row(float *acc, const void *rows, int32_t in, int64_t row, int64_t h) {
    if (in == BF16) {
        const uint16_t *r = (const uint16_t *)rows + row * h;
        for (int64_t i = 0; i < h; ++i) acc[i] = from_bf16(r[i]);
    } else {
        memcpy(acc, (const float *)rows + row * h, (size_t)h * sizeof *acc);
    }
}

static inline void add_row(float *restrict acc, const void *rows, int32_t in, int64_t row, int64_t h) {
    if (in == BF16) {
        const uint16_t *restrict r = (const uint16_t *)rows + row * h;
        for (int64_t i = 0; i < h; ++i) acc[i] += from_bf16(r[i]);
    } else {
        const float *restrict r = (const float *)rows + row * h;
        for (int64_t i = 0; i < h; ++i) acc[i] += r[i];
    }
}

/* rows [sum(counts), h] of dtype ``in`` -> out [n, h] of dtype ``out_dtype``; acc: h floats of
 * scratch. Returns 0, or 2 for a dtype without a branch. A token's sum starts from its first row
 * (0 + x = x, but for the sign of a zero); one row of the output's own dtype is copied as is
 * (its float32 value rounds back to itself). Built for AVX2 as well where the CPU has it. */
__attribute__((target_clones("avx2", "default")))
int seqroute_pair_sum(const void *rows, int32_t in, const int64_t *counts, int64_t n, int64_t h,
                      void *out, int32_t out_dtype, float *acc) {
    if ((in != F32 && in != BF16) || (out_dtype != F32 && out_dtype != BF16)) return 2;
    const size_t esz = out_dtype == BF16 ? 2 : 4;
    int64_t row = 0;
    for (int64_t t = 0; t < n; ++t) {
        const int64_t c = counts[t];
        char *o = (char *)out + (size_t)t * (size_t)h * esz;
        if (c == 0) {
            memset(o, 0, (size_t)h * esz);
            continue;
        }
        if (c == 1 && in == out_dtype) {
            memcpy(o, (const char *)rows + (size_t)row * (size_t)h * esz, (size_t)h * esz);
            ++row;
            continue;
        }
        load_row(acc, rows, in, row++, h);
        for (int64_t j = 1; j < c; ++j) add_row(acc, rows, in, row++, h);
        if (out_dtype == BF16) {
            uint16_t *ob = (uint16_t *)o;
            for (int64_t i = 0; i < h; ++i) ob[i] = to_bf16(acc[i]);
        } else {
            memcpy(o, acc, (size_t)h * sizeof *acc);
        }
    }
    return 0;
}
