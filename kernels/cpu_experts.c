/* CPU lane: one layer's FP4 routed experts computed on the CPU, straight from host RAM.
 *
 * Built and loaded by kernels/cpu_experts.py (which also holds the plain-torch twin, the
 * numerical definition). One source, three paths chosen by the compile flags of the build:
 *   -mavx512f -mavx512bw -mfma  -> "avx512"  (16 lanes; E2M1 -> fp32 by a 16-entry vpermps)
 *   -mavx2 -mfma                -> "avx2"    (8 lanes; E2M1 -> bf16 bytes by vpshufb -> fp32)
 *   (none)                      -> "scalar"  (portable C, natural input order)
 *   -DHS_EMULATE_AVX512         -> "avx512-emu": the avx512 path's loop structure on plain C
 *                                  lanes, so machines without AVX-512 can test its layout logic.
 *
 * Record (one expert), uint8, C-contiguous, read in place (never copied):
 *   w13_q [2I, D/2]  E2M1 pairs, low nibble = even input; rows 0..I-1 gate (w1), I..2I-1 up (w3)
 *   w13_s [2I, D/32] E8M0 scale per 32 inputs
 *   w2_q  [D, I/2], w2_s [D, I/32]  down (w2)
 * The up rows come through pointers of their own (w3_q [I, D/2], w3_s [I, D/32]): into w13 for a
 * host-cache record, or the checkpoint's separate w3 tensors for one read where it lies on disk.
 * Per call: x [T, D] fp32, route_w [T, n] fp32, n records -> out [T, D] = sum_j y_j (in j order):
 *   xq = act_quant(x) if act_quant else x        (per row, blocks of 128, ragged last block)
 *   g = min(w1 . xq, limit), v = clamp(w3 . xq, -limit, limit)
 *   a = round_to_act_dtype((w * silu(g)) * v); a = act_quant(a) if act_quant
 *   y_j = w2 . a
 *
 * Phases (each a parallel loop over work items on the pool; the caller's thread takes part):
 *   0. (caller) x -> act-quant -> the SIMD input layout (below), once per call.
 *   1. gate/up: items = (expert, 16 row pairs). A row pair (gate i, up I+i) gives a[:, i] for
 *      every token; each weight is decoded once and used for up to 4 tokens (more tokens: more
 *      passes).
 *   2. act-quant of a, items = (expert, token, 128-block); only when act_quant.
 *   3. down: items = 16 output rows; a row's experts are summed in the given order by the one
 *      thread that owns the row, so the result does not depend on the thread count.
 * Experts whose route weights are all zero are skipped (their y is exactly zero for finite
 * weights).
 *
 * SIMD input layout. A chunk is 4W bytes of a weight row (W lanes of 4 bytes) = 8W inputs and
 * W/4 scale groups; one chunk decodes into 8 vectors of W weights (vf_dec8), in an order that
 * suits the path's instructions (avx512: nibble k of every lane; avx2: through bf16 bytes, see
 * vf_dec8). The inputs (x, and a for the down phase) are stored permuted to match
 * (chunk_slot), padded with zeros to whole chunks, so no packed byte is ever shuffled into
 * input order. Every 128-block of inputs maps to the same 128 positions (8W divides 128), so
 * act-quant works on the permuted layout. For the scalar path the layout is the identity.
 * Rows are walked in input blocks that keep the layout's slice in L1 (rows_dot).
 *
 * Scales: the E8M0 scale multiplies each 32-input group's partial sum once (as the GPU kernel
 * does); scale bytes go through a 256-entry table equal to e8m0_to_float (0 -> 2^-127, the fp32
 * subnormal; 255 -> NaN).
 *
 * Threads: hs_create(threads) starts threads-1 persistent workers; the caller is the last one.
 * Workers spin briefly after a phase (the next phase or layer usually follows within
 * microseconds), then sleep on a condition variable. One call at a time per context: hs_run holds
 * the context's mutex, so concurrent calls on one context are serialised, not interleaved.
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define HS_ABI_VERSION 2
#define HS_EXPORT __attribute__((visibility("default")))
#define HS_INLINE static inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* ------------------------------------------------------------------------------------------- */
/* Tables                                                                                       */
/* ------------------------------------------------------------------------------------------- */

