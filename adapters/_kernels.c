/* Fused CPU kernels of the PyTorch adapter's steps (private; tether.adapters._kernels).
 *
 * On a CPU an optimizer step over a large model is bound by memory traffic. PyTorch's eager
 * ops read and write every tensor once per op, and even the adapter's blocked single pass
 * (`_torch_ops._adam_ftp_blocks_` and its siblings) pays one in-cache sweep per op. These
 * kernels do the elementwise part of one tensor's step (ALGORITHMS.md §3–§6) in one sweep for
 * the base step and every reduction, and one for the projection or the decay; everything that
 * involves more than one tensor (the radius's own Adam, the clip, SPD's ratio) stays in
 * `tether.core`, called by `_torch_ops` between the two.
 *
 * A tensor is seen as `rows x cols`: MARS (`core.mars_norm`) reduces every axis but the first,
 * so `rows` is its first dimension (1 for a vector or a scalar) and `cols` the rest; SPD's sums
 * are over the whole tensor, in spans of SPAN values. Every array is contiguous and passed as
 * its address (an integer, `Tensor.data_ptr()`; for a sharded parameter, its local shard's);
 * `_torch_ops` checks all of that before calling in. The full-size arrays are of one storage
 * dtype S (float32, float64 or bfloat16), the per-row ones (s, n) of the compute dtype T (S
 * itself, float32 for bfloat16). bfloat16 values are computed in float32 and stored rounded
 * to nearest even, as torch's fused optimizers do: one rounding per stored value.
 * The GIL is released while a kernel runs, and rows (spans) are shared among `threads` OpenMP
 * threads. Each reduction over rows (spans) is summed by one thread in order, so the results do
 * not depend on `threads`.
 *
 *   adam_ftp_displace, sgd_ftp_displace, ftp_displace:
 *                     ∇γ = Σ_r s_r Σ_j (c_prev ⊙ g)_rj, the base step (torch.optim.Adam's or
 *                     SGD's; none for the FTP wrapper, whose base has stepped), c = (θ − θ₀) + u
 *                     written over c_prev, and the row sums Σ_j |c_rj|. Returns (∇γ, the largest
 *                     row sum). (For a shard the row sums are partial: `_torch_ops` sums them
 *                     across ranks before the projection and takes max n itself.)
 *   ftp_project:      n_r = Σ_j |c_rj| + eps (the norms' 1e-8, `core.NORM_EPS`),
 *                     θ = θ₀ + clip(γ / n_r, 0, 1) · c_r and s_r = 1 / n_r.
 *   adam_spd_step:    ⟨g, θ − θ₀⟩, ‖θ − θ₀‖², Adam's step into θ (which then holds θ̃ − θ₀) and
 *                     ‖θ̃ − θ₀‖²; `spd_decay` then decays.
 *   spd_sums:         the SPD wrapper's ⟨g, θ − θ₀⟩ and ‖θ − θ₀‖² (before and after the wrapped step).
 *   spd_decay:        the SPD wrapper's θ ← (1 − λr) θ̃ + λr θ₀.
 *   dot:              Σ a · b over a whole tensor (Σ a² without b), in spans of SPAN values
 *                     whose sums are added up in order: the same bits for any thread count
 *                     (MKL's dot, under torch.dot, splits its sum by the thread count).
 *   scalars:          the 0-d tensors of a bucket (step counts, radii, SPD's records) read into a
 *                     vector, written from one or advanced by one, in one call.
 *
 * The sweeps are one loop body (SWEEP_ONE) specialised by constant flags, vectorised by
 * `omp simd` and compiled for AVX-512 and AVX2 as well as the x86-64 baseline (picked at load).
 */
#ifndef T /* the module; the kernels for one dtype T are the part after #else */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* Independent partial sums per row: the reduction loops vectorize without reassociating math. */
#define LANES 16
/* Values per row summed in T before their partial sums join a double (a multiple of LANES). */
#define CHUNK 256
/* Tensors at least this large (bytes) get the projection's result written past the cache:
 * the parameter is not read in that sweep, and a normal store would first read it in. */
#define STREAM_BYTES (4L << 20)
/* Tensors with fewer values run on one thread: a parallel region costs more than they do. */
#define PARALLEL_MIN (1L << 16)
/* Rows of fewer values than this (and tensors of more than one row) take `sweep_narrow`: a row
 * of under two AVX-512 vectors spends much of its sweep in the vector loop's set-up and scalar
 * tail (LoRA's B, rank r wide: 4.1x faster at r = 8, 1.3x at 16, 2x at 31; at 32, the same). */
#define NARROW 32
/* Values per piece of `sweep_narrow`: its per-value terms stay in the stack, and in L1 (256 values
 * sweep 1.2x faster than 1,024). */
#define NARROW_VALUES 256
/* Whether a block of `rows` rows of `cols` values takes `sweep_narrow`. */
static inline int narrow_rows(Py_ssize_t rows, Py_ssize_t cols) { return rows > 1 && cols > 0 && cols < NARROW; }
/* Values per span of `dot`: each span is summed by one thread, the spans' sums in order. */
#define SPAN (1L << 14)
/* The base step of a sweep: none (the wrappers' measures), Adam's or SGD's. */
enum { NONE = 0, ADAM = 1, SGD = 2 };
/* The flags of a sweep, one bit each (`sweep_any` decodes them). */
enum {
    F_FTP = 1, F_AMSGRAD = 2, F_ANCHOR = 4, F_WD = 8, F_G = 16, F_SMALL = 32, F_MOMENTUM = 64, F_NESTEROV = 128,
};

/* The Adam sweeps are compiled for AVX-512 and AVX2 too, picked at load time by the CPU
 * (GCC's function multiversioning); elsewhere one portable build. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

/* `p[j] = a[j] + scale·c[j]` (a = NULL: 0) from `j` (p + j 64-byte aligned) with streaming
 * stores, as far as whole vectors go; returns where it stopped. 256-bit stores where the CPU has
 * AVX: on a 2-core EPYC the projection then takes 6.7 ms per 16.7M float32 values, not 7.5. */
