/* Fused CPU kernels of the PyTorch adapter's FTP steps (private; tether.adapters._kernels).
 *
 * On a CPU an optimizer step over a large model is bound by memory traffic. PyTorch's eager
 * ops read and write every tensor once per op, and even the adapter's blocked single pass
 * (`_torch_ops._sgd_ftp_blocks_`) pays one in-cache sweep per op. These two kernels do the
 * elementwise part of one tensor's FTP step (ALGORITHMS.md §3, §4) in one sweep each, a row at
 * a time; everything that involves more than one tensor (the radius's own Adam, the clip)
 * stays in `tether.core`, called by `_torch_ops` between the two.
 *
 * A tensor is seen as `rows x cols`: MARS (`core.mars_norm`) reduces every axis but the first,
 * so `rows` is its first dimension (1 for a vector or a scalar) and `cols` the rest. Every
 * array is contiguous and of one dtype (float32 or float64), passed as its address (an integer,
 * `Tensor.data_ptr()`); `_torch_ops` checks all of that before calling in. The GIL is released
 * while a kernel runs, and rows are shared among `threads` OpenMP threads. Each reduction over
 * rows is summed by one thread in row order, so the results do not depend on `threads`.
 *
 *   sgd_ftp_displace: ∇γ = Σ_r s_r Σ_j (c_prev ⊙ g)_rj, the SGD step (weight decay, momentum,
 *                     dampening, Nesterov as torch.optim.SGD), c = (θ − θ₀) − lr·d written over
 *                     c_prev, and the row sums Σ_j |c_rj|. Returns ∇γ. (The norms' 1e-8 and
 *                     max n are `_torch_ops`'s: for a shard, the row sums are partial.)
 *   ftp_project:      θ = θ₀ + clip(γ / n_r, 0, 1) · c_r and s_r = 1 / n_r.
 *   dot:              Σ a · b over a whole tensor (Σ a² without b), in spans of SPAN values
 *                     whose sums are added up in order: the same bits for any thread count
 *                     (MKL's dot, under torch.dot, splits its sum by the thread count).
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
/* Values per span of `dot`: each span is summed by one thread, the spans' sums in order. */
#define SPAN (1L << 14)
/* The Adam sweeps are compiled for AVX-512 and AVX2 too, picked at load time by the CPU
 * (GCC's function multiversioning); elsewhere one portable build. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif
/* How far ahead (values) `displace` prefetches its five streams: its sweep took about 8% less
 * time with it than without on the 2-core EPYC this was measured on (256 and 1024: no better). */
#define AHEAD 512

/* `p[j] = a[j] + scale·c[j]` (a = NULL: 0) from `j` (p + j 16-byte aligned) with streaming
 * stores, as far as whole vectors go; returns where it stopped. */
