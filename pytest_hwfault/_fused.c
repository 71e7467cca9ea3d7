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
#include <stdlib.h>
#include <string.h>

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

/* hw_to_bytes for float64 codes (a wide layer's, whose sums the emulated path takes in float64): torch's
 * out.copy_(x.add(offset)) on a float64 x. */
void hw_to_bytes_f64(const double *x, uint8_t *out, int64_t n, double offset, int threads) {
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

static inline double clamp_like_torch_double(double v, double low, double high) {
    v = low > v ? low : v;
    return high < v ? high : v;
}

/* The requantization of a wide layer's float64 accumulator into float32 `out` (its own memory, laid out like acc),
 * as the engine's eager chain computes it: acc + bias in float64, then either the rest in float64 (a calibrated
 * layer: times the multiplier, plus bias_after and pre_round, rounded, plus post_round, clamped, to float32) or,
 * with `in_float32` (a deployed runtime's int32 -> float conversion), converted to float32 first and the rest as
 * hw_requantize does it; then times `scale`. The per-channel arrays are float64 (bias codes may pass 2^24; the
 * float32 multipliers and float biases are held exactly). Channel of element i as in hw_requantize. */
static inline float requantize_wide_one(double a, double mult, double bias_after, double pre_round,
                                        double post_round, double low, double high, int in_float32) {
    if (in_float32) {
        const float v = nearbyintf((float)a * (float)mult + (float)bias_after + (float)pre_round) + (float)post_round;
        return clamp_like_torch(v, (float)low, (float)high);
    }
    const double v = nearbyint(a * mult + bias_after + pre_round) + post_round;
    return (float)clamp_like_torch_double(v, low, high);
}

void hw_requantize_wide(const double *acc, float *out, int64_t n, int64_t channels, int64_t inner, const double *bias,
                        const double *mult, const double *bias_after, double pre_round, double post_round, double low,
                        double high, float scale, int in_float32, int threads) {
    if (inner == 1) { /* channels innermost */
        const int64_t rows = n / channels;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_FROM)
        for (int64_t row = 0; row < rows; row++) {
            const double *a = acc + row * channels;
            float *o = out + row * channels;
            for (int64_t c = 0; c < channels; c++)
                o[c] = requantize_wide_one(a[c] + bias[c], mult[c], bias_after[c], pre_round, post_round, low, high,
                                           in_float32) * scale;
        }
    } else { /* runs of `inner` elements share a channel */
        const int64_t runs = n / inner;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_FROM)
        for (int64_t run = 0; run < runs; run++) {
            const double *a = acc + run * inner;
            float *o = out + run * inner;
            const int64_t c = run % channels;
            for (int64_t j = 0; j < inner; j++)
                o[j] = requantize_wide_one(a[j] + bias[c], mult[c], bias_after[c], pre_round, post_round, low, high,
                                           in_float32) * scale;
        }
    }
}

/* a = relu(a + b), in place: torch's a.add_(b).relu_() (the model's own residual sum and its ReLU, `inplace.py`),
 * a and b laid out alike. torch's ReLU keeps -0.0 and NaN, and gives +0.0 for a negative sum. */
void hw_add_relu(float *a, const float *b, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_FROM)
    for (int64_t i = 0; i < n; i++) {
        float v = a[i] + b[i];
        a[i] = v < 0.0f ? 0.0f : v;
    }
}

/* Rewrite the faulty codes of a tensor whose values are code x scale (inject.apply_edit: the same steps on the
 * faulty positions only, in 64-bit integers, which give what torch's int32 or int64 ops give for codes up to 62
 * bits). Per fault k at flat position linear[k] (unique): code = round(value / scale) (or the value itself where
 * `unit`), raw = code + zero_point (its low `bits` bits, but for 8 bits, whose conversion to a byte keeps them),
 * raw = ((raw & keep) | set) ^ flip, sign-extended where `is_signed`, minus zero_point, times scale. The fault words
 * are int32 or int64 (`words_64`). Returns -1, having written nothing, when a position is outside 0..n-1 (torch's
 * indexing then raises). */