#if defined(__SSE2__)
static inline void fence(void) { _mm_sfence(); }
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define STREAM_AVX 1
__attribute__((target("avx"))) static Py_ssize_t stream_f32_avx(float *p, const float *a, const float *c,
                                                                  float scale, Py_ssize_t j, Py_ssize_t cols) {
    const __m256 s8 = _mm256_set1_ps(scale);
    for (; j + 8 <= cols; j += 8) {
        __m256 v = _mm256_mul_ps(s8, _mm256_loadu_ps(c + j));
        if (a) v = _mm256_add_ps(_mm256_loadu_ps(a + j), v);
        _mm256_stream_ps(p + j, v);
    }
    return j;
}
__attribute__((target("avx"))) static Py_ssize_t stream_f64_avx(double *p, const double *a, const double *c,
                                                                  double scale, Py_ssize_t j, Py_ssize_t cols) {
    const __m256d s4 = _mm256_set1_pd(scale);
    for (; j + 4 <= cols; j += 4) {
        __m256d v = _mm256_mul_pd(s4, _mm256_loadu_pd(c + j));
        if (a) v = _mm256_add_pd(_mm256_loadu_pd(a + j), v);
        _mm256_stream_pd(p + j, v);
    }
    return j;
}
#else
#define STREAM_AVX 0
#endif
static inline Py_ssize_t stream_f32(float *p, const float *a, const float *c, float scale, Py_ssize_t j,
                                    Py_ssize_t cols) {
#if STREAM_AVX
    if (__builtin_cpu_supports("avx")) return stream_f32_avx(p, a, c, scale, j, cols);
#endif
    const __m128 s4 = _mm_set1_ps(scale);
    for (; j + 4 <= cols; j += 4) {
        __m128 v = _mm_mul_ps(s4, _mm_loadu_ps(c + j));
        if (a) v = _mm_add_ps(_mm_loadu_ps(a + j), v);
        _mm_stream_ps(p + j, v);
    }
    return j;
}
static inline Py_ssize_t stream_f64(double *p, const double *a, const double *c, double scale, Py_ssize_t j,
                                    Py_ssize_t cols) {
#if STREAM_AVX
    if (__builtin_cpu_supports("avx")) return stream_f64_avx(p, a, c, scale, j, cols);
#endif
    const __m128d s2 = _mm_set1_pd(scale);
    for (; j + 2 <= cols; j += 2) {
        __m128d v = _mm_mul_pd(s2, _mm_loadu_pd(c + j));
        if (a) v = _mm_add_pd(_mm_loadu_pd(a + j), v);
        _mm_stream_pd(p + j, v);
    }
    return j;
}
#else
static inline void fence(void) {}
static inline Py_ssize_t stream_f32(float *p, const float *a, const float *c, float scale, Py_ssize_t j,
                                    Py_ssize_t cols) {
    (void)p, (void)a, (void)c, (void)scale, (void)cols;
    return j;
}
static inline Py_ssize_t stream_f64(double *p, const double *a, const double *c, double scale, Py_ssize_t j,
                                    Py_ssize_t cols) {
    (void)p, (void)a, (void)c, (void)scale, (void)cols;
    return j;
}
#endif

/* bfloat16, stored as its bits: the upper half of a float32's. */
static inline float bf16_load(uint16_t x) {
    const uint32_t bits = (uint32_t)x << 16;
    float f;
    __builtin_memcpy(&f, &bits, sizeof f);
    return f;
}
/* Rounded to nearest even, NaN kept a (quiet) NaN: c10's round_to_nearest_even, torch's `.bfloat16()`. */
static inline uint16_t bf16_store(float f) {
    uint32_t bits;
    __builtin_memcpy(&bits, &f, sizeof bits);
    const uint16_t rounded = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : rounded;
}

/* bfloat16 in AVX2 where the CPU has it, 16 values at a time: widened by interleaving them with zeros
 * (`bf16_load16`: lo holds values 0-3 and 8-11, hi 4-7 and 12-15), narrowed by `packus`, which undoes
 * that order, and rounded as `bf16_store` (bit for bit, NaN as 0x7FC0). GCC's vectorisation of the
 * scalar loops spends about twice the instructions (widening by 32-bit lanes, then permuting). */
#if STREAM_AVX
#define BF16_AVX2 1
#define AVX2 __attribute__((target("avx2")))
AVX2 static inline void bf16_load16(const uint16_t *x, __m256 *lo, __m256 *hi) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)x), zero = _mm256_setzero_si256();
    *lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v));
    *hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v));
}
/* `bf16_store` of 8 floats, each result in the low half of its 32-bit lane */
AVX2 static inline __m256i bf16_round8(__m256 f) {
    const __m256i bits = _mm256_castps_si256(f);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}
/* the value `bf16_round8` stores, as a float */
AVX2 static inline __m256 bf16_widen8(__m256i rounded) { return _mm256_castsi256_ps(_mm256_slli_epi32(rounded, 16)); }
AVX2 static inline void bf16_store16(uint16_t *x, __m256i lo, __m256i hi) {
    _mm256_storeu_si256((__m256i *)x, _mm256_packus_epi32(lo, hi));
}
/* the projection's `p[j] = a[j] + scale·c[j]` (a = NULL: 0) from `j`, 16 values at a time (stream:
 * streaming stores, p + j 32-byte aligned); returns where it stopped */
AVX2 static Py_ssize_t project_bf16_avx2(uint16_t *p, const uint16_t *a, const uint16_t *c, float scale,
                                         Py_ssize_t j, Py_ssize_t cols, int stream) {
    const __m256 s8 = _mm256_set1_ps(scale);
    for (; j + 16 <= cols; j += 16) {
        __m256 lo, hi;
        bf16_load16(c + j, &lo, &hi);
        lo = _mm256_mul_ps(s8, lo), hi = _mm256_mul_ps(s8, hi);
        if (a) {
            __m256 alo, ahi;
            bf16_load16(a + j, &alo, &ahi);
            lo = _mm256_add_ps(alo, lo), hi = _mm256_add_ps(ahi, hi);
        }
        const __m256i v = _mm256_packus_epi32(bf16_round8(lo), bf16_round8(hi));
        if (stream)
            _mm256_stream_si256((__m256i *)(p + j), v);
        else
            _mm256_storeu_si256((__m256i *)(p + j), v);
    }
    return j;
}
#else
#define BF16_AVX2 0
#endif
static inline int bf16_avx2(void) {
#if BF16_AVX2
    return __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}
/* the projection's vector loop for bfloat16 (`STREAM`, `PLAIN`): AVX2's where the CPU has it, else none */
static inline Py_ssize_t project_bf16_vector(uint16_t *p, const uint16_t *a, const uint16_t *c, float scale,
                                             Py_ssize_t j, Py_ssize_t cols, int stream) {
#if BF16_AVX2
    if (bf16_avx2()) return project_bf16_avx2(p, a, c, scale, j, cols, stream);
#endif
    (void)p, (void)a, (void)c, (void)scale, (void)cols, (void)stream;
    return j; /* the scalar loops do it all: no streaming stores for bfloat16 without AVX2 */
}
#define STREAM_BF16(p, a, c, scale, j, cols) project_bf16_vector(p, a, c, scale, j, cols, 1)
#define PLAIN_BF16(p, a, c, scale, j, cols) project_bf16_vector(p, a, c, scale, j, cols, 0)
/* float32 and float64: GCC vectorises the projection's plain loop as it is */
#define PLAIN_NONE(p, a, c, scale, j, cols) (j)

/* The storage (S) and compute (T) types of each instantiation, by suffix (for the dispatch below). */
typedef float store_f32, compute_f32;
typedef double store_f64, compute_f64;
typedef uint16_t store_bf16;
typedef float compute_bf16;

#define S float
#define T float
#define LD(x) (x)
#define ST(x) (x)
#define ABS fabsf
#define SQRT sqrtf
#define NAME(x) x##_f32
#define STREAM stream_f32
#define PLAIN PLAIN_NONE
#include "_kernels.c" /* this file again, with T defined; it undefines these at its end */

#define S double
#define T double
#define LD(x) (x)
#define ST(x) (x)
#define ABS fabs
#define SQRT sqrt
#define NAME(x) x##_f64
#define STREAM stream_f64
#define PLAIN PLAIN_NONE
#include "_kernels.c" /* this file again, with T defined; it undefines these at its end */

#define S uint16_t
#define T float
#define LD(x) bf16_load(x)
#define ST(x) bf16_store(x)
#define ABS fabsf
#define SQRT sqrtf
#define NAME(x) x##_bf16
#define STREAM STREAM_BF16
#define PLAIN PLAIN_BF16
#define SWEEP_AVX2 BF16_AVX2 /* SGD-FTP's sweep in AVX2 (`sgd_ftp_avx2`) */
#include "_kernels.c" /* this file again, with T defined; it undefines these at its end */

