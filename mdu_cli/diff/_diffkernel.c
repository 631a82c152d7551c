/* The inner loop of `mdu diff`: float64 sums of one chunk pair in a single pass.
 *
 * numpy needs about nine passes over a chunk for the statistics of the delta
 * report (widen both sides, subtract, three dot products, abs, sum, max,
 * compare), which on two cores is several times slower than reading the
 * files. This kernel widens a block of both sides into float64 buffers that
 * stay in L1, then reduces them in one fused loop. The GIL is released for the
 * whole call, so the reading threads overlap with it.
 *
 * Optional: mdu_cli.delta_report falls back to numpy when the module did not
 * build, or when MDU_DIFF_ENGINE=numpy. Both paths give the same sums up to
 * float64 rounding (tests/test_diff_kernel.py).
 *
 * Safetensors data is little-endian, as is every host this is built for.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

enum { KIND_F64 = 0, KIND_F32 = 1, KIND_BF16 = 2, KIND_F16 = 3, KIND_COUNT };
static const Py_ssize_t ITEMSIZE[KIND_COUNT] = {8, 4, 2, 2};

/* Elements per block: the two widened sides take 16 KiB, which stays in L1. */
#define BLOCK 1024

/* fp16 has 65536 values: a table built once beats bit manipulation per element. */
static float half_table[65536];

static float half_to_float(uint16_t h) {
    int exponent = (h >> 10) & 0x1f;
    int mantissa = h & 0x3ff;
    float value;
    if (exponent == 0)
        value = ldexpf((float)mantissa, -24); /* zero and subnormals */
    else if (exponent == 31)
        value = mantissa ? NAN : INFINITY;
    else
        value = ldexpf((float)(mantissa | 0x400), exponent - 25);
    return (h & 0x8000) ? -value : value;
}

/* x86-64: build an AVX2 clone beside the baseline one and pick at load time,
 * so one binary is both portable and fast. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define FAST __attribute__((target_clones("avx2", "default")))
#else
#define FAST
#endif

FAST static void widen(const char *src, int kind, Py_ssize_t n, double *out) {
    Py_ssize_t i;
    switch (kind) {
    case KIND_F32: {
        const float *s = (const float *)src;
        for (i = 0; i < n; i++)
            out[i] = (double)s[i];
        break;
    }
    case KIND_BF16: {
        /* bf16 is the upper half of an fp32. */
        const uint16_t *s = (const uint16_t *)src;
        for (i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)s[i] << 16;
            float f;
            memcpy(&f, &bits, sizeof f);
            out[i] = (double)f;
        }
        break;
    }
    case KIND_F16: {
        const uint16_t *s = (const uint16_t *)src;
        for (i = 0; i < n; i++)
            out[i] = (double)half_table[s[i]];
        break;
    }
    default:
        memcpy(out, src, (size_t)n * sizeof(double));
    }
}

typedef struct {
    double sq_diff, sq_base, sq_other, abs_diff, max_abs;
    long long changed;
} Sums;

FAST static void reduce_block(const double *a, const double *b, Py_ssize_t n, Sums *acc) {
    double sq_diff = 0, sq_base = 0, sq_other = 0, abs_diff = 0, max_abs = 0;
    long long changed = 0;
    Py_ssize_t i;
    /* The reduction pragma lets the compiler keep per-lane partial sums
     * (reassociation) without -ffast-math, which would break NaN handling. */
#pragma omp simd reduction(+ : sq_diff, sq_base, sq_other, abs_diff, changed) reduction(max : max_abs)
    for (i = 0; i < n; i++) {
        double d = b[i] - a[i];
        double m = fabs(d);
        sq_diff += d * d;
        sq_base += a[i] * a[i];
        sq_other += b[i] * b[i];
        abs_diff += m;
        max_abs = m > max_abs ? m : max_abs;
        changed += a[i] != b[i]; /* NaN is never equal, so it counts as changed */
    }
    acc->sq_diff += sq_diff;
    acc->sq_base += sq_base;
    acc->sq_other += sq_other;
    acc->abs_diff += abs_diff;
    acc->max_abs = max_abs > acc->max_abs ? max_abs : acc->max_abs;
    acc->changed += changed;
}

static int get_side(PyObject *object, int kind, Py_ssize_t count, Py_buffer *view, const char *which) {
    if (kind < 0 || kind >= KIND_COUNT) {
        PyErr_Format(PyExc_ValueError, "%s: unknown element kind %d", which, kind);
        return -1;
    }
    if (PyObject_GetBuffer(object, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (count < 0 || view->len < count * ITEMSIZE[kind]) {
        PyErr_Format(PyExc_ValueError, "%s: buffer of %zd bytes is shorter than %zd elements", which, view->len,
                     count);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(sums_doc,
             "sums(base, base_kind, other, other_kind, count) -> "
             "(sq_diff, sq_base, sq_other, abs_diff, max_abs, changed)\n\n"
             "Float64 sums over the first `count` elements of two buffers, each holding\n"
             "little-endian elements of kind 0 (f64), 1 (f32), 2 (bf16) or 3 (f16).\n"
             "max_abs is NaN when any difference is NaN.");

static PyObject *sums(PyObject *self, PyObject *args) {
    PyObject *base_obj, *other_obj;
    int base_kind, other_kind;
    Py_ssize_t count;
    Py_buffer base, other;
    if (!PyArg_ParseTuple(args, "OiOin", &base_obj, &base_kind, &other_obj, &other_kind, &count))
        return NULL;
    if (get_side(base_obj, base_kind, count, &base, "base") < 0)
        return NULL;
    if (get_side(other_obj, other_kind, count, &other, "other") < 0) {
        PyBuffer_Release(&base);
        return NULL;
    }
    Sums acc = {0, 0, 0, 0, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    double wide_base[BLOCK], wide_other[BLOCK];
    const char *pb = (const char *)base.buf, *po = (const char *)other.buf;
    for (Py_ssize_t start = 0; start < count; start += BLOCK) {
        Py_ssize_t n = count - start < BLOCK ? count - start : BLOCK;
        /* float64 input is reduced in place; anything narrower is widened first. */
        const double *a = (const double *)(pb + start * ITEMSIZE[base_kind]);
        const double *b = (const double *)(po + start * ITEMSIZE[other_kind]);
        if (base_kind != KIND_F64) {
            widen((const char *)a, base_kind, n, wide_base);
            a = wide_base;
        }
        if (other_kind != KIND_F64) {
            widen((const char *)b, other_kind, n, wide_other);
            b = wide_other;
        }
        reduce_block(a, b, n, &acc);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&base);
    PyBuffer_Release(&other);
    /* The max reduction skips NaN; the squared sum does not, so it tells. */
    double max_abs = isnan(acc.sq_diff) ? NAN : acc.max_abs;
    return Py_BuildValue("(dddddL)", acc.sq_diff, acc.sq_base, acc.sq_other, acc.abs_diff, max_abs, acc.changed);
}

static PyMethodDef methods[] = {
    {"sums", sums, METH_VARARGS, sums_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_diffkernel", "Fused float64 reduction for mdu diff.", -1, methods,
};

PyMODINIT_FUNC PyInit__diffkernel(void) {
    for (uint32_t h = 0; h < 65536; h++)
        half_table[h] = half_to_float((uint16_t)h);
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "F64", KIND_F64) < 0 || PyModule_AddIntConstant(m, "F32", KIND_F32) < 0 ||
        PyModule_AddIntConstant(m, "BF16", KIND_BF16) < 0 || PyModule_AddIntConstant(m, "F16", KIND_F16) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
