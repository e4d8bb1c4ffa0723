/* The block scan of replay_bridge.checks in one pass over the ids.
 *
 * scan(src, out) reads routing ids src [rows, blocks, k] (any integer width, read as unsigned
 * of that width; each row's blocks * k ids contiguous, rows at any stride), writes them cut to
 * out's width into out (C-contiguous, 1 or 2 bytes per id; None: check src as it is) and
 * returns (top, repeats):
 *   top      the largest id, read as unsigned of its width (a negative id counts as huge);
 *   repeats  whether some block holds an id twice, judged on the narrowed ids (meaningful
 *            when top fits the narrow width, which the caller checks).
 * Row by row, so that each row is read from memory once and checked while in cache.
 *
 * Repeats: a block of k ids of w bits that fills a 64-bit word evenly (k * w divides 64) is
 * compared with itself rotated by 1 .. k/2 ids within each block; a zero lane in the XOR is a
 * repeat. Other shapes compare each id with the ids d places on, masked to stay in the block.
 * On x86-64 with glibc the functions are also built for AVX2 and picked at load time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* target_clones needs GNU ifuncs: glibc on x86-64, GCC >= 6 or clang >= 14 */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && \
    (defined(__clang__) ? __clang_major__ >= 14 : __GNUC__ >= 6)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* ---- narrowing copy with the running maximum ---------------------------------------------- */

#define DEFINE_COPY(SRC, DST)                                                                  \
    CLONES static uint64_t copy_##SRC##_##DST(const void *from, void *to, Py_ssize_t n) {      \
        const SRC *src = from;                                                                 \
        DST *dst = to;                                                                         \
        SRC top = 0;                                                                           \
        for (Py_ssize_t j = 0; j < n; j++) {                                                   \
            SRC v = src[j];                                                                    \
            top = v > top ? v : top;                                                           \
            dst[j] = (DST)v;                                                                   \
        }                                                                                      \
        return (uint64_t)top;                                                                  \
    }

DEFINE_COPY(uint8_t, uint8_t)
DEFINE_COPY(uint16_t, uint8_t)
DEFINE_COPY(uint32_t, uint8_t)
DEFINE_COPY(uint64_t, uint8_t)
DEFINE_COPY(uint8_t, uint16_t)
DEFINE_COPY(uint16_t, uint16_t)
DEFINE_COPY(uint32_t, uint16_t)
DEFINE_COPY(uint64_t, uint16_t)

#define DEFINE_MAX(T)                                                                          \
    CLONES static uint64_t max_##T(const void *from, Py_ssize_t n) {                           \
        const T *src = from;                                                                   \
        T top = 0;                                                                             \
        for (Py_ssize_t j = 0; j < n; j++) top = src[j] > top ? src[j] : top;                  \
        return (uint64_t)top;                                                                  \
    }

DEFINE_MAX(uint8_t)
DEFINE_MAX(uint16_t)
DEFINE_MAX(uint32_t)
DEFINE_MAX(uint64_t)

typedef uint64_t (*copy_fn)(const void *, void *, Py_ssize_t);
typedef uint64_t (*max_fn)(const void *, Py_ssize_t);

static copy_fn pick_copy(int src_size, int dst_size) {
#define CASE(S, SRC)                                                                           \
    case S:                                                                                    \
        return dst_size == 1 ? copy_##SRC##_uint8_t : copy_##SRC##_uint16_t;
    switch (src_size) {
        CASE(1, uint8_t)
        CASE(2, uint16_t)
        CASE(4, uint32_t)
        CASE(8, uint64_t)
    }
#undef CASE
    return NULL;
}

static max_fn pick_max(int size) {
    switch (size) {
        case 1: return max_uint8_t;
        case 2: return max_uint16_t;
        case 4: return max_uint32_t;
        case 8: return max_uint64_t;
    }
    return NULL;
}

/* ---- repeated ids in a row of blocks ------------------------------------------------------ */

/* Lanes of W bits (8 or 16) packed in a word, K ids a block (K * W divides 64): the word XOR
 * itself rotated by d = 1 .. K/2 lanes inside each block has a zero lane where a block repeats
 * an id. Inlined with constant K and W, the masks fold to constants. */
static inline __attribute__((always_inline)) uint64_t lanes_below(int k, int w, int cut) {
    uint64_t lane = w == 8 ? 0xFFull : 0xFFFFull, m = 0;
    for (int pos = 0; pos < 64 / w; pos++)
        if (pos % k < cut) m |= lane << (pos * w);
    return m;
}

static inline __attribute__((always_inline)) int packed_repeats(const uint8_t *row,
                                                                Py_ssize_t words, int k, int w) {
    const uint64_t ones = w == 8 ? 0x0101010101010101ull : 0x0001000100010001ull;
    const uint64_t highs = ones << (w - 1);
    uint64_t acc = 0;
    for (Py_ssize_t i = 0; i < words; i++) {
        uint64_t x;
        memcpy(&x, row + 8 * i, 8);
        for (int d = 1; d <= k / 2; d++) {
            uint64_t lo = lanes_below(k, w, k - d);
            uint64_t y = ((x >> (d * w)) & lo) | ((x << ((k - d) * w)) & ~lo);
            uint64_t z = x ^ y;
            acc |= (z - ones) & ~z & highs;
        }
    }
    return acc != 0;
}

#define DEFINE_PACKED(K, W)                                                                    \
    CLONES static int packed_##K##_##W(const uint8_t *row, Py_ssize_t words) {                 \
        return packed_repeats(row, words, K, W);                                               \
    }

DEFINE_PACKED(2, 8)
DEFINE_PACKED(4, 8)
DEFINE_PACKED(8, 8)
DEFINE_PACKED(2, 16)
DEFINE_PACKED(4, 16)

