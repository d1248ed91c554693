/* One pass per row of attention scores: the softmax, and the two factors of its p ln p
 * (probes/entropy_terms.py), so that no later pass over the block is needed for the entropy or
 * the largest weight. Built at first use by probes/native_softmax.py; it links nothing.
 *
 * Rows are those of one sequence's "(h q) k" block: row r is row r % rows_per_head of head
 * r / rows_per_head, at head * head_stride + (r % rows_per_head) * row_stride floats; the
 * probabilities may be written over the scores (each score is read before its weight is written). With
 * m the row's largest score, M = max(m, the head's sink logit) and e_j = exp(s_j - M):
 *   p_j = e_j / Z,  Z = sum_j e_j (+ exp(sink - M))
 *   sums[r][0] = sum_j p_j (s_j - m)               (<= 0)
 *   sums[r][1] = sum_j p_j (s_j - m) w_j           (only with key weights, w: "h k")
 *   peaks[r]   = exp(m - M) / Z                    (the row's largest weight)
 *   column_sums[r][f] = sum_j p_j c_fj            (key columns c, group by group: "h f k" each)
 *   row_sums[h][g][j] = sum_i u_gi p_ij             (row weights u, group by group: "g q" each, into
 *                                                    "h g k"; softmax_block's rows hold whole heads)
 * With a key rule (the kernel's own causal and sliding-window rule, applied here instead of a mask
 * filled into the scores), row i sees only keys first_i..stop_i - 1 around its diagonal key
 * d_i = diagonal + i (its own position): causal, j <= d_i (and j > d_i - window with a window);
 * without causality, |j - d_i| < window; every other key gets p_j = 0 and no score of it is read.
 * Key columns and row weights are what consumers would otherwise multiply the whole block by
 * afterwards, one more pass over it from memory each; here each row is still in the cache, and four
 * rows of a head are multiplied together, so that a column or a row sum is read once for the four.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
    int64_t ruled, diagonal, causal, window; /* the key rule, where `ruled` (window 0: none) */
} Block;

#define MAX_COLUMNS 64
#define MAX_GROUPS 64 /* row weight groups */
#define ROWS 4 /* rows of one head multiplied together: each column and row sum is read once for all of them */

/* sum_j p_i[j] c_f[j] for up to four rows i and four columns f, each read once for all sixteen sums (a row
 * past `rows` or a column past `count` repeats the first one, and its sums are dropped); row i's sums go to
 * out[i * stride + f] */
static void four_by_four(const float *const *p, int64_t rows, const float *const *c, int64_t count, int64_t keys,
                         float *out, int64_t stride) {
    const float *p0 = p[0], *p1 = p[rows > 1 ? 1 : 0], *p2 = p[rows > 2 ? 2 : 0], *p3 = p[rows > 3 ? 3 : 0];
    const float *c0 = c[0], *c1 = c[count > 1 ? 1 : 0], *c2 = c[count > 2 ? 2 : 0], *c3 = c[count > 3 ? 3 : 0];
    float s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
    float s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
    for (int64_t j = 0; j < keys; j++) {
        float a0 = p0[j], a1 = p1[j], a2 = p2[j], a3 = p3[j];
        float d0 = c0[j], d1 = c1[j], d2 = c2[j], d3 = c3[j];
        s00 += a0 * d0; s01 += a0 * d1; s02 += a0 * d2; s03 += a0 * d3;
        s10 += a1 * d0; s11 += a1 * d1; s12 += a1 * d2; s13 += a1 * d3;
        s20 += a2 * d0; s21 += a2 * d1; s22 += a2 * d2; s23 += a2 * d3;
        s30 += a3 * d0; s31 += a3 * d1; s32 += a3 * d2; s33 += a3 * d3;
    }
    float sums[ROWS][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13}, {s20, s21, s22, s23}, {s30, s31, s32, s33}};
    for (int64_t i = 0; i < rows; i++)
        for (int64_t f = 0; f < count; f++) out[i * stride + f] = sums[i][f];
}

