/* ADAPT's Fovea pass, forward and analytic backward, both directions (xmodal/models/adapt.py).
 *
 * Compiled at first use by xmodal.models.native (cc -O3 -march=native) and called through
 * ctypes, one call per thread over a range of token items [i0, i1). Notation as in adapt.py:
 * tokens x (N, L, D) with len[i] real tokens each (padding at the end), conditioning rows
 * scale / shift / unit (C, D) and k = smooth * scale; the softmax over tokens is shifted by
 * the token extreme xe (the largest value where k > 0, the smallest otherwise), so every
 * exponent is <= 0. Per (item, condition) pair the forward keeps only (D,) statistics; the
 * backward recomputes exp once. Inner loops run over the channel axis D, contiguous, and are
 * vectorised by the compiler (xm_exp is branch-free for that).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define XM_EPS 1e-8f
/* channels per register block: 16 floats, one AVX-512 register (two AVX2 ones) */
#define XM_BLK 16

/* e^y for y <= 88, |relative error| < 2e-7 (Cephes expf: y = n ln2 + f, degree-6 polynomial
 * in f). Every caller has y <= 0 (exponents shifted by the extreme token). y is clamped below
 * at -87: e^-87 < 2e-38, as good as 0 beside the extreme's e^0 = 1. */
static inline float xm_exp(float y) {
    y = y > -87.0f ? y : -87.0f; /* one max instruction */
    float n = floorf(fmaf(y, 1.44269504088896341f, 0.5f));
    float f = fmaf(n, -0.693359375f, y); /* ln 2 in two parts (Cody-Waite): f is exact */
    f = fmaf(n, 2.12194440e-4f, f);
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float s;
    memcpy(&s, &bits, sizeof s);
    return p * s;
}

/* xe (D,): the shift of item i's softmax for condition row kt */
static inline void extremes(const float *restrict kt, const float *restrict mx, const float *restrict mn,
                            float *restrict xe, int64_t D) {
    for (int64_t d = 0; d < D; d++) xe[d] = kt[d] > 0.0f ? mx[d] : mn[d];
}

/* Exact inner kernel, exposed for the unit test of the exp: out[j] = e^y[j]. */
void xm_exp_array(const float *restrict y, float *restrict out, int64_t n) {
    for (int64_t j = 0; j < n; j++) out[j] = xm_exp(y[j]);
}

/* Channels [d0, d0 + nb) of one T2I pair: sums over the item's n tokens of e, e dl, e dl^2
 * (dl = x - xe). With nb = XM_BLK (a constant after inlining) the accumulators stay in
 * registers while the tokens stream past; only the tokens are loaded in the loop. */
static inline __attribute__((always_inline)) void
t2i_fwd_block(const float *restrict xi, int64_t n, int64_t D, int64_t d0, int64_t nb, const float *restrict kt,
              const float *restrict xe, float *restrict z, float *restrict s1, float *restrict s2) {
    float k[XM_BLK], c[XM_BLK], a0[XM_BLK], a1[XM_BLK], a2[XM_BLK];
    for (int64_t b = 0; b < nb; b++) {
        k[b] = kt[d0 + b];
        c[b] = xe[d0 + b];
        a0[b] = a1[b] = a2[b] = 0.0f;
    }
    for (int64_t r = 0; r < n; r++) {
        const float *restrict xr = xi + r * D + d0;
#pragma omp simd
        for (int64_t b = 0; b < nb; b++) {
            float dl = xr[b] - c[b];
            float e = xm_exp(k[b] * dl);
            a0[b] += e;
            a1[b] += e * dl;
            a2[b] += e * dl * dl;
        }
    }
    for (int64_t b = 0; b < nb; b++) {
        z[d0 + b] = a0[b];
        s1[d0 + b] = a1[b];
        s2[d0 + b] = a2[b];
    }
}