/* dtype codes of `_torch_ops`: 0 float32, 1 float64, 2 bfloat16 */
static int check_dtype(int dtype) {
    if (dtype >= 0 && dtype <= 2) return 0;
    PyErr_Format(PyExc_ValueError, "dtype code must be 0 (float32), 1 (float64) or 2 (bfloat16), got %d", dtype);
    return -1;
}

/* CALL(suffix) for the instantiation of dtype code `dtype` (checked). */
#define BY_DTYPE(dtype, CALL) \
    do {                     \
        if ((dtype) == 0) {  \
            CALL(f32);       \
        } else if ((dtype) == 1) { \
            CALL(f64);       \
        } else {             \
            CALL(bf16);      \
        }                    \
    } while (0)

static int check_shape(Py_ssize_t rows, Py_ssize_t cols) {
    if (rows >= 1 && cols >= 0) return 0;
    PyErr_Format(PyExc_ValueError, "rows must be >= 1 and cols >= 0, got %zd x %zd", rows, cols);
    return -1;
}

static PyObject *ftp_project(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, threads;
    unsigned long long p, a, c, n, s;
    Py_ssize_t rows, cols;
    double radius, eps;
    if (!PyArg_ParseTuple(args, "iKKKKKddnni", &dtype, &p, &a, &c, &n, &s, &radius, &eps, &rows, &cols, &threads))
        return NULL;
    if (check_dtype(dtype) || check_shape(rows, cols)) return NULL;
#define PROJECT(X)                                                                                      \
    project_##X((store_##X *)p, (const store_##X *)a, (const store_##X *)c, (const compute_##X *)n,     \
                (compute_##X *)s, radius, eps, rows, cols, threads)
    Py_BEGIN_ALLOW_THREADS;
    BY_DTYPE(dtype, PROJECT);
    Py_END_ALLOW_THREADS;
#undef PROJECT
    Py_RETURN_NONE;
}

static PyObject *dot(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, threads;
    unsigned long long a, b;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "iKKni", &dtype, &a, &b, &n, &threads)) return NULL;
    if (check_dtype(dtype)) return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "n must be >= 0, got %zd", n);
        return NULL;
    }
    double total;
#define DOT(X) total = dot_##X((const store_##X *)a, (const store_##X *)b, n, threads)
    Py_BEGIN_ALLOW_THREADS;
    BY_DTYPE(dtype, DOT);
    Py_END_ALLOW_THREADS;
#undef DOT
    return PyFloat_FromDouble(total);
}

/* The sweep's arguments for one dtype: addresses as integers (0: absent), scalars as doubles. */
typedef struct {
    unsigned long long p, g, m, v, vm, a, c, b;
    double beta1, beta2, scale, offset, value, lrwd, lr, momentum, coef, wd;
} sweep_in;

#define SWEEP_ARGS(SUFFIX, IN)                                                                      \
    typedef store_##SUFFIX SS;                                                                      \
    typedef compute_##SUFFIX TT;                                                                    \
    sweep_args_##SUFFIX k = {                                                                       \
        .p = (SS *)(IN).p, .m = (SS *)(IN).m, .v = (SS *)(IN).v, .vm = (SS *)(IN).vm,                \
        .c = (SS *)(IN).c, .b = (SS *)(IN).b, .g = (const SS *)(IN).g, .a = (const SS *)(IN).a,     \
        .w1 = (TT)(1 - (IN).beta1), .beta2 = (TT)(IN).beta2, .w2 = (TT)(1 - (IN).beta2),            \
        .scale = (TT)(IN).scale, .offset = (TT)(IN).offset, .value = (TT)(IN).value,                \
        .lrwd = (TT)(IN).lrwd, .lr = (TT)(IN).lr, .momentum = (TT)(IN).momentum,                    \
        .coef = (TT)(IN).coef, .wd = (TT)(IN).wd,                                                   \
    }

/* The FTP sweeps over rows x cols (base: ADAM, SGD or NONE, the wrapper's measure after the
 * wrapped step); s, n and dots as in `ftp_rows`. Returns (∇γ = Σ_r dots_r, max_r n_r). */
static PyObject *ftp_sweep(int base, int dtype, sweep_in in, unsigned long long s, unsigned long long n,
                           unsigned long long dots_address, Py_ssize_t rows, Py_ssize_t cols, int nesterov,
                           int threads) {
    if (check_dtype(dtype) || check_shape(rows, cols)) return NULL;
    double *dots = (double *)dots_address, grad = 0, largest = 0;
    int failed;
#define FTP_ROWS(X)                                                                                     \
    do {                                                                                                \
        SWEEP_ARGS(X, in);                                                                              \
        failed = ftp_rows_##X(&k, (const TT *)s, (TT *)n, dots, &largest, rows, cols, base, nesterov, threads); \
    } while (0)
    Py_BEGIN_ALLOW_THREADS;
    BY_DTYPE(dtype, FTP_ROWS);
#undef FTP_ROWS
    for (Py_ssize_t r = 0; r < rows; r++) grad += dots[r];
    Py_END_ALLOW_THREADS;
    if (failed) return PyErr_NoMemory();
    return Py_BuildValue("(dd)", grad, largest);
}

static PyObject *adam_ftp_displace(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, threads;
    sweep_in in = {0};
    unsigned long long s, n, dots;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "iKKKKKKKKKKnnddddddi", &dtype, &in.p, &in.g, &in.m, &in.v, &in.vm, &in.a, &in.c,
                          &s, &n, &dots, &rows, &cols, &in.beta1, &in.beta2, &in.scale, &in.offset, &in.value,
                          &in.lrwd, &threads))
        return NULL;
    return ftp_sweep(ADAM, dtype, in, s, n, dots, rows, cols, 0, threads);
}

static PyObject *sgd_ftp_displace(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, nesterov, threads;
    sweep_in in = {0};
    unsigned long long s, n, dots;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "iKKKKKKKKnnddddpi", &dtype, &in.p, &in.g, &in.b, &in.a, &in.c, &s, &n, &dots, &rows,
                          &cols, &in.lr, &in.momentum, &in.coef, &in.wd, &nesterov, &threads))
        return NULL;
    return ftp_sweep(SGD, dtype, in, s, n, dots, rows, cols, nesterov, threads);
}

static PyObject *ftp_displace(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, threads;
    sweep_in in = {0};
    unsigned long long s, n, dots;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "iKKKKKKKnni", &dtype, &in.p, &in.g, &in.a, &in.c, &s, &n, &dots, &rows, &cols,
                          &threads))
        return NULL;
    return ftp_sweep(NONE, dtype, in, s, n, dots, rows, cols, 0, threads);
}

static int check_count(Py_ssize_t count) {
    if (count >= 0) return 0;
    PyErr_Format(PyExc_ValueError, "count must be >= 0, got %zd", count);
    return -1;
}

/* The SPD sweeps: with Adam AdamSPD's step, without it the SPD wrapper's measure (g = 0: ‖θ − θ₀‖²
 * only). Returns (⟨g, θ − θ₀⟩, ‖θ − θ₀‖², ‖θ̃ − θ₀‖²). */
static PyObject *spd_sweep(int base, int dtype, sweep_in in, Py_ssize_t count, int threads) {
    if (check_dtype(dtype) || check_count(count)) return NULL;
    double sums[3];
    int failed;
#define SPD_SPANS(X)                                      \
    do {                                                  \
        SWEEP_ARGS(X, in);                                \
        failed = spd_spans_##X(&k, count, sums, base, threads); \
    } while (0)
    Py_BEGIN_ALLOW_THREADS;
    BY_DTYPE(dtype, SPD_SPANS);
    Py_END_ALLOW_THREADS;
#undef SPD_SPANS
    if (failed) return PyErr_NoMemory();
    return Py_BuildValue("(ddd)", sums[0], sums[1], sums[2]);
}

