/* One pass per row of attention scores: the softmax, and the two factors of its p ln p
 * (probes/entropy_terms.py), so that no later pass over the block is needed for the entropy or
 * the largest weight. Built at first use by probes/native_softmax.py; it links nothing.
 *
 * Rows are those of one sequence's "(h q) k" block: row r is row r % rows_per_head of head
 * r / rows_per_head, at head * head_stride + (r % rows_per_head) * row_stride floats. With
 * m the row's largest score, M = max(m, the head's sink logit) and e_j = exp(s_j - M):
 *   p_j = e_j / Z,  Z = sum_j e_j (+ exp(sink - M))
 *   sums[r][0] = sum_j p_j (s_j - m)               (<= 0)
 *   sums[r][1] = sum_j p_j (s_j - m) w_j           (only with key weights, w: "h k")
 *   peaks[r]   = exp(m - M) / Z                    (the row's largest weight)
 */
#include <math.h>
#include <stdint.h>

/* exp(x) to about 1 ulp on [-87.3, 88.7] (Cephes' expf polynomial), 0 below: in plain C so that the
 * compiler vectorises the loops that call it without a vector math library. */
static inline float exp_poly(float x) {
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float clamped = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    float n = (clamped * log2e + shifter) - shifter;
    float r = clamped - n * ln2_hi - n * ln2_lo;
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return x < -87.3f ? 0.0f : p * scale.f;
}

void softmax_rows(const float *scores, int64_t scores_head_stride, int64_t scores_row_stride, float *probs,
                  int64_t probs_head_stride, int64_t probs_row_stride, int64_t row_start, int64_t row_stop,
                  int64_t keys, int64_t rows_per_head, const float *sinks, const float *key_weights,
                  int64_t weights_stride, float *sums, float *peaks) {
    int64_t columns = key_weights ? 2 : 1;
    for (int64_t row = row_start; row < row_stop; row++) {
        int64_t head = row / rows_per_head, within = row % rows_per_head;
        const float *s = scores + head * scores_head_stride + within * scores_row_stride;
        float *p = probs + head * probs_head_stride + within * probs_row_stride;
        const float *w = key_weights ? key_weights + head * weights_stride : 0;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < keys; j++) m = s[j] > m ? s[j] : m;
        float top = m;
        if (sinks && sinks[head] > top) top = sinks[head];
        float z = 0.0f, ed = 0.0f, edw = 0.0f;
        if (w) {
#pragma omp simd reduction(+ : z, ed, edw)
            for (int64_t j = 0; j < keys; j++) {
                float d = s[j] - top, e = exp_poly(d);
                p[j] = e;
                z += e;
                ed += e * d;
                edw += e * d * w[j];
            }
        } else {
#pragma omp simd reduction(+ : z, ed)
            for (int64_t j = 0; j < keys; j++) {
                float d = s[j] - top, e = exp_poly(d);
                p[j] = e;
                z += e;
                ed += e * d;
            }
        }
        /* with a sink above the keys, s_j - m = d_j + (top - m); the weighted sum needs sum_j e_j w_j then */
        float key_mass = z, shift = top - m;
        if (sinks) z += exp_poly(sinks[head] - top);
        float inverse = 1.0f / z;
#pragma omp simd
        for (int64_t j = 0; j < keys; j++) p[j] *= inverse;
        sums[row * columns] = (ed + shift * key_mass) * inverse;
        if (w) {
            float ew = 0.0f;
            if (shift != 0.0f) {
#pragma omp simd reduction(+ : ew)
                for (int64_t j = 0; j < keys; j++) ew += p[j] * w[j];
            }
            sums[row * columns + 1] = edw * inverse + shift * ew;
        }
        peaks[row] = exp_poly(m - top) * inverse;
    }
}
