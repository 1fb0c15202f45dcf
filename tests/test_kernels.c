/* tests/test_kernels.c - every SIMD kernel of afm.h against the scalar reference.
   Build (C or C++):  cc -O2 -std=c99 -Wall -Wextra -Wpedantic tests/test_kernels.c -lm -lpthread
   Closing line: "N passed, N failed". Exit status 0 iff nothing failed.
   Integer paths (activation quantization, dequantization) must match bit for bit; float sums
   must agree within float rounding of the sum of absolute terms. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#define AFM_IMPLEMENTATION
#include "../afm.h"

static int n_pass, n_fail;
static int check(int ok, const char *what) {
    if (ok) n_pass++;
    else { n_fail++; printf("FAIL: %s\n", what); }
    return ok;
}

/* ---- deterministic random numbers ---- */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}
static float rndf(void) { return (float)(rnd() & 0xffffff) / 16777216.0f * 2.0f - 1.0f; } /* [-1, 1) */
static float rnd_act(void) { /* activations with occasional outliers */
    float x = rndf();
    uint32_t u = rnd() % 64;
    if (u == 0) x *= 40.0f;
    else if (u == 1) x = 0.0f;
    return x;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) { printf("out of memory\n"); exit(2); }
    return p;
}

/* A Q2B matrix (file layout, at p) into panels, as the loader does, in a new buffer; frees p. */
static uint8_t *panelize(afm__wmat *w, uint8_t *p) {
    uint8_t *panels = (uint8_t *)xmalloc(afm__q2b_panels_size(w)), *tmp = (uint8_t *)xmalloc(afm__q2b_panel_tmp_size(w));
    afm__q2b_panelize(w, panels, tmp);
    free(tmp);
    free(p);
    return panels;
}

/* A random tensor of a type: random codes (padding too) and random fp16 scales; Q2B in panels. */
static uint8_t *make_weights(int type, int rows, int cols, int group, afm__wmat *w) {
    uint64_t size = afm__type_size(type, (uint64_t)rows, (uint64_t)cols, (uint32_t)(afm__type_is_quant(type) ? group : 0));
    uint8_t *p = (uint8_t *)xmalloc((size_t)size);
    size_t i;
    for (i = 0; i < size; i++) p[i] = (uint8_t)rnd();
    if (afm__wmat_init(w, type, p, size, rows, cols, afm__type_is_quant(type) ? group : 0) != 0) {
        printf("wmat_init failed\n");
        exit(2);
    }
    if (type == AFM_TYPE_Q8) /* codes in -127..127 */
        for (i = 0; i < (size_t)rows * w->row_bytes; i++) if (p[i] == 0x80) p[i] = 0x81;
    if (afm__type_is_quant(type)) {
        size_t ns = (size_t)rows * (size_t)w->n_groups;
        for (i = 0; i < ns; i++) {
            float s = (0.001f + 0.05f * (float)(rnd() % 1000) / 1000.0f) * ((rnd() & 7) == 0 ? -1.0f : 1.0f);
            uint16_t h = afm__f2h(s);
            memcpy(p + (size_t)rows * w->row_bytes + 2 * i, &h, 2);
        }
    } else {
        int n = rows * cols;
        for (i = 0; i < (size_t)n; i++) {
            float f = rndf() * 0.1f;
            if (type == AFM_TYPE_F32) memcpy(p + 4 * i, &f, 4);
            else if (type == AFM_TYPE_F16) { uint16_t h = afm__f2h(f); memcpy(p + 2 * i, &h, 2); }
            else { uint16_t h = (uint16_t)(afm__bits_from_f32(f) >> 16); memcpy(p + 2 * i, &h, 2); }
        }
    }
    if (type == AFM_TYPE_Q2B) p = panelize(w, p);
    return p;
}

/* Sum of absolute terms of the scalar formula for (row r, token t): the error scale. */
static double abs_terms(const afm__wmat *w, const afm__act *a, int r, int t) {
    double s = 0.0;
    if (afm__type_is_quant(w->type)) {
        int sb;
        for (sb = 0; sb < w->kpad / 64; sb++) {
            double sg = fabs(afm__qscale(w, r, sb));
            /* sum of |(code - offset) * q| over the sub-block: the size of the terms */
            double dot = 0.0;
            int i;
            for (i = 0; i < 64; i++)
                dot += fabs(afm__code(w, r, sb, i) - 0.5 * afm__type_off2(w->type)) *
                       abs(a->q[(size_t)t * (size_t)a->kpad + (size_t)(sb * 64 + i)]);
            s += sg * fabs((double)a->d[(size_t)t * (size_t)a->nsb + (size_t)sb]) * dot;
        }
    } else {
        int i;
        for (i = 0; i < w->cols; i++)
            s += fabs((double)afm__wf_scalar(w->type, w->data + (size_t)r * w->row_bytes, i) * a->x[(size_t)t * (size_t)a->kpad + (size_t)i]);
    }
    return s;
}


/* ---- tests ---- */

static void test_fp16(void) {
    uint32_t h;
    int bad = 0, i;
    for (h = 0; h < 65536; h++) {
        float f = afm__h2f((uint16_t)h);
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue; /* NaN */
        if (afm__f2h(f) != h) bad++;
    }
    check(bad == 0, "fp16 round trip of every half");
    /* rounding: compare with a double-precision nearest-even reference on random floats */
    bad = 0;
    for (i = 0; i < 200000; i++) {
        float f = afm__f32_from_bits(rnd() ^ (rnd() << 16));
        double best = 0, bd = 1e300;
        uint16_t got, want = 0;
        uint32_t c;
        if (!(fabsf(f) < 65504.0f)) continue;
        got = afm__f2h(f);
        /* candidates: the two halves around f */
        for (c = (uint32_t)(got > 0 ? got - 1 : 0); c <= (uint32_t)got + 1 && c < 65536; c++) {
            double v = afm__h2f((uint16_t)c), e = fabs(v - (double)f);
            if ((c & 0x7c00) == 0x7c00) continue;
            if (e < bd || (e == bd && !(c & 1))) { bd = e; best = v; want = (uint16_t)c; }
        }
        (void)best;
        if (afm__h2f(got) != afm__h2f(want)) bad++;
    }
    check(bad == 0, "fp16 conversion rounds to nearest even");
}