/* T2I forward: per pair (i, t) Z = sum_r e, M = E_p[x] = xe + sum e (x - xe) / Z,
 * VAR = Var_p[x]; v = scale M + shift; out = <v, unit> / |v|, nrm = |v|.
 * Z, M, VAR may be NULL (scoring without gradient). idx (N, C) int64, or NULL: item i's
 * t-th pair is with condition row idx[i, t] (re-ranking lists) instead of row t. work: 5 D floats. */
void t2i_fwd(int64_t i0, int64_t i1, int64_t C, int64_t L, int64_t D, float smooth,
             const float *restrict x, const int32_t *restrict len, const float *restrict xmax,
             const float *restrict xmin, const float *restrict scale, const float *restrict shift,
             const float *restrict unit, const int64_t *restrict idx, float *restrict out, float *restrict nrm,
             float *restrict Z, float *restrict M, float *restrict VAR, float *restrict work) {
    float *restrict xe = work, *restrict z = work + D, *restrict s1 = work + 2 * D, *restrict s2 = work + 3 * D;
    float *restrict kt = work + 4 * D;
    for (int64_t i = i0; i < i1; i++) {
        const float *xi = x + i * L * D;
        for (int64_t t = 0; t < C; t++) {
            const int64_t row = idx ? idx[i * C + t] : t; /* the condition row of pair (i, t) */
            const float *restrict sc = scale + row * D, *restrict sh = shift + row * D, *restrict u = unit + row * D;
            for (int64_t d = 0; d < D; d++) kt[d] = smooth * sc[d];
            extremes(kt, xmax + i * D, xmin + i * D, xe, D);
            int64_t d0 = 0;
            for (; d0 + XM_BLK <= D; d0 += XM_BLK) t2i_fwd_block(xi, len[i], D, d0, XM_BLK, kt, xe, z, s1, s2);
            if (d0 < D) t2i_fwd_block(xi, len[i], D, d0, D - d0, kt, xe, z, s1, s2);
            float dot = 0.0f, nn = 0.0f;
            int64_t p = (i * C + t) * D;
#pragma omp simd reduction(+ : dot, nn)
            for (int64_t d = 0; d < D; d++) {
                float mc = s1[d] / z[d];
                float m = xe[d] + mc;
                float v = sc[d] * m + sh[d];
                dot += v * u[d];
                nn += v * v;
                s1[d] = m;
                s2[d] = fmaxf(s2[d] / z[d] - mc * mc, 0.0f);
            }
            if (Z) {
                memcpy(Z + p, z, D * sizeof(float));
                memcpy(M + p, s1, D * sizeof(float));
                memcpy(VAR + p, s2, D * sizeof(float));
            }
            float n = fmaxf(sqrtf(nn), XM_EPS);
            out[i * C + t] = dot / n;
            nrm[i * C + t] = n;
        }
    }
}

/* Channels [d0, d0 + nb) of one T2I pair's token gradient: gx_r += e_r (A + B x_r). */
static inline __attribute__((always_inline)) void
t2i_bwd_block(const float *restrict xi, float *restrict gxi, int64_t n, int64_t D, int64_t d0, int64_t nb,
              const float *restrict kt, const float *restrict xe, const float *restrict A, const float *restrict B) {
    float k[XM_BLK], c[XM_BLK], a[XM_BLK], bb[XM_BLK];
    for (int64_t b = 0; b < nb; b++) {
        k[b] = kt[d0 + b];
        c[b] = xe[d0 + b];
        a[b] = A[d0 + b];
        bb[b] = B[d0 + b];
    }
    for (int64_t r = 0; r < n; r++) {
        const float *restrict xr = xi + r * D + d0;
        float *restrict gr = gxi + r * D + d0;
#pragma omp simd
        for (int64_t b = 0; b < nb; b++) gr[b] += xm_exp(k[b] * (xr[b] - c[b])) * (a[b] + bb[b] * xr[b]);
    }
}

