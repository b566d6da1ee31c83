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
#define NAME(x) x##_f32
#define STREAM stream_f32
#include "_kernels.c" /* this file again, with T defined */
#undef T
#undef ABS
#undef NAME
#undef STREAM

#define T double
#define ABS fabs
#define NAME(x) x##_f64
#define STREAM stream_f64
#include "_kernels.c" /* this file again, with T defined */
#undef T
#undef ABS
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

static PyMethodDef methods[] = {
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
#endif /* T */