static void test_sizes(void) {
    check(afm__type_size(AFM_TYPE_Q2B, 6656, 2048, 64) == 6656ull * (512 + 64), "Q2B size 6656x2048 g64");
    check(afm__type_size(AFM_TYPE_Q2B, 2048, 6656, 128) == 2048ull * (1664 + 104), "Q2B size 2048x6656 g128");
    check(afm__type_size(AFM_TYPE_Q4, 153600, 2048, 64) == 153600ull * (1024 + 64), "Q4 size 153600x2048 g64");
    check(afm__type_size(AFM_TYPE_Q8, 10, 100, 64) == 10ull * (128 + 4), "Q8 size 10x100 g64 (padded)");
    check(afm__type_size(AFM_TYPE_Q2B, 3, 300, 512) == 3ull * (128 + 2), "Q2B size 3x300 g512 (padded)");
    check(afm__type_size(AFM_TYPE_Q2B, 3, 300, 32) == 0, "Q2B group 32 rejected");
    check(afm__type_size(AFM_TYPE_F16, 3, 5, 0) == 30, "F16 size");
    check(afm__type_size(AFM_TYPE_F16, 3, 5, 64) == 0, "F16 with a group rejected");
    check(afm__type_size(7, 3, 5, 0) == 0, "unknown type rejected");
}

/* prepare: SIMD bit-exact to scalar */
static void test_prepare(const afm__kernels *ks, const afm__kernels *kk, const char *lname) {
    static const int sizes[] = {1, 5, 63, 64, 65, 127, 128, 200, 511, 512, 513, 1000, 2048, 2100};
    int si, nt;
    char msg[200];
    for (si = 0; si < (int)(sizeof sizes / sizeof sizes[0]); si++)
        for (nt = 1; nt <= 3; nt++) {
            const int n = sizes[si], ldx = n + 3;
            float *X = (float *)xmalloc(sizeof(float) * (size_t)(nt * ldx));
            size_t sz = afm__act_size(AFM_TYPE_Q2B, nt, n);
            void *b1 = xmalloc(sz), *b2 = xmalloc(sz);
            afm__act a1, a2;
            int i, ok;
            for (i = 0; i < nt * ldx; i++) X[i] = rnd_act();
            if (si % 4 == 3) { /* blocks with NaN, infinity, huge and tiny values: same codes on every level */
                static const float odd[] = {NAN, -INFINITY, 3e38f, -1e-38f, 1e-30f, 7e-31f, 0.0f};
                for (i = 0; i < nt * ldx; i += 61) X[i] = odd[(i / 61) % 7];
                for (i = 0; i < nt * ldx && i < 64; i++) X[i] *= 1e-29f; /* a block at the tiny threshold */
            }
            memset(b1, 0x5a, sz); memset(b2, 0xa5, sz);
            afm__act_init(&a1, AFM_TYPE_Q2B, nt, n, b1);
            afm__act_init(&a2, AFM_TYPE_Q2B, nt, n, b2);
            ks->prepare_q8(&a1, X, (size_t)ldx, 0, nt);
            kk->prepare_q8(&a2, X, (size_t)ldx, 0, 1);
            if (nt > 1) kk->prepare_q8(&a2, X, (size_t)ldx, 1, nt); /* split over tokens */
            ok = memcmp(a1.q, a2.q, (size_t)nt * (size_t)a1.kpad) == 0 &&
                 memcmp(a1.d, a2.d, sizeof(float) * (size_t)nt * (size_t)a1.nsb) == 0 &&
                 memcmp(a1.qs, a2.qs, sizeof(int32_t) * (size_t)nt * (size_t)a1.nsb) == 0;
            snprintf(msg, sizeof msg, "%s prepare_q8 n_in=%d n_tok=%d bit-exact", lname, n, nt);
            check(ok, msg);
            /* the scalar quantization is close to X */
            if (si == 0 && nt == 1 && !(si % 4 == 3)) {
                int t, bad = 0;
                for (t = 0; t < nt; t++)
                    for (i = 0; i < n; i++) {
                        float dq = a1.q[(size_t)t * (size_t)a1.kpad + (size_t)i] * a1.d[(size_t)t * (size_t)a1.nsb + (size_t)(i / 64)];
                        if (fabsf(dq - X[t * ldx + i]) > a1.d[(size_t)t * (size_t)a1.nsb + (size_t)(i / 64)] * 0.5001f) bad++;
                    }
                check(bad == 0, "int8 activations within half a step");
            }
            free(X); free(b1); free(b2);
        }
}

/* Q2B panels (the loader's in-memory layout): every code and scale where the file layout has it,
   padding rows zero, and the in-place rearrangement equal to the one into a new buffer. */
static void test_panels(void) {
    static const int rows_list[] = {1, 15, 16, 17, 33, 48}, cols_list[] = {1, 300, 1000, 2048 + 65}, groups[] = {64, 128, 256, 512};
    int ri, ci, gi, bad = 0, r, sb, i;
    for (ri = 0; ri < 6; ri++)
        for (ci = 0; ci < 4; ci++)
            for (gi = 0; gi < 4; gi++) {
                const int rows = rows_list[ri], cols = cols_list[ci];
                const uint64_t size = afm__type_size(AFM_TYPE_Q2B, (uint64_t)rows, (uint64_t)cols, (uint32_t)groups[gi]);
                uint8_t *file = (uint8_t *)xmalloc((size_t)size), *panels, *tmp;
                afm__wmat f, w;
                size_t k;
                for (k = 0; k < size; k++) file[k] = (uint8_t)rnd();
                afm__wmat_init(&f, AFM_TYPE_Q2B, file, size, rows, cols, groups[gi]);
                w = f;
                panels = (uint8_t *)xmalloc(afm__q2b_panels_size(&w));
                tmp = (uint8_t *)xmalloc(afm__q2b_panel_tmp_size(&w));
                memset(panels, 0xa5, afm__q2b_panels_size(&w));
                afm__q2b_panelize(&w, panels, tmp);
                for (r = 0; r < (rows + 15) / 16 * 16; r++)
                    for (sb = 0; sb < w.kpad / 64; sb++) {
                        const uint8_t *row = f.data + (size_t)r * f.row_bytes;
                        uint16_t want_s = r < rows ? afm__rd16(f.scales + ((size_t)r * (size_t)f.n_groups + (size_t)(sb >> f.gshift)) * 2) : 0;
                        const float got_s = afm__qscale(&w, r, sb), want_f = afm__h2f(want_s);
                        if (memcmp(&got_s, &want_f, 4) != 0) bad++;
                        for (i = 0; i < 64; i++) {
                            int want = r < rows ? (row[(sb >> 2) * 64 + i] >> (2 * (sb & 3))) & 3 : 0;
                            if (afm__code(&w, r, sb, i) != want) bad++;
                        }
                    }
                if (rows % 16 == 0) { /* in place, as the loader does on a writable mapping */
                    uint8_t *copy = (uint8_t *)xmalloc((size_t)size);
                    afm__wmat c;
                    memcpy(copy, file, (size_t)size);
                    afm__wmat_init(&c, AFM_TYPE_Q2B, copy, size, rows, cols, groups[gi]);
                    afm__q2b_panelize(&c, copy, tmp);
                    if (afm__q2b_panels_size(&c) != size || memcmp(copy, panels, (size_t)size) != 0) bad++;
                    free(copy);
                }
                free(file); free(panels); free(tmp);
            }
    check(bad == 0, "Q2B panels: every code and scale where the file has it, padding zero, in place == copied");
}