static PyObject *adam_spd_step(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, threads;
    sweep_in in = {0};
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "iKKKKKKndddddi", &dtype, &in.p, &in.g, &in.m, &in.v, &in.vm, &in.a, &count,
                          &in.beta1, &in.beta2, &in.scale, &in.offset, &in.value, &threads))
        return NULL;
    return spd_sweep(ADAM, dtype, in, count, threads);
}

static PyObject *spd_sums(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, threads;
    sweep_in in = {0};
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "iKKKni", &dtype, &in.p, &in.g, &in.a, &count, &threads)) return NULL;
    return spd_sweep(NONE, dtype, in, count, threads);
}

static PyObject *spd_decay(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, threads;
    unsigned long long p, a;
    double keep, strength;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "iKKddni", &dtype, &p, &a, &keep, &strength, &count, &threads)) return NULL;
    if (check_dtype(dtype) || check_count(count)) return NULL;
#define SPD_DECAY(X) spd_decay_##X((store_##X *)p, (const store_##X *)a, keep, strength, count, threads)
    Py_BEGIN_ALLOW_THREADS;
    BY_DTYPE(dtype, SPD_DECAY);
    Py_END_ALLOW_THREADS;
#undef SPD_DECAY
    Py_RETURN_NONE;
}

/* A scalar of dtype code `code` at `address` (0 float32, 1 float64, 3 bool, 4 int64, 5 int32), as a
 * double (a step count, exact below 2^53). */
static inline double scalar_get(int code, const void *address) {
    if (code == 0) return *(const float *)address;
    if (code == 1) return *(const double *)address;
    if (code == 4) return (double)*(const int64_t *)address;
    if (code == 5) return *(const int32_t *)address;
    return *(const uint8_t *)address != 0;
}

static inline void scalar_set(int code, void *address, double value) {
    if (code == 0)
        *(float *)address = (float)value; /* to nearest, as copy_ from float64 */
    else if (code == 1)
        *(double *)address = value;
    else if (code == 4)
        *(int64_t *)address = (int64_t)value;
    else if (code == 5)
        *(int32_t *)address = (int32_t)value;
    else
        *(uint8_t *)address = value != 0;
}

/* scalars: many 0-d tensors (the per-tensor step counts, radii and SPD's records) read into a
 * vector, written from one or advanced by one, in one call: PyTorch's foreach ops on 0-d tensors
 * pay a dispatch per tensor (about 2 us each on a CPU). */
static PyObject *scalars(PyObject *self, PyObject *args) {
    (void)self;
    int code, vector_code, mode;
    PyObject *addresses;
    unsigned long long vector;
    if (!PyArg_ParseTuple(args, "iOiKi", &code, &addresses, &vector_code, &vector, &mode)) return NULL;
    if (code < 0 || code > 5 || code == 2 || vector_code < 0 || vector_code > 3 || vector_code == 2) {
        PyErr_Format(PyExc_ValueError,
                     "scalar dtype codes must be 0 (float32), 1 (float64), 3 (bool), 4 (int64) or 5 (int32; not a vector's), "
                     "got %d, %d", code, vector_code);
        return NULL;
    }
    if (mode < 0 || mode > 2 || (mode == 2 && code == 3)) {
        PyErr_Format(PyExc_ValueError, "mode must be 0 (read), 1 (write) or 2 (advance a number), got %d", mode);
        return NULL;
    }
    PyObject *items = PySequence_Fast(addresses, "addresses must be a sequence of integers");
    if (!items) return NULL;
    const Py_ssize_t count = PySequence_Fast_GET_SIZE(items);
    void **targets = malloc((count > 0 ? count : 1) * sizeof(void *));
    if (!targets) {
        Py_DECREF(items);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) { /* every address parsed before anything is written */
        targets[i] = PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(items, i));
        if (!targets[i]) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "an address is 0");
            free(targets);
            Py_DECREF(items);
            return NULL;
        }
    }
    Py_DECREF(items);
    if (count > 0 && !vector) {
        free(targets);
        PyErr_SetString(PyExc_ValueError, "the vector's address is 0");
        return NULL;
    }
    const size_t width = vector_code == 0 ? sizeof(float) : vector_code == 1 ? sizeof(double) : 1;
    char *values = (char *)vector;
    for (Py_ssize_t i = 0; i < count; i++) {
        void *x = targets[i];
        if (mode == 0) {
            scalar_set(vector_code, values + i * width, scalar_get(code, x));
        } else if (mode == 1) {
            scalar_set(code, x, scalar_get(vector_code, values + i * width));
        } else { /* in the step count's own dtype, as torch._foreach_add_(steps, 1) */
            if (code == 0)
                *(float *)x += 1.0f;
            else if (code == 1)
                *(double *)x += 1.0;
            else if (code == 4)
                *(int64_t *)x += 1;
            else
                *(int32_t *)x += 1;
            scalar_set(vector_code, values + i * width, scalar_get(code, x));
        }
    }
    free(targets);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"adam_ftp_displace", adam_ftp_displace, METH_VARARGS,
     "adam_ftp_displace(dtype, p, g, m, v, vm, a, c, s, n, dots, rows, cols, beta1, beta2, scale, offset, "
     "value, lrwd, threads) -> radius_grad\n\n"
     "One tensor's Adam step (m, v and, vm != 0, amsgrad's v*, updated in place) and FTP statistics in one "
     "sweep: c = (p - a) + lrwd * p + value * m / (sqrt(v*) * scale + offset) over c_prev, n = MARS(c), "
     "radius_grad = sum_r s_r <c_prev, g>_r (dots: rows float64 values of scratch)."},
    {"ftp_displace", ftp_displace, METH_VARARGS,
     "ftp_displace(dtype, p, g, a, c, s, n, dots, rows, cols, threads) -> radius_grad\n\n"
     "The FTP wrapper's sweep after the wrapped step: c = p - a over c_prev, n = MARS(c), "
     "radius_grad = sum_r s_r <c_prev, g>_r."},
    {"adam_spd_step", adam_spd_step, METH_VARARGS,
     "adam_spd_step(dtype, p, g, m, v, vm, a, count, beta1, beta2, scale, offset, value, threads) "
     "-> (alignment, squared_distance, new_squared_distance)\n\n"
     "One tensor's Adam step and SPD statistics in one sweep; p receives p~ - a (the decay follows)."},
    {"spd_sums", spd_sums, METH_VARARGS,
     "spd_sums(dtype, p, g, a, count, threads) -> (alignment, squared_distance, 0)\n\n"
     "<g, p - a> (0 for g = 0) and ||p - a||^2 in one sweep, the same for any thread count."},
    {"spd_decay", spd_decay, METH_VARARGS,
     "spd_decay(dtype, p, a, keep, strength, count, threads) -> None\n\np = p * keep + a * strength."},
    {"sgd_ftp_displace", sgd_ftp_displace, METH_VARARGS,
     "sgd_ftp_displace(dtype, p, g, b, a, c, s, n, dots, rows, cols, lr, momentum, coef, weight_decay, "
     "nesterov, threads) -> radius_grad\n\n"
     "One tensor's SGD step and FTP statistics in one sweep (addresses as integers; b = 0 without momentum, "
     "a = 0 for a zero anchor); c_prev is overwritten by c, n receives MARS(c) (the row sums of |c|), and "
     "dots (rows float64 values) is scratch."},
    {"ftp_project", ftp_project, METH_VARARGS,
     "ftp_project(dtype, p, a, c, n, s, radius, rows, cols, threads) -> None\n\n"
     "p = a + clip(radius / n_r, 0, 1) * c_r (a = 0: a zero anchor) and s_r = 1 / n_r."},
    {"scalars", scalars, METH_VARARGS,
     "scalars(code, addresses, vector_code, vector, mode) -> None\n\n"
     "0-d tensors at addresses (code 0 float32, 1 float64, 3 bool, 4 int64, 5 int32) and a vector of as many values "
     "(vector_code): mode 0 reads them into it, 1 writes it into them, 2 adds 1 to each and reads them."},
    {"dot", dot, METH_VARARGS,
     "dot(dtype, a, b, n, threads) -> float\n\n"
     "The sum of a * b over n contiguous values (b = 0: of a * a), the same for any thread count."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "Fused CPU kernels of tether's PyTorch FTP steps (private).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) {
#if STREAM_AVX
    __builtin_cpu_init(); /* for __builtin_cpu_supports: the streaming stores, bfloat16's AVX2 */
#endif
    return PyModule_Create(&module);
}