static inline int64_t word(const void *words, int words_64, int64_t k) {
    return words_64 ? ((const int64_t *)words)[k] : (int64_t)((const int32_t *)words)[k];
}

/* Fault k's edit of one code (a float holding an integer): the steps hw_apply_edit describes, without the scale. */
static inline float edit_code(float code, int64_t k, const void *keep, const void *set, const void *flip,
                              int words_64, int bits, int64_t zero_point, int is_signed) {
    const int64_t mask = (int64_t)((UINT64_C(1) << bits) - 1), top = (int64_t)(UINT64_C(1) << (bits - 1));
    int64_t raw = (int64_t)code + zero_point;
    if (bits != 8)
        raw &= mask;
    if (keep)
        raw &= word(keep, words_64, k);
    if (set)
        raw |= word(set, words_64, k);
    if (flip)
        raw ^= word(flip, words_64, k);
    float out;
    if (bits == 8) {
        const uint8_t low = (uint8_t)raw;
        out = is_signed ? (float)(int8_t)low : (float)low;
    } else {
        if (is_signed)
            raw = (raw ^ top) - top;
        out = (float)raw;
    }
    if (zero_point)
        out = out - (float)zero_point;
    return out;
}

static int positions_in_range(const int64_t *linear, int64_t count, int64_t n) {
    for (int64_t k = 0; k < count; k++)
        if (linear[k] < 0 || linear[k] >= n)
            return 0;
    return 1;
}

int hw_apply_edit(float *flat, int64_t n, const int64_t *linear, int64_t count, const void *keep, const void *set,
                  const void *flip, int words_64, int unit, float scale, int bits, int64_t zero_point,
                  int is_signed, int threads) {
    if (!positions_in_range(linear, count, n))
        return -1;
    /* the positions are unique: no two threads write one element. Scattered over a large tensor, each fault is a
     * cache miss, which a second thread overlaps */
#pragma omp parallel for num_threads(threads) schedule(static) if (count >= 8192)
    for (int64_t k = 0; k < count; k++) {
        const int64_t i = linear[k];
        float v = flat[i];
        if (!unit)
            v = nearbyintf(v / scale);
        const float out = edit_code(v, k, keep, set, flip, words_64, bits, zero_point, is_signed);
        flat[i] = unit ? out : out * scale;
    }
    return 0;
}

/* hw_requantize (clamp low..high, times scale), hw_apply_edit on the codes at `linear` (unique memory offsets: a
 * layer's act faults), then torch's relu_ on every element, in one pass over the tensor: the faulty elements are
 * requantized, edited, scaled and ReLU'd first, from the accumulator, into `faulty` (count floats); the main pass
 * then clamps every element to floor..high (floor = max(low, 0): the ReLU of code x scale for scale > 0, as the
 * engine fuses it without faults), and the faulty ones are written back. torch's ReLU gives +0.0 for a negative
 * value and keeps -0.0. Returns -1, having written nothing, when a position is outside 0..n-1. */