/* matmul: SIMD vs scalar, plus the scalar reference against a double-precision product of the
   dequantized weights and dequantized activations (ties the matmul layout to the dequant layout). */
static void test_matmul_case(const afm__kernels *ks, const afm__kernels *kk, const char *lname,
                             int type, int rows, int cols, int group, int n_tok, int check_ref) {
    afm__wmat w;
    uint8_t *wd = make_weights(type, rows, cols, group, &w);
    const int ldx = cols + 1;
    const size_t ldy = (size_t)rows + 5;
    float *X = (float *)xmalloc(sizeof(float) * (size_t)(n_tok * ldx));
    size_t sz = afm__act_size(type, n_tok, cols);
    void *b1 = xmalloc(sz), *b2 = xmalloc(sz);
    float *Y1 = (float *)xmalloc(sizeof(float) * ldy * (size_t)n_tok), *Y2 = (float *)xmalloc(sizeof(float) * ldy * (size_t)n_tok);
    void *gs = xmalloc(afm__gemm_scratch_size(w.kpad));
    afm__act a1, a2;
    int i, t, r, bad = 0, poison_bad = 0;
    const int r0 = rows > 3 ? 1 : 0, r1 = rows > 3 ? rows - 1 : rows;
    char msg[256];
    for (i = 0; i < n_tok * ldx; i++) X[i] = rnd_act();
    afm__act_init(&a1, type, n_tok, cols, b1);
    afm__act_init(&a2, type, n_tok, cols, b2);
    afm__prepare_activations(ks, &a1, X, (size_t)ldx, 0, n_tok);
    afm__prepare_activations(kk, &a2, X, (size_t)ldx, 0, n_tok);
    for (i = 0; i < (int)(ldy * (size_t)n_tok); i++) { Y1[i] = -777.0f; Y2[i] = -777.0f; }
    afm__matmul_rows(ks, &w, &a1, Y1, ldy, r0, r1, NULL);
    /* the SIMD run in two row ranges, as two threads would, with the matrix-matrix kernel's scratch */
    afm__matmul_rows(kk, &w, &a2, Y2, ldy, r0, (r0 + r1) / 2, gs);
    afm__matmul_rows(kk, &w, &a2, Y2, ldy, (r0 + r1) / 2, r1, gs);
    for (t = 0; t < n_tok; t++)
        for (r = 0; r < (int)ldy; r++) {
            float y1 = Y1[(size_t)t * ldy + (size_t)r], y2 = Y2[(size_t)t * ldy + (size_t)r];
            if (r < r0 || r >= r1) { if (y2 != -777.0f) poison_bad++; continue; }
            if (memcmp(&y1, &y2, sizeof y1) != 0) { if (bad < 3) printf("  r=%d t=%d ref=%.9g got=%.9g\n", r, t, y1, y2); bad++; }
        }
    snprintf(msg, sizeof msg, "%s matmul %s rows=%d cols=%d group=%d n_tok=%d == scalar, bit for bit", lname,
             afm__type_name(type), rows, cols, group, n_tok);
    check(bad == 0 && poison_bad == 0, msg);
    if (n_tok > 1) { /* batch invariance: each token alone gives the same bits as inside the batch */
        afm__act one = a2;
        float *Y3 = (float *)xmalloc(sizeof(float) * ldy);
        int diff = 0;
        for (t = 0; t < n_tok; t++) {
            one.n_tok = 1;
            if (a2.quant) {
                one.q = a2.q + (size_t)t * (size_t)a2.kpad;
                one.d = a2.d + (size_t)t * (size_t)a2.nsb;
                one.qs = a2.qs + (size_t)t * (size_t)a2.nsb;
            } else one.x = a2.x + (size_t)t * (size_t)a2.kpad;
            afm__matmul_rows(kk, &w, &one, Y3, ldy, r0, r1, gs);
            for (r = r0; r < r1; r++) diff += memcmp(&Y3[r], &Y2[(size_t)t * ldy + (size_t)r], sizeof(float)) != 0;
        }
        free(Y3);
        snprintf(msg, sizeof msg, "%s matmul %s rows=%d cols=%d group=%d: %d tokens in one batch == one by one, bit for bit",
                 lname, afm__type_name(type), rows, cols, group, n_tok);
        check(diff == 0, msg);
    }
    if (check_ref) { /* scalar formula == dequant(W) . dequant(q) in double */
        float *wr = (float *)xmalloc(sizeof(float) * (size_t)cols);
        int rbad = 0;
        for (r = r0; r < r1; r++) {
            afm__dequant_scalar(&w, r, wr);
            for (t = 0; t < n_tok; t++) {
                double s = 0.0, sa = 0.0;
                for (i = 0; i < cols; i++) {
                    double xv = a1.quant ? (double)a1.q[(size_t)t * (size_t)a1.kpad + (size_t)i] * a1.d[(size_t)t * (size_t)a1.nsb + (size_t)(i / 64)]
                                         : (double)a1.x[(size_t)t * (size_t)a1.kpad + (size_t)i];
                    s += (double)wr[i] * xv;
                    sa += fabs((double)wr[i] * xv);
                }
                if (!(fabs(s - Y1[(size_t)t * ldy + (size_t)r]) <= 2e-5 * (sa + abs_terms(&w, &a1, r, t)) + 1e-30)) rbad++;
            }
        }
        snprintf(msg, sizeof msg, "scalar matmul %s rows=%d cols=%d group=%d == dequant product", afm__type_name(type), rows, cols, group);
        check(rbad == 0, msg);
        free(wr);
    }
    free(wd); free(X); free(b1); free(b2); free(Y1); free(Y2); free(gs);
}

