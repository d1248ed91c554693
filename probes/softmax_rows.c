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
 *   column_sums[r][f] = sum_j p_j c_fj            (key columns c, group by group: "h f k" each)
 *   row_sums[h][g][j] += u_gi p_j                   (row weights u, group by group: "g q" each, into
 *                                                    "h g k"; a call's rows must hold whole heads)
 * Key columns and row weights are what consumers would otherwise multiply the whole block by
 * afterwards, one more pass over it from memory each; here each row is still in the cache.
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

typedef struct {
    const float *scores;
    int64_t scores_head_stride, scores_row_stride;
    float *probs;
    int64_t probs_head_stride, probs_row_stride;
    int64_t keys, rows_per_head;
    const float *sinks;       /* "h", or NULL */
    const float *key_weights; /* "h k", or NULL */
    int64_t weights_stride;
    float *sums, *peaks;      /* "(h q) c", "(h q)" */
    int64_t column_groups;
    const float *const *columns;
    const int64_t *columns_head_stride, *columns_row_stride, *columns_count;
    float *column_sums;       /* "(h q) f": every group's columns */
    int64_t row_groups;
    const float *const *row_weights;
    const int64_t *row_weights_count;
    float *const *row_sums;
} Block;

/* sum_j p_j c_j for up to eight columns at once, so that p is read once for them (a column past `count`
 * repeats the first one and its sum is dropped) */
static void eight_dots(const float *p, const float *const *c, int64_t count, int64_t keys, float *out) {
    const float *c0 = c[0], *c1 = c[count > 1 ? 1 : 0], *c2 = c[count > 2 ? 2 : 0], *c3 = c[count > 3 ? 3 : 0];
    const float *c4 = c[count > 4 ? 4 : 0], *c5 = c[count > 5 ? 5 : 0], *c6 = c[count > 6 ? 6 : 0];
    const float *c7 = c[count > 7 ? 7 : 0];
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f, s4 = 0.0f, s5 = 0.0f, s6 = 0.0f, s7 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t j = 0; j < keys; j++) {
        float v = p[j];
        s0 += v * c0[j];
        s1 += v * c1[j];
        s2 += v * c2[j];
        s3 += v * c3[j];
        s4 += v * c4[j];
        s5 += v * c5[j];
        s6 += v * c6[j];
        s7 += v * c7[j];
    }
    float sums[8] = {s0, s1, s2, s3, s4, s5, s6, s7};
    for (int64_t f = 0; f < count; f++) out[f] = sums[f];
}

#define MAX_COLUMNS 64

static void products(const Block *b, const float *p, int64_t row, int64_t head, int64_t within) {
    /* every group's columns for this row's head, then eight at a time */
    const float *columns[MAX_COLUMNS];
    int64_t total = 0;
    for (int64_t group = 0; group < b->column_groups; group++) {
        const float *first = b->columns[group] + head * b->columns_head_stride[group];
        for (int64_t f = 0; f < b->columns_count[group] && total < MAX_COLUMNS; f++)
            columns[total++] = first + f * b->columns_row_stride[group];
    }
    float *out = b->column_sums + row * total;
    for (int64_t f = 0; f < total; f += 8) eight_dots(p, columns + f, total - f < 8 ? total - f : 8, b->keys, out + f);
    for (int64_t group = 0; group < b->row_groups; group++) {
        int64_t count = b->row_weights_count[group];
        for (int64_t g = 0; g < count; g++) {
            float u = b->row_weights[group][g * b->rows_per_head + within];
            if (u == 0.0f) continue;
            float *into = b->row_sums[group] + (head * count + g) * b->keys;
#pragma omp simd
            for (int64_t j = 0; j < b->keys; j++) into[j] += u * p[j];
        }
    }
}

void softmax_rows(const Block *b, int64_t row_start, int64_t row_stop) {
    int64_t columns = b->key_weights ? 2 : 1, keys = b->keys;
    for (int64_t row = row_start; row < row_stop; row++) {
        int64_t head = row / b->rows_per_head, within = row % b->rows_per_head;
        const float *s = b->scores + head * b->scores_head_stride + within * b->scores_row_stride;
        float *p = b->probs + head * b->probs_head_stride + within * b->probs_row_stride;
        const float *w = b->key_weights ? b->key_weights + head * b->weights_stride : 0;
        const float *sinks = b->sinks;
        float *sums = b->sums, *peaks = b->peaks;
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
        products(b, p, row, head, within);
    }
}

/* Every row of a block, over OpenMP's threads: built with -fopenmp, the library takes the libgomp that
 * torch has already loaded (same soname), so these are torch's own intra-op threads. A unit of rows
 * stays in one thread (a head's rows where they add into row sums). */
void softmax_block(const Block *b, int64_t rows, int64_t unit, int64_t threads) {
    int64_t units = rows / unit;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && units > 1)
    for (int64_t u = 0; u < units; u++) softmax_rows(b, u * unit, (u + 1) * unit);
}