/* E2M1 code -> value; bit 3 is the sign (8 is -0). */
static const float FP4_VALUES[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* E8M0 byte -> fp32, filled once (pthread_once): exactly e8m0_to_float. */
static float E8M0[256];
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

static float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* E2M1 code -> low / high byte of its bf16 (exact), twice: vpshufb tables for both 128-bit
 * halves of an AVX2 register. */
static uint8_t BF16_LO[32], BF16_HI[32];

static void tables_init(void) {
    for (uint32_t e = 0; e < 256; e++) {
        uint32_t bits = e == 0 ? (1u << 22) : e == 255 ? 0x7FC00000u : (e << 23);
        E8M0[e] = bits_to_float(bits);
    }
    for (int n = 0; n < 32; n++) {
        uint32_t bits = float_to_bits(FP4_VALUES[n % 16]);
        BF16_LO[n] = (uint8_t)(bits >> 16);
        BF16_HI[n] = (uint8_t)(bits >> 24);
    }
}

/* 2^e for e in [-126, 127], exact. */
static inline float pow2i(int e) { return bits_to_float((uint32_t)(e + 127) << 23); }

/* ------------------------------------------------------------------------------------------- */
/* Roundings of the definition (exact; no fast-math: the build uses -ffp-contract=off)          */
/* ------------------------------------------------------------------------------------------- */

/* fp32 -> bf16 -> fp32, round to nearest even (torch's .to(bfloat16)); NaN stays NaN. */
static inline float round_bf16(float v) {
    uint32_t u = float_to_bits(v);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return v;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return bits_to_float(u & 0xFFFF0000u);
}

/* Round |v| to a grid with `mbits` mantissa bits and minimum normal exponent `emin`, ties to
 * even: scale so the quantum is 1, round with the 2^23 magic number (exact for y < 2^23),
 * scale back. Both scalings are exact powers of two inside the fp32 normal range. */
static inline float round_grid(float a, int mbits, int emin) {
    int e = (int)((float_to_bits(a) >> 23) & 0xFF) - 127;
    if (e < emin) e = emin;
    float y = a * pow2i(mbits - e);
    float r = (y + 8388608.0f) - 8388608.0f;
    return r * pow2i(e - mbits);
}

/* fp32 -> fp16 -> fp32, ties to even, overflow to inf (|v| >= 65520), subnormals kept. */
static inline float round_fp16(float v) {
    float a = fabsf(v);
    if (!(a < 65520.0f)) return a != a ? v : copysignf(INFINITY, v);
    return copysignf(round_grid(a, 10, -14), v);
}

/* fp32 |v| <= 448 -> nearest e4m3fn value (ties to even), as _formats._e4m3_round. */
static inline float round_e4m3(float v) { return copysignf(round_grid(fabsf(v), 3, -6), v); }

enum { ACT_F32 = 0, ACT_BF16 = 1, ACT_F16 = 2 };

static inline float round_act(float v, int dtype) {
    return dtype == ACT_BF16 ? round_bf16(v) : dtype == ACT_F16 ? round_fp16(v) : v;
}

/* Act-quant of one block (any order of its elements, zero padding allowed: zeros change
 * neither the amax nor themselves): s = 2^ceil(log2(max(amax, 1e-4) / 448)),
 * x = e4m3(clamp(x / s, -448, 448)) * s. x / s == x * (1/s) exactly (s a power of two with
 * 1/s normal), and ceil(log2) comes from the bits, as _formats._pow2_ceil. */
static void act_quant_block(float *p, int len) {
    float amax = 0.0f;
    for (int i = 0; i < len; i++) {
        float a = fabsf(p[i]);
        if (a > amax) amax = a;
    }
    if (amax < 1e-4f) amax = 1e-4f;
    uint32_t b = float_to_bits(amax / 448.0f);
    int e = (int)((b >> 23) & 0xFF) - 127 + ((b & 0x7FFFFFu) != 0);
    float s = pow2i(e), inv = pow2i(-e);
    for (int i = 0; i < len; i++) {
        float y = p[i] * inv;
        y = y < -448.0f ? -448.0f : y > 448.0f ? 448.0f : y;
        p[i] = round_e4m3(y) * s;
    }
}

static inline float swiglu(float g, float v, float w, float limit) {
    /* torch semantics: clamp keeps NaN, silu(g) = g / (1 + exp(-g)), (w * silu) * v in fp32 */
    if (g > limit) g = limit;
    if (v > limit) v = limit;
    else if (v < -limit) v = -limit;
    float s = g / (1.0f + expf(-g));
    return (w * s) * v;
}

/* ------------------------------------------------------------------------------------------- */
/* Vector primitives per path                                                                   */
/* ------------------------------------------------------------------------------------------- */

#if defined(HS_EMULATE_AVX512)
/* Plain-C lanes with the avx512 path's width and semantics (vpermps: low 4 bits of the index;
 * fma: fused), so the shared loop below runs here exactly as it would on AVX-512. */
#define HS_PATH "avx512-emu"
/* 64-byte vectors by value without AVX-512: GCC notes the ABI; all of it is internal here. */
#pragma GCC diagnostic ignored "-Wpsabi"
#define HS_W 16
typedef float VF __attribute__((vector_size(64)));
typedef uint32_t VI __attribute__((vector_size(64)));

HS_INLINE VI vi_load(const uint8_t *p) {
    VI v;
    memcpy(&v, p, sizeof v);
    return v;
}
HS_INLINE VI vi_load_part(const uint8_t *p, int nbytes) {
    VI v = {0};
    memcpy(&v, p, (size_t)nbytes);
    return v;
}
/* f[k] lane j = nibble k of lane j (input 8j + k of the chunk), as the avx512 path. */
HS_INLINE void vf_dec8(VI v, VF *f) {
    for (int k = 0; k < 8; k++)
        for (int j = 0; j < HS_W; j++) f[k][j] = FP4_VALUES[(v[j] >> (4 * k)) & 15u];
}
/* Slot (k * W + lane) of input r of a chunk: r = 8 * lane + k. */
static inline size_t chunk_slot(size_t r) { return (r % 8) * HS_W + r / 8; }
HS_INLINE VF vf_load(const float *p) {
    VF v;
    memcpy(&v, p, sizeof v);
    return v;
}
HS_INLINE VF vf_zero(void) { return (VF){0}; }
HS_INLINE VF vf_mul(VF a, VF b) { return a * b; }
HS_INLINE VF vf_add(VF a, VF b) { return a + b; }
HS_INLINE VF vf_fma(VF a, VF b, VF c) {
    VF r;
    for (int j = 0; j < HS_W; j++) r[j] = fmaf(a[j], b[j], c[j]);
    return r;
}
HS_INLINE float vf_sum(VF a) {
    float s = 0.0f;
    for (int j = 0; j < HS_W; j++) s += a[j];
    return s;
}
HS_INLINE VF vf_scales(const uint8_t *s, int ng) {
    VF r;
    for (int j = 0; j < HS_W; j++) r[j] = j / 4 < ng ? E8M0[s[j / 4]] : 0.0f;
    return r;
}

#elif defined(__AVX512F__) && defined(__AVX512BW__)
#define HS_PATH "avx512"
#define HS_W 16
typedef __m512 VF;
typedef __m512i VI;

HS_INLINE VI vi_load(const uint8_t *p) { return _mm512_loadu_si512((const void *)p); }
/* A row's last chunk may hold 16, 32 or 48 bytes: masked lanes are not read (no fault past the
 * end of a mapping) and come back zero (code 0 = +0.0, times the zero padding of the inputs). */
HS_INLINE VI vi_load_part(const uint8_t *p, int nbytes) {
    return _mm512_maskz_loadu_epi32((__mmask16)((1u << (nbytes / 4)) - 1u), (const void *)p);
}
/* f[k] lane j = nibble k of lane j (input 8j + k of the chunk): vpermps reads the low 4 bits
 * of each index, so the 16-entry table (sign included) needs one shift and one permute per 16
 * weights. */
HS_INLINE void vf_dec8(VI v, VF *f) {
    const __m512 lut = _mm512_loadu_ps(FP4_VALUES);
    f[0] = _mm512_permutexvar_ps(v, lut);
    f[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
    f[2] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), lut);
    f[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), lut);
    f[4] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 16), lut);
    f[5] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 20), lut);
    f[6] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 24), lut);
    f[7] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 28), lut);
}
/* Slot (k * W + lane) of input r of a chunk: r = 8 * lane + k. */
static inline size_t chunk_slot(size_t r) { return (r % 8) * HS_W + r / 8; }
HS_INLINE VF vf_load(const float *p) { return _mm512_loadu_ps(p); }
HS_INLINE VF vf_zero(void) { return _mm512_setzero_ps(); }
HS_INLINE VF vf_mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
HS_INLINE VF vf_add(VF a, VF b) { return _mm512_add_ps(a, b); }
HS_INLINE VF vf_fma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
HS_INLINE float vf_sum(VF a) { return _mm512_reduce_add_ps(a); }
/* Lanes 4g..4g+3 hold group g's scale (4 groups per 64-byte chunk). */
HS_INLINE VF vf_scales(const uint8_t *s, int ng) {
    __m128 q = _mm_setr_ps(E8M0[s[0]], ng > 1 ? E8M0[s[1]] : 0.0f, ng > 2 ? E8M0[s[2]] : 0.0f,
                           ng > 3 ? E8M0[s[3]] : 0.0f);
    const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(q));
}