static void test_matmul(const afm__kernels *ks, const afm__kernels *kk, const char *lname) {
    static const int types[] = {AFM_TYPE_Q2B, AFM_TYPE_Q4, AFM_TYPE_Q8, AFM_TYPE_F32, AFM_TYPE_F16, AFM_TYPE_BF16};
    static const int cols_list[] = {1, 37, 64, 100, 255, 256, 300, 513, 777, 1000, 2048 + 65};
    static const int toks[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 31, 64, 100};
    static const int groups[] = {64, 128, 256, 512};
    int ti, ci, ni, gi;
    for (ti = 0; ti < 6; ti++) {
        const int type = types[ti], quant = afm__type_is_quant(type);
        for (ci = 0; ci < (int)(sizeof cols_list / sizeof cols_list[0]); ci++)
            for (gi = 0; gi < (quant ? 4 : 1); gi++) {
                const int cols = cols_list[ci];
                /* every token count for a few shapes, a sample for the rest */
                for (ni = 0; ni < (int)(sizeof toks / sizeof toks[0]); ni++) {
                    const int nt = toks[ni];
                    if (!(ci % 3 == 0 || nt <= 3 || nt == 9 || nt == 17) || (nt >= 64 && cols > 1000)) continue;
                    test_matmul_case(ks, kk, lname, type, 1 + (int)(rnd() % 13), cols, quant ? groups[gi] : 0, nt, ni == 0 || ni == 5);
                }
            }
    }
    /* one realistic shape */
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 40, 6656, 64, 1, 0);
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 40, 6656, 128, 9, 0);
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q4, 33, 2048, 64, 5, 0);
    /* the matrix-matrix kernels (gemm_min tokens or more): whole panels of 16 rows and panels cut by
       the row range (rows r0 = 1 .. rows - 1, split in two at about the middle: at least one whole
       panel each side), every group, full token tiles and every remainder */
    for (gi = 0; gi < 4; gi++) {
        test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 70, 300, groups[gi], 3, gi == 0);
        test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 70, 300, groups[gi], 8, 0);
        test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 67, 2048 + 65, groups[gi], 13, 0);
    }
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 70, 1000, 64, 22, 0);
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 70, 1000, 128, 31, 0);
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 80, 6656, 64, 37, 0);
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 65, 1024, 64, 300, 0);
    /* decode and two-token verification: whole panels two at a time from the two halves of each
       thread's range (5 and 6 whole panels between cut ones: an odd one left, and none) */
    for (gi = 0; gi < 4; gi++) {
        test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 200, 300, groups[gi], 1, 0);
        test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 200, 2048 + 65, groups[gi], 2, 0);
    }
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 230, 640, 64, 1, 0);
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 230, 640, 128, 2, 0);
    /* AMX: whole tiles of 16 tokens and a rest, with sub-blocks not a multiple of 8 (36: lanes of
       5 and 4 sub-blocks) and fewer than 8 (4) */
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 50, 2048 + 65, 64, 16, 0);
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 50, 2048 + 65, 128, 33, 0);
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 40, 200, 64, 16, 0);
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q2B, 40, 200, 256, 21, 0);
    /* Q4 batches (the output head when every position's logits are wanted; AMX takes 16 rows at a
       time): blocks of 16 rows and rows cut by the range, every group, 1 to 21 64-byte blocks a
       row, token tiles of 16 and a rest */
    for (gi = 0; gi < 4; gi++) {
        test_matmul_case(ks, kk, lname, AFM_TYPE_Q4, 70, 300, groups[gi], 4, 0);
        test_matmul_case(ks, kk, lname, AFM_TYPE_Q4, 67, 2048 + 65, groups[gi], 9, 0);
    }
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q4, 50, 1000, 64, 16, 0);
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q4, 50, 640, 128, 21, 0);
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q4, 70, 100, 64, 6, 0);
    test_matmul_case(ks, kk, lname, AFM_TYPE_Q4, 70, 256, 128, 4, 0);
}

static void test_dequant(const afm__kernels *ks, const afm__kernels *kk, const char *lname) {
    static const int types[] = {AFM_TYPE_Q2B, AFM_TYPE_Q4, AFM_TYPE_Q8, AFM_TYPE_F32, AFM_TYPE_F16, AFM_TYPE_BF16};
    static const int cols_list[] = {1, 63, 64, 65, 129, 255, 256, 257, 1000, 2048};
    static const int groups[] = {64, 128, 256, 512};
    int ti, ci, gi, r;
    char msg[200];
    for (ti = 0; ti < 6; ti++)
        for (ci = 0; ci < (int)(sizeof cols_list / sizeof cols_list[0]); ci++)
            for (gi = 0; gi < (afm__type_is_quant(types[ti]) ? 4 : 1); gi++) {
                afm__wmat w;
                const int rows = 3, cols = cols_list[ci];
                uint8_t *wd = make_weights(types[ti], rows, cols, groups[gi], &w);
                float *o1 = (float *)xmalloc(sizeof(float) * (size_t)(cols + 1)), *o2 = (float *)xmalloc(sizeof(float) * (size_t)(cols + 1));
                int ok = 1;
                for (r = 0; r < rows; r++) {
                    o1[cols] = o2[cols] = 12345.0f;
                    afm__dequantize_row(ks, &w, r, o1);
                    afm__dequantize_row(kk, &w, r, o2);
                    if (memcmp(o1, o2, sizeof(float) * (size_t)(cols + 1)) != 0 || o2[cols] != 12345.0f) ok = 0;
                }
                snprintf(msg, sizeof msg, "%s dequant %s cols=%d group=%d bit-exact", lname, afm__type_name(types[ti]), cols,
                         afm__type_is_quant(types[ti]) ? groups[gi] : 0);
                check(ok, msg);
                free(wd); free(o1); free(o2);
            }
}