/* T2I backward. g (N, C) = dL/dout. gx (N, L, D): item rows i0..i1 accumulated.
 * acc (4, C, D), this thread's own: sums over its items of dL/dunit, dL/dshift,
 * gv * M (the scale gradient less smooth * dL/dk) and dL/dk = gv scale VAR.
 * dm/dx_r = p_r (1 + k (x_r - m)): gx_r += sum_t a e_r (1 - k m + k x_r), a = gv scale / Z.
 * work: 5 D floats. */
void t2i_bwd(int64_t i0, int64_t i1, int64_t C, int64_t L, int64_t D, float smooth,
             const float *restrict x, const int32_t *restrict len, const float *restrict xmax,
             const float *restrict xmin, const float *restrict scale, const float *restrict shift,
             const float *restrict unit, const float *restrict Z, const float *restrict M,
             const float *restrict VAR, const float *restrict nrm, const float *restrict out,
             const float *restrict g, float *restrict gx, float *restrict acc, float *restrict work) {
    float *restrict xe = work, *restrict A = work + D, *restrict B = work + 2 * D, *restrict kt = work + 3 * D;
    float *g_unit = acc, *g_shift = acc + C * D, *g_scale = acc + 2 * C * D, *g_k = acc + 3 * C * D;
    for (int64_t i = i0; i < i1; i++) {
        const float *xi = x + i * L * D;
        float *gxi = gx + i * L * D;
        for (int64_t t = 0; t < C; t++) {
            float gp = g[i * C + t];
            if (gp == 0.0f) continue; /* hinge losses leave most pairs without gradient */
            const float *restrict sc = scale + t * D, *restrict sh = shift + t * D, *restrict u = unit + t * D;
            int64_t p = (i * C + t) * D;
            const float *z = Z + p, *m = M + p, *var = VAR + p;
            float n = nrm[i * C + t];
            float gn = gp / n, sn = out[i * C + t] / n;
            float *restrict gu = g_unit + t * D, *restrict gs = g_shift + t * D, *restrict gsc = g_scale + t * D,
                          *restrict gk = g_k + t * D;
            for (int64_t d = 0; d < D; d++) kt[d] = smooth * sc[d];
            extremes(kt, xmax + i * D, xmin + i * D, xe, D);
            for (int64_t d = 0; d < D; d++) {
                float v = sc[d] * m[d] + sh[d];
                float gv = gn * (u[d] - sn * v);
                float a = gv * sc[d] / z[d];
                A[d] = a * (1.0f - kt[d] * m[d]);
                B[d] = a * kt[d];
                gu[d] += gn * v;
                gs[d] += gv;
                gsc[d] += gv * m[d];
                gk[d] += gv * sc[d] * var[d];
            }
            int64_t d0 = 0;
            for (; d0 + XM_BLK <= D; d0 += XM_BLK) t2i_bwd_block(xi, gxi, len[i], D, d0, XM_BLK, kt, xe, A, B);
            if (d0 < D) t2i_bwd_block(xi, gxi, len[i], D, d0, D - d0, kt, xe, A, B);
        }
    }
}

/* Channels [d0, d0 + nb) of one I2T pair: Z, sum e dl and the max over words of
 * e (w scale + shift) with its arg-max word (the first word starts them: an item has one). */
static inline __attribute__((always_inline)) void
i2t_fwd_block(const float *restrict wi, int64_t n, int64_t D, int64_t d0, int64_t nb, const float *restrict kt,
              const float *restrict xe, const float *restrict sc, const float *restrict sh, float *restrict z,
              float *restrict s1, float *restrict mx, int32_t *restrict am) {
    float k[XM_BLK], c[XM_BLK], s[XM_BLK], h[XM_BLK], a0[XM_BLK], a1[XM_BLK], m[XM_BLK];
    int32_t arg[XM_BLK];
    for (int64_t b = 0; b < nb; b++) {
        k[b] = kt[d0 + b];
        c[b] = xe[d0 + b];
        s[b] = sc[d0 + b];
        h[b] = sh[d0 + b];
        float w0 = wi[d0 + b], dl = w0 - c[b], e = xm_exp(k[b] * dl);
        a0[b] = e;
        a1[b] = e * dl;
        m[b] = e * (w0 * s[b] + h[b]);
        arg[b] = 0;
    }
    for (int64_t l = 1; l < n; l++) {
        const float *restrict wl = wi + l * D + d0;
#pragma omp simd
        for (int64_t b = 0; b < nb; b++) {
            float dl = wl[b] - c[b];
            float e = xm_exp(k[b] * dl);
            a0[b] += e;
            a1[b] += e * dl;
            float cand = e * (wl[b] * s[b] + h[b]);
            int better = cand > m[b];
            m[b] = better ? cand : m[b];
            arg[b] = better ? (int32_t)l : arg[b];
        }
    }
    for (int64_t b = 0; b < nb; b++) {
        z[d0 + b] = a0[b];
        s1[d0 + b] = a1[b];
        mx[d0 + b] = m[b];
        am[d0 + b] = arg[b];
    }
}

