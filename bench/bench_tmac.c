/* bench/bench_tmac.c - a T-MAC style (table lookup) AVX2 matvec for Q2B, decode (1 token),
   checked bit for bit against the scalar reference and timed against afm__matmul_q2b_avx2.
     gcc -std=c99 -O2 -D_GNU_SOURCE bench/bench_tmac.c -lm -lpthread -o build/bench_tmac && build/bench_tmac
   Why this layout: vpshufb looks 32 bytes up in ONE 16-entry table per 128-bit lane, so the 32
   bytes of a register must share an activation pair: the codes are repacked so that 32 rows'
   4-bit indices (2 codes of one pair) sit side by side. The summation contract needs, per row and
   64-weight sub-block, one exact integer dot; per (sub-block, g) 4 lookups of 32 rows are added in
   int16, and the 8 groups g too (|dot| <= 64*3*127 = 24384, exact), widened once, and then follow
   the contract's float steps (2P - 3Q, fma with S*d into lane sb%8), 32 rows side by side. Same
   integer, same float operations in the same order -> same bits. The tables (16 int16 sums per
   pair, split into low and high bytes) are built once per token and shared by all rows. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define AFM_IMPLEMENTATION
#include "../afm.h"

static uint64_t rs = 88172645463325252ull;
static uint32_t rnd(void) { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return (uint32_t)(rs >> 20); }
static double cpu_now(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec; }

/* repacked matrix: tile of 32 rows; per sub-block sb: 8 g x 64 bytes of indices, then 32 fp16 scales */
typedef struct { int rows, nsb, gshift; uint8_t *p; size_t tile_bytes; } tm_mat;
#define TM_SB_BYTES (8 * 64 + 64)

static int q2b_code(const afm__wmat *w, int r, int sb, int e) {
    const uint8_t b = w->data[(size_t)r * w->row_bytes + (size_t)(sb / 4) * 64 + (size_t)e];
    return (b >> (2 * (sb % 4))) & 3;
}
static void tm_repack(const afm__wmat *w, tm_mat *m) {
    int t, sb, g, j, r;
    m->rows = w->rows; m->nsb = w->kpad / 64; m->gshift = w->gshift;
    m->tile_bytes = (size_t)m->nsb * TM_SB_BYTES;
    m->p = (uint8_t *)aligned_alloc(64, m->tile_bytes * (size_t)(w->rows / 32));
    for (t = 0; t < w->rows / 32; t++)
        for (sb = 0; sb < m->nsb; sb++) {
            uint8_t *q = m->p + (size_t)t * m->tile_bytes + (size_t)sb * TM_SB_BYTES;
            for (g = 0; g < 8; g++)
                for (j = 0; j < 4; j += 2)
                    for (r = 0; r < 32; r++) {
                        const int R = 32 * t + r;
                        const int e0 = (j < 2 ? 4 * g : 32 + 4 * g), e1 = e0 + 2;
                        /* pair j: elements e0, e0+1; pair j+1: e1, e1+1 */
                        const int i0 = q2b_code(w, R, sb, e0) | q2b_code(w, R, sb, e0 + 1) << 2;
                        const int i1 = q2b_code(w, R, sb, e1) | q2b_code(w, R, sb, e1 + 1) << 2;
                        q[g * 64 + (j / 2) * 32 + r] = (uint8_t)(i0 | i1 << 4);
                    }
            for (r = 0; r < 32; r++) memcpy(q + 512 + 2 * r, w->scales + (size_t)(32 * t + r) * (size_t)w->n_groups * 2 + 2 * (size_t)(sb >> w->gshift), 2);
        }
}

/* tables for one token: per sb, g, pair j (0..3): 16 low bytes then 16 high bytes of
   T[i] = (i & 3) x_a + (i >> 2) x_b */
static void tm_tables(const afm__act *a, uint8_t *tab) {
    int sb, g, j, i;
    for (sb = 0; sb < a->nsb; sb++)
        for (g = 0; g < 8; g++)
            for (j = 0; j < 4; j++) {
                const int ea = sb * 64 + (j < 2 ? 4 * g + 2 * j : 32 + 4 * g + 2 * (j - 2));
                const int xa = a->q[ea], xb = a->q[ea + 1];
                uint8_t *o = tab + (((size_t)sb * 8 + (size_t)g) * 4 + (size_t)j) * 32;
                for (i = 0; i < 16; i++) {
                    const int v = (i & 3) * xa + (i >> 2) * xb;
                    o[i] = (uint8_t)(v & 255); o[16 + i] = (uint8_t)((unsigned)v >> 8 & 255);
                }
            }
}

