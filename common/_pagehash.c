/* Per-page xxh3-64 digests of guest pages, and the copies that go with them, with the GIL
 * released.
 *
 * A guest page (4096 bytes) or a page's packed tags (128 bytes) is one row. Hashing a batch of
 * rows one Python call each cost about 0.9 us per page (0.24 s per GiB against 0.10 s for the
 * hashing itself); here the loops run in C and other threads run meanwhile. Copy and hash go
 * row by row, so a row is read from memory once and hashed or copied from the cache:
 *   hash_rows(rows, row_bytes, out)                       out[i] = xxh3(row i)
 *   gather_content(table, row_bytes, indices, dst, out, zero)
 *                                     zero[i] = table row indices[i] is all zero; the others,
 *                                     in order, copied to dst and hashed (of the copy), or with
 *                                     dst None hashed in place; returns how many
 *   place_rows(src, row_bytes, indices, expected, table)  table row indices[i] = src row i, then
 *                                                         the row as it landed is hashed: returns
 *                                                         the first that is not expected[i]
 *                                                         (-1: none); it is written, no row after
 * The digests equal the xxhash package's xxh3_64_intdigest (XXH3_64bits, seed 0), which the
 * Python fallback in common/guest/pagehash.py computes; the tests compare the two. Digests are
 * host-order u64s: pagehash.py uses the module on little-endian hosts only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <xxhash.h>

typedef uint64_t (*hash_fn)(const void *, size_t);
static uint64_t hash_default(const void *p, size_t n) { return XXH3_64bits(p, n); }
static hash_fn row_hash = hash_default;
static const char *variant = "default";

#if defined(__x86_64__) || defined(__i386__)
#define HAVE_AVX2_BUILD 1
uint64_t pagehash_xxh3_avx2(const void *p, size_t n); /* _pagehash_avx2.c */
#endif

/* rows of `row` bytes in a buffer of `len` bytes */
static int whole_rows(Py_ssize_t len, Py_ssize_t row, Py_ssize_t *n) {
    if (row <= 0 || len % row != 0) {
        PyErr_Format(PyExc_ValueError, "%zd bytes are not a whole number of %zd-byte rows", len, row);
        return -1;
    }
    *n = len / row;
    return 0;
}

static int room_for(const char *what, Py_ssize_t have, Py_ssize_t need) {
    if (have < need) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes, %zd needed", what, have, need);
        return -1;
    }
    return 0;
}

/* every index names a row of the table */
static int rows_in_table(const int64_t *idx, Py_ssize_t n, Py_ssize_t table_rows) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (idx[i] < 0 || idx[i] >= table_rows) {
            PyErr_Format(PyExc_IndexError, "row %lld is outside a table of %zd rows", (long long)idx[i], table_rows);
            return -1;
        }
    }
    return 0;
}