#else /* T: the kernels for one dtype, included twice by the first part of this file */

/* ftp_project for one tensor: n_r = sums_r + eps, p_r = a_r + clip(γ / n_r, 0, 1) · c_r and s_r = 1 / n_r. */
MULTIVERSION static void NAME(project)(S *p, const S *a, const S *c, const T *sums, T *s, double radius_,
                                       double eps_, Py_ssize_t rows, Py_ssize_t cols, int threads) {
    const T radius = (T)radius_, eps = (T)eps_;
    const int stream = rows * cols * (Py_ssize_t)sizeof(S) >= STREAM_BYTES;
    const int parallel = threads > 1 && rows > 1 && rows * cols >= PARALLEL_MIN;
#pragma omp parallel num_threads(threads) if (parallel)
    {
#pragma omp for schedule(static)
        for (Py_ssize_t r = 0; r < rows; r++) {
            const Py_ssize_t o = r * cols;
            const T n = sums[r] + eps;
            T scale = radius / n;
            scale = scale < 0 ? 0 : (scale > 1 ? 1 : scale);
            S *restrict pr = p + o;
            const S *restrict ar = a ? a + o : NULL, *restrict cr = c + o;
            /* streaming stores over [start, rest), from the first cache line's start (else the vector loop
             * of `PLAIN`, if any, over [0, rest)); plain scalar ones around */
            Py_ssize_t start = 0, rest;
            if (stream) {
                const Py_ssize_t misaligned = (Py_ssize_t)((64 - ((uintptr_t)pr & 63)) & 63) / (Py_ssize_t)sizeof(S);
                start = misaligned < cols ? misaligned : cols;
                rest = STREAM(pr, ar, cr, scale, start, cols);
            } else {
                rest = PLAIN(pr, ar, cr, scale, 0, cols);
            }
            if (ar) {
                for (Py_ssize_t j = 0; j < start; j++) pr[j] = ST(LD(ar[j]) + scale * LD(cr[j]));
                for (Py_ssize_t j = rest; j < cols; j++) pr[j] = ST(LD(ar[j]) + scale * LD(cr[j]));
            } else {
                for (Py_ssize_t j = 0; j < start; j++) pr[j] = ST(scale * LD(cr[j]));
                for (Py_ssize_t j = rest; j < cols; j++) pr[j] = ST(scale * LD(cr[j]));
            }
            s[r] = 1 / n;
        }
        fence();
    }
}

/* LANES partial sums of T of a_j · b_j (b = NULL: a_j²) over `count` values, a multiple of LANES,
 * joined in double. The loop bound is a parameter of an inlined function, not a `while` over a
 * moving end: under Python's -fwrapv, GCC vectorizes the former only (4x faster). */
static inline __attribute__((always_inline)) double NAME(dot_lanes)(const S *restrict a, const S *restrict b,
                                                                     const Py_ssize_t count) {
    T lanes[LANES] = {0};
    if (b)
        for (Py_ssize_t i = 0; i < count; i += LANES)
            for (int k = 0; k < LANES; k++) lanes[k] += LD(a[i + k]) * LD(b[i + k]);
    else
        for (Py_ssize_t i = 0; i < count; i += LANES)
            for (int k = 0; k < LANES; k++) lanes[k] += LD(a[i + k]) * LD(a[i + k]);
    double total = 0;
    for (int k = 0; k < LANES; k++) total += lanes[k];
    return total;
}

/* Σ_j a_j · b_j over one span: CHUNK values at a time in `dot_lanes`, their sums in double. */
MULTIVERSION static double NAME(dot_span)(const S *restrict a, const S *restrict b, Py_ssize_t n) {
    double total = 0;
    Py_ssize_t j = 0;
    for (; j + CHUNK <= n; j += CHUNK) total += NAME(dot_lanes)(a + j, b ? b + j : NULL, CHUNK);
    const Py_ssize_t whole = (n - j) / LANES * LANES;
    if (whole) total += NAME(dot_lanes)(a + j, b ? b + j : NULL, whole);
    T tail = 0;
    for (j += whole; j < n; j++) tail += LD(a[j]) * LD(b ? b[j] : a[j]);
    return total + tail;
}

/* Σ a · b over n values: spans of SPAN values shared among `threads`, their sums added in order. */
static double NAME(dot)(const S *a, const S *b, Py_ssize_t n, int threads) {
    const Py_ssize_t spans = (n + SPAN - 1) / SPAN;
    double *sums = spans > 1 ? malloc(spans * sizeof(double)) : NULL;
    double total = 0;
    if (!sums) {  /* one span, or no memory for the spans' sums: the same sums, one after another */
        for (Py_ssize_t k = 0; k < spans; k++)
            total += NAME(dot_span)(a + k * SPAN, b ? b + k * SPAN : NULL, k + 1 < spans ? SPAN : n - k * SPAN);
        return total;
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n >= PARALLEL_MIN)
    for (Py_ssize_t k = 0; k < spans; k++)
        sums[k] = NAME(dot_span)(a + k * SPAN, b ? b + k * SPAN : NULL, k + 1 < spans ? SPAN : n - k * SPAN);
    for (Py_ssize_t k = 0; k < spans; k++) total += sums[k];
    free(sums);
    return total;
}


/* -- the Adam steps and the wrappers' sweeps ------------------------------------------------- */

/* The arrays (of S) and scalars of one tensor's sweep (`sweep`). Scalars are in T, as PyTorch's
 * kernels take them. Adam: w1 = 1 − β1 (the lerp's weight), beta2, w2 = 1 − β2, the
 * coefficients of x ← x + value · m / (√v* · scale + offset) (`_torch_ops.adam_coefficients`),
 * lrwd = −lr·wd (AdamW's decay); SGD: lr, momentum, coef (of u in the momentum buffer b: 1 on
 * the first step, else 1 − dampening), wd (added to the gradient). */
typedef struct {
    S *p, *m, *v, *vm, *c, *b;
    const S *g, *a;
    T w1, beta2, w2, scale, offset, value, lrwd; /* Adam */
    T lr, momentum, coef, wd;                     /* SGD */
} NAME(sweep_args);