#elif defined(__AVX2__) && defined(__FMA__)
#define HS_PATH "avx2"
#define HS_W 8
typedef __m256 VF;
typedef __m256i VI;

HS_INLINE VI vi_load(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
/* The last chunk of a row may hold 16 bytes (rows are whole 16-byte groups): masked lanes are
 * not read and come back zero. */
HS_INLINE VI vi_load_part(const uint8_t *p, int nbytes) {
    __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(nbytes / 4),
                                   _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_maskload_epi32((const int *)p, m);
}
/* AVX2 has no 16-entry float permute (vpermps reads 3 index bits: a sign fix-up would cost 3
 * more ops per 8 weights), so decode through bf16 instead: every E2M1 value is exact in bf16,
 * vpshufb maps 32 nibbles to the bf16's low or high byte at once (tables BF16_LO / BF16_HI),
 * vpunpck{l,h}bw pairs the bytes into bf16 words, and a bf16 word becomes an fp32 by a shift
 * (even word of a 32-bit lane) or a mask (odd word). 19 ops per 64 weights instead of 40.
 * Output order: in 128-bit half h, 32-bit lane i of f[k] holds input 32h + 4i + OFF[k] of the
 * chunk, OFF = {0, 2, 16, 18, 1, 3, 17, 19} (low nibbles = even inputs, high = odd; unpack lo /
 * hi = bytes 0-7 / 8-15 of the half; shift / mask = even / odd byte). Lanes 0-3 are scale
 * group 0, lanes 4-7 group 1. */
HS_INLINE void vf_dec8(VI v, VF *f) {
    const __m256i nib = _mm256_set1_epi8(0x0F), odd = _mm256_set1_epi32((int)0xFFFF0000u);
    const __m256i tlo = _mm256_loadu_si256((const __m256i *)BF16_LO);
    const __m256i thi = _mm256_loadu_si256((const __m256i *)BF16_HI);
    __m256i e = _mm256_and_si256(v, nib);                        /* even inputs' codes */
    __m256i o = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);  /* odd inputs' codes */
    __m256i el = _mm256_shuffle_epi8(tlo, e), eh = _mm256_shuffle_epi8(thi, e);
    __m256i ol = _mm256_shuffle_epi8(tlo, o), oh = _mm256_shuffle_epi8(thi, o);
    __m256i w[4] = {_mm256_unpacklo_epi8(el, eh), _mm256_unpackhi_epi8(el, eh),
                    _mm256_unpacklo_epi8(ol, oh), _mm256_unpackhi_epi8(ol, oh)};
    for (int m = 0; m < 4; m++) {
        f[2 * m] = _mm256_castsi256_ps(_mm256_slli_epi32(w[m], 16));
        f[2 * m + 1] = _mm256_castsi256_ps(_mm256_and_si256(w[m], odd));
    }
}
/* Slot (k * W + lane) of input r of a chunk (inverse of the order above): r = 32h + 16u + 4i + e
 * -> k = 4 * (e & 1) + 2u + (e >> 1), lane = 4h + i. */
