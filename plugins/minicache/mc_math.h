/* mc_math.h — the arithmetic of MiniCache (Liu et al. 2024), as pure static-inline functions shared by
 * minicache.c and tests/test_minicache.c: magnitude/direction split, angular distance, SLERP of two unit
 * directions and the token-retention rule.
 * Owns: the numerics and their degenerate cases. Does not own: where directions live (minicache.c's
 * arenas), which layers pair up, or the streaming statistics (minicache.c keeps d_min / d_max).
 *
 * Conventions: vectors are n floats; sums are accumulated in double so results do not depend on the
 * order of n fp32 terms more than necessary. A zero vector has norm 0 and the zero direction. */
#ifndef MC_MATH_H
#define MC_MATH_H

#include <math.h>
#include <stdint.h>

#ifndef MC_PI
#define MC_PI 3.14159265358979323846
#endif

/* Below this sin(Omega) SLERP degenerates to normalized linear interpolation (Omega within ~1e-6 rad
 * of 0 or pi). */
#define MC_SLERP_MIN_SIN 1e-6

/* |x| (Euclidean norm), in double. */
static inline double mc_norm(const float *x, uint32_t n) {
    double s = 0.0;
    for (uint32_t i = 0; i < n; i++) s += (double)x[i] * (double)x[i];
    return sqrt(s);
}

/* e = x / |x|; returns |x|. A zero (or subnormal-tiny) vector gives e = 0 and returns its norm. */
static inline double mc_unit(const float *x, uint32_t n, float *e) {
    double nr = mc_norm(x, n);
    if (!(nr > 1e-30)) {
        for (uint32_t i = 0; i < n; i++) e[i] = 0.0f;
        return nr;
    }
    double inv = 1.0 / nr;
    for (uint32_t i = 0; i < n; i++) e[i] = (float)((double)x[i] * inv);
    return nr;
}

/* Cosine of the angle between two unit directions (either may be the zero direction: cosine 0),
 * clamped to [-1, 1] so rounding never takes acos out of its domain. */
static inline double mc_cos(const float *ea, const float *eb, uint32_t n) {
    double d = 0.0;
    for (uint32_t i = 0; i < n; i++) d += (double)ea[i] * (double)eb[i];
    return d > 1.0 ? 1.0 : (d < -1.0 ? -1.0 : d);
}

/* Angular distance d = arccos(e_a . e_b) / pi in [0, 1]: 0 same direction, 0.5 orthogonal (or a zero
 * direction), 1 opposite. */
static inline double mc_angular_distance(const float *ea, const float *eb, uint32_t n) {
    return acos(mc_cos(ea, eb, n)) / MC_PI;
}

/* out = SLERP(e_a, e_b; t) = sin((1-t) W)/sin W * e_a + sin(t W)/sin W * e_b, W = arccos(e_a . e_b),
 * renormalized to unit length (exact SLERP of unit vectors is unit; renormalizing removes rounding and
 * handles a zero direction on one side, which then yields the other side's direction). When sin W is
 * tiny (W ~ 0 or ~ pi) it uses the normalized linear interpolation (1-t) e_a + t e_b; if that vanishes
 * too (exactly opposite directions at t = 0.5, or both zero) the result is e_a for t < 0.5, else e_b
 * (every direction orthogonal to both is equally "between" them; this picks a deterministic one).
 * out may not alias e_a or e_b. */
static inline void mc_slerp(const float *ea, const float *eb, uint32_t n, double t, float *out) {
    double c = mc_cos(ea, eb, n);
    double w = acos(c), sw = sin(w);
    double ca, cb;
    if (sw > MC_SLERP_MIN_SIN) {
        ca = sin((1.0 - t) * w) / sw;
        cb = sin(t * w) / sw;
    } else {
        ca = 1.0 - t;
        cb = t;
    }
    double s = 0.0;
    for (uint32_t i = 0; i < n; i++) {
        double v = ca * (double)ea[i] + cb * (double)eb[i];
        s += v * v;
    }
    double nr = sqrt(s);
    if (!(nr > 1e-12)) {
        const float *src = t < 0.5 ? ea : eb;
        for (uint32_t i = 0; i < n; i++) out[i] = src[i];
        return;
    }
    double inv = 1.0 / nr;
    for (uint32_t i = 0; i < n; i++) out[i] = (float)((ca * (double)ea[i] + cb * (double)eb[i]) * inv);
}

/* Retention rule: a token whose angular distance d lies in the top fraction gamma of the observed range,
 * d >= d_max - gamma (d_max - d_min), is kept unmerged (returns 1); below it the token is merged (0).
 * gamma = 1 retains every token (d >= d_min always); gamma = 0 merges all but the farthest; the paper's
 * 0.05 keeps the few most distinct pairs. d_min <= d <= d_max is expected (the caller updates its
 * statistics with the token before asking). A single token (d_min == d_max) is retained. */
static inline int mc_retain(double d, double d_min, double d_max, double gamma) {
    return d >= d_max - gamma * (d_max - d_min);
}

#endif /* MC_MATH_H */
