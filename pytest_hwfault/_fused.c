/* The engine's elementwise chains as single passes (see native.py).
 *
 * Every function performs, per element, the very IEEE float32 operations the eager torch chain performs, in the
 * same order: compiled without FP contraction or fast-math, its results are bit-identical (native.py checks that
 * on the machine before anything uses them). Clamping follows torch's vectorised clamp: max(low, v) then
 * min(high, v), with a NaN kept. Rounding is to nearest, ties to even (nearbyintf in the default mode), as
 * torch.round.
 */
#include <math.h>
#include <stdint.h>

#define PARALLEL_FROM 32768 /* elements: below this a thread team costs more than it saves */

static inline float clamp_like_torch(float v, float low, float high) {
    v = low > v ? low : v;
    return high < v ? high : v;
}

/* out = clamp(round(x * inv_scale), low, high): torch.mul(x, inv_scale, out=out).round_().clamp_(low, high). x and
 * out may be the same memory. No clamp is low = -inf, high = inf (the identity, NaN included). */
void hw_quantize(const float *x, float *out, int64_t n, float inv_scale, float low, float high, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_FROM)
    for (int64_t i = 0; i < n; i++)
        out[i] = clamp_like_torch(nearbyintf(x[i] * inv_scale), low, high);
}

/* out = the byte of (int)(x + offset): integer-valued codes to the uint8/int8 an integer kernel reads (x + offset
 * in 0..255 or -128..127). torch: out.copy_(x.add(offset)), or copy_ to int8 then xor 128 for offset 128. */
void hw_to_bytes(const float *x, uint8_t *out, int64_t n, float offset, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_FROM)
    for (int64_t i = 0; i < n; i++)
        out[i] = (uint8_t)(int32_t)(x[i] + offset);
}

/* Both of the above in one pass: the bytes of clamp(round(x * inv_scale), low, high) + offset, for a layer whose
 * float codes nothing else reads. */
void hw_quantize_to_bytes(const float *x, uint8_t *out, int64_t n, float inv_scale, float low, float high,
                          float offset, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_FROM)
    for (int64_t i = 0; i < n; i++)
        out[i] = (uint8_t)(int32_t)(clamp_like_torch(nearbyintf(x[i] * inv_scale), low, high) + offset);
}

/* The requantization of a layer's accumulator, in place. Element i belongs to channel (i / inner) % channels:
 *   v = clamp(round((v + bias[c]) * mult[c] + bias_after[c] + pre_round) + post_round, low, high) * scale
 * one IEEE operation at a time, left to right. A step the chain does not have is given its identity: adding -0.0
 * (x + -0.0 == x for every x, signed zeros and NaN included; adding +0.0 is not: -0.0 + 0.0 == +0.0), multiplying by
 * 1.0, clamping to -inf..inf. The per-channel arrays hold `channels` values each. */
void hw_requantize(float *acc, int64_t n, int64_t channels, int64_t inner, const float *bias, const float *mult,
                   const float *bias_after, float pre_round, float post_round, float low, float high, float scale,
                   int threads) {
    if (inner == 1) { /* channels innermost (channels-last, a Linear's output): vectorised along the channels */
        const int64_t rows = n / channels;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_FROM)
        for (int64_t row = 0; row < rows; row++) {
            float *a = acc + row * channels;
            for (int64_t c = 0; c < channels; c++) {
                float v = nearbyintf((a[c] + bias[c]) * mult[c] + bias_after[c] + pre_round) + post_round;
                a[c] = clamp_like_torch(v, low, high) * scale;
            }
        }
    } else { /* row-major: runs of `inner` elements share a channel */
        const int64_t runs = n / inner;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_FROM)
        for (int64_t run = 0; run < runs; run++) {
            float *a = acc + run * inner;
            const int64_t c = run % channels;
            const float b = bias[c], m = mult[c], b2 = bias_after[c];
            for (int64_t j = 0; j < inner; j++) {
                float v = nearbyintf((a[j] + b) * m + b2 + pre_round) + post_round;
                a[j] = clamp_like_torch(v, low, high) * scale;
            }
        }
    }
}