typedef int (*packed_fn)(const uint8_t *, Py_ssize_t);

static packed_fn pick_packed(Py_ssize_t k, int size) {
    if (size == 1) return k == 2 ? packed_2_8 : k == 4 ? packed_4_8 : k == 8 ? packed_8_8 : NULL;
    if (size == 2) return k == 2 ? packed_2_16 : k == 4 ? packed_4_16 : NULL;
    return NULL;
}

/* Any other shape: each id against the id d places on, for d = 1 .. k-1, where both lie in one
 * block (keep[d-1][j] is all ones there); branch-free, so it vectorises over the row. */
#define DEFINE_SHIFTED(T)                                                                      \
    CLONES static int shifted_##T(const void *ids, Py_ssize_t n, Py_ssize_t k,                 \
                                  const void *mask) {                                          \
        const T *x = ids, *keep = mask;                                                        \
        T acc = 0;                                                                             \
        for (Py_ssize_t d = 1; d < k; d++, keep += n)                                          \
            for (Py_ssize_t j = 0; j + d < n; j++) acc |= (T)(x[j] == x[j + d]) & keep[j];     \
        return acc != 0;                                                                       \
    }

DEFINE_SHIFTED(uint8_t)
DEFINE_SHIFTED(uint16_t)
DEFINE_SHIFTED(uint32_t)
DEFINE_SHIFTED(uint64_t)

typedef int (*shifted_fn)(const void *, Py_ssize_t, Py_ssize_t, const void *);

static shifted_fn pick_shifted(int size) {
    switch (size) {
        case 1: return shifted_uint8_t;
        case 2: return shifted_uint16_t;
        case 4: return shifted_uint32_t;
        default: return shifted_uint64_t;
    }
}

/* keep[d-1][j] for a row of n ids in blocks of k: all ones where j and j + d share a block. */
static void *shift_masks(Py_ssize_t n, Py_ssize_t k, int size) {
    unsigned char *keep = PyMem_RawCalloc((size_t)(k - 1) * n, size);
    if (keep == NULL) return NULL;
    for (Py_ssize_t d = 1; d < k; d++)
        for (Py_ssize_t j = 0; j < n; j++)
            if (j % k + d < k) memset(keep + ((d - 1) * n + j) * size, 0xFF, size);
    return keep;
}

/* ---- scan(src, out) ------------------------------------------------------------------------ */

static int integer_format(const char *f) {
    if (f == NULL) return 1; /* unsigned bytes */
    if (*f == '@' || *f == '=' || *f == '<') f++;
    else if (*f == '>' || *f == '!') return 0; /* not native order */
    return f[0] && !f[1] && strchr("bBhHiIlLqQnN", f[0]) != NULL;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    PyObject *src_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "OO:scan", &src_obj, &out_obj)) return NULL;
    Py_buffer src, out = {0};
    if (PyObject_GetBuffer(src_obj, &src, PyBUF_STRIDES | PyBUF_FORMAT) < 0) return NULL;
    int have_out = out_obj != Py_None;
    PyObject *result = NULL;
    if (have_out && PyObject_GetBuffer(out_obj, &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE |
                                                          PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    int size = (int)src.itemsize;
    if (src.ndim != 3 || !integer_format(src.format) ||
        (size != 1 && size != 2 && size != 4 && size != 8)) {
        PyErr_SetString(PyExc_TypeError, "src: a 3-D buffer of native-order integers");
        goto done;
    }
    Py_ssize_t rows = src.shape[0], blocks = src.shape[1], k = src.shape[2];
    Py_ssize_t n = blocks * k;
    if (src.strides[2] != size || src.strides[1] != k * size) {
        PyErr_SetString(PyExc_ValueError, "src: each row's ids must be contiguous");
        goto done;
    }
    int narrow = size;
    if (have_out) {
        narrow = (int)out.itemsize;
        if ((narrow != 1 && narrow != 2) || !integer_format(out.format) ||
            out.len != rows * n * narrow) {
            PyErr_SetString(PyExc_ValueError, "out: 1- or 2-byte integers, src's shape");
            goto done;
        }
    }
    /* out holds whole 8-byte words per row when n * narrow is a multiple of 8 */
    packed_fn packed = (n * narrow) % 8 == 0 ? pick_packed(k, narrow) : NULL;
    shifted_fn shifted = pick_shifted(narrow);
    void *keep = NULL;
    if (packed == NULL && k > 1 && n > 0 && (keep = shift_masks(n, k, narrow)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    copy_fn copy = have_out ? pick_copy(size, narrow) : NULL;
    max_fn top_of = pick_max(size);
    uint64_t top = 0;
    int repeats = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
        const char *row = (const char *)src.buf + r * src.strides[0];
        const void *ids = row;
        uint64_t t;
        if (copy) {
            void *dst = (char *)out.buf + r * n * narrow;
            t = copy(row, dst, n);
            ids = dst;
        } else {
            t = top_of(row, n);
        }
        top = t > top ? t : top;
        if (!repeats && k > 1 && n > 0)
            repeats = packed ? packed(ids, n * narrow / 8) : shifted(ids, n, k, keep);
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(keep);
    result = Py_BuildValue("(KO)", (unsigned long long)top, repeats ? Py_True : Py_False);
done:
    PyBuffer_Release(&src);
    if (have_out) PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(src, out) -> (top, repeats): narrow src [rows, blocks, k] into out (or None), "
     "the largest id as unsigned, and whether a block repeats an id."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blockscan", "The block scan of replay_bridge.checks, compiled.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__blockscan(void) { return PyModule_Create(&module); }