/* the products of `rows` consecutive rows of one head, the first of them `first` (their probabilities p); row sums
 * are added into `head_sums`, the head's "g k" of each row weight group */
static void products(const Block *b, const float *const *p, int64_t rows, int64_t first, float *const *head_sums) {
    int64_t head = first / b->rows_per_head, within = first % b->rows_per_head;
    const float *columns[MAX_COLUMNS];
    int64_t total = 0;
    for (int64_t group = 0; group < b->column_groups; group++) {
        const float *start = b->columns[group] + head * b->columns_head_stride[group];
        for (int64_t f = 0; f < b->columns_count[group] && total < MAX_COLUMNS; f++)
            columns[total++] = start + f * b->columns_row_stride[group];
    }
    float *out = b->column_sums + first * total;
    for (int64_t f = 0; f < total; f += 4)
        four_by_four(p, rows, columns + f, total - f < 4 ? total - f : 4, b->keys, out + f, total);
    const float *p0 = p[0], *p1 = p[rows > 1 ? 1 : 0], *p2 = p[rows > 2 ? 2 : 0], *p3 = p[rows > 3 ? 3 : 0];
    for (int64_t group = 0; group < b->row_groups; group++) {
        int64_t count = b->row_weights_count[group];
        for (int64_t g = 0; g < count; g++) {
            const float *u = b->row_weights[group] + g * b->rows_per_head + within;
            float u0 = u[0], u1 = rows > 1 ? u[1] : 0.0f, u2 = rows > 2 ? u[2] : 0.0f, u3 = rows > 3 ? u[3] : 0.0f;
            if (u0 == 0.0f && u1 == 0.0f && u2 == 0.0f && u3 == 0.0f) continue;
            float *into = head_sums[group] + g * b->keys;
#pragma omp simd
            for (int64_t j = 0; j < b->keys; j++) into[j] += u0 * p0[j] + u1 * p1[j] + u2 * p2[j] + u3 * p3[j];
        }
    }
}

/* floats of one head's row sums of a row weight group ("g k") */
static int64_t group_floats(const Block *b, int64_t group) { return b->row_weights_count[group] * b->keys; }

/* the keys first..stop - 1 a row of a head may see (every key without a rule) */
static void key_range(const Block *b, int64_t within, int64_t *first, int64_t *stop) {
    *first = 0, *stop = b->keys;
    if (!b->ruled) return;
    int64_t d = b->diagonal + within;
    if (b->window) *first = d - b->window + 1 > 0 ? d - b->window + 1 : 0;
    if (b->causal) *stop = d + 1;
    else if (b->window) *stop = d + b->window;
    if (*stop > b->keys) *stop = b->keys;
    if (*first > *stop) *first = *stop;
}

/* Rows row_start..row_stop - 1. Where the first of them is not its head's first row, another range holds the head's
 * first rows and fills its row sums: this range's share of them goes to `shared` ("g k" of each group, one after
 * another) for the caller to add. */