static void test_kv_f(const afm__kernels *ks, const afm__kernels *kk, const char *lname) {
    /* the float kernels (float models, f32 activations): the AVX2 ones tile 24 columns (values) and
       8 heads x 1 position, 4 x 2, 2 x 4 or 1 x 8 (scores): dims and counts around those sizes reach
       every tile and remainder */
    static const int dims[] = {1, 7, 8, 17, 24, 32, 40, 48, 64, 100, 128, 136};
    static const int npos[] = {1, 2, 3, 5, 7, 9, 16, 33, 100, 128};
    static const int nqs[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16};
    int di, pi, qi;
    char msg[200];
    for (di = 0; di < (int)(sizeof dims / sizeof dims[0]); di++)
        for (pi = 0; pi < (int)(sizeof npos / sizeof npos[0]); pi++)
            for (qi = 0; qi < (int)(sizeof nqs / sizeof nqs[0]); qi++) {
                const int dim = dims[di], n = npos[pi], nq = nqs[qi];
                const size_t ks_ = (size_t)dim + 3, ldq = (size_t)dim + 1, lds = (size_t)n + 2;
                int8_t *K = (int8_t *)xmalloc(ks_ * (size_t)n);
                float *q = (float *)xmalloc(sizeof(float) * ldq * (size_t)nq);
                float *s1 = (float *)xmalloc(sizeof(float) * lds * (size_t)nq), *s2 = (float *)xmalloc(sizeof(float) * lds * (size_t)nq);
                float *o1 = (float *)xmalloc(sizeof(float) * ldq * (size_t)nq), *o2 = (float *)xmalloc(sizeof(float) * ldq * (size_t)nq);
                size_t i;
                int h, p, bad = 0;
                const float scale = 0.0123f;
                for (i = 0; i < ks_ * (size_t)n; i++) K[i] = (int8_t)(rnd() % 255 - 127);
                for (i = 0; i < ldq * (size_t)nq; i++) q[i] = rndf();
                ks->kv_scores_f(q, ldq, nq, K, ks_, n, dim, scale, s1, lds, NULL);
                kk->kv_scores_f(q, ldq, nq, K, ks_, n, dim, scale, s2, lds, nq % 2 ? K : NULL); /* the hint changes nothing */
                for (h = 0; h < nq; h++)
                    for (p = 0; p < n; p++) bad += memcmp(&s1[(size_t)h * lds + (size_t)p], &s2[(size_t)h * lds + (size_t)p], 4) != 0;
                snprintf(msg, sizeof msg, "%s kv_scores_f dim=%d n_pos=%d nq=%d == scalar, bit for bit", lname, dim, n, nq);
                check(bad == 0, msg);
                /* values: probabilities in s1 rows (positive) */
                for (h = 0; h < nq; h++) for (p = 0; p < n; p++) s1[(size_t)h * lds + (size_t)p] = (float)(rnd() % 1000) / 1000.0f;
                for (i = 0; i < ldq * (size_t)nq; i++) o1[i] = o2[i] = -5.0f;
                ks->kv_values_f(s1, lds, nq, K, ks_, n, dim, scale, o1, ldq);
                kk->kv_values_f(s1, lds, nq, K, ks_, n, dim, scale, o2, ldq);
                bad = 0;
                for (h = 0; h < nq; h++) {
                    bad += memcmp(o1 + (size_t)h * ldq, o2 + (size_t)h * ldq, sizeof(float) * (size_t)dim) != 0;
                    if (o2[(size_t)h * ldq + (size_t)dim] != -5.0f) bad++;
                }
                snprintf(msg, sizeof msg, "%s kv_values_f dim=%d n_pos=%d nq=%d == scalar, bit for bit", lname, dim, n, nq);
                check(bad == 0, msg);
                free(K); free(q); free(s1); free(s2); free(o1); free(o2);
            }
}