#if defined(__SSE2__)
static inline void fence(void) { _mm_sfence(); }
static inline Py_ssize_t stream_f32(float *p, const float *a, const float *c, float scale, Py_ssize_t j,
                                    Py_ssize_t cols) {
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

#define T float
#define ABS fabsf
#define SQRT sqrtf
#define NAME(x) x##_f32
#define STREAM stream_f32
#include "_kernels.c" /* this file again, with T defined */
#undef T
#undef ABS
#undef SQRT
#undef NAME
#undef STREAM

#define T double
#define ABS fabs
#define SQRT sqrt
#define NAME(x) x##_f64
#define STREAM stream_f64
#include "_kernels.c" /* this file again, with T defined */
#undef T
#undef ABS
#undef SQRT
#undef NAME
#undef STREAM

/* dtype codes of `_torch_ops`: 0 float32, 1 float64 */
static int check_dtype(int dtype) {
    if (dtype == 0 || dtype == 1) return 0;
    PyErr_Format(PyExc_ValueError, "dtype code must be 0 (float32) or 1 (float64), got %d", dtype);
    return -1;
}

static int check_shape(Py_ssize_t rows, Py_ssize_t cols) {
    if (rows >= 1 && cols >= 0) return 0;
    PyErr_Format(PyExc_ValueError, "rows must be >= 1 and cols >= 0, got %zd x %zd", rows, cols);
    return -1;
}

static PyObject *sgd_ftp_displace(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, nesterov, threads;
    unsigned long long p, g, b, a, c, s, n, dots_address;
    Py_ssize_t rows, cols;
    double lr, momentum, coef, wd;
    if (!PyArg_ParseTuple(args, "iKKKKKKKKnnddddpi", &dtype, &p, &g, &b, &a, &c, &s, &n, &dots_address, &rows,
                          &cols, &lr, &momentum, &coef, &wd, &nesterov, &threads))
        return NULL;
    if (check_dtype(dtype) || check_shape(rows, cols)) return NULL;
    double *dots = (double *)dots_address, grad = 0;
    Py_BEGIN_ALLOW_THREADS;
    if (dtype == 0)
        displace_f32((float *)p, (const float *)g, (float *)b, (const float *)a, (float *)c, (const float *)s,
                     (float *)n, dots, rows, cols, lr, momentum, coef, wd, nesterov, threads);
    else
        displace_f64((double *)p, (const double *)g, (double *)b, (const double *)a, (double *)c,
                     (const double *)s, (double *)n, dots, rows, cols, lr, momentum, coef, wd, nesterov, threads);
    for (Py_ssize_t r = 0; r < rows; r++) grad += dots[r];
    Py_END_ALLOW_THREADS;
    return PyFloat_FromDouble(grad);
}

static PyObject *ftp_project(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, threads;
    unsigned long long p, a, c, n, s;
    Py_ssize_t rows, cols;
    double radius;
    if (!PyArg_ParseTuple(args, "iKKKKKdnni", &dtype, &p, &a, &c, &n, &s, &radius, &rows, &cols, &threads))
        return NULL;
    if (check_dtype(dtype) || check_shape(rows, cols)) return NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (dtype == 0)
        project_f32((float *)p, (const float *)a, (const float *)c, (const float *)n, (float *)s, radius, rows,
                    cols, threads);
    else
        project_f64((double *)p, (const double *)a, (const double *)c, (const double *)n, (double *)s, radius,
                    rows, cols, threads);
    Py_END_ALLOW_THREADS;
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
    Py_BEGIN_ALLOW_THREADS;
    if (dtype == 0)
        total = dot_f32((const float *)a, (const float *)b, n, threads);
    else
        total = dot_f64((const double *)a, (const double *)b, n, threads);
    Py_END_ALLOW_THREADS;
    return PyFloat_FromDouble(total);
}

/* The sweep's arguments for one dtype: addresses as integers (0: absent), scalars as doubles. */
#define SWEEP_ARGS(TT, SUFFIX)                                                                     \
    sweep_args_##SUFFIX k = {                                                                      \
        .p = (TT *)p, .m = (TT *)m, .v = (TT *)v, .vm = (TT *)vm, .c = (TT *)c,                     \
        .g = (const TT *)g, .a = (const TT *)a, .w1 = (TT)(1 - beta1), .beta2 = (TT)beta2,          \
        .w2 = (TT)(1 - beta2), .scale = (TT)scale, .offset = (TT)offset, .value = (TT)value,       \
        .lrwd = (TT)lrwd,                                                                          \
    }

/* The FTP sweeps: with Adam (adam = 1) AdamFTP's step, without it the FTP wrapper's measure of
 * the wrapped optimizer's result. Returns ∇γ = Σ_r dots_r. */