int hw_requantize_edit_relu(float *acc, int64_t n, int64_t channels, int64_t inner, const float *bias,
                            const float *mult, const float *bias_after, float pre_round, float post_round, float low,
                            float high, float floor, float scale, const int64_t *linear, int64_t count,
                            const void *keep, const void *set, const void *flip, int words_64, int bits,
                            int64_t zero_point, int is_signed, float *faulty, int threads) {
    if (!positions_in_range(linear, count, n))
        return -1;
    /* the main pass's channel of offset i: (i / inner) % channels, by a shift and a mask where both are powers of two
     * (a 64-bit division per fault cost more than the ReLU pass this function saves, at a high BER) */
    const int pow2 = (channels & (channels - 1)) == 0 && (inner & (inner - 1)) == 0;
    const int inner_shift = __builtin_ctzll((unsigned long long)inner);
#pragma omp parallel for num_threads(threads) schedule(static) if (count >= 8192)
    for (int64_t k = 0; k < count; k++) {
        const int64_t i = linear[k];
        const int64_t c = pow2 ? (i >> inner_shift) & (channels - 1) : (inner == 1 ? i : i / inner) % channels;
        const float v = nearbyintf((acc[i] + bias[c]) * mult[c] + bias_after[c] + pre_round) + post_round;
        const float out = edit_code(clamp_like_torch(v, low, high), k, keep, set, flip, words_64, bits, zero_point,
                                    is_signed) * scale;
        faulty[k] = out < 0.0f ? 0.0f : out;
    }
    hw_requantize(acc, n, channels, inner, bias, mult, bias_after, pre_round, post_round, floor, high, scale,
                  threads);
#pragma omp parallel for num_threads(threads) schedule(static) if (count >= 8192)
    for (int64_t k = 0; k < count; k++)
        acc[linear[k]] = faulty[k];
    return 0;
}

/* The positions of a Bernoulli process from its logged uniforms log(1 - u) (faults.bernoulli_positions; the log
 * stays torch's, whose vectorised form may differ from libm's in the last place): gap k is floor(logged[k] / log_q)
 * clamped to at most `total` (torch's clamp(max=): the smaller of the two), converted to int64, plus 1, and
 * out[k] = last + gaps 0..k (a running sum that wraps like torch's int64 cumsum). Sequential: each position needs
 * the one before it, and the pass is memory-bound. */
void hw_gap_positions(const double *logged, int64_t n, double log_q, double total, int64_t last, int64_t *out) {
    uint64_t position = (uint64_t)last;
    for (int64_t k = 0; k < n; k++) {
        double gap = floor(logged[k] / log_q);
        gap = total < gap ? total : gap;
        position += (uint64_t)((int64_t)gap + 1);
        out[k] = (int64_t)position;
    }
}

/* faults.sample_pattern's decoding of a draw over whole codes (each target's bits are its codes' 2^shift bits, the
 * targets one after the other): fault k of target t (bounds[t] <= k < bounds[t + 1]), at position flat[k], is bit
 * flat[k] & (2^shift - 1) of code (flat[k] >> shift) - firsts[t] of that target; a transient target's code is image
 * x numels[t] + index (a shift and a mask where numels[t] is a power of two), a weight target's (numels[t] = 0) is
 * the index, with image -1. Writes linear (the target's code), image, index and bit of every fault. */
void hw_decode_faults(const int64_t *flat, int64_t targets, const int64_t *bounds, const int64_t *firsts,
                      const int64_t *numels, int shift, int64_t *linear, int64_t *image, int64_t *index, int64_t *bit,
                      int threads) {
    const int64_t bits_mask = (INT64_C(1) << shift) - 1;
    /* a target per task: a layer's faults are a few thousand at a high BER, too few to split */
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (bounds[targets] >= 65536)
    for (int64_t t = 0; t < targets; t++) {
        const int64_t lo = bounds[t], hi = bounds[t + 1], first = firsts[t], numel = numels[t];
        const int pow2 = numel > 0 && (numel & (numel - 1)) == 0;
        const int numel_shift = pow2 ? __builtin_ctzll((unsigned long long)numel) : 0;
        for (int64_t k = lo; k < hi; k++) {
            const int64_t code = (flat[k] >> shift) - first;
            linear[k] = code;
            bit[k] = flat[k] & bits_mask;
            if (numel == 0) {
                image[k] = -1;
                index[k] = code;
            } else if (pow2) {
                image[k] = code >> numel_shift;
                index[k] = code & (numel - 1);
            } else {
                image[k] = code / numel;
                index[k] = code - image[k] * numel;
            }
        }
    }
}