static void test_kv(const afm__kernels *ks, const afm__kernels *kk, const char *lname) {
    /* the AVX2 kernels take 16 dims at a time and 8 heads (scores), 4 heads x 16 or 8 columns over
       pairs of positions (values): dims, positions and head counts around those sizes reach every
       tile and remainder, odd position counts the unpaired last one */
    static const int dims[] = {1, 7, 8, 15, 16, 17, 24, 32, 40, 48, 64, 100, 128, 136};
    static const int npos[] = {1, 2, 3, 5, 7, 9, 16, 33, 100, 128};
    static const int nqs[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16};
    int di, pi, qi;
    char msg[200];
    for (di = 0; di < (int)(sizeof dims / sizeof dims[0]); di++)
        for (pi = 0; pi < (int)(sizeof npos / sizeof npos[0]); pi++)
            for (qi = 0; qi < (int)(sizeof nqs / sizeof nqs[0]); qi++) {
                const int dim = dims[di], n = npos[pi], nq = nqs[qi];
                const size_t ks_ = (size_t)dim + 3, ldq = (size_t)dim + 1, lds = (size_t)n + 2, ldp = (size_t)n + 3;
                int8_t *K = (int8_t *)xmalloc(ks_ * (size_t)n);
                int16_t *q = (int16_t *)xmalloc(sizeof(int16_t) * ldq * (size_t)nq), *pr = (int16_t *)xmalloc(sizeof(int16_t) * ldp * (size_t)nq);
                float *s1 = (float *)xmalloc(sizeof(float) * lds * (size_t)nq), *s2 = (float *)xmalloc(sizeof(float) * lds * (size_t)nq);
                float *o1 = (float *)xmalloc(sizeof(float) * ldq * (size_t)nq), *o2 = (float *)xmalloc(sizeof(float) * ldq * (size_t)nq);
                float qs[16], vs[16];
                size_t i;
                int h, p, bad = 0, wrong = 0;
                /* the extremes the callers allow: keys down to -128, queries +-32767, probabilities up to 32767 */
                for (i = 0; i < ks_ * (size_t)n; i++) K[i] = (int8_t)(i % 11 == 0 ? -128 : (int)(rnd() % 256) - 128);
                for (i = 0; i < ldq * (size_t)nq; i++) q[i] = (int16_t)(i % 13 == 0 ? -32767 : i % 13 == 1 ? 32767 : (int)(rnd() % 65535) - 32767);
                for (i = 0; i < ldp * (size_t)nq; i++) pr[i] = (int16_t)(i % 7 == 0 ? 32767 : (int)(rnd() % 32768));
                for (h = 0; h < nq; h++) { qs[h] = 1e-4f * (float)(h + 1); vs[h] = 3e-5f / (float)(h + 1); }
                for (i = 0; i < lds * (size_t)nq; i++) s1[i] = s2[i] = -7.0f; /* the rows' padding must stay */
                ks->kv_scores(q, ldq, nq, K, ks_, n, dim, qs, s1, lds, NULL);
                kk->kv_scores(q, ldq, nq, K, ks_, n, dim, qs, s2, lds, nq % 2 ? K : NULL); /* the hint changes nothing */
                for (h = 0; h < nq; h++)
                    bad += s2[(size_t)h * lds + (size_t)n] != -7.0f || s2[(size_t)h * lds + (size_t)n + 1] != -7.0f;
                for (h = 0; h < nq; h++)
                    for (p = 0; p < n; p++) {
                        int64_t sum = 0;
                        int d;
                        for (d = 0; d < dim; d++) sum += (int64_t)q[(size_t)h * ldq + (size_t)d] * K[(size_t)p * ks_ + (size_t)d];
                        bad += memcmp(&s1[(size_t)h * lds + (size_t)p], &s2[(size_t)h * lds + (size_t)p], 4) != 0;
                        wrong += s1[(size_t)h * lds + (size_t)p] != (float)sum * qs[h];
                    }
                snprintf(msg, sizeof msg, "%s kv_scores dim=%d n_pos=%d nq=%d == scalar, bit for bit (scalar == the int64 sum)", lname, dim, n, nq);
                check(bad == 0 && wrong == 0, msg);
                for (i = 0; i < ldq * (size_t)nq; i++) o1[i] = o2[i] = -5.0f;
                ks->kv_values(pr, ldp, nq, K, ks_, n, dim, vs, o1, ldq);
                kk->kv_values(pr, ldp, nq, K, ks_, n, dim, vs, o2, ldq);
                bad = wrong = 0;
                for (h = 0; h < nq; h++) {
                    int d;
                    bad += memcmp(o1 + (size_t)h * ldq, o2 + (size_t)h * ldq, sizeof(float) * (size_t)dim) != 0;
                    if (o2[(size_t)h * ldq + (size_t)dim] != -5.0f) bad++;
                    for (d = 0; d < dim; d++) {
                        int64_t sum = 0;
                        for (p = 0; p < n; p++) sum += (int64_t)pr[(size_t)h * ldp + (size_t)p] * K[(size_t)p * ks_ + (size_t)d];
                        wrong += o1[(size_t)h * ldq + (size_t)d] != (float)sum * vs[h];
                    }
                }
                snprintf(msg, sizeof msg, "%s kv_values dim=%d n_pos=%d nq=%d == scalar, bit for bit (scalar == the int64 sum)", lname, dim, n, nq);
                check(bad == 0 && wrong == 0, msg);
                free(K); free(q); free(pr); free(s1); free(s2); free(o1); free(o2);
            }
    { /* the largest sums the callers allow: head_dim 1024, codes +-16383 (afm__quant_query's limit
         there) against keys of -128, and 128 positions of probability 32767 against -128 */
        const int dim = 1024, n = 128, nq = 8;
        int8_t *K = (int8_t *)xmalloc((size_t)dim * (size_t)n);
        int16_t *q = (int16_t *)xmalloc(sizeof(int16_t) * (size_t)dim * (size_t)nq), *pr = (int16_t *)xmalloc(sizeof(int16_t) * (size_t)n * (size_t)nq);
        float *s1 = (float *)xmalloc(sizeof(float) * (size_t)n * (size_t)nq), *s2 = (float *)xmalloc(sizeof(float) * (size_t)n * (size_t)nq);
        float *o1 = (float *)xmalloc(sizeof(float) * (size_t)dim * (size_t)nq), *o2 = (float *)xmalloc(sizeof(float) * (size_t)dim * (size_t)nq);
        const float one[8] = {1, 1, 1, 1, 1, 1, 1, 1};
        size_t i;
        int bad = 0;
        memset(K, 0x80, (size_t)dim * (size_t)n);
        for (i = 0; i < (size_t)dim * (size_t)nq; i++) q[i] = (int16_t)(i / (size_t)dim % 2 ? 16383 : -16383);
        for (i = 0; i < (size_t)n * (size_t)nq; i++) pr[i] = 32767;
        ks->kv_scores(q, (size_t)dim, nq, K, (size_t)dim, n, dim, one, s1, (size_t)n, NULL);
        kk->kv_scores(q, (size_t)dim, nq, K, (size_t)dim, n, dim, one, s2, (size_t)n, NULL);
        ks->kv_values(pr, (size_t)n, nq, K, (size_t)dim, n, dim, one, o1, (size_t)dim);
        kk->kv_values(pr, (size_t)n, nq, K, (size_t)dim, n, dim, one, o2, (size_t)dim);
        for (i = 0; i < (size_t)n * (size_t)nq; i++) bad += s2[i] != s1[i] || s1[i] != (i / (size_t)n % 2 ? -2147352576.0f : 2147352576.0f);
        for (i = 0; i < (size_t)dim * (size_t)nq; i++) bad += o2[i] != o1[i] || o1[i] != -536854528.0f;
        snprintf(msg, sizeof msg, "%s kv_scores and kv_values at the largest sums (dim 1024, codes 16383 and 32767 against -128) == the exact sums", lname);
        check(bad == 0, msg);
        free(K); free(q); free(pr); free(s1); free(s2); free(o1); free(o2);
    }
    for (di = 1; di <= 140; di += (di < 18 ? 1 : 17)) { /* round16: n = 1 .. 18, then 35, 52, ..., 137 */
        float x[141];
        int16_t r1[142], r2[142];
        const float mul = 32767.0f;
        int i, bad = 0;
        for (i = 0; i < 141; i++) x[i] = rndf();
        x[0] = 1.0f; x[1] = -1.0f; x[2] = 0.5f / mul; x[3] = 1.5f / mul; x[4] = -2.5f / mul; /* ends; ties go to even */
        if (di > 9) { x[5] = (float)NAN; x[9] = -(float)NAN; }
        r1[di] = r2[di] = 12345;
        ks->round16(r1, x, di, mul);
        kk->round16(r2, x, di, mul);
        bad += memcmp(r1, r2, sizeof(int16_t) * (size_t)(di + 1)) != 0 || r2[di] != 12345;
        for (i = 0; i < di; i++) bad += r1[i] != (x[i] == x[i] ? (int)lrintf(x[i] * mul) : 0);
        if (di > 4) bad += r1[0] != 32767 || r1[1] != -32767 || r1[2] != 0 || r1[3] != 2 || r1[4] != -2;
        snprintf(msg, sizeof msg, "%s round16 n=%d == scalar, bit for bit (ties to even, NaN to 0, nothing past n)", lname, di);
        check(bad == 0, msg);
    }
    for (di = 1; di <= 140; di += (di < 18 ? 1 : 17)) { /* axpy: n = 1 .. 18, then 35, 52, ..., 137 */
        float y1[141], y2[141], x[141], a = rndf() * 3.0f;
        int i, bad = 0;
        for (i = 0; i < 141; i++) { x[i] = rndf(); y1[i] = y2[i] = rndf(); }
        ks->axpy(y1, a, x, di);
        kk->axpy(y2, a, x, di);
        for (i = 0; i < 141; i++) bad += memcmp(&y1[i], &y2[i], 4) != 0;
        snprintf(msg, sizeof msg, "%s axpy n=%d == scalar, bit for bit (and nothing past n)", lname, di);
        check(bad == 0, msg);
    }
}

/* Regression (hostile case q8_nan_activations_ubsan.afm): NaN, infinite, huge and tiny activations
   once overflowed the int8 block's code sum (signed overflow, UBSan). Now a block with NaN or
   infinity gets codes 0 and NaN scales, a block under 2^-100 is zero, and huge finite values quantize
   normally; the same on every level (this file also runs under ASan/UBSan). */