static void softmax_rows(const Block *b, int64_t row_start, int64_t row_stop, float *shared) {
    int64_t columns = b->key_weights ? 2 : 1, keys = b->keys;
    int products_asked = b->column_groups > 0 || b->row_groups > 0;
    const float *waiting[ROWS]; /* rows of one head whose products are not done yet, from `first` on */
    float *head_sums[MAX_GROUPS]; /* where the current head's row sums go */
    int64_t first = row_start, count = 0;
    for (int64_t row = row_start; row < row_stop; row++) {
        int64_t head = row / b->rows_per_head, within = row % b->rows_per_head;
        if (count && within == 0) { /* a new head */
            products(b, waiting, count, first, head_sums);
            count = 0;
        }
        if (within == 0 || row == row_start) /* the head's row sums in this range start from 0 */
            for (int64_t group = 0, offset = 0; group < b->row_groups; group++) {
                int64_t size = group_floats(b, group);
                head_sums[group] = within == 0 ? b->row_sums[group] + head * size : shared + offset;
                memset(head_sums[group], 0, (size_t)size * sizeof(float));
                offset += size;
            }
        int64_t lo, hi;
        key_range(b, within, &lo, &hi);
        const float *s = b->scores + head * b->scores_head_stride + within * b->scores_row_stride;
        float *p = b->probs + head * b->probs_head_stride + within * b->probs_row_stride;
        const float *w = b->key_weights ? b->key_weights + head * b->weights_stride : 0;
        const float *sinks = b->sinks;
        float *sums = b->sums, *peaks = b->peaks;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = lo; j < hi; j++) m = s[j] > m ? s[j] : m;
        float top = m;
        if (sinks && sinks[head] > top) top = sinks[head];
        float z = 0.0f, ed = 0.0f, edw = 0.0f;
        if (w) {
#pragma omp simd reduction(+ : z, ed, edw)
            for (int64_t j = lo; j < hi; j++) {
                float d = s[j] - top, e = exp_poly(d);
                p[j] = e;
                z += e;
                ed += e * d;
                edw += e * d * w[j];
            }
        } else {
#pragma omp simd reduction(+ : z, ed)
            for (int64_t j = lo; j < hi; j++) {
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
        for (int64_t j = lo; j < hi; j++) p[j] *= inverse;
        if (lo > 0) memset(p, 0, (size_t)lo * sizeof(float));
        if (hi < keys) memset(p + hi, 0, (size_t)(keys - hi) * sizeof(float));
        sums[row * columns] = (ed + shift * key_mass) * inverse;
        if (w) {
            float ew = 0.0f;
            if (shift != 0.0f) {
#pragma omp simd reduction(+ : ew)
                for (int64_t j = lo; j < hi; j++) ew += p[j] * w[j];
            }
            sums[row * columns + 1] = edw * inverse + shift * ew;
        }
        peaks[row] = exp_poly(m - top) * inverse;
        if (!products_asked) continue;
        if (!count) first = row;
        waiting[count++] = p;
        if (count == ROWS) {
            products(b, waiting, count, first, head_sums);
            count = 0;
        }
    }
    if (count) products(b, waiting, count, first, head_sums);
}

/* Every row of a block, over OpenMP's threads: built with -fopenmp, the library takes the libgomp that
 * torch has already loaded (same soname), so these are torch's own intra-op threads. The rows are cut into
 * `threads` equal ranges, whatever the heads (9 heads on 2 threads as 4 and 5 left one thread idle a ninth
 * of the time); a head cut in two adds the later range's share of its row sums after the others. */
void softmax_block(const Block *b, int64_t rows, int64_t threads) {
    int64_t per_head = 0; /* floats of a head's row sums, all groups */
    for (int64_t group = 0; group < b->row_groups; group++) per_head += group_floats(b, group);
    float *shared = per_head && threads > 1 ? malloc((size_t)(threads * per_head) * sizeof(float)) : 0;
    if (per_head && threads > 1 && !shared) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t t = 0; t < threads; t++)
        softmax_rows(b, rows * t / threads, rows * (t + 1) / threads, shared ? shared + t * per_head : 0);
    for (int64_t t = 1; t < threads && shared; t++) {
        int64_t start = rows * t / threads;
        if (start % b->rows_per_head == 0 || start >= rows) continue;
        const float *from = shared + t * per_head;
        for (int64_t group = 0; group < b->row_groups; group++) {
            int64_t size = group_floats(b, group);
            float *into = b->row_sums[group] + start / b->rows_per_head * size;
#pragma omp simd
            for (int64_t j = 0; j < size; j++) into[j] += from[j];
            from += size;
        }
    }
    free(shared);
}