/* I2T forward: tokens are words, conditions images. Per pair: Z = sum_l e, EX = E_p[w],
 * the max over words of e (w scale + shift) (the Fovea value before / Z) and its arg-max
 * word per channel ARG; v = max / Z, out = <v, unit> / |v|. Z, EX, ARG may be NULL;
 * idx as in t2i_fwd.
 * work: 5 D floats + D int32. */
void i2t_fwd(int64_t i0, int64_t i1, int64_t C, int64_t L, int64_t D, float smooth,
             const float *restrict w, const int32_t *restrict len, const float *restrict wmax,
             const float *restrict wmin, const float *restrict scale, const float *restrict shift,
             const float *restrict unit, const int64_t *restrict idx, float *restrict out, float *restrict nrm,
             float *restrict Z, float *restrict EX, int32_t *restrict ARG, float *restrict work) {
    float *restrict xe = work, *restrict z = work + D, *restrict s1 = work + 2 * D, *restrict mx = work + 3 * D;
    float *restrict kt = work + 4 * D;
    int32_t *restrict am = (int32_t *)(work + 5 * D);
    for (int64_t i = i0; i < i1; i++) {
        const float *wi = w + i * L * D;
        for (int64_t t = 0; t < C; t++) {
            const int64_t row = idx ? idx[i * C + t] : t; /* the condition row of pair (i, t) */
            const float *restrict sc = scale + row * D, *restrict sh = shift + row * D, *restrict u = unit + row * D;
            for (int64_t d = 0; d < D; d++) kt[d] = smooth * sc[d];
            extremes(kt, wmax + i * D, wmin + i * D, xe, D);
            int64_t d0 = 0;
            for (; d0 + XM_BLK <= D; d0 += XM_BLK) i2t_fwd_block(wi, len[i], D, d0, XM_BLK, kt, xe, sc, sh, z, s1, mx, am);
            if (d0 < D) i2t_fwd_block(wi, len[i], D, d0, D - d0, kt, xe, sc, sh, z, s1, mx, am);
            float dot = 0.0f, nn = 0.0f;
            int64_t p = (i * C + t) * D;
#pragma omp simd reduction(+ : dot, nn)
            for (int64_t d = 0; d < D; d++) {
                float v = mx[d] / z[d];
                dot += v * u[d];
                nn += v * v;
                s1[d] = xe[d] + s1[d] / z[d];
            }
            if (Z) {
                memcpy(Z + p, z, D * sizeof(float));
                memcpy(EX + p, s1, D * sizeof(float));
                memcpy(ARG + p, am, D * sizeof(int32_t));
            }
            float n = fmaxf(sqrtf(nn), XM_EPS);
            out[i * C + t] = dot / n;
            nrm[i * C + t] = n;
        }
    }
}