static inline size_t chunk_slot(size_t r) {
    size_t h = r / 32, u = (r / 16) % 2, i = (r / 4) % 4, e = r % 4;
    return (4 * (e & 1) + 2 * u + (e >> 1)) * HS_W + 4 * h + i;
}
HS_INLINE VF vf_load(const float *p) { return _mm256_loadu_ps(p); }
HS_INLINE VF vf_zero(void) { return _mm256_setzero_ps(); }
HS_INLINE VF vf_mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
HS_INLINE VF vf_add(VF a, VF b) { return _mm256_add_ps(a, b); }
HS_INLINE VF vf_fma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
HS_INLINE float vf_sum(VF a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* Lanes 0..3 hold group 0's scale, lanes 4..7 group 1's (2 groups per 32-byte chunk). */
HS_INLINE VF vf_scales(const uint8_t *s, int ng) {
    __m128 lo = _mm_set1_ps(E8M0[s[0]]);
    __m128 hi = ng > 1 ? _mm_set1_ps(E8M0[s[1]]) : _mm_setzero_ps();
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

#else
#define HS_PATH "scalar"
#define HS_W 1
static inline size_t chunk_slot(size_t r) { return r; } /* natural order */
#endif

#define HS_CI (8 * HS_W)   /* inputs per chunk (8 for the scalar path: identity layout) */
#define HS_TB 4            /* tokens per pass over the weights */
#define HS_MAX_T 64        /* tokens per call */
#define HS_PAIRS 16        /* gate/up row pairs per work item */
#define HS_DROWS 16        /* down rows per work item */
#define HS_MAXROWS 16      /* rows per rows_dot call (both of the above) */
#define HS_XBLOCK 16384    /* bytes of the input layout in use at once (half of a 32 KiB L1d) */

/* Position of input i in the layout (see the header comment). */
static inline size_t layout_pos(size_t i) { return i / HS_CI * HS_CI + chunk_slot(i % HS_CI); }

static inline size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }

/* ------------------------------------------------------------------------------------------- */
/* Row dot products: one weight row against T <= 4 input rows (stride xs floats)                */
/* ------------------------------------------------------------------------------------------- */

#if HS_W > 1
/* One chunk: 8 decoded vectors, each used for all T tokens; partial sums collect the chunk (all
 * its groups at once, lane-wise) in two chains per token (a single chain of 8 dependent FMAs
 * per chunk is latency-bound) and are scaled once into acc[t]. */
HS_INLINE void chunk_acc(VI v, VF sc, const float *const *xt, size_t c, const int T, VF *acc) {
    VF f[8], p[HS_TB], q[HS_TB];
    vf_dec8(v, f);
    for (int t = 0; t < T; t++) {
        const float *x = xt[t] + c * HS_CI;
        p[t] = vf_mul(f[0], vf_load(x));
        q[t] = vf_mul(f[1], vf_load(x + HS_W));
        for (int k = 2; k < 8; k += 2) {
            p[t] = vf_fma(f[k], vf_load(x + k * HS_W), p[t]);
            q[t] = vf_fma(f[k + 1], vf_load(x + (k + 1) * HS_W), q[t]);
        }
        acc[t] = vf_fma(vf_add(p[t], q[t]), sc, acc[t]);
    }
}

/* Rows [0, nrows) of a matrix (rb bytes and rb/16 scales per row) dotted with T token rows of
 * the layout xl (stride xs): res[r * T + t]. The input dim is walked in blocks whose slice of xl
 * (T * block * 4 bytes) stays within HS_XBLOCK bytes, L1-resident while every row of the item
 * passes over it: unblocked, 4 tokens of D = 4096 (64 KiB) would come from L2 for every row and
 * 32 bytes of x per weight byte would cap the kernel. Accumulators wait in memory between
 * blocks; the summation order depends only on the sizes, not on the threads. */
HS_INLINE void rows_dot(const uint8_t *q, const uint8_t *s, size_t rb, int nrows,
                        const float *xl, size_t xs, const int T, float *res) {
    const size_t cb = 4 * HS_W; /* bytes per chunk */
    const size_t nfull = rb / cb, nch = (rb + cb - 1) / cb;
    size_t blk = HS_XBLOCK / (sizeof(float) * HS_CI * (size_t)T);
    if (blk < 1) blk = 1;
    VF accs[HS_MAXROWS][HS_TB];
    const float *xt[HS_TB]; /* one base pointer per token: constant offsets inside a chunk */
    for (int t = 0; t < T; t++) xt[t] = xl + t * xs;
    for (int r = 0; r < nrows; r++)
        for (int t = 0; t < T; t++) accs[r][t] = vf_zero();
    for (size_t c0 = 0; c0 < nch; c0 += blk) {
        size_t c1 = c0 + blk < nfull ? c0 + blk : nfull;
        for (int r = 0; r < nrows; r++) {
            const uint8_t *qr = q + (size_t)r * rb, *sr = s + (size_t)r * (rb / 16);
            VF acc[HS_TB];
            for (int t = 0; t < T; t++) acc[t] = accs[r][t];
            for (size_t c = c0; c < c1; c++)
                chunk_acc(vi_load(qr + c * cb), vf_scales(sr + c * (cb / 16), (int)(cb / 16)),
                          xt, c, T, acc);
            if (nfull < nch && c0 + blk >= nch) { /* the row's partial last chunk */
                int rem = (int)(rb - nfull * cb);
                chunk_acc(vi_load_part(qr + nfull * cb, rem),
                          vf_scales(sr + nfull * (cb / 16), rem / 16), xt, nfull, T, acc);
            }
            for (int t = 0; t < T; t++) accs[r][t] = acc[t];
        }
    }
    for (int r = 0; r < nrows; r++)
        for (int t = 0; t < T; t++) res[r * T + t] = vf_sum(accs[r][t]);
}

#else
/* Portable: natural input order, one row at a time, one 32-input group (16 bytes) at a time. */
HS_INLINE void rows_dot(const uint8_t *q, const uint8_t *s, size_t rb, int nrows,
                        const float *xl, size_t xs, const int T, float *res) {
    for (int r = 0; r < nrows; r++) {
        const uint8_t *qr = q + (size_t)r * rb, *sr = s + (size_t)r * (rb / 16);
        float acc[HS_TB] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (size_t g = 0; g < rb / 16; g++) {
            float p[HS_TB] = {0.0f, 0.0f, 0.0f, 0.0f};
            const uint8_t *qg = qr + g * 16;
            const float *xg = xl + g * 32;
            for (int b = 0; b < 16; b++) {
                float w0 = FP4_VALUES[qg[b] & 15], w1 = FP4_VALUES[qg[b] >> 4];
                for (int t = 0; t < T; t++) {
                    p[t] += w0 * xg[t * xs + 2 * b];
                    p[t] += w1 * xg[t * xs + 2 * b + 1];
                }
            }
            float sc = E8M0[sr[g]];
            for (int t = 0; t < T; t++) acc[t] += p[t] * sc;
        }
        for (int t = 0; t < T; t++) res[r * T + t] = acc[t];
    }
}
#endif

/* Instances with the token count fixed, so the loops above unroll into registers. */
#define HS_ROWS_DOT_T(N)                                                                      \
    static void rows_dot_##N(const uint8_t *q, const uint8_t *s, size_t rb, int nrows,        \
                             const float *xl, size_t xs, float *res) {                         \
        rows_dot(q, s, rb, nrows, xl, xs, N, res);                                             \
    }