static PyObject *hash_rows(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    Py_ssize_t row, n;
    if (!PyArg_ParseTuple(args, "y*nw*", &src, &row, &out))
        return NULL;
    PyObject *result = NULL;
    if (whole_rows(src.len, row, &n) < 0 || room_for("the digest output", out.len, n * 8) < 0)
        goto done;
    const char *base = (const char *)src.buf;
    char *dst = (char *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t h = row_hash(base + i * row, (size_t)row);
        memcpy(dst + i * 8, &h, 8);
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(n);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

/* all zero? The first word settles almost every row with content; the rest goes 64 bytes a step */
static int row_is_zero(const char *p, size_t n) {
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t any = 0;
        for (size_t j = 0; j < 64; j += 8) {
            uint64_t w;
            memcpy(&w, p + i + j, 8);
            any |= w;
        }
        if (any)
            return 0;
    }
    for (; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

static PyObject *gather_content(PyObject *self, PyObject *args) {
    Py_buffer table, indices, out, zero, dst = {0};
    PyObject *dst_obj;
    Py_ssize_t row, table_rows;
    if (!PyArg_ParseTuple(args, "y*ny*Ow*w*", &table, &row, &indices, &dst_obj, &out, &zero))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = indices.len / 8;
    const int64_t *idx = (const int64_t *)indices.buf;
    int copy = dst_obj != Py_None;
    if (copy && PyObject_GetBuffer(dst_obj, &dst, PyBUF_WRITABLE) < 0) {
        copy = 0;
        goto done;
    }
    if (indices.len % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "indices must be 64-bit integers");
        goto done;
    }
    if (whole_rows(table.len, row, &table_rows) < 0 || (copy && room_for("the destination", dst.len, n * row) < 0) ||
        room_for("the digest output", out.len, n * 8) < 0 || room_for("the zero flags", zero.len, n) < 0 ||
        rows_in_table(idx, n, table_rows) < 0)
        goto done;
    const char *from = (const char *)table.buf;
    char *to = copy ? (char *)dst.buf : NULL, *digests = (char *)out.buf, *is_zero = (char *)zero.buf;
    Py_ssize_t count = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *source = from + idx[i] * row;
        is_zero[i] = (char)row_is_zero(source, (size_t)row);
        if (is_zero[i])
            continue;
        if (copy) {
            char *copied = to + count * row;
            memcpy(copied, source, (size_t)row);
            source = copied; /* what is sent is what was hashed */
        }
        uint64_t h = row_hash(source, (size_t)row);
        memcpy(digests + count * 8, &h, 8);
        count++;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(count);
done:
    PyBuffer_Release(&table);
    PyBuffer_Release(&indices);
    PyBuffer_Release(&out);
    PyBuffer_Release(&zero);
    if (copy)
        PyBuffer_Release(&dst);
    return result;
}

static PyObject *place_rows(PyObject *self, PyObject *args) {
    Py_buffer src, indices, expected, table;
    Py_ssize_t row, n, table_rows;
    if (!PyArg_ParseTuple(args, "y*ny*y*w*", &src, &row, &indices, &expected, &table))
        return NULL;
    PyObject *result = NULL;
    const int64_t *idx = (const int64_t *)indices.buf;
    if (whole_rows(src.len, row, &n) < 0)
        goto done;
    if (indices.len != n * 8 || expected.len != n * 8) {
        PyErr_Format(PyExc_ValueError, "%zd rows need %zd indices and %zd digests", n, indices.len / 8,
                     expected.len / 8);
        goto done;
    }
    if (whole_rows(table.len, row, &table_rows) < 0 || rows_in_table(idx, n, table_rows) < 0)
        goto done;
    const char *from = (const char *)src.buf, *want = (const char *)expected.buf;
    char *to = (char *)table.buf;
    Py_ssize_t bad = -1;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        char *landed = to + idx[i] * row;
        memcpy(landed, from + i * row, (size_t)row);
        /* hashed where it landed (from the cache): a wrong copy or index shows, not only damage */
        uint64_t h = row_hash(landed, (size_t)row), w;
        memcpy(&w, want + i * 8, 8);
        if (h != w) {
            bad = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bad);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&indices);
    PyBuffer_Release(&expected);
    PyBuffer_Release(&table);
    return result;
}

/* KVM_ARM_MTE_COPY_TAGS's layout and the packed one (common/guest/tag_ioctl.py):
 *   unpack_tags(packed, out)   out[2i] = packed[i] & 15, out[2i + 1] = packed[i] >> 4
 *   pack_tags(tags, out)       out[i] = (tags[2i] & 15) | (tags[2i + 1] & 15) << 4
 * A word at a time (little-endian hosts only, as the digests), the GIL released: 2 to 3 ms per
 * GiB of guest here, where numpy took 40 and 10. */
static PyObject *unpack_tags(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    if (!PyArg_ParseTuple(args, "y*w*", &src, &out))
        return NULL;
    PyObject *result = NULL;
    if (room_for("the unpacked tags", out.len, 2 * src.len) < 0)
        goto done;
    const uint8_t *in = (const uint8_t *)src.buf;
    uint8_t *dst = (uint8_t *)out.buf;
    Py_ssize_t n = src.len;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) { /* 4 packed bytes to 8 tags, spread within one word */
        uint32_t v;
        memcpy(&v, in + i, 4);
        uint64_t w = v;
        w = (w | (w << 16)) & 0x0000FFFF0000FFFFULL;
        w = (w | (w << 8)) & 0x00FF00FF00FF00FFULL;
        w = (w & 0x000F000F000F000FULL) | ((w >> 4) & 0x000F000F000F000FULL) << 8;
        memcpy(dst + 2 * i, &w, 8);
    }
    for (; i < n; i++) {
        dst[2 * i] = in[i] & 15;
        dst[2 * i + 1] = in[i] >> 4;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(n);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *pack_tags(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    if (!PyArg_ParseTuple(args, "y*w*", &src, &out))
        return NULL;
    PyObject *result = NULL;
    if (src.len % 2) {
        PyErr_Format(PyExc_ValueError, "%zd tags do not pair into bytes", src.len);
        goto done;
    }
    if (room_for("the packed tags", out.len, src.len / 2) < 0)
        goto done;
    const uint8_t *in = (const uint8_t *)src.buf;
    uint8_t *dst = (uint8_t *)out.buf;
    Py_ssize_t n = src.len / 2;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) { /* 8 tags to 4 packed bytes, gathered within one word */
        uint64_t w;
        memcpy(&w, in + 2 * i, 8);
        w &= 0x0F0F0F0F0F0F0F0FULL;
        w = (w | (w >> 4)) & 0x00FF00FF00FF00FFULL;
        w = (w | (w >> 8)) & 0x0000FFFF0000FFFFULL;
        w = (w | (w >> 16)) & 0x00000000FFFFFFFFULL;
        uint32_t v = (uint32_t)w;
        memcpy(dst + i, &v, 4);
    }
    for (; i < n; i++)
        dst[i] = (uint8_t)((in[2 * i] & 15) | (in[2 * i + 1] & 15) << 4);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(n);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"unpack_tags", unpack_tags, METH_VARARGS, "unpack_tags(packed, out) -> bytes unpacked"},
    {"pack_tags", pack_tags, METH_VARARGS, "pack_tags(tags, out) -> bytes packed"},
    {"hash_rows", hash_rows, METH_VARARGS, "hash_rows(rows, row_bytes, out) -> n"},
    {"gather_content", gather_content, METH_VARARGS,
     "gather_content(table, row_bytes, indices, dst or None, out, zero) -> rows with content"},
    {"place_rows", place_rows, METH_VARARGS, "place_rows(src, row_bytes, indices, expected, table) -> first bad row or -1"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pagehash", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pagehash(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
#ifdef HAVE_AVX2_BUILD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) {
        row_hash = pagehash_xxh3_avx2;
        variant = "avx2";
    }
#endif
    if (PyModule_AddStringConstant(m, "VARIANT", variant) < 0) { /* the benchmarks print it */
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