/* One tensor's sampled faults folded into one edit per code and placed in memory (inject.compose_canonical, then
 * layout.place): linear[k] is the row-major position of fault k's code in a batch of images,
 * bit[k] its bit; the faults are sorted by code with no (code, bit) twice, so a code's mask is the OR (= the sum) of
 * its faults' bits. In a channels-last layout (channels > 1, `spatial` positions per channel) the code of image i,
 * channel c, spatial position s lies at (i * channels + c) * spatial + s row-major and at i * channels * spatial +
 * s * channels + c in memory; with channels = 1, at its row-major position. Writes each code's offset and mask (int32
 * or int64 words, `words_64`) in the order of the codes and returns how many; -1, having written nothing that counts,
 * where the faults are not sorted or a bit does not fit the words. */
int64_t hw_compose_place(const int64_t *linear, const int64_t *bit, int64_t count, int64_t channels,
                         int64_t spatial, int64_t *offsets, void *masks, int words_64) {
    const int pow2 = (spatial & (spatial - 1)) == 0 && (channels & (channels - 1)) == 0;
    const int spatial_shift = spatial > 1 ? __builtin_ctzll((unsigned long long)spatial) : 0;
    const int64_t width = words_64 ? 64 : 32;
    int64_t codes = 0;
    for (int64_t k = 0; k < count;) {
        const int64_t code = linear[k];
        uint64_t mask = 0;
        for (; k < count && linear[k] == code; k++) {
            if (bit[k] < 0 || bit[k] >= width)
                return -1;
            mask |= UINT64_C(1) << bit[k];
        }
        if (k < count && linear[k] < code)
            return -1;
        int64_t offset = code;
        if (channels > 1) {
            int64_t where, channel;
            if (pow2) {
                where = code & (spatial - 1);
                channel = (code >> spatial_shift) & (channels - 1);
            } else {
                where = code % spatial;
                channel = (code / spatial) % channels;
            }
            offset = code + where * (channels - 1) - channel * (spatial - 1);
        }
        offsets[codes] = offset;
        if (words_64)
            ((int64_t *)masks)[codes] = (int64_t)mask;
        else
            ((int32_t *)masks)[codes] = (int32_t)(uint32_t)mask;
        codes++;
    }
    return codes;
}

/* onnxruntime's CPU LayerNormalization (float32; MLAS's AVX2 kernel, centered two-pass) of `rows` rows of width c, a
 * multiple of 8 (`onnx_float.ort_layer_norm` says how it was measured): the mean is a float64 sum in 4 lanes (element
 * j into lane j % 4), folded (0 + 2, 1 + 3, then the two), divided by c, rounded to float32; the variance is the sum
 * of the squared float32 differences from it, by fused multiply-adds in 8 lanes, folded in halves (k + k + 4, k +
 * k + 2, 0 + 1); inv = 1 / sqrtf(var / c + eps); each output fmaf((x - mean) * inv, scale, bias), or (x - mean) *
 * inv * scale without a bias. */
void hw_layer_norm_ort(const float *x, const float *scale, const float *bias, float *y, int64_t rows, int64_t c,
                       float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * c >= PARALLEL_FROM)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * c;
        float *out = y + r * c;
        double sums[4] = {0.0, 0.0, 0.0, 0.0};
        for (int64_t j = 0; j < c; j += 4)
            for (int k = 0; k < 4; k++)
                sums[k] += (double)row[j + k];
        const double sum = (sums[0] + sums[2]) + (sums[1] + sums[3]);
        const float mean = (float)(sum / (double)c);
        float lanes[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (int64_t j = 0; j < c; j += 8)
            for (int k = 0; k < 8; k++) {
                const float d = row[j + k] - mean;
                lanes[k] = fmaf(d, d, lanes[k]);
            }
        for (int k = 0; k < 4; k++)
            lanes[k] = lanes[k] + lanes[k + 4];
        for (int k = 0; k < 2; k++)
            lanes[k] = lanes[k] + lanes[k + 2];
        const float var = (lanes[0] + lanes[1]) / (float)c + eps;
        const float inv = 1.0f / sqrtf(var);
        for (int64_t j = 0; j < c; j++) {
            const float q = (row[j] - mean) * inv;
            out[j] = bias ? fmaf(q, scale[j], bias[j]) : q * scale[j];
        }
    }
}