HS_ROWS_DOT_T(1)
HS_ROWS_DOT_T(2)
HS_ROWS_DOT_T(3)
HS_ROWS_DOT_T(4)

/* Any T: passes of up to 4 tokens over the rows (more than 4 tokens is rare in decode);
 * res[r * T + t]. */
static void rows_dot_any(const uint8_t *q, const uint8_t *s, size_t rb, int nrows,
                         const float *xl, size_t xs, int T, float *res) {
    float part[HS_MAXROWS * HS_TB];
    for (int t0 = 0; t0 < T; t0 += HS_TB) {
        int tn = T - t0 < HS_TB ? T - t0 : HS_TB;
        const float *x0 = xl + (size_t)t0 * xs;
        switch (tn) {
        case 1: rows_dot_1(q, s, rb, nrows, x0, xs, part); break;
        case 2: rows_dot_2(q, s, rb, nrows, x0, xs, part); break;
        case 3: rows_dot_3(q, s, rb, nrows, x0, xs, part); break;
        default: rows_dot_4(q, s, rb, nrows, x0, xs, part); break;
        }
        for (int r = 0; r < nrows; r++)
            for (int t = 0; t < tn; t++) res[r * T + t0 + t] = part[r * tn + t];
    }
}

/* ------------------------------------------------------------------------------------------- */
/* Thread pool                                                                                  */
/* ------------------------------------------------------------------------------------------- */

typedef void (*item_fn)(void *arg, int item);

typedef struct hs_ctx {
    pthread_mutex_t call_mu; /* one hs_run / hs_resize at a time */
    pthread_mutex_t mu;      /* with cv: where idle workers sleep */
    pthread_cond_t cv;
    pthread_t *tid;
    int nworkers;
    /* (generation << 32) | next item: a worker claims an item with a CAS that also checks the
     * generation, so a late worker can never take an item of a later loop by mistake. */
    _Atomic uint64_t work;
    _Atomic int n_items;
    _Atomic int done; /* items finished in the current generation */
    _Atomic int stop;
    uint32_t gen;
    item_fn fn; /* written before the generation is published (release), read after a claim */
    void *arg;
    long spin_ns;
    /* workspace, grown on demand */
    float *xl;
    size_t xl_cap;
    float *abuf;
    size_t abuf_cap;
} hs_ctx;

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* The item index of a loop that is over (parallel_for): no count reaches it. */
#define HS_CLOSED 0xFFFFFFFFu

static void run_items(hs_ctx *c, uint32_t gen) {
    uint64_t w = atomic_load_explicit(&c->work, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(w >> 32) != gen) return;
        uint32_t it = (uint32_t)w;
        /* acquire: a count the next loop wrote comes after this loop was closed (parallel_for),
         * so a claim made after reading it fails. */
        if (it >= (uint32_t)atomic_load_explicit(&c->n_items, memory_order_acquire)) return;
        if (atomic_compare_exchange_weak_explicit(&c->work, &w, w + 1, memory_order_acq_rel,
                                                  memory_order_acquire)) {
            c->fn(c->arg, (int)it);
            atomic_fetch_add_explicit(&c->done, 1, memory_order_release);
            w = atomic_load_explicit(&c->work, memory_order_acquire);
        }
    }
}

static void *worker_main(void *p) {
    hs_ctx *c = p;
    uint32_t seen = (uint32_t)(atomic_load(&c->work) >> 32);
    for (;;) {
        long t0 = now_ns();
        unsigned spins = 0;
        uint64_t w;
        while ((uint32_t)((w = atomic_load_explicit(&c->work, memory_order_acquire)) >> 32) ==
                   seen &&
               !atomic_load_explicit(&c->stop, memory_order_relaxed)) {
            cpu_relax();
            if ((++spins & 255u) == 0 && now_ns() - t0 > c->spin_ns) {
                pthread_mutex_lock(&c->mu);
                while ((uint32_t)(atomic_load(&c->work) >> 32) == seen && !atomic_load(&c->stop))
                    pthread_cond_wait(&c->cv, &c->mu);
                pthread_mutex_unlock(&c->mu);
            }
        }
        if (atomic_load(&c->stop)) return NULL;
        seen = (uint32_t)(w >> 32);
        run_items(c, seen);
    }
}