static void test_q8_nan_activations_ubsan(const afm__kernels *kk, const char *lname) {
    static const float fill[5] = {NAN, INFINITY, 3.4e38f, 1e-35f, -2.5f};
    float X[5 * 64];
    size_t sz = afm__act_size(AFM_TYPE_Q8, 1, 5 * 64);
    void *buf = xmalloc(sz);
    afm__act a;
    char msg[200];
    int b, i, ok = 1;
    for (b = 0; b < 5; b++)
        for (i = 0; i < 64; i++) X[b * 64 + i] = i == 7 ? fill[b] : (float)(i % 5) - 2.0f; /* one odd value per block */
    afm__act_init(&a, AFM_TYPE_Q8, 1, 5 * 64, buf);
    kk->prepare_q8(&a, X, 5 * 64, 0, 1);
    for (b = 0; b < 2; b++) { /* NaN, infinity */
        ok &= a.d[b] != a.d[b] && a.qs[b] == 0;
        for (i = 0; i < 64; i++) ok &= a.q[b * 64 + i] == 0;
    }
    ok &= a.d[2] == 3.4e38f / 127.0f && a.q[2 * 64 + 7] == 127 && a.q[2 * 64 + 0] == 0; /* huge: that value alone counts */
    ok &= a.d[3] > 0 && a.q[3 * 64 + 7] == 0 && a.q[3 * 64 + 4] == 127;                 /* tiny next to 2: rounds to 0 */
    ok &= a.d[4] == 2.5f / 127.0f && a.q[4 * 64 + 7] == -127;
    snprintf(msg, sizeof msg, "%s q8_nan_activations_ubsan: NaN/inf blocks give codes 0 and NaN scales, huge and tiny values quantize, no overflow", lname);
    check(ok, msg);
    free(buf);
}

/* n floats with the same bits, or both NaN (NaN payloads are not part of the contract: compilers
   treat a + b as b + a, and x86 and arm64 make different NaNs). */
static int same_floats(const float *a, const float *b, int n) {
    int i;
    for (i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], 4) != 0 && !(a[i] != a[i] && b[i] != b[i])) return 0;
    return 1;
}

/* The shared elementwise math: exp within 1 ulp of the double-precision value over its whole range
   (every 97th float), and silu_mul / softmax bit for bit against the scalar reference on values
   that cover the range, with NaN and infinities, at every length mod 8. */
static void test_math(const afm__kernels *ks, const afm__kernels *kk, const char *lname, int first) {
    char msg[200];
    int n, i, bad = 0;
    if (first) {
        uint32_t u;
        double worst = 0;
        for (u = 0; u < 0xffffffffu - 97; u += 97) {
            float x, y;
            double e, err;
            memcpy(&x, &u, 4);
            y = afm__expf(x);
            if (x != x) { bad += y == y; continue; }
            e = exp((double)x);
            if (x < AFM__EXP_LO) { bad += y != 0.0f; continue; }
            if (e > FLT_MAX) { bad += y != INFINITY; continue; }
            err = fabs((double)y - e) / (e < 1.17549435e-38 ? 1.4e-45 : ldexp(1.0, ilogb(e) - 23));
            if (err > worst) worst = err;
        }
        snprintf(msg, sizeof msg, "afm__expf within 1 ulp of exp (worst %.3f ulp) and its range rules", worst);
        check(bad == 0 && worst < 1.0, msg);
        {
            double sn, cs, worst_t = 0;
            for (i = 0; i < 200000; i++) {
                double x = (double)(i * 37 % 65536) * ((i % 7) + 1) * 0.0123456789 - 100.0;
                afm__sincos_d(x, &sn, &cs);
                if (fabs(sn - sin(x)) > worst_t) worst_t = fabs(sn - sin(x));
                if (fabs(cs - cos(x)) > worst_t) worst_t = fabs(cs - cos(x));
            }
            snprintf(msg, sizeof msg, "afm__sincos_d within %.3g of libm's sin and cos", worst_t);
            check(worst_t < 1e-13, msg);
            worst_t = 0;
            for (i = 1; i < 64; i++) {
                double e = -2.0 * i / 128 * afm__log_d(500000.0), want = pow(500000.0, -2.0 * i / 128);
                if (fabs(afm__exp_d(e) - want) / want > worst_t) worst_t = fabs(afm__exp_d(e) - want) / want;
            }
            snprintf(msg, sizeof msg, "afm__exp_d(y * afm__log_d(theta)) within %.3g (relative) of pow", worst_t);
            check(worst_t < 1e-14, msg);
        }
    }
    for (n = 1; n <= 70; n += (n < 20 ? 1 : 7)) {
        float *h1 = (float *)xmalloc(sizeof(float) * (size_t)n), *h2 = (float *)xmalloc(sizeof(float) * (size_t)n);
        float *g = (float *)xmalloc(sizeof(float) * (size_t)n), s1, s2, m1, m2;
        static const float odd[] = {NAN, INFINITY, -INFINITY, 89.0f, -89.0f, 88.7f, -87.4f, 0.0f, -0.0f, 1e-30f};
        for (i = 0; i < n; i++) {
            h1[i] = h2[i] = (rnd() % 5 == 0) ? odd[rnd() % 10] : (rndf() - 0.5f) * 60.0f;
            g[i] = rndf();
        }
        ks->silu_mul(h1, g, n);
        kk->silu_mul(h2, g, n);
        bad = !same_floats(h1, h2, n);
        for (i = 0; i < n; i++) h1[i] = h2[i] = (rnd() % 9 == 0) ? odd[rnd() % 10] : (rndf() - 0.5f) * 60.0f;
        s1 = ks->expsum(h1, n, &m1);
        s2 = kk->expsum(h2, n, &m2);
        bad += !same_floats(h1, h2, n) + !same_floats(&s1, &s2, 1) + !same_floats(&m1, &m2, 1);
        for (i = 0; i < n; i++) h1[i] = h2[i] = (rndf() - 0.5f) * 40.0f;
        s1 = ks->expsum(h1, n, &m1);
        s2 = kk->expsum(h2, n, &m2);
        bad += !same_floats(h1, h2, n) + !same_floats(&s1, &s2, 1) + !same_floats(&m1, &m2, 1);
        snprintf(msg, sizeof msg, "%s silu_mul and expsum (softmax's exp and sum) n=%d == scalar, bit for bit", lname, n);
        check(bad == 0, msg);
        free(h1); free(h2); free(g);
    }
    for (n = 1; n <= 140; n += (n < 40 ? 1 : 17)) { /* softmax16: n = 1 .. 40, then 57, ..., 125 (past 16s and 8s) */
        float x[141], m1, m2;
        int16_t c1[142], c2[142];
        int32_t s1, s2, want = 0;
        double worst = 0;
        for (i = 0; i < n; i++) x[i] = (rnd() % 4 == 0) ? (rndf() - 0.5f) * 60.0f : 40.0f - 12.0f * fabsf(rndf()); /* most within 12 of the max, some far below */
        if (n > 5) { x[3] = NAN; x[n - 1] = 40.0f; x[n - 2] = 40.0f - 4e-6f; } /* NaN skipped; the maximum (inputs are below 30) twice, nearly */
        c1[n] = c2[n] = 12345;
        s1 = ks->softmax16(x, n, &m1, c1);
        s2 = kk->softmax16(x, n, &m2, c2);
        bad = memcmp(c1, c2, sizeof(int16_t) * (size_t)(n + 1)) != 0 || c2[n] != 12345 || s1 != s2 || !same_floats(&m1, &m2, 1);
        for (i = 0; i < n; i++) { /* codes within a step of 32767 e^(x - max), summed; NaN gives 0 */
            const double e = x[i] == x[i] ? 32767.0 * exp((double)x[i] - (double)m1) : 0.0;
            if (fabs(c1[i] - e) > worst) worst = fabs(c1[i] - e);
            want += c1[i];
        }
        /* 0.6: half a step of rounding, and 0.1 of a step (3e-6) for the series */
        bad += want != s1 || worst > 0.6 || (n > 5 && (m1 != 40.0f || c1[n - 1] != 32767 || c1[3] != 0));
        snprintf(msg, sizeof msg, "%s softmax16 n=%d == scalar, bit for bit; codes within %.2f of 32767 e^(x - max) (limit 0.6)", lname, n, worst);
        check(bad == 0, msg);
    }
    for (n = 1; n <= 21; n += 4) { /* rows of NaN (a NaN query's scores), of infinities, and maxima of -0 and +0 */
        static const float fill[4][3] = {{NAN, NAN, NAN}, {INFINITY, -INFINITY, 1.0f}, {-0.0f, 0.0f, -3.0f}, {0.0f, -0.0f, -1e-30f}};
        int f;
        for (f = 0; f < 4; f++) {
            float x[21], m1, m2;
            int16_t c1[21], c2[21];
            int32_t s1, s2;
            for (i = 0; i < n; i++) x[i] = fill[f][(i * 7 + n) % 3];
            s1 = ks->softmax16(x, n, &m1, c1);
            s2 = kk->softmax16(x, n, &m2, c2);
            bad = memcmp(c1, c2, sizeof(int16_t) * (size_t)n) != 0 || s1 != s2 || !same_floats(&m1, &m2, 1) ||
                  (f == 0 && (s1 != 0 || m1 != -FLT_MAX));
            snprintf(msg, sizeof msg, "%s softmax16 n=%d on %s == scalar, bit for bit", lname, n,
                     f == 0 ? "NaN (codes 0, max -FLT_MAX)" : f == 1 ? "infinities" : "signed zeros");
            check(bad == 0, msg);
        }
    }
}