/* p x v + c[0], then that x v + c[1], ... : a polynomial by Horner's rule, each step one fused multiply-add */
static inline float horner_fma(float p, float v, const float *c, int n) {
    for (int i = 0; i < n; i++)
        p = fmaf(p, v, c[i]);
    return p;
}

/* onnxruntime's CPU Tanh (float32; MLAS's FMA3 kernel, the rational approximation Eigen uses): x clamped to [-9, 9]
 * (a NaN kept), p = x * P(x^2) and q = Q(x^2) by Horner steps each one fused multiply-add, tanh = p / q. The
 * constants are MLAS's `MlasTanhConstants`, in this order: alpha_13 .. alpha_1, beta_6 .. beta_0. */
static inline float tanh_mlas(float v, const float *c) {
    v = -9.0f > v ? -9.0f : v;
    v = 9.0f < v ? 9.0f : v;
    const float v2 = v * v;
    const float p = horner_fma(c[0], v2, c + 1, 6) * v;
    const float q = horner_fma(c[7], v2, c + 8, 3);
    return p / q;
}

void hw_tanh_mlas(const float *x, float *y, int64_t n, const float *constants, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_FROM)
    for (int64_t i = 0; i < n; i++)
        y[i] = tanh_mlas(x[i], constants);
}

/* onnxruntime's CPU Sigmoid (float32; MLAS's FMA3 logistic kernel, the rational approximation Eigen uses): x clamped
 * to [-18, 18] (a NaN kept), p = x * P(x^2) and q = Q(x^2) by Horner steps each one fused multiply-add, p / q + 0.5,
 * then raised to 0 where below it (the FMA3 kernel clamps at 0 only, not at 1; a NaN kept). The constants are MLAS's
 * `MlasLogisticConstants`, in this order: alpha_9 .. alpha_1, beta_10 .. beta_0. */
static inline float logistic_mlas(float v, const float *c) {
    v = -18.0f > v ? -18.0f : v;
    v = 18.0f < v ? 18.0f : v;
    const float v2 = v * v;
    const float p = horner_fma(c[0], v2, c + 1, 4) * v;
    const float q = horner_fma(c[5], v2, c + 6, 5);
    const float r = p / q + 0.5f;
    return r < 0.0f ? 0.0f : r;
}

void hw_logistic_mlas(const float *x, float *y, int64_t n, const float *constants, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_FROM)
    for (int64_t i = 0; i < n; i++)
        y[i] = logistic_mlas(x[i], constants);
}

/* onnxruntime's CPU Erf (float32) as measured on every one of the 2^32 float32 inputs on a CPU with AVX-512F (onnxruntime
 * 1.32; NaN in, NaN out): MLAS's erf (the faithfully rounded erff of Norbert Juffa's answer on Stack Overflow) with no
 * clamp of |x| above, each step one fused multiply-add. |x| below the split: x + x P(x^2); from the split on:
 * 1 - exp(-(|x| + |x| Q(|x|))), the exponential by MLAS's range reduction (m = round(t / ln 2) by the 1.5 x 2^23 trick,
 * ln 2 in two parts), a degree-6 polynomial and 2^m written into an exponent field; the sign copied back. The
 * constants (MLAS's `MlasErfConstants`), in this order: the split, P's six and Q's seven coefficients from the highest
 * degree down (each constant term minus one), the exponential's lower bound, 1 / ln 2, -ln 2 in a high and a low part,
 * its polynomial's seven coefficients from the highest degree down, 1.5 x 2^23. */