/* fn(arg, 0..n-1) over the pool and the calling thread; returns when all items are done. */
static void parallel_for(hs_ctx *c, item_fn fn, void *arg, int n) {
    if (n <= 0) return;
    if (c->nworkers == 0 || n == 1) {
        for (int i = 0; i < n; i++) fn(arg, i);
        return;
    }
    /* Close the last loop first. A worker of it that read its next index (every item taken) and
     * then this loop's larger count would otherwise claim that index before this loop is
     * published, and run an item of the wrong loop, or of this one's function with the last
     * one's index, and count it as done here: the caller then returned while the item ran on,
     * reading the caller's stack (a segfault seen once under oversubscription). Closed, its
     * claim fails. */
    atomic_store_explicit(&c->work, ((uint64_t)c->gen << 32) | HS_CLOSED, memory_order_relaxed);
    c->fn = fn;
    c->arg = arg;
    atomic_store_explicit(&c->n_items, n, memory_order_release);
    atomic_store_explicit(&c->done, 0, memory_order_relaxed);
    c->gen++;
    atomic_store_explicit(&c->work, (uint64_t)c->gen << 32, memory_order_release);
    pthread_mutex_lock(&c->mu);
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    run_items(c, c->gen);
    unsigned spins = 0;
    while (atomic_load_explicit(&c->done, memory_order_acquire) < n) {
        if (++spins < 4096) cpu_relax();
        else sched_yield(); /* a worker was descheduled mid-item: give it the core */
    }
}

static void stop_workers(hs_ctx *c) {
    atomic_store(&c->stop, 1);
    pthread_mutex_lock(&c->mu);
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    for (int i = 0; i < c->nworkers; i++) pthread_join(c->tid[i], NULL);
    free(c->tid);
    c->tid = NULL;
    c->nworkers = 0;
    atomic_store(&c->stop, 0);
}

/* Start threads-1 workers; fewer if the system refuses some (the pool still works). */
static void start_workers(hs_ctx *c, int threads) {
    int want = threads > 1 ? threads - 1 : 0;
    c->nworkers = 0;
    if (!want) return;
    c->tid = calloc((size_t)want, sizeof *c->tid);
    if (!c->tid) return;
    for (int i = 0; i < want; i++) {
        if (pthread_create(&c->tid[i], NULL, worker_main, c) != 0) break;
        c->nworkers++;
    }
}

HS_EXPORT int hs_abi_version(void) { return HS_ABI_VERSION; }
HS_EXPORT const char *hs_path(void) { return HS_PATH; }

HS_EXPORT hs_ctx *hs_create(int threads) {
    pthread_once(&tables_once, tables_init);
    hs_ctx *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    pthread_mutex_init(&c->call_mu, NULL);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    c->spin_ns = 100000; /* 100 us: phases and layers follow each other faster than that */
    start_workers(c, threads);
    return c;
}

HS_EXPORT int hs_threads(hs_ctx *c) { return c->nworkers + 1; }

HS_EXPORT int hs_resize(hs_ctx *c, int threads) {
    pthread_mutex_lock(&c->call_mu);
    stop_workers(c);
    start_workers(c, threads);
    int n = c->nworkers + 1;
    pthread_mutex_unlock(&c->call_mu);
    return n;
}

HS_EXPORT void hs_set_spin_us(hs_ctx *c, int us) {
    c->spin_ns = us < 0 ? 0 : (long)us * 1000L;
}

HS_EXPORT void hs_destroy(hs_ctx *c) {
    if (!c) return;
    pthread_mutex_lock(&c->call_mu);
    stop_workers(c);
    pthread_mutex_unlock(&c->call_mu);
    pthread_mutex_destroy(&c->call_mu);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    free(c->xl);
    free(c->abuf);
    free(c);
}

/* ------------------------------------------------------------------------------------------- */
/* The layer call                                                                               */
/* ------------------------------------------------------------------------------------------- */

typedef struct {
    int T, D, I, n, n_act, act_quant, act_dtype;
    size_t Dp, Ip; /* padded input lengths of the layout */
    float limit;
    const float *route_w; /* [T, n] */
    const uint8_t *const *w13_q, *const *w13_s, *const *w2_q, *const *w2_s;
    const uint8_t *const *w3_q, *const *w3_s; /* the up rows (w3): in w13 or apart */
    const int *act;    /* the experts with a nonzero weight, in the given order */
    const float *xl;   /* [T, Dp] layout */
    float *abuf;       /* [n, T, Ip] layout */
    float *out;        /* [T, D] */
} job_t;

static void gate_up_item(void *p, int item) {
    const job_t *J = p;
    int per = (J->I + HS_PAIRS - 1) / HS_PAIRS;
    int j = J->act[item / per];
    int i0 = (item % per) * HS_PAIRS, i1 = i0 + HS_PAIRS < J->I ? i0 + HS_PAIRS : J->I;
    size_t rb = (size_t)J->D / 2, sb = (size_t)J->D / 32;
    float g[HS_PAIRS * HS_MAX_T], v[HS_PAIRS * HS_MAX_T];
    rows_dot_any(J->w13_q[j] + i0 * rb, J->w13_s[j] + i0 * sb, rb, i1 - i0, J->xl, J->Dp, J->T, g);
    rows_dot_any(J->w3_q[j] + i0 * rb, J->w3_s[j] + i0 * sb, rb, i1 - i0, J->xl, J->Dp, J->T, v);
    for (int i = i0; i < i1; i++) {
        size_t pos = layout_pos((size_t)i);
        for (int t = 0; t < J->T; t++) {
            int k = (i - i0) * J->T + t;
            float a = swiglu(g[k], v[k], J->route_w[t * J->n + j], J->limit);
            J->abuf[((size_t)j * J->T + t) * J->Ip + pos] = round_act(a, J->act_dtype);
        }
    }
}