/* One element of `sweep` (the flags are constants in each specialization):
 *   ADAM:  m ← lerp(m, g, 1 − β1), v ← β2·v + (1 − β2)·g², v* ← max(v*, v) with amsgrad, and
 *          the step u = value · m / (√v* · scale + offset), as torch.optim.Adam;
 *   SGD:   d = g [+ wd·θ], b ← μ·b + coef·d and d = b (Nesterov: d + μ·b), the step u = −lr·d,
 *          as torch.optim.SGD;
 *   ftp:   S0 += c_prev·g, c = (θ − θ₀) [+ lrwd·θ] [+ u] written over c_prev, S1 += |c|;
 *   else (SPD): d = θ − θ₀, S0 += g·d, S1 += d², and with a base step θ ← d + u (the parameter holds
 *          θ̃ − θ₀ until the decay), S2 += (θ̃ − θ₀)².
 *   |c| is of c as stored (bfloat16: rounded), the c the projection scales; (θ̃ − θ₀)² is of
 *   the value before its rounding (summing the stored one stops GCC vectorizing this loop). */
#define SWEEP_ONE(i, S0, S1, S2)                                                                      \
    do {                                                                                              \
        const T gi = has_g ? LD(g[i]) : 0;                                                            \
        T u = 0;                                                                                      \
        if (base == ADAM) {                                                                           \
            const T mo = LD(m[i]);                                                                    \
            const T mi = small ? mo + w1 * (gi - mo) : gi - (gi - mo) * ((T)1 - w1);                   \
            const T vi = LD(v[i]) * beta2 + w2 * gi * gi;                                             \
            m[i] = ST(mi);                                                                            \
            v[i] = ST(vi);                                                                            \
            T second = vi;                                                                            \
            if (amsgrad) {                                                                            \
                const T vmo = LD(vm[i]);                                                              \
                second = (vmo >= vi || vmo != vmo) ? vmo : vi; /* NaN propagates, as torch.maximum */ \
                vm[i] = ST(second);                                                                   \
            }                                                                                         \
            u = value * mi / (SQRT(second) * scale + offset);                                         \
        } else if (base == SGD) {                                                                     \
            T d = has_wd ? gi + wd * LD(p[i]) : gi;                                               \
            if (has_momentum) {                                                                       \
                const T bi = momentum * LD(b[i]) + coef * d;                                      \
                b[i] = ST(bi);                                                                        \
                d = nesterov ? d + momentum * bi : bi;                                                \
            }                                                                                         \
            u = -(lr * d);                                                                            \
        }                                                                                             \
        T di = has_anchor ? LD(p[i]) - LD(a[i]) : LD(p[i]);                                          \
        if (ftp) {                                                                                    \
            S0 += LD(c[i]) * gi;                                                                      \
            if (base == ADAM && has_wd) di = di + lrwd * LD(p[i]);                                    \
            if (base) di = di + u;                                                                    \
            const S stored = ST(di); /* n is the norm of c as stored (bfloat16: rounded) */          \
            c[i] = stored;                                                                            \
            S1 += ABS(LD(stored));                                                                    \
        } else {                                                                                      \
            if (has_g) S0 += gi * di;                                                                 \
            S1 += di * di;                                                                            \
            if (base) {                                                                               \
                di = di + u;                                                                          \
                p[i] = ST(di);                                                                        \
                S2 += di * di;                                                                        \
            }                                                                                         \
        }                                                                                             \
    } while (0)

/* The arrays of `k` from offset `o` and its scalars, under the names SWEEP_ONE reads (the
 * flags base, ftp, amsgrad, has_anchor, has_g and has_momentum in scope). */
#define SWEEP_LOCALS(k, o)                                                                                  \
    S *restrict p = (k)->p + (o), *restrict m = base == ADAM ? (k)->m + (o) : NULL;                         \
    S *restrict v = base == ADAM ? (k)->v + (o) : NULL, *restrict vm = amsgrad ? (k)->vm + (o) : NULL;      \
    S *restrict c = ftp ? (k)->c + (o) : NULL, *restrict b = has_momentum ? (k)->b + (o) : NULL;            \
    const S *restrict g = has_g ? (k)->g + (o) : NULL, *restrict a = has_anchor ? (k)->a + (o) : NULL;      \
    const T w1 = (k)->w1, beta2 = (k)->beta2, w2 = (k)->w2, scale = (k)->scale, offset = (k)->offset;      \
    const T value = (k)->value, lrwd = (k)->lrwd, lr = (k)->lr, momentum = (k)->momentum;                 \
    const T coef = (k)->coef, wd = (k)->wd

/* `count` contiguous values from offset `o` through SWEEP_ONE; the three sums into out[], each
 * summed in T over CHUNK values at a time (in the vector lanes `omp simd` makes), those sums
 * joined in double: a float32 row of any length is summed about as accurately as PyTorch's
 * cascade sum, and in the same order for any thread count. */
static inline __attribute__((always_inline)) void NAME(sweep)(const NAME(sweep_args) *k, Py_ssize_t o,
                                                               Py_ssize_t count, double out[3], const int base,
                                                               const int ftp, const int amsgrad,
                                                               const int has_anchor, const int has_wd,
                                                               const int has_g, const int small,
                                                               const int has_momentum, const int nesterov) {
    SWEEP_LOCALS(k, o);
    double s0 = 0, s1 = 0, s2 = 0;
    for (Py_ssize_t j = 0; j < count; j += CHUNK) {
        const Py_ssize_t end = count - j > CHUNK ? j + CHUNK : count;
        T t0 = 0, t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t0, t1, t2)
        for (Py_ssize_t i = j; i < end; i++) SWEEP_ONE(i, t0, t1, t2);
        s0 += t0, s1 += t1, s2 += t2;
    }
    out[0] = s0, out[1] = s1, out[2] = s2;
}

/* `sweep` over `rows` rows of `cols` (< NARROW) values from offset `o`, each row's sums into
 * out[3 r ..]: SWEEP_ONE runs over whole rows at once, as one vector loop that keeps each value's
 * terms, and each row's terms are then summed in order (in T, then joined in double as `sweep`'s
 * are). Row by row, a row of 8 values would take 8 scalar square roots and divisions. */
static inline __attribute__((always_inline)) void NAME(sweep_narrow)(
    const NAME(sweep_args) *k, Py_ssize_t o, Py_ssize_t rows, Py_ssize_t cols, double *out, const int base,
    const int ftp, const int amsgrad, const int has_anchor, const int has_wd, const int has_g, const int small,
    const int has_momentum, const int nesterov) {
    SWEEP_LOCALS(k, o);
    T e0[NARROW_VALUES], e1[NARROW_VALUES], e2[NARROW_VALUES];
    const Py_ssize_t per = NARROW_VALUES / cols; /* whole rows per piece: at least 8 */
    for (Py_ssize_t r = 0; r < rows; r += per) {
        const Py_ssize_t taken = rows - r < per ? rows - r : per, start = r * cols, count = taken * cols;
#pragma omp simd
        for (Py_ssize_t q = 0; q < count; q++) {
            const Py_ssize_t i = start + q;
            T z0 = 0, z1 = 0, z2 = 0;
            SWEEP_ONE(i, z0, z1, z2);
            e0[q] = z0, e1[q] = z1;
            if (!ftp) e2[q] = z2;
        }
        for (Py_ssize_t x = 0; x < taken; x++) {
            const T *r0 = e0 + x * cols, *r1 = e1 + x * cols, *r2 = e2 + x * cols;
            T t0 = 0, t1 = 0, t2 = 0;
            for (Py_ssize_t j = 0; j < cols; j++) {
                t0 += r0[j], t1 += r1[j];
                if (!ftp) t2 += r2[j];
            }
            double *row = out + 3 * (r + x);
            row[0] = t0, row[1] = t1, row[2] = t2;
        }
    }
}