static inline float erf_mlas(float x, const float *c) {
    uint32_t bits, sign;
    memcpy(&bits, &x, 4);
    sign = bits & 0x80000000u;
    bits &= 0x7fffffffu;
    float a;
    memcpy(&a, &bits, 4);
    const int big = c[0] <= a;  /* false for a NaN: the small branch carries it */
    const float p = fmaf(horner_fma(c[1], a * a, c + 2, 5), a, a);  /* both branches computed, one selected */
    const float small = big ? 0.0f : p;
    const float b = big ? a : 0.0f;
    float t = -fmaf(horner_fma(c[7], b, c + 8, 6), b, b);
    t = t > c[14] ? t : c[14];
    const float m = fmaf(c[15], t, c[25]) - c[25];
    const float f = fmaf(m, c[17], fmaf(m, c[16], t));
    const float e = horner_fma(c[18], f, c + 19, 6);
    const uint32_t field = (uint32_t)((int32_t)m + 127) << 23;
    float scale;
    memcpy(&scale, &field, 4);
    const float big_result = 1.0f - e * scale;
    uint32_t out, small_bits;
    memcpy(&out, &big_result, 4);
    memcpy(&small_bits, &small, 4);
    out = out | small_bits | sign;
    float y;
    memcpy(&y, &out, 4);
    return y;
}

void hw_erf_mlas(const float *x, float *y, int64_t n, const float *constants, int threads) {
    float c[26];  /* a local copy: the loop then vectorizes */
    memcpy(c, constants, sizeof c);
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_FROM)
    for (int64_t i = 0; i < n; i++)
        y[i] = erf_mlas(x[i], c);
}

/* onnxruntime's CPU GELU kernels (com.microsoft) it fuses from a GELU's exported ops, each step a float32 operation in
 * its order: v = x (+ bias[i % bias_len] where `bias`); FastGelu (`erf` 0): tanh_mlas(v x ((C x v) x v + B)), then
 * (0.5 x v) x (t + 1); Gelu and BiasGelu (`erf` 1): erf_mlas(v x float32(1 / sqrt 2)), then (0.5 x v) x (e + 1).
 * `constants`: B, C, float32(1 / sqrt 2), then MLAS's tanh constants (11) or its erf constants (26). */
void hw_gelu_ort(const float *x, const float *bias, float *y, int64_t n, int64_t bias_len, int erf,
                 const float *constants, int threads) {
    float c[29];
    memcpy(c, constants, (erf ? 29 : 14) * sizeof(float));
    const int64_t width = bias ? bias_len : (n < 4096 ? n : 4096), rows = (n + width - 1) / width;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_FROM)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t k = n - r * width < width ? n - r * width : width;
        const float *xr = x + r * width;
        float *yr = y + r * width;
        /* v = x (+ bias) first, into the output row; then the kernel in place (loops that vectorize) */
        if (bias)
            for (int64_t j = 0; j < k; j++)
                yr[j] = xr[j] + bias[j];
        else
            for (int64_t j = 0; j < k; j++)
                yr[j] = xr[j];
        if (erf)
            for (int64_t j = 0; j < k; j++) {
                const float v = yr[j];
                yr[j] = (0.5f * v) * (erf_mlas(v * c[2], c + 3) + 1.0f);
            }
        else
            for (int64_t j = 0; j < k; j++) {
                const float v = yr[j];
                yr[j] = (0.5f * v) * (tanh_mlas(v * ((c[1] * v) * v + c[0]), c + 3) + 1.0f);
            }
    }
}

/* onnxruntime's CPU SkipLayerNormalization (com.microsoft; a residual Add and the LayerNorm after it, which it fuses in
 * float graphs), as measured on its outputs (Mean, InvStdDev, the sum): per row of `width`, v = x + skip (+ bias), a
 * skip of the input's shape (its broadcast of a smaller one was not matched); Welford's running mean and sum of squared
 * deviations in order (d = v - mean; mean += d / k; M2 += d x (v - mean)), var = M2 / width, s = sqrtf(var + eps);
 * out = ((v - mean) / s) x gamma (+ beta). Each step a float32 operation, none fused. */