static void a_quant_item(void *p, int item) {
    const job_t *J = p;
    int nb = (int)((J->Ip + 127) / 128), per = J->T * nb;
    int j = J->act[item / per], t = (item % per) / nb, b = item % nb;
    size_t lo = (size_t)b * 128, hi = lo + 128 < J->Ip ? lo + 128 : J->Ip;
    act_quant_block(J->abuf + ((size_t)j * J->T + t) * J->Ip + lo, (int)(hi - lo));
}

static void down_item(void *p, int item) {
    const job_t *J = p;
    int d0 = item * HS_DROWS, d1 = d0 + HS_DROWS < J->D ? d0 + HS_DROWS : J->D, nr = d1 - d0;
    size_t rb = (size_t)J->I / 2, sb = (size_t)J->I / 32;
    float y[HS_DROWS * HS_MAX_T], sum[HS_DROWS * HS_MAX_T];
    for (int k = 0; k < nr * J->T; k++) sum[k] = 0.0f;
    for (int e = 0; e < J->n_act; e++) { /* experts in the given order */
        int j = J->act[e];
        rows_dot_any(J->w2_q[j] + (size_t)d0 * rb, J->w2_s[j] + (size_t)d0 * sb, rb, nr,
                     J->abuf + (size_t)j * J->T * J->Ip, J->Ip, J->T, y);
        for (int k = 0; k < nr * J->T; k++) sum[k] += y[k];
    }
    for (int d = d0; d < d1; d++)
        for (int t = 0; t < J->T; t++) J->out[(size_t)t * J->D + d] = sum[(d - d0) * J->T + t];
}

static int grow(float **buf, size_t *cap, size_t n) {
    if (n <= *cap) return 0;
    free(*buf);
    *buf = NULL;
    *cap = 0;
    size_t bytes = round_up(n * sizeof(float), 64);
    if (posix_memalign((void **)buf, 64, bytes) != 0) {
        *buf = NULL;
        return -1;
    }
    *cap = n;
    return 0;
}

/* out [T, D] = sum over the n experts (in order) of their outputs; see the header comment.
 * x [T, D] fp32, route_w [T, n] fp32, record pointers per expert, a_out [n, T, I] (optional,
 * for tests: the final activations a, after rounding and act-quant). Returns 0, or -1 for bad
 * sizes (D, I multiples of 32; 1 <= T <= 64; n >= 0), -2 when memory runs out. */
HS_EXPORT int hs_run(hs_ctx *c, int T, int D, int I, int n, const float *x, const float *route_w,
                     const uint8_t *const *w13_q, const uint8_t *const *w13_s,
                     const uint8_t *const *w3_q, const uint8_t *const *w3_s,
                     const uint8_t *const *w2_q, const uint8_t *const *w2_s, float limit,
                     int act_quant, int act_dtype, float *out, float *a_out) {
    if (T < 1 || T > HS_MAX_T || D < 32 || I < 32 || D % 32 || I % 32 || n < 0) return -1;
    if (act_dtype < ACT_F32 || act_dtype > ACT_F16) return -1;
    pthread_mutex_lock(&c->call_mu);
    int rc = 0;
    job_t J = {.T = T, .D = D, .I = I, .n = n, .act_quant = act_quant, .act_dtype = act_dtype,
               .Dp = round_up((size_t)D, HS_CI), .Ip = round_up((size_t)I, HS_CI),
               .limit = limit, .route_w = route_w, .w13_q = w13_q, .w13_s = w13_s,
               .w3_q = w3_q, .w3_s = w3_s, .w2_q = w2_q, .w2_s = w2_s, .out = out};
    int *act = n ? malloc((size_t)n * sizeof *act) : NULL;
    if ((n && !act) || grow(&c->xl, &c->xl_cap, (size_t)T * J.Dp) ||
        grow(&c->abuf, &c->abuf_cap, (size_t)(n ? n : 1) * T * J.Ip)) {
        rc = -2;
        goto done;
    }
    for (int j = 0; j < n; j++) {
        int used = 0;
        for (int t = 0; t < T; t++) used |= route_w[t * n + j] != 0.0f;
        if (used) act[J.n_act++] = j;
    }
    J.act = act;
    J.xl = c->xl;
    J.abuf = c->abuf;

    /* Phase 0: x -> act-quant (natural 128-blocks) -> layout, zero padded. */
    memset(c->xl, 0, (size_t)T * J.Dp * sizeof(float));
    for (int t = 0; t < T; t++) {
        float blk[128];
        for (int b0 = 0; b0 < D; b0 += 128) {
            int len = D - b0 < 128 ? D - b0 : 128;
            memcpy(blk, x + (size_t)t * D + b0, (size_t)len * sizeof(float));
            if (act_quant) act_quant_block(blk, len);
            float *row = c->xl + (size_t)t * J.Dp;
            for (int i = 0; i < len; i++) row[layout_pos((size_t)(b0 + i))] = blk[i];
        }
    }
    if (J.n_act) memset(c->abuf, 0, (size_t)n * T * J.Ip * sizeof(float)); /* the padding */

    int pair_items = (I + HS_PAIRS - 1) / HS_PAIRS;
    parallel_for(c, gate_up_item, &J, J.n_act * pair_items);
    if (act_quant) parallel_for(c, a_quant_item, &J, J.n_act * T * (int)((J.Ip + 127) / 128));
    if (a_out) {
        memset(a_out, 0, (size_t)n * T * I * sizeof(float));
        for (int k = 0; k < J.n_act; k++)
            for (int t = 0; t < T; t++) {
                size_t r = (size_t)act[k] * T + t;
                for (int i = 0; i < I; i++)
                    a_out[r * I + i] = c->abuf[r * J.Ip + layout_pos((size_t)i)];
            }
    }
    parallel_for(c, down_item, &J, (D + HS_DROWS - 1) / HS_DROWS);
done:
    free(act);
    pthread_mutex_unlock(&c->call_mu);
    return rc;
}