AFM__T_AVX2 static void tm_matvec(const tm_mat *m, const afm__act *a, const uint8_t *tab, float *Y) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    int t, sb, g, rv, l;
    for (t = 0; t < m->rows / 32; t++) {
        AFM__ALIGN(32) float acc[8][32];
        const uint8_t *tp = m->p + (size_t)t * m->tile_bytes;
        memset(acc, 0, sizeof acc);
        for (sb = 0; sb < m->nsb; sb++) {
            const uint8_t *q = tp + (size_t)sb * TM_SB_BYTES;
            const __m256 d = _mm256_set1_ps(a->d[sb]);
            const __m256i oQ = _mm256_set1_epi32(3 * a->qs[sb]);
            __m256i A = _mm256_setzero_si256(), B = _mm256_setzero_si256(), v[4];
            for (l = 0; l < 9; l++) _mm_prefetch((const char *)q + 4 * TM_SB_BYTES + 64 * l, _MM_HINT_T0);
            for (g = 0; g < 8; g++) {
                const uint8_t *tb = tab + ((size_t)sb * 8 + (size_t)g) * 128;
                const __m256i c01 = _mm256_loadu_si256((const __m256i *)(q + g * 64));
                const __m256i c23 = _mm256_loadu_si256((const __m256i *)(q + g * 64 + 32));
                const __m256i i0 = _mm256_and_si256(c01, m4), i1 = _mm256_and_si256(_mm256_srli_epi16(c01, 4), m4);
                const __m256i i2 = _mm256_and_si256(c23, m4), i3 = _mm256_and_si256(_mm256_srli_epi16(c23, 4), m4);
#define TM_LK(I, J, LO, HI) do { \
                    const __m256i L_ = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(tb + 32 * (J)))), I); \
                    const __m256i H_ = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)(tb + 32 * (J) + 16))), I); \
                    LO = _mm256_unpacklo_epi8(L_, H_); HI = _mm256_unpackhi_epi8(L_, H_); } while (0)
                __m256i a0, b0, a1, b1, a2, b2, a3, b3;
                TM_LK(i0, 0, a0, b0); TM_LK(i1, 1, a1, b1); TM_LK(i2, 2, a2, b2); TM_LK(i3, 3, a3, b3);
#undef TM_LK
                /* A: rows 0-7 | 16-23, B: rows 8-15 | 24-31 (unpack works within 128-bit lanes) */
                A = _mm256_add_epi16(A, _mm256_add_epi16(_mm256_add_epi16(a0, a1), _mm256_add_epi16(a2, a3)));
                B = _mm256_add_epi16(B, _mm256_add_epi16(_mm256_add_epi16(b0, b1), _mm256_add_epi16(b2, b3)));
            }
            v[0] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(A));
            v[1] = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(B));
            v[2] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(A, 1));
            v[3] = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(B, 1));
            for (rv = 0; rv < 4; rv++) {
                const __m256 S = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(q + 512 + 16 * rv)));
                const __m256i p = _mm256_sub_epi32(_mm256_slli_epi32(v[rv], 1), oQ);
                _mm256_store_ps(acc[sb % 8] + 8 * rv, _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(S, d), _mm256_load_ps(acc[sb % 8] + 8 * rv)));
            }
        }
        for (rv = 0; rv < 32; rv++) {
            float la[8];
            for (l = 0; l < 8; l++) la[l] = acc[l][rv];
            Y[32 * t + rv] = 0.5f * afm__sum8(la);
        }
    }
}

static int cmpd(const void *x, const void *y) { double a = *(const double *)x, b = *(const double *)y; return a < b ? -1 : a > b; }