static PyObject *ftp_sweep(int adam, int dtype, unsigned long long p, unsigned long long g, unsigned long long m,
                           unsigned long long v, unsigned long long vm, unsigned long long a, unsigned long long c,
                           unsigned long long s, unsigned long long n, unsigned long long dots_address,
                           Py_ssize_t rows, Py_ssize_t cols, double beta1, double beta2, double scale,
                           double offset, double value, double lrwd, int threads) {
    if (check_dtype(dtype) || check_shape(rows, cols)) return NULL;
    double *dots = (double *)dots_address, grad = 0;
    const int amsgrad = vm != 0, has_wd = lrwd != 0;
    Py_BEGIN_ALLOW_THREADS;
    if (dtype == 0) {
        SWEEP_ARGS(float, f32);
        ftp_rows_f32(&k, (const float *)s, (float *)n, dots, rows, cols, adam, amsgrad, has_wd, threads);
    } else {
        SWEEP_ARGS(double, f64);
        ftp_rows_f64(&k, (const double *)s, (double *)n, dots, rows, cols, adam, amsgrad, has_wd, threads);
    }
    for (Py_ssize_t r = 0; r < rows; r++) grad += dots[r];
    Py_END_ALLOW_THREADS;
    return PyFloat_FromDouble(grad);
}

static PyObject *adam_ftp_displace(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, threads;
    unsigned long long p, g, m, v, vm, a, c, s, n, dots;
    Py_ssize_t rows, cols;
    double beta1, beta2, scale, offset, value, lrwd;
    if (!PyArg_ParseTuple(args, "iKKKKKKKKKKnnddddddi", &dtype, &p, &g, &m, &v, &vm, &a, &c, &s, &n, &dots, &rows,
                          &cols, &beta1, &beta2, &scale, &offset, &value, &lrwd, &threads))
        return NULL;
    return ftp_sweep(1, dtype, p, g, m, v, vm, a, c, s, n, dots, rows, cols, beta1, beta2, scale, offset, value,
                     lrwd, threads);
}

static PyObject *ftp_displace(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, threads;
    unsigned long long p, g, a, c, s, n, dots;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "iKKKKKKKnni", &dtype, &p, &g, &a, &c, &s, &n, &dots, &rows, &cols, &threads))
        return NULL;
    return ftp_sweep(0, dtype, p, g, 0, 0, 0, a, c, s, n, dots, rows, cols, 0.9, 0.999, 1, 0, 0, 0, threads);
}

static int check_count(Py_ssize_t count) {
    if (count >= 0) return 0;
    PyErr_Format(PyExc_ValueError, "count must be >= 0, got %zd", count);
    return -1;
}

/* The SPD sweeps: with Adam AdamSPD's step, without it the SPD wrapper's measure (g = 0: ‖θ − θ₀‖²
 * only). Returns (⟨g, θ − θ₀⟩, ‖θ − θ₀‖², ‖θ̃ − θ₀‖²). */
static PyObject *spd_sweep(int adam, int dtype, unsigned long long p, unsigned long long g, unsigned long long m,
                           unsigned long long v, unsigned long long vm, unsigned long long a, Py_ssize_t count,
                           double beta1, double beta2, double scale, double offset, double value, int threads) {
    if (check_dtype(dtype) || check_count(count)) return NULL;
    const unsigned long long c = 0;
    const double lrwd = 0;
    double sums[3];
    int failed;
    Py_BEGIN_ALLOW_THREADS;
    if (dtype == 0) {
        SWEEP_ARGS(float, f32);
        failed = spd_spans_f32(&k, count, sums, adam, vm != 0, threads);
    } else {
        SWEEP_ARGS(double, f64);
        failed = spd_spans_f64(&k, count, sums, adam, vm != 0, threads);
    }
    Py_END_ALLOW_THREADS;
    if (failed) return PyErr_NoMemory();
    return Py_BuildValue("(ddd)", sums[0], sums[1], sums[2]);
}

static PyObject *adam_spd_step(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, threads;
    unsigned long long p, g, m, v, vm, a;
    Py_ssize_t count;
    double beta1, beta2, scale, offset, value;
    if (!PyArg_ParseTuple(args, "iKKKKKKndddddi", &dtype, &p, &g, &m, &v, &vm, &a, &count, &beta1, &beta2, &scale,
                          &offset, &value, &threads))
        return NULL;
    return spd_sweep(1, dtype, p, g, m, v, vm, a, count, beta1, beta2, scale, offset, value, threads);
}