/* ------------------------------------------------------------------------------------------- */
/* Memory read bandwidth probe (tools/cpu_expert_bench.py): the same pool reads a buffer.      */
/* ------------------------------------------------------------------------------------------- */

typedef struct {
    const uint64_t *p;
    size_t n;      /* words */
    size_t per;    /* words per item */
    _Atomic uint64_t acc;
} read_job_t;

static void read_item(void *p, int item) {
    read_job_t *R = p;
    size_t lo = (size_t)item * R->per, hi = lo + R->per < R->n ? lo + R->per : R->n;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0; /* 4 chains: loads, not adds, are the limit */
    size_t i = lo;
    for (; i + 4 <= hi; i += 4) {
        s0 ^= R->p[i];
        s1 ^= R->p[i + 1];
        s2 ^= R->p[i + 2];
        s3 ^= R->p[i + 3];
    }
    for (; i < hi; i++) s0 ^= R->p[i];
    atomic_fetch_xor_explicit(&R->acc, s0 ^ s1 ^ s2 ^ s3, memory_order_relaxed);
}

/* XOR of all 8-byte words of buf (bytes rounded down to 8), read by the pool in 1 MiB items;
 * the result only keeps the reads from being optimised away. */
HS_EXPORT uint64_t hs_read_xor(hs_ctx *c, const void *buf, size_t bytes) {
    pthread_mutex_lock(&c->call_mu);
    read_job_t R = {.p = buf, .n = bytes / 8, .per = (1u << 20) / 8};
    atomic_init(&R.acc, 0);
    parallel_for(c, read_item, &R, (int)((R.n + R.per - 1) / R.per));
    pthread_mutex_unlock(&c->call_mu);
    return atomic_load(&R.acc);
}

/* ------------------------------------------------------------------------------------------- */
/* Parallel copy: a record read from the tier below the host cache into its host slot.         */
/* ------------------------------------------------------------------------------------------- */

#define HS_COPY_ITEM ((size_t)256 << 10)

typedef struct {
    int n;
    uint8_t *const *dst;
    const uint8_t *const *src;
    const size_t *bytes;
    const size_t *first; /* first item of each segment; first[n] = the item count */
    int streaming;       /* non-temporal stores (stream_copy) */
} copy_job_t;

/* memcpy with stores that bypass the caches (non-temporal) from the first 64-byte boundary of
 * dst on. The destination is a host slot that the GPU's copy engine reads next, not this CPU:
 * a cached store first reads each destination line from memory (read for ownership), a third
 * stream of memory traffic beside the source's read and the write, on a host whose memory the
 * copy engine already draws on while the record is read. The stores are fenced before the
 * item ends (they are weakly ordered; the pool's completion then publishes them). */
static void stream_copy(uint8_t *d, const uint8_t *s, size_t len) {
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
    size_t head = (64 - ((uintptr_t)d & 63)) & 63;
    if (head > len) head = len;
    memcpy(d, s, head);
    d += head, s += head, len -= head;
    size_t body = len & ~(size_t)63;
    for (size_t i = 0; i < body; i += 64) {
#if defined(__AVX512F__)
        _mm512_stream_si512((void *)(d + i), _mm512_loadu_si512((const void *)(s + i)));
#elif defined(__AVX2__)
        _mm256_stream_si256((__m256i *)(d + i), _mm256_loadu_si256((const __m256i *)(s + i)));
        _mm256_stream_si256((__m256i *)(d + i + 32),
                            _mm256_loadu_si256((const __m256i *)(s + i + 32)));
#else
        for (int k = 0; k < 64; k += 16)
            _mm_stream_si128((__m128i *)(d + i + k), _mm_loadu_si128((const __m128i *)(s + i + k)));
#endif
    }
    memcpy(d + body, s + body, len - body);
    _mm_sfence();
#else
    memcpy(d, s, len);
#endif
}

static void copy_item(void *p, int item) {
    const copy_job_t *J = p;
    int s = 0;
    while (s + 1 < J->n && (size_t)item >= J->first[s + 1]) s++;
    size_t off = ((size_t)item - J->first[s]) * HS_COPY_ITEM;
    size_t len = J->bytes[s] - off < HS_COPY_ITEM ? J->bytes[s] - off : HS_COPY_ITEM;
    if (J->streaming)
        stream_copy(J->dst[s] + off, J->src[s] + off, len);
    else
        memcpy(J->dst[s] + off, J->src[s] + off, len);
}

/* Copy n segments (dst[i] <- src[i], bytes[i] each, not overlapping) in 256 KiB items over the
 * pool: one thread copies a few GB/s, a record of the tier below wants the whole machine.
 * streaming: with non-temporal stores (stream_copy), else memcpy.
 * Returns 0, or -2 when memory runs out. */
HS_EXPORT int hs_copy(hs_ctx *c, int n, uint8_t *const *dst, const uint8_t *const *src,
                      const size_t *bytes, int streaming) {
    if (n <= 0) return 0;
    size_t *first = malloc(((size_t)n + 1) * sizeof *first);
    if (!first) return -2;
    first[0] = 0;
    for (int i = 0; i < n; i++) first[i + 1] = first[i] + (bytes[i] + HS_COPY_ITEM - 1) / HS_COPY_ITEM;
    copy_job_t J = {.n = n, .dst = dst, .src = src, .bytes = bytes, .first = first,
                    .streaming = streaming};
    pthread_mutex_lock(&c->call_mu);
    parallel_for(c, copy_item, &J, (int)first[n]);
    pthread_mutex_unlock(&c->call_mu);
    free(first);
    return 0;
}