int main(int argc, char **argv) {
    static const struct { const char *name; int rows, cols; } sh[] = {
        {"gate/up 2048->6656", 6656, 2048}, {"down 6656->2048", 2048, 6656}, {"qkv 2048->2560", 2560, 2048},
        {"small 576->96", 96, 576}, {"o 2048->2048", 2048, 2048}};
    afm__kernels ks, kv;
    int si, bad = 0, reps = argc > 1 ? atoi(argv[1]) : 7;
    afm__select_kernels(&ks, AFM__LEVEL_SCALAR);
    afm__select_kernels(&kv, AFM__LEVEL_AVX2);
    printf("kernels: %s vs scalar; 1 thread, CPU time, median of %d\n", kv.name, reps);
    printf("%-20s %5s %9s %9s %9s %9s %9s %9s %9s  bits\n", "shape", "group", "avx2 us", "tmac us", "lookup us", "avx2 GB/s", "tmac GB/s", "avx2 c/64", "tmac c/64");
    for (si = 0; si < (int)(sizeof sh / sizeof sh[0]); si++) {
        int group;
        for (group = 64; group <= 128; group += 64) {
            const int rows = sh[si].rows, cols = sh[si].cols;
            const size_t sz = (size_t)afm__type_size(AFM_TYPE_Q2B, (uint64_t)rows, (uint64_t)cols, (uint32_t)group);
            /* enough copies to exceed the last-level cache: matvec streams weights from memory */
            const int nm = (int)(64u * 1024 * 1024 / sz) + 1;
            uint8_t *mem = (uint8_t *)malloc(sz * (size_t)nm);
            afm__wmat *w = (afm__wmat *)malloc(sizeof(afm__wmat) * (size_t)nm);
            tm_mat *tm = (tm_mat *)malloc(sizeof(tm_mat) * (size_t)nm);
            float *X = (float *)malloc(sizeof(float) * (size_t)cols), *Y0 = (float *)malloc(4 * (size_t)rows), *Y1 = (float *)malloc(4 * (size_t)rows), *Y2 = (float *)malloc(4 * (size_t)rows);
            void *buf = malloc(afm__act_size(AFM_TYPE_Q2B, 1, cols));
            afm__act act;
            uint8_t *tab;
            double ta[64], tt[64], tn[64], ma, mt, mn, cyc = 2.45e9;
            size_t i;
            int mi, r, eq;
            for (mi = 0; mi < nm; mi++) {
                uint8_t *p = mem + sz * (size_t)mi;
                for (i = 0; i < sz; i++) p[i] = (uint8_t)rnd();
                afm__wmat_init(&w[mi], AFM_TYPE_Q2B, p, sz, rows, cols, group);
                for (i = 0; i < (size_t)rows * (size_t)w[mi].n_groups; i++) {
                    uint16_t h = afm__f2h(0.01f + (float)(rnd() % 100) * 1e-4f);
                    memcpy((uint8_t *)w[mi].scales + 2 * i, &h, 2);
                }
                tm_repack(&w[mi], &tm[mi]);
                { /* the engine's kernels read panels (made in place, as the loader does) */
                    uint8_t *tmp = (uint8_t *)malloc(afm__q2b_panel_tmp_size(&w[mi]));
                    afm__q2b_panelize(&w[mi], p, tmp);
                    free(tmp);
                }
            }
            for (i = 0; i < (size_t)cols; i++) X[i] = (float)((int)(rnd() % 2001) - 1000) / 1000.0f;
            afm__act_init(&act, AFM_TYPE_Q2B, 1, cols, buf);
            afm__prepare_activations(&kv, &act, X, (size_t)cols, 0, 1);
            tab = (uint8_t *)aligned_alloc(64, (size_t)act.nsb * 1024);
            tm_tables(&act, tab);
            /* bit identity on every matrix of the set */
            eq = 1;
            for (mi = 0; mi < nm && eq; mi++) {
                afm__matmul_rows(&ks, &w[mi], &act, Y0, (size_t)rows, 0, rows, NULL);
                afm__matmul_rows(&kv, &w[mi], &act, Y1, (size_t)rows, 0, rows, NULL);
                tm_matvec(&tm[mi], &act, tab, Y2);
                eq = !memcmp(Y0, Y1, 4 * (size_t)rows) && !memcmp(Y0, Y2, 4 * (size_t)rows);
            }
            if (!eq) bad++;
            for (r = 0; r < reps; r++) {
                double t0 = cpu_now();
                for (mi = 0; mi < nm; mi++) afm__matmul_rows(&kv, &w[mi], &act, Y1, (size_t)rows, 0, rows, NULL);
                ta[r] = (cpu_now() - t0) / nm;
                t0 = cpu_now();
                for (mi = 0; mi < nm; mi++) { tm_tables(&act, tab); tm_matvec(&tm[mi], &act, tab, Y2); }
                tt[r] = (cpu_now() - t0) / nm;
                t0 = cpu_now(); /* the lookups alone: tables built once, as for gate and up sharing them */
                for (mi = 0; mi < nm; mi++) tm_matvec(&tm[mi], &act, tab, Y2);
                tn[r] = (cpu_now() - t0) / nm;
            }
            qsort(ta, (size_t)reps, sizeof(double), cmpd); qsort(tt, (size_t)reps, sizeof(double), cmpd); qsort(tn, (size_t)reps, sizeof(double), cmpd);
            ma = ta[reps / 2]; mt = tt[reps / 2]; mn = tn[reps / 2];
            printf("%-20s %5d %9.1f %9.1f %9.1f %9.2f %9.2f %9.2f %9.2f  %s\n", sh[si].name, group, ma * 1e6, mt * 1e6, mn * 1e6, sz / ma * 1e-9, sz / mt * 1e-9,
                   ma * cyc / ((double)rows * act.nsb), mt * cyc / ((double)rows * act.nsb), eq ? "identical" : "DIFFER");
            for (mi = 0; mi < nm; mi++) free(tm[mi].p);
            free(tab); free(buf); free(X); free(Y0); free(Y1); free(Y2); free(tm); free(w); free(mem);
        }
    }
    printf(bad ? "FAILED: %d shapes differ\n" : "all shapes bit-identical to scalar\n", bad);
    return bad != 0;
}