/* Channels [d0, d0 + nb) of one I2T pair's word gradient: gw_l -= c e_l. */
static inline __attribute__((always_inline)) void
i2t_bwd_block(const float *restrict wi, float *restrict gwi, int64_t n, int64_t D, int64_t d0, int64_t nb,
              const float *restrict kt, const float *restrict xe, const float *restrict cc) {
    float k[XM_BLK], x0[XM_BLK], c[XM_BLK];
    for (int64_t b = 0; b < nb; b++) {
        k[b] = kt[d0 + b];
        x0[b] = xe[d0 + b];
        c[b] = cc[d0 + b];
    }
    for (int64_t l = 0; l < n; l++) {
        const float *restrict wl = wi + l * D + d0;
        float *restrict gl = gwi + l * D + d0;
#pragma omp simd
        for (int64_t b = 0; b < nb; b++) gl[b] -= c[b] * xm_exp(k[b] * (wl[b] - x0[b]));
    }
}

/* I2T backward. v = p* a* (the arg-max word w*, a* = w* scale + shift, p* = e* / Z):
 * dv/dshift = p*, dv/dk = p* a* (w* - E_p[w]), dv/dscale = p* w* + smooth dv/dk,
 * dv/dw_l = p* ([l = w*] (k a* + scale) - k a* p_l). acc as in t2i_bwd. work: 5 D floats. */
void i2t_bwd(int64_t i0, int64_t i1, int64_t C, int64_t L, int64_t D, float smooth,
             const float *restrict w, const int32_t *restrict len, const float *restrict wmax,
             const float *restrict wmin, const float *restrict scale, const float *restrict shift,
             const float *restrict unit, const float *restrict Z, const float *restrict EX,
             const int32_t *restrict ARG, const float *restrict nrm, const float *restrict out,
             const float *restrict g, float *restrict gw, float *restrict acc, float *restrict work) {
    float *restrict xe = work, *restrict c = work + D, *restrict kt = work + 2 * D;
    float *restrict ws = work + 3 * D, *restrict hit = work + 4 * D;
    float *g_unit = acc, *g_shift = acc + C * D, *g_scale = acc + 2 * C * D, *g_k = acc + 3 * C * D;
    for (int64_t i = i0; i < i1; i++) {
        const float *wi = w + i * L * D;
        float *gwi = gw + i * L * D;
        for (int64_t t = 0; t < C; t++) {
            float gp0 = g[i * C + t];
            if (gp0 == 0.0f) continue;
            const float *restrict sc = scale + t * D, *restrict sh = shift + t * D, *restrict u = unit + t * D;
            int64_t p = (i * C + t) * D;
            const float *z = Z + p, *ex = EX + p;
            const int32_t *arg = ARG + p;
            float n = nrm[i * C + t];
            float gn = gp0 / n, sn = out[i * C + t] / n;
            float *restrict gu = g_unit + t * D, *restrict gs = g_shift + t * D, *restrict gsc = g_scale + t * D,
                          *restrict gk = g_k + t * D;
            for (int64_t d = 0; d < D; d++) kt[d] = smooth * sc[d];
            extremes(kt, wmax + i * D, wmin + i * D, xe, D);
            for (int64_t d = 0; d < D; d++) ws[d] = wi[arg[d] * D + d]; /* the arg-max words */
#pragma omp simd
            for (int64_t d = 0; d < D; d++) {
                float ps = xm_exp(kt[d] * (ws[d] - xe[d])) / z[d];
                float astar = ws[d] * sc[d] + sh[d];
                float v = ps * astar;
                float gpd = gn * (u[d] - sn * v) * ps;
                gk[d] += gpd * astar * (ws[d] - ex[d]);
                gu[d] += gn * v;
                gs[d] += gpd;
                gsc[d] += gpd * ws[d];
                c[d] = gpd * kt[d] * astar / z[d];
                hit[d] = gpd * (kt[d] * astar + sc[d]);
            }
            for (int64_t d = 0; d < D; d++) gwi[arg[d] * D + d] += hit[d];
            int64_t d0 = 0;
            for (; d0 + XM_BLK <= D; d0 += XM_BLK) i2t_bwd_block(wi, gwi, len[i], D, d0, XM_BLK, kt, xe, c);
            if (d0 < D) i2t_bwd_block(wi, gwi, len[i], D, d0, D - d0, kt, xe, c);
        }
    }
}