#if defined(SWEEP_AVX2) && SWEEP_AVX2
/* bfloat16 SGD-FTP's `sweep` (base SGD, ftp) over `count` values from offset `o` in AVX2, bit for bit
 * SWEEP_ONE's arithmetic and `sweep`'s sums (T over CHUNK values, then double), 16 values at a time;
 * the last count % 16 through `sweep` itself. 1.8x faster in cache than GCC's vectorisation of
 * SWEEP_ONE on a 2-core EPYC, which leaves this bfloat16 sweep bound by memory, as float32's is. */
AVX2 static inline __attribute__((always_inline)) void NAME(sgd_ftp_avx2_any)(
    const NAME(sweep_args) *k, Py_ssize_t o, Py_ssize_t count, double out[3], const int has_anchor,
    const int has_wd, const int has_momentum, const int nesterov) {
    S *restrict p = k->p + o, *restrict c = k->c + o, *restrict b = has_momentum ? k->b + o : NULL;
    const S *restrict g = k->g + o, *restrict a = has_anchor ? k->a + o : NULL;
    /* -(lr·d) is (-lr)·d exactly: negation is exact and rounding symmetric */
    const __m256 wd = _mm256_set1_ps(k->wd), momentum = _mm256_set1_ps(k->momentum);
    const __m256 coef = _mm256_set1_ps(k->coef), neg_lr = _mm256_set1_ps(-k->lr);
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const Py_ssize_t whole = count / 16 * 16;
    double s0 = 0, s1 = 0;
    for (Py_ssize_t j = 0; j < whole;) {
        const Py_ssize_t end = whole - j > CHUNK ? j + CHUNK : whole;
        __m256 dot_lo = _mm256_setzero_ps(), dot_hi = dot_lo, sum_lo = dot_lo, sum_hi = dot_lo;
        for (; j < end; j += 16) {
            __m256 g_lo, g_hi, p_lo, p_hi, c_lo, c_hi;
            bf16_load16(g + j, &g_lo, &g_hi);
            bf16_load16(p + j, &p_lo, &p_hi);
            bf16_load16(c + j, &c_lo, &c_hi);
            __m256 d_lo = g_lo, d_hi = g_hi;
            if (has_wd) {
                d_lo = _mm256_add_ps(g_lo, _mm256_mul_ps(wd, p_lo));
                d_hi = _mm256_add_ps(g_hi, _mm256_mul_ps(wd, p_hi));
            }
            if (has_momentum) {
                __m256 b_lo, b_hi;
                bf16_load16(b + j, &b_lo, &b_hi);
                b_lo = _mm256_add_ps(_mm256_mul_ps(momentum, b_lo), _mm256_mul_ps(coef, d_lo));
                b_hi = _mm256_add_ps(_mm256_mul_ps(momentum, b_hi), _mm256_mul_ps(coef, d_hi));
                bf16_store16(b + j, bf16_round8(b_lo), bf16_round8(b_hi));
                if (nesterov) {
                    d_lo = _mm256_add_ps(d_lo, _mm256_mul_ps(momentum, b_lo));
                    d_hi = _mm256_add_ps(d_hi, _mm256_mul_ps(momentum, b_hi));
                } else {
                    d_lo = b_lo, d_hi = b_hi;
                }
            }
            __m256 x_lo = p_lo, x_hi = p_hi;
            if (has_anchor) {
                __m256 a_lo, a_hi;
                bf16_load16(a + j, &a_lo, &a_hi);
                x_lo = _mm256_sub_ps(p_lo, a_lo), x_hi = _mm256_sub_ps(p_hi, a_hi);
            }
            dot_lo = _mm256_add_ps(dot_lo, _mm256_mul_ps(c_lo, g_lo));
            dot_hi = _mm256_add_ps(dot_hi, _mm256_mul_ps(c_hi, g_hi));
            x_lo = _mm256_add_ps(x_lo, _mm256_mul_ps(neg_lr, d_lo));
            x_hi = _mm256_add_ps(x_hi, _mm256_mul_ps(neg_lr, d_hi));
            const __m256i r_lo = bf16_round8(x_lo), r_hi = bf16_round8(x_hi);
            bf16_store16(c + j, r_lo, r_hi);
            sum_lo = _mm256_add_ps(sum_lo, _mm256_and_ps(magnitude, bf16_widen8(r_lo))); /* |c| as stored */
            sum_hi = _mm256_add_ps(sum_hi, _mm256_and_ps(magnitude, bf16_widen8(r_hi)));
        }
        T dots[8], sums[8], t0 = 0, t1 = 0;
        _mm256_storeu_ps(dots, _mm256_add_ps(dot_lo, dot_hi));
        _mm256_storeu_ps(sums, _mm256_add_ps(sum_lo, sum_hi));
        for (int i = 0; i < 8; i++) t0 += dots[i], t1 += sums[i];
        s0 += t0, s1 += t1;
    }
    if (whole < count) {
        double tail[3];
        NAME(sweep)(k, o + whole, count - whole, tail, SGD, 1, 0, has_anchor, has_wd, 1, 0, has_momentum, nesterov);
        s0 += tail[0], s1 += tail[1];
    }
    out[0] = s0, out[1] = s1, out[2] = 0;
}

/* `sgd_ftp_avx2_any` with its flags constant: momentum with or without an anchor, the rest general */
AVX2 static void NAME(sgd_ftp_avx2)(const NAME(sweep_args) *k, Py_ssize_t o, Py_ssize_t count, double out[3],
                                    int flags) {
    const int has_anchor = !!(flags & F_ANCHOR), has_wd = !!(flags & F_WD);
    const int has_momentum = !!(flags & F_MOMENTUM), nesterov = !!(flags & F_NESTEROV);
    if (has_momentum && !has_wd && !nesterov) {
        if (has_anchor)
            NAME(sgd_ftp_avx2_any)(k, o, count, out, 1, 0, 1, 0);
        else
            NAME(sgd_ftp_avx2_any)(k, o, count, out, 0, 0, 1, 0);
        return;
    }
    NAME(sgd_ftp_avx2_any)(k, o, count, out, has_anchor, has_wd, has_momentum, nesterov);
}
#endif

/* `sweep` over `rows` rows of `cols` values from offset `o`, each row's sums into out[3 r ..],
 * with every flag a constant: the common cases as their own loops, the rest general. One call
 * takes a block of rows, so that the call (through the CPU's clone) is not paid per row.
 * F_SMALL: Adam's lerp weight 1 − β1 is below 0.5 (PyTorch's lerp takes one form or the other). */