/* A fixture written by tests/gen/quantize.py --fixtures: Python's encoding and its float32 decode.
   The C decode (every level) must reproduce it bit for bit. */
static void test_fixture(const char *path, const afm__kernels *kk, int nk) {
    FILE *f = fopen(path, "rb");
    unsigned char hdr[32];
    uint32_t type, rows, cols, group;
    uint64_t n;
    uint8_t *data = NULL;
    float *want = NULL, *got = NULL;
    afm__wmat w;
    char msg[300];
    int ok = 0, i, r;
    if (!f || fread(hdr, 1, 32, f) != 32 || memcmp(hdr, "AFMQFIX1", 8) != 0) goto done;
    memcpy(&type, hdr + 8, 4); memcpy(&rows, hdr + 12, 4); memcpy(&cols, hdr + 16, 4); memcpy(&group, hdr + 20, 4);
    memcpy(&n, hdr + 24, 8);
    if (rows == 0 || cols == 0 || rows > 100000 || cols > 100000 || n > ((uint64_t)1 << 32)) goto done;
    data = (uint8_t *)xmalloc((size_t)n);
    want = (float *)xmalloc(sizeof(float) * (size_t)rows * cols);
    got = (float *)xmalloc(sizeof(float) * (size_t)cols);
    if (fread(data, 1, (size_t)n, f) != (size_t)n || fread(want, sizeof(float), (size_t)rows * cols, f) != (size_t)rows * cols) goto done;
    if (afm__wmat_init(&w, (int)type, data, n, (int)rows, (int)cols, (int)group) != 0) goto done;
    if (type == AFM_TYPE_Q2B) data = panelize(&w, data);
    ok = 1;
    for (i = 0; i < nk; i++)
        for (r = 0; r < (int)rows; r++) {
            afm__dequantize_row(&kk[i], &w, r, got);
            if (memcmp(got, want + (size_t)r * cols, sizeof(float) * cols) != 0) ok = 0;
        }
done:
    snprintf(msg, sizeof msg, "fixture %s: C decode == Python decode (bit-exact, %d kernel sets)", path, nk);
    check(ok, msg);
    if (f) fclose(f);
    free(data); free(want); free(got);
}

int main(int argc, char **argv) {
    afm__kernels ks, kk, all[8];
    int level, top, nall = 0, verbose = 0, a;
    afm__select_kernels(&ks, AFM__LEVEL_SCALAR);
    top = afm__select_kernels(&kk, AFM__LEVEL_MAX);
    printf("kernels: best on this CPU = %s\n", kk.name);
    for (level = 0; level <= top && nall < 8; level++)
        if (afm__select_kernels(&all[nall], level) == level) nall++;
    for (a = 1; a < argc; a++) { /* arguments: -v, or fixture files */
        if (strcmp(argv[a], "-v") == 0) verbose = 1;
        else test_fixture(argv[a], all, nall);
    }
    test_fp16();
    test_sizes();
    test_panels();
    /* the scalar reference against itself still exercises the dequant-product check */
    for (level = 0; level <= top; level++) {
        int got = afm__select_kernels(&kk, level);
        int before = n_fail;
        if (got != level) continue;
        printf("testing level %s\n", kk.name);
        test_prepare(&ks, &kk, kk.name);
        test_matmul(&ks, &kk, kk.name);
        test_dequant(&ks, &kk, kk.name);
        test_kv(&ks, &kk, kk.name);
        test_kv_f(&ks, &kk, kk.name);
        test_math(&ks, &kk, kk.name, level == AFM__LEVEL_SCALAR);
        test_q8_nan_activations_ubsan(&kk, kk.name);
        if (verbose || n_fail != before) printf("  %s: %d failures\n", kk.name, n_fail - before);
    }
#if defined(AFM__X86)
    if (top < AFM__LEVEL_AVX512VNNI) printf("note: this CPU lacks %s; those kernels were compiled but not run\n",
                                             top < AFM__LEVEL_AVX512 ? "AVX-512 and AVX-512 VNNI" : "AVX-512 VNNI");
#endif
    printf("%d passed, %d failed\n", n_pass, n_fail);
    return n_fail ? 1 : 0;
}