void hw_skip_layer_norm_ort(const float *x, const float *skip, const float *bias, const float *gamma,
                            const float *beta, float *y, int64_t rows, int64_t width, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * width >= PARALLEL_FROM)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * width, *sr = skip + r * width;
        float *yr = y + r * width;
        float mean = 0.0f, m2 = 0.0f;
        for (int64_t j = 0; j < width; j++) {
            float v = xr[j] + sr[j];
            if (bias)
                v = v + bias[j];
            yr[j] = v;
            const float d = v - mean;
            mean = mean + d / (float)(j + 1);
            m2 = m2 + d * (v - mean);
        }
        const float s = sqrtf(m2 / (float)width + eps);
        for (int64_t j = 0; j < width; j++) {
            const float q = ((yr[j] - mean) / s) * gamma[j];
            yr[j] = beta ? q + beta[j] : q;
        }
    }
}

/* onnxruntime's CPU float MatMul (MLAS's SGEMM) of `batch` [m, k] x [k, n] row-major pairs, as measured on it: each
 * output a chain of fused multiply-adds over k in order from +0; with `block` > 0 (a constant B, which onnxruntime
 * packs) the chain restarts every `block` values of k and the blocks' results are added to the output in order. */
void hw_matmul_fma(const float *a, const float *b, float *c, int64_t batch, int64_t m, int64_t k, int64_t n,
                   int64_t block, int threads) {
    const int64_t step = block > 0 && block < k ? block : k;
#pragma omp parallel for num_threads(threads) schedule(static) if (batch * m * n * k >= PARALLEL_FROM)
    for (int64_t row = 0; row < batch * m; row++) {
        const float *ar = a + row * k;
        const float *bm = b + (row / m) * k * n;
        float *cr = c + row * n;
        /* a later block's chains run in `part`, then add to the row; the j loop is the vector one, each output's
         * chain still one fused multiply-add after the other in k */
        float *part = step < k ? (float *)malloc((size_t)n * sizeof(float)) : cr;
        if (part == NULL) { /* no memory for the row's parts: each output's blocks one after the other instead */
            for (int64_t j = 0; j < n; j++)
                for (int64_t k0 = 0; k0 < k; k0 += step) {
                    const int64_t k1 = k0 + step < k ? k0 + step : k;
                    float acc = 0.0f;
                    for (int64_t kk = k0; kk < k1; kk++)
                        acc = fmaf(ar[kk], bm[kk * n + j], acc);
                    cr[j] = k0 == 0 ? acc : cr[j] + acc;
                }
            continue;
        }
        for (int64_t k0 = 0; k0 < k; k0 += step) {
            const int64_t k1 = k0 + step < k ? k0 + step : k;
            float *acc = k0 == 0 ? cr : part;
            for (int64_t j = 0; j < n; j++)
                acc[j] = 0.0f;
            for (int64_t kk = k0; kk < k1; kk++) {
                const float av = ar[kk];
                const float *br = bm + kk * n;
                for (int64_t j = 0; j < n; j++)
                    acc[j] = fmaf(av, br[j], acc[j]);
            }
            if (k0 > 0)
                for (int64_t j = 0; j < n; j++)
                    cr[j] = cr[j] + part[j];
        }
        if (part != cr)
            free(part);
    }
}

/* onnxruntime's CPU Softmax (float32; MLAS's AVX-512F sum-of-exponentials kernel) of `rows` rows of width d: each row's
 * maximum subtracted (added negated), clamped below at constants[0]; exp by MLAS's range reduction and degree-6
 * polynomial, each step one fused multiply-add, scaled by 2^m rounded once (vscalefps; here a float64 product); the
 * sum in 16 lanes (element j into lane j % 16, in order), folded as the kernel does (k + k + 8, then pairs, then the
 * two halves); each output exp x (1 / sum). `constants`: lower bound, rounding bias, log2(e), ln2 high, ln2 low,
 * poly_0 .. poly_4, poly_56. */