MULTIVERSION static void NAME(sweep_any)(const NAME(sweep_args) *k, Py_ssize_t o, Py_ssize_t rows,
                                         Py_ssize_t cols, double *out, int base, int flags) {
    const int narrow = narrow_rows(rows, cols);
/* the block through `sweep_narrow`, or row by row through `sweep`, BASE and FLAGS taken as constants */
#define SWEEP_BLOCK(BASE, FLAGS)                                                                      \
    do {                                                                                              \
        if (narrow)                                                                                   \
            NAME(sweep_narrow)(k, o, rows, cols, out, BASE, !!((FLAGS) & F_FTP),                      \
                               !!((FLAGS) & F_AMSGRAD), !!((FLAGS) & F_ANCHOR), !!((FLAGS) & F_WD),  \
                               !!((FLAGS) & F_G), !!((FLAGS) & F_SMALL), !!((FLAGS) & F_MOMENTUM),   \
                               !!((FLAGS) & F_NESTEROV));                                             \
        else                                                                                          \
            for (Py_ssize_t r = 0; r < rows; r++)                                                     \
                NAME(sweep)(k, o + r * cols, cols, out + 3 * r, BASE, !!((FLAGS) & F_FTP),           \
                            !!((FLAGS) & F_AMSGRAD), !!((FLAGS) & F_ANCHOR), !!((FLAGS) & F_WD),     \
                            !!((FLAGS) & F_G), !!((FLAGS) & F_SMALL), !!((FLAGS) & F_MOMENTUM),      \
                            !!((FLAGS) & F_NESTEROV));                                                \
    } while (0)
#define SWEEP_CASE(BASE, FLAGS)                                                                      \
    if (base == (BASE) && flags == (FLAGS)) {                                                         \
        SWEEP_BLOCK(BASE, FLAGS);                                                                     \
        return;                                                                                       \
    }
    SWEEP_CASE(ADAM, F_FTP | F_ANCHOR | F_G | F_SMALL)                    /* AdamFTP */
    SWEEP_CASE(ADAM, F_FTP | F_ANCHOR | F_WD | F_G | F_SMALL)             /* AdamFTP, AdamW's decay */
    SWEEP_CASE(ADAM, F_ANCHOR | F_G | F_SMALL)                            /* AdamSPD */
    SWEEP_CASE(SGD, F_FTP | F_ANCHOR | F_G | F_MOMENTUM)                  /* SGDFTP */
    SWEEP_CASE(SGD, F_FTP | F_G | F_MOMENTUM)                             /* SGDFTP, a zero anchor */
    SWEEP_CASE(NONE, F_FTP | F_ANCHOR | F_G)                              /* the FTP wrapper */
    SWEEP_CASE(NONE, F_ANCHOR | F_G)                                      /* the SPD wrapper, before */
    SWEEP_CASE(NONE, F_ANCHOR)                                            /* the SPD wrapper, after */
#undef SWEEP_CASE
    SWEEP_BLOCK(base, flags); /* the rest, general */
#undef SWEEP_BLOCK
}

/* The flags of a sweep over the arrays in `k`. */
static int NAME(sweep_flags)(const NAME(sweep_args) *k, int base, int ftp, int nesterov) {
    return (ftp ? F_FTP : 0) | (k->vm ? F_AMSGRAD : 0) | (k->a ? F_ANCHOR : 0) |
           (k->lrwd != 0 || k->wd != 0 ? F_WD : 0) | (k->g ? F_G : 0) |
           (base == ADAM && k->w1 < (T)0.5 ? F_SMALL : 0) | (k->b ? F_MOMENTUM : 0) | (nesterov ? F_NESTEROV : 0);
}

/* The FTP sweeps (adam_ftp_displace, sgd_ftp_displace, ftp_displace) over rows x cols, blocks
 * of rows shared among threads: dots_r = s_r · Σ_j (c_prev ⊙ g)_rj, n_r = Σ_j |c_rj| and
 * largest = max_r n_r. Returns -1 without memory. */
static int NAME(ftp_rows)(const NAME(sweep_args) *k, const T *s, T *n, double *dots, double *largest,
                          Py_ssize_t rows, Py_ssize_t cols, int base, int nesterov, int threads) {
    const int parallel = threads > 1 && rows > 1 && rows * cols >= PARALLEL_MIN;
    const int flags = NAME(sweep_flags)(k, base, 1, nesterov);
    /* rows per block: about SPAN values, at least one row */
    const Py_ssize_t block = cols >= SPAN ? 1 : SPAN / (cols > 0 ? cols : 1);
    double *out = malloc(3 * rows * sizeof(double));
    if (!out) return -1;
#if defined(SWEEP_AVX2) && SWEEP_AVX2
    const int avx2 = base == SGD && bf16_avx2() && !narrow_rows(rows, cols); /* narrow: `sweep_narrow` */
#endif
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
    for (Py_ssize_t r = 0; r < rows; r += block) {
        const Py_ssize_t taken = rows - r < block ? rows - r : block;
#if defined(SWEEP_AVX2) && SWEEP_AVX2
        if (avx2) {
            for (Py_ssize_t q = r; q < r + taken; q++) NAME(sgd_ftp_avx2)(k, q * cols, cols, out + 3 * q, flags);
            continue;
        }
#endif
        NAME(sweep_any)(k, r * cols, taken, cols, out + 3 * r, base, flags);
    }
    T most = 0; /* the row sums are >= 0 */
    for (Py_ssize_t r = 0; r < rows; r++) {
        dots[r] = (double)(s[r] * (T)out[3 * r]);
        n[r] = (T)out[3 * r + 1];
        most = (most >= n[r] || most != most) ? most : n[r]; /* NaN propagates, as torch.max */
    }
    *largest = (double)most;
    free(out);
    return 0;
}

/* The SPD sweeps (adam_spd_step, spd_sums) over `count` values in spans of SPAN, shared among
 * threads; the spans' sums are added up in order into sums[0..2]. Returns -1 without memory. */
static int NAME(spd_spans)(const NAME(sweep_args) *k, Py_ssize_t count, double sums[3], int base, int threads) {
    const Py_ssize_t spans = (count + SPAN - 1) / SPAN;
    const int flags = NAME(sweep_flags)(k, base, 0, 0);
    double *parts = malloc((spans > 0 ? spans : 1) * 3 * sizeof(double));
    if (!parts) return -1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && count >= PARALLEL_MIN)
    for (Py_ssize_t q = 0; q < spans; q++)
        NAME(sweep_any)(k, q * SPAN, 1, q + 1 < spans ? SPAN : count - q * SPAN, parts + 3 * q, base, flags);
    sums[0] = sums[1] = sums[2] = 0;
    for (Py_ssize_t q = 0; q < spans; q++)
        for (int i = 0; i < 3; i++) sums[i] += parts[3 * q + i];
    free(parts);
    return 0;
}

/* spd_decay: θ ← θ · keep + θ₀ · strength over `count` values (θ₀ = NULL: θ · keep), the
 * SPD wrapper's (1 − λr) θ̃ + λr θ₀. */
MULTIVERSION static void NAME(spd_decay)(S *p, const S *a, double keep_, double strength_, Py_ssize_t count, int threads) {
    const T keep = (T)keep_, strength = (T)strength_;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && count >= PARALLEL_MIN)
    for (Py_ssize_t q = 0; q < count; q += SPAN) {
        S *restrict pq = p + q;
        const S *restrict aq = a ? a + q : NULL;
        const Py_ssize_t end = count - q < SPAN ? count - q : SPAN;
        if (aq)
            for (Py_ssize_t j = 0; j < end; j++) pq[j] = ST(LD(pq[j]) * keep + LD(aq[j]) * strength);
        else
            for (Py_ssize_t j = 0; j < end; j++) pq[j] = ST(LD(pq[j]) * keep);
    }
}

#undef SWEEP_ONE
#undef SWEEP_LOCALS
/* the instantiation's parameters, for the next one */
#undef S
#undef T
#undef LD
#undef ST
#undef ABS
#undef SQRT
#undef NAME
#undef STREAM
#undef PLAIN
#undef SWEEP_AVX2
#endif /* T */