static PyObject *spd_sums(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, threads;
    unsigned long long p, g, a;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "iKKKni", &dtype, &p, &g, &a, &count, &threads)) return NULL;
    return spd_sweep(0, dtype, p, g, 0, 0, 0, a, count, 0.9, 0.999, 1, 0, 0, threads);
}

static PyObject *spd_decay(PyObject *self, PyObject *args) {
    (void)self;
    int dtype, threads;
    unsigned long long p, a;
    double keep, strength;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "iKKddni", &dtype, &p, &a, &keep, &strength, &count, &threads)) return NULL;
    if (check_dtype(dtype) || check_count(count)) return NULL;
    Py_BEGIN_ALLOW_THREADS;
    if (dtype == 0)
        spd_decay_f32((float *)p, (const float *)a, keep, strength, count, threads);
    else
        spd_decay_f64((double *)p, (const double *)a, keep, strength, count, threads);
    Py_END_ALLOW_THREADS;
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
    {"dot", dot, METH_VARARGS,
     "dot(dtype, a, b, n, threads) -> float\n\n"
     "The sum of a * b over n contiguous values (b = 0: of a * a), the same for any thread count."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "Fused CPU kernels of tether's PyTorch FTP steps (private).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }

#else /* T: the kernels for one dtype, included twice by the first part of this file */

/* One element of `displace`, index i: the SGD step of torch.optim.SGD (u, b, d), then
 * c = (θ − θ₀) − lr·d written over c_prev after DOT has taken ⟨c_prev, g⟩; L1 takes |c|.
 * The flags are constants in each specialization of `displace_row`. */
#define DISPLACE_ONE(i, DOT, L1)                                                                      \
    do {                                                                                              \
        const T gi = g[i];                                                                            \
        DOT += c[i] * gi;                                                                             \
        const T u = has_wd ? gi + wd * p[i] : gi;                                                     \
        T d = u;                                                                                      \
        if (has_momentum) {                                                                           \
            const T bi = m * b[i] + coef * u;                                                         \
            b[i] = bi;                                                                                \
            d = nesterov ? u + m * bi : bi;                                                           \
        }                                                                                             \
        const T ci = (has_anchor ? p[i] - a[i] : p[i]) - lr * d;                                      \
        c[i] = ci;                                                                                    \
        L1 += ABS(ci);                                                                                \
    } while (0)

/* One row of `displace`: returns Σ_j |c_j| and sets *dot_out = Σ_j c_prev_j · g_j. Each is
 * summed in LANES partial sums of T (so that the loop vectorizes) over CHUNK values at a time,
 * whose results are added up in double: a float32 row of any length is summed about as
 * accurately as PyTorch's cascade sum. */
static inline __attribute__((always_inline)) T NAME(displace_row)(
    T *restrict p, const T *restrict g, T *restrict b, const T *restrict a, T *restrict c, Py_ssize_t cols,
    T lr, T m, T coef, T wd, const int has_momentum, const int has_anchor, const int has_wd,
    const int nesterov, T *restrict dot_out) {
    double dot_sum = 0, l1_sum = 0;
    Py_ssize_t j = 0;
    while (j + LANES <= cols) {
        T dot[LANES] = {0}, l1[LANES] = {0};
        const Py_ssize_t end = cols - j > CHUNK ? j + CHUNK : cols;
        for (; j + LANES <= end; j += LANES) {
            __builtin_prefetch(g + j + AHEAD);
            __builtin_prefetch(c + j + AHEAD, 1);
            __builtin_prefetch(p + j + AHEAD);
            if (has_anchor) __builtin_prefetch(a + j + AHEAD);
            if (has_momentum) __builtin_prefetch(b + j + AHEAD, 1);
            for (int k = 0; k < LANES; k++) DISPLACE_ONE(j + k, dot[k], l1[k]);
        }
        for (int k = 0; k < LANES; k++) {
            dot_sum += dot[k];
            l1_sum += l1[k];
        }
    }
    T dot_tail = 0, l1_tail = 0;
    for (; j < cols; j++) DISPLACE_ONE(j, dot_tail, l1_tail);
    *dot_out = (T)(dot_sum + dot_tail);
    return (T)(l1_sum + l1_tail);
}

/* sgd_ftp_displace for one tensor: dots_r = s_r · ⟨c_prev, g⟩_r and n_r = Σ_j |c_rj|. */
static void NAME(displace)(T *p, const T *g, T *b, const T *a, T *c, const T *s, T *n, double *dots,
                           Py_ssize_t rows, Py_ssize_t cols, double lr_, double momentum_, double coef_,
                           double wd_, int nesterov, int threads) {
    const T lr = (T)lr_, m = (T)momentum_, coef = (T)coef_, wd = (T)wd_;
    const int has_momentum = b != NULL, has_anchor = a != NULL, has_wd = wd_ != 0;
    const int parallel = threads > 1 && rows > 1 && rows * cols >= PARALLEL_MIN;
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
    for (Py_ssize_t r = 0; r < rows; r++) {
        const Py_ssize_t o = r * cols;
        T *restrict pr = p + o, *restrict br = has_momentum ? b + o : NULL, *restrict cr = c + o;
        const T *restrict gr = g + o, *restrict ar = has_anchor ? a + o : NULL;
        T dot, l1;
        /* the common cases as their own loops, the rest through the general one */
        if (has_momentum && has_anchor && !has_wd && !nesterov)
            l1 = NAME(displace_row)(pr, gr, br, ar, cr, cols, lr, m, coef, wd, 1, 1, 0, 0, &dot);
        else if (has_momentum && !has_anchor && !has_wd && !nesterov)
            l1 = NAME(displace_row)(pr, gr, br, ar, cr, cols, lr, m, coef, wd, 1, 0, 0, 0, &dot);
        else
            l1 = NAME(displace_row)(pr, gr, br, ar, cr, cols, lr, m, coef, wd, has_momentum, has_anchor, has_wd,
                                    nesterov, &dot);
        dots[r] = (double)(s[r] * dot);
        n[r] = l1;
    }
}

/* ftp_project for one tensor: p_r = a_r + clip(γ / n_r, 0, 1) · c_r and s_r = 1 / n_r. */
static void NAME(project)(T *p, const T *a, const T *c, const T *n, T *s, double radius_, Py_ssize_t rows,
                          Py_ssize_t cols, int threads) {
    const T radius = (T)radius_;
    const int stream = rows * cols * (Py_ssize_t)sizeof(T) >= STREAM_BYTES;
    const int parallel = threads > 1 && rows > 1 && rows * cols >= PARALLEL_MIN;
#pragma omp parallel num_threads(threads) if (parallel)
    {
#pragma omp for schedule(static)
        for (Py_ssize_t r = 0; r < rows; r++) {
            const Py_ssize_t o = r * cols;
            T scale = radius / n[r];
            scale = scale < 0 ? 0 : (scale > 1 ? 1 : scale);
            T *restrict pr = p + o;
            const T *restrict ar = a ? a + o : NULL, *restrict cr = c + o;
            /* streaming stores over [start, rest), from the first 16-byte boundary; plain ones around */
            Py_ssize_t start = cols, rest = cols;
            if (stream) {
                const Py_ssize_t misaligned = (Py_ssize_t)((16 - ((uintptr_t)pr & 15)) & 15) / (Py_ssize_t)sizeof(T);
                start = misaligned < cols ? misaligned : cols;
                rest = STREAM(pr, ar, cr, scale, start, cols);
            }
            if (ar) {
                for (Py_ssize_t j = 0; j < start; j++) pr[j] = ar[j] + scale * cr[j];
                for (Py_ssize_t j = rest; j < cols; j++) pr[j] = ar[j] + scale * cr[j];
            } else {
                for (Py_ssize_t j = 0; j < start; j++) pr[j] = scale * cr[j];
                for (Py_ssize_t j = rest; j < cols; j++) pr[j] = scale * cr[j];
            }
            s[r] = 1 / n[r];
        }
        fence();
    }
}

/* LANES partial sums of T of a_j · b_j (b = NULL: a_j²) over `count` values, a multiple of LANES,
 * joined in double. The loop bound is a parameter of an inlined function, not a `while` over a
 * moving end: under Python's -fwrapv, GCC vectorizes the former only (4x faster). */
static inline __attribute__((always_inline)) double NAME(dot_lanes)(const T *restrict a, const T *restrict b,
                                                                     const Py_ssize_t count) {
    T lanes[LANES] = {0};
    if (b)
        for (Py_ssize_t i = 0; i < count; i += LANES)
            for (int k = 0; k < LANES; k++) lanes[k] += a[i + k] * b[i + k];
    else
        for (Py_ssize_t i = 0; i < count; i += LANES)
            for (int k = 0; k < LANES; k++) lanes[k] += a[i + k] * a[i + k];
    double total = 0;
    for (int k = 0; k < LANES; k++) total += lanes[k];
    return total;
}

/* Σ_j a_j · b_j over one span: CHUNK values at a time in `dot_lanes`, their sums in double. */
static double NAME(dot_span)(const T *restrict a, const T *restrict b, Py_ssize_t n) {
    double total = 0;
    Py_ssize_t j = 0;
    for (; j + CHUNK <= n; j += CHUNK) total += NAME(dot_lanes)(a + j, b ? b + j : NULL, CHUNK);
    const Py_ssize_t whole = (n - j) / LANES * LANES;
    if (whole) total += NAME(dot_lanes)(a + j, b ? b + j : NULL, whole);
    T tail = 0;
    for (j += whole; j < n; j++) tail += a[j] * (b ? b[j] : a[j]);
    return total + tail;
}

/* Σ a · b over n values: spans of SPAN values shared among `threads`, their sums added in order. */
static double NAME(dot)(const T *a, const T *b, Py_ssize_t n, int threads) {
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

#undef DISPLACE_ONE

/* -- the Adam steps and the wrappers' sweeps ------------------------------------------------- */

/* The arrays and scalars of one tensor's sweep (`sweep`). Scalars are in T, as PyTorch's
 * kernels take them: w1 = 1 − β1 (the lerp's weight), beta2, w2 = 1 − β2, Adam's coefficients
 * x ← x + value · m / (√v* · scale + offset) (`_torch_ops.adam_coefficients`), lrwd = −lr·wd. */
typedef struct {
    T *p, *m, *v, *vm, *c;
    const T *g, *a;
    T w1, beta2, w2, scale, offset, value, lrwd;
} NAME(sweep_args);

/* One element of `sweep` (the flags are constants in each specialization):
 *   adam:  m ← lerp(m, g, 1 − β1), v ← β2·v + (1 − β2)·g², v* ← max(v*, v) with amsgrad, and
 *          the step u = value · m / (√v* · scale + offset), as torch.optim.Adam;
 *   ftp:   S0 += c_prev·g, c = (θ − θ₀) [+ lrwd·θ] [+ u] written over c_prev, S1 += |c|;
 *   else (SPD): d = θ − θ₀, S0 += g·d, S1 += d², and with adam θ ← d + u (the parameter holds
 *          θ̃ − θ₀ until the decay), S2 += (θ̃ − θ₀)². */
#define SWEEP_ONE(i, S0, S1, S2)                                                                      \
    do {                                                                                              \
        const T gi = has_g ? g[i] : 0;                                                                \
        T u = 0;                                                                                      \
        if (adam) {                                                                                   \
            const T mo = m[i];                                                                        \
            const T mi = small ? mo + w1 * (gi - mo) : gi - (gi - mo) * ((T)1 - w1);                   \
            const T vi = v[i] * beta2 + w2 * gi * gi;                                                 \
            m[i] = mi;                                                                                \
            v[i] = vi;                                                                                \
            T second = vi;                                                                            \
            if (amsgrad) {                                                                            \
                const T vmo = vm[i];                                                                  \
                second = (vmo >= vi || vmo != vmo) ? vmo : vi; /* NaN propagates, as torch.maximum */ \
                vm[i] = second;                                                                       \
            }                                                                                         \
            u = value * mi / (SQRT(second) * scale + offset);                                         \
        }                                                                                             \
        T di = has_anchor ? p[i] - a[i] : p[i];                                                       \
        if (ftp) {                                                                                    \
            S0 += c[i] * gi;                                                                          \
            if (has_wd) di = di + lrwd * p[i];                                                        \
            if (adam) di = di + u;                                                                    \
            c[i] = di;                                                                                \
            S1 += ABS(di);                                                                            \
        } else {                                                                                      \
            if (has_g) S0 += gi * di;                                                                 \
            S1 += di * di;                                                                            \
            if (adam) {                                                                               \
                di = di + u;                                                                          \
                p[i] = di;                                                                            \
                S2 += di * di;                                                                        \
            }                                                                                         \
        }                                                                                             \
    } while (0)

/* `count` contiguous values from offset `o` through SWEEP_ONE; the three sums into out[], each
 * taken in LANES partial sums of T over CHUNK values at a time, joined in double (as
 * `displace_row`). */
static inline __attribute__((always_inline)) void NAME(sweep)(const NAME(sweep_args) *k, Py_ssize_t o,
                                                               Py_ssize_t count, double out[3], const int adam,
                                                               const int ftp, const int amsgrad,
                                                               const int has_anchor, const int has_wd,
                                                               const int has_g, const int small) {
    T *restrict p = k->p + o, *restrict m = adam ? k->m + o : NULL, *restrict v = adam ? k->v + o : NULL;
    T *restrict vm = amsgrad ? k->vm + o : NULL, *restrict c = ftp ? k->c + o : NULL;
    const T *restrict g = has_g ? k->g + o : NULL, *restrict a = has_anchor ? k->a + o : NULL;
    const T w1 = k->w1, beta2 = k->beta2, w2 = k->w2, scale = k->scale, offset = k->offset;
    const T value = k->value, lrwd = k->lrwd;
    double s0 = 0, s1 = 0, s2 = 0;
    (void)small;
    for (Py_ssize_t j = 0; j < count; j += CHUNK) {
        const Py_ssize_t end = count - j > CHUNK ? j + CHUNK : count;
        T t0 = 0, t1 = 0, t2 = 0;
#pragma omp simd reduction(+ : t0, t1, t2)
        for (Py_ssize_t i = j; i < end; i++) SWEEP_ONE(i, t0, t1, t2);
        s0 += t0, s1 += t1, s2 += t2;
    }
    out[0] = s0, out[1] = s1, out[2] = s2;
}

/* `sweep` with every flag a constant: the common cases as their own loops, the rest general.
 * small: the lerp's weight 1 − β1 is below 0.5 (PyTorch's lerp takes one form or the other). */
MULTIVERSION static void NAME(sweep_any)(const NAME(sweep_args) *k, Py_ssize_t o, Py_ssize_t count, double out[3], int adam,
                            int ftp, int amsgrad, int has_anchor, int has_wd, int has_g) {
    const int small = k->w1 < (T)0.5;
    if (adam && small && ftp && !amsgrad && has_anchor && !has_wd && has_g)
        NAME(sweep)(k, o, count, out, 1, 1, 0, 1, 0, 1, 1);
    else if (adam && small && ftp && !amsgrad && has_anchor && has_wd && has_g)
        NAME(sweep)(k, o, count, out, 1, 1, 0, 1, 1, 1, 1);
    else if (adam && small && !ftp && !amsgrad && has_anchor && has_g)
        NAME(sweep)(k, o, count, out, 1, 0, 0, 1, 0, 1, 1);
    else if (!adam && ftp && has_anchor && !has_wd && has_g)
        NAME(sweep)(k, o, count, out, 0, 1, 0, 1, 0, 1, 1);
    else if (!adam && !ftp && has_anchor && has_g)
        NAME(sweep)(k, o, count, out, 0, 0, 0, 1, 0, 1, 1);
    else if (!adam && !ftp && has_anchor && !has_g)
        NAME(sweep)(k, o, count, out, 0, 0, 0, 1, 0, 0, 1);
    else
        NAME(sweep)(k, o, count, out, adam, ftp, amsgrad, has_anchor, has_wd, has_g, small);
}

/* The FTP sweeps (adam_ftp_displace, ftp_displace) over rows x cols, rows shared among threads:
 * dots_r = s_r · Σ_j (c_prev ⊙ g)_rj and n_r = Σ_j |c_rj|. */
static void NAME(ftp_rows)(const NAME(sweep_args) *k, const T *s, T *n, double *dots, Py_ssize_t rows,
                           Py_ssize_t cols, int adam, int amsgrad, int has_wd, int threads) {
    const int parallel = threads > 1 && rows > 1 && rows * cols >= PARALLEL_MIN;
    const int has_anchor = k->a != NULL;
#pragma omp parallel for num_threads(threads) schedule(static) if (parallel)
    for (Py_ssize_t r = 0; r < rows; r++) {
        double out[3];
        NAME(sweep_any)(k, r * cols, cols, out, adam, 1, amsgrad, has_anchor, has_wd, 1);
        dots[r] = (double)(s[r] * (T)out[0]);
        n[r] = (T)out[1];
    }
}

/* The SPD sweeps (adam_spd_step, spd_sums) over `count` values in spans of SPAN, shared among
 * threads; the spans' sums are added up in order into sums[0..2]. Returns -1 without memory. */
static int NAME(spd_spans)(const NAME(sweep_args) *k, Py_ssize_t count, double sums[3], int adam, int amsgrad,
                           int threads) {
    const Py_ssize_t spans = (count + SPAN - 1) / SPAN;
    const int has_anchor = k->a != NULL, has_g = k->g != NULL;
    double *parts = malloc((spans > 0 ? spans : 1) * 3 * sizeof(double));
    if (!parts) return -1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && count >= PARALLEL_MIN)
    for (Py_ssize_t q = 0; q < spans; q++)
        NAME(sweep_any)(k, q * SPAN, q + 1 < spans ? SPAN : count - q * SPAN, parts + 3 * q, adam, 0, amsgrad,
                        has_anchor, 0, has_g);
    sums[0] = sums[1] = sums[2] = 0;
    for (Py_ssize_t q = 0; q < spans; q++)
        for (int i = 0; i < 3; i++) sums[i] += parts[3 * q + i];
    free(parts);
    return 0;
}

/* spd_decay: θ ← θ · keep + θ₀ · strength over `count` values (θ₀ = NULL: θ · keep), the
 * SPD wrapper's (1 − λr) θ̃ + λr θ₀. */
static void NAME(spd_decay)(T *p, const T *a, double keep_, double strength_, Py_ssize_t count, int threads) {
    const T keep = (T)keep_, strength = (T)strength_;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && count >= PARALLEL_MIN)
    for (Py_ssize_t q = 0; q < count; q += SPAN) {
        T *restrict pq = p + q;
        const T *restrict aq = a ? a + q : NULL;
        const Py_ssize_t end = count - q < SPAN ? count - q : SPAN;
        if (aq)
            for (Py_ssize_t j = 0; j < end; j++) pq[j] = pq[j] * keep + aq[j] * strength;
        else
            for (Py_ssize_t j = 0; j < end; j++) pq[j] = pq[j] * keep;
    }
}

#undef SWEEP_ONE
#endif /* T */