void hw_softmax_mlas(const float *x, float *y, int64_t rows, int64_t d, const float *constants, int threads) {
    const float lower = constants[0], bias = constants[1], log2e = constants[2], ln2_high = constants[3],
                ln2_low = constants[4];
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * d >= PARALLEL_FROM)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * d;
        float *out = y + r * d;
        float maximum = row[0];
        for (int64_t j = 1; j < d; j++)
            if (row[j] != row[j] || row[j] > maximum) /* a NaN, once met, stays: torch's max */
                maximum = maximum != maximum ? maximum : row[j];
        const float negative_maximum = -maximum;
        for (int64_t j = 0; j < d; j++) {
            float v = row[j] + negative_maximum;
            v = lower > v ? lower : v;
            const float biased = fmaf(v, log2e, bias);
            const float m = biased - bias;
            v = fmaf(m, ln2_high, v);
            v = fmaf(m, ln2_low, v);
            /* poly_0 .. poly_4, then poly_56 twice */
            const float p = fmaf(horner_fma(constants[5], v, constants + 6, 5), v, constants[10]);
            /* p x 2^m rounded once, as vscalefps: exact in float64 (m is an integer in -150..128, or NaN) */
            const int64_t exponent = m == m ? (int64_t)m + 1023 : 1023;
            const union { uint64_t bits; double value; } power = {(uint64_t)exponent << 52};
            out[j] = m == m ? (float)((double)p * power.value) : m;
        }
        float lanes[16] = {0.0f};
        for (int64_t j0 = 0; j0 < d; j0 += 16)
            for (int64_t k = 0; k < 16 && j0 + k < d; k++)
                lanes[k] = lanes[k] + out[j0 + k];
        float y8[8];
        for (int k = 0; k < 8; k++)
            y8[k] = lanes[k + 8] + lanes[k];
        const float total = ((y8[0] + y8[1]) + (y8[2] + y8[3])) + ((y8[4] + y8[5]) + (y8[6] + y8[7]));
        const float scale = 1.0f / total;
        for (int64_t j = 0; j < d; j++)
            out[j] = out[j] * scale;
    }
}

/* onnxruntime's QLinearAdd (op 0) and QLinearMul (op 1) on values (code - zero point) x scale, as the reader's eager
 * chains compute them (`onnx_reader.QLinearAdd`, `QLinearMul`, which check this pass against themselves before use):
 * element i of the output from element i % period_a of a and i % period_b of b. Codes recovered as round(x / scale) + zero point; op 0:
 * float64(qa) x ra + float32(float64(qb) x rb + fixed), rounded to float32 then to an integer; op 1: ((qa - za) x
 * (qb - zb)) x ratio + zc, each step rounded to float32, then to an integer (the zero point added before the
 * rounding: a tie rounds to the even code, not to the even offset from an odd zero point); a result outside the
 * int32 range (NaN too) becomes -2^31 (MLAS converts without a clamp); clamped to the code range; out = (code - zc) x
 * sc.
 * p: sa, za, sb, zb, sc, zc, low, high, then ra, rb, fixed (op 0) or ratio (op 1). Finite scales only. */
void hw_qlinear_binary(const float *a, const float *b, float *out, int64_t n, int64_t period_a, int64_t period_b,
                       int op, const float *p, int threads) {
    const float sa = p[0], za = p[1], sb = p[2], zb = p[3], sc = p[4], zc = p[5], low = p[6], high = p[7];
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= PARALLEL_FROM)
    for (int64_t i = 0; i < n; i++) {
        const float qa = nearbyintf(a[period_a == n ? i : i % period_a] / sa) + za;
        const float qb = nearbyintf(b[period_b == n ? i : i % period_b] / sb) + zb;
        float o;
        if (op == 0) {
            const float inner = (float)((double)qb * (double)p[9] + (double)p[10]);
            o = nearbyintf((float)((double)qa * (double)p[8] + (double)inner));
        } else {
            o = nearbyintf(((qa - za) * (qb - zb)) * p[8] + zc);
        }
        if (!(o >= -2147483648.0f && o < 2147483648.0f))
            o = -2147483648.0f;
        out[i] = (clamp_like_torch(o, low, high) - zc) * sc;
    }
}
