# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled systematic Reed-Solomon over GF(256) (same API and output as :mod:`rs_pure`).

The matrices (parity, decode) come from :mod:`gf256`; this module only runs
the GF(256) matrix product over shard rows, with the GIL released. On x86-64
it uses split-nibble multiplication with byte shuffles (AVX2, else SSSE3,
chosen at run time from the CPU, so the build needs no -m flags): for a
coefficient ``a``, ``a * x = LO[a][x & 15] ^ HI[a][x >> 4]``, two 16-entry
tables looked up 32 bytes at a time. Other CPUs, and the tail of each row,
use the 256-entry multiplication table byte by byte.
"""

from libc.stdint cimport uint8_t
from libc.stdlib cimport free, malloc

import numpy as np

from pysrbup._native import gf256

cdef extern from *:
    """
    #include <stdint.h>
    #include <stdlib.h>
    #include <string.h>
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    #include <immintrin.h>
    #define PSR_X86 1
    #endif

    enum { PSR_SCALAR = 0, PSR_SSSE3 = 1, PSR_AVX2 = 2 };

    static int psr_detect(void) {
    #ifdef PSR_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2")) return PSR_AVX2;
        if (__builtin_cpu_supports("ssse3")) return PSR_SSSE3;
    #endif
        return PSR_SCALAR;
    }

    /* out[r][p] = XOR_c MUL[coef[r][c]][in[c][p]] for p in [p0, n). */
    static void psr_scalar(const uint8_t *mul, const uint8_t *coef, int rows, int cols,
                           const uint8_t *const *in, uint8_t *const *out,
                           size_t p0, size_t n) {
        const size_t block = 4096;
        for (size_t b0 = p0; b0 < n; b0 += block) {
            size_t b1 = (n - b0 > block) ? b0 + block : n;
            for (int r = 0; r < rows; r++) {
                uint8_t *o = out[r];
                memset(o + b0, 0, b1 - b0);
                for (int c = 0; c < cols; c++) {
                    uint8_t a = coef[r * cols + c];
                    const uint8_t *x = in[c];
                    if (a == 0) continue;
                    if (a == 1) {
                        for (size_t p = b0; p < b1; p++) o[p] ^= x[p];
                    } else {
                        const uint8_t *t = mul + 256 * (size_t)a;
                        for (size_t p = b0; p < b1; p++) o[p] ^= t[x[p]];
                    }
                }
            }
        }
    }

    #ifdef PSR_X86
    /* tables: per (r, c) 32 bytes = LO[0..15], HI[0..15]. Returns bytes done. */
    __attribute__((target("avx2")))
    static size_t psr_avx2(const uint8_t *tables, int rows, int cols,
                           const uint8_t *const *in, uint8_t *const *out, size_t n) {
        const __m256i mask = _mm256_set1_epi8(0x0f);
        size_t p = 0;
        for (; p + 64 <= n; p += 64) {
            for (int r = 0; r < rows; r++) {
                const uint8_t *t = tables + (size_t)r * cols * 32;
                __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
                for (int c = 0; c < cols; c++, t += 32) {
                    __m256i tl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)t));
                    __m256i th = _mm256_broadcastsi128_si256(
                        _mm_loadu_si128((const __m128i *)(t + 16)));
                    __m256i x0 = _mm256_loadu_si256((const __m256i *)(in[c] + p));
                    __m256i x1 = _mm256_loadu_si256((const __m256i *)(in[c] + p + 32));
                    __m256i l0 = _mm256_and_si256(x0, mask);
                    __m256i h0 = _mm256_and_si256(_mm256_srli_epi64(x0, 4), mask);
                    __m256i l1 = _mm256_and_si256(x1, mask);
                    __m256i h1 = _mm256_and_si256(_mm256_srli_epi64(x1, 4), mask);
                    acc0 = _mm256_xor_si256(acc0, _mm256_xor_si256(
                        _mm256_shuffle_epi8(tl, l0), _mm256_shuffle_epi8(th, h0)));
                    acc1 = _mm256_xor_si256(acc1, _mm256_xor_si256(
                        _mm256_shuffle_epi8(tl, l1), _mm256_shuffle_epi8(th, h1)));
                }
                _mm256_storeu_si256((__m256i *)(out[r] + p), acc0);
                _mm256_storeu_si256((__m256i *)(out[r] + p + 32), acc1);
            }
        }
        return p;
    }

    __attribute__((target("ssse3")))
    static size_t psr_ssse3(const uint8_t *tables, int rows, int cols,
                            const uint8_t *const *in, uint8_t *const *out, size_t n) {
        const __m128i mask = _mm_set1_epi8(0x0f);
        size_t p = 0;
        for (; p + 16 <= n; p += 16) {
            for (int r = 0; r < rows; r++) {
                const uint8_t *t = tables + (size_t)r * cols * 32;
                __m128i acc = _mm_setzero_si128();
                for (int c = 0; c < cols; c++, t += 32) {
                    __m128i tl = _mm_loadu_si128((const __m128i *)t);
                    __m128i th = _mm_loadu_si128((const __m128i *)(t + 16));
                    __m128i x = _mm_loadu_si128((const __m128i *)(in[c] + p));
                    __m128i l = _mm_and_si128(x, mask);
                    __m128i h = _mm_and_si128(_mm_srli_epi64(x, 4), mask);
                    acc = _mm_xor_si128(acc, _mm_xor_si128(_mm_shuffle_epi8(tl, l),
                                                           _mm_shuffle_epi8(th, h)));
                }
                _mm_storeu_si128((__m128i *)(out[r] + p), acc);
            }
        }
        return p;
    }
    #endif

    /* Returns 0, or -1 if out of memory. */
    static int psr_matmul(int isa, const uint8_t *mul, const uint8_t *coef, int rows, int cols,
                          const uint8_t *const *in, uint8_t *const *out, size_t n) {
        size_t done = 0;
        if (rows == 0 || n == 0) return 0;
    #ifdef PSR_X86
        if (isa != PSR_SCALAR && n >= 16) {
            uint8_t *tables = (uint8_t *)malloc((size_t)rows * cols * 32);
            if (!tables) return -1;
            for (int i = 0; i < rows * cols; i++) {
                const uint8_t *row = mul + 256 * (size_t)coef[i];
                for (int j = 0; j < 16; j++) {
                    tables[32 * i + j] = row[j];
                    tables[32 * i + 16 + j] = row[j << 4];
                }
            }
            if (isa == PSR_AVX2) done = psr_avx2(tables, rows, cols, in, out, n);
            else done = psr_ssse3(tables, rows, cols, in, out, n);
            free(tables);
        }
    #endif
        psr_scalar(mul, coef, rows, cols, in, out, done, n);
        return 0;
    }
    """
    int psr_detect() noexcept nogil
    int psr_matmul(int isa, const uint8_t* mul, const uint8_t* coef, int rows, int cols,
                   const uint8_t* const* in_, uint8_t* const* out, size_t n) noexcept nogil

API_VERSION = 2
MAX_SHARDS = gf256.MAX_SHARDS

__all__ = ["MAX_SHARDS", "encode", "reconstruct"]

_ISA_NAMES = ("scalar", "ssse3", "avx2")
cdef int _best_isa = psr_detect()
cdef int _isa = _best_isa
cdef const uint8_t[:, ::1] _MUL = gf256.MUL


def _get_isa():
    """Name of the instruction set the kernel uses (``scalar``, ``ssse3`` or ``avx2``)."""
    return _ISA_NAMES[_isa]


def _set_isa(name):
    """Forces a kernel variant (for tests and benchmarks); None restores the best one.

    Raises ValueError if the CPU lacks the requested instruction set.
    """
    global _isa
    if name is None:
        _isa = _best_isa
        return
    want = _ISA_NAMES.index(name)
    if want > _best_isa:
        raise ValueError(f"CPU does not support {name}")
    _isa = want


cdef int _apply(coef, src, sources, dst, targets) except -1:
    """dst[targets[r]] = XOR_c coef[r, c] * src[sources[c]], rows of 2-D uint8 arrays."""
    cdef const uint8_t[:, ::1] cview = coef
    cdef const uint8_t[:, ::1] sview = src
    cdef uint8_t[:, ::1] dview = dst
    cdef int rows = len(targets), cols = len(sources), i, rc
    cdef size_t n = sview.shape[1]
    cdef const uint8_t** ins
    cdef uint8_t** outs
    if rows == 0:
        return 0
    ins = <const uint8_t**>malloc(cols * sizeof(uint8_t*))
    outs = <uint8_t**>malloc(rows * sizeof(uint8_t*))
    try:
        if ins == NULL or outs == NULL:
            raise MemoryError()
        for i in range(cols):
            ins[i] = &sview[sources[i], 0] if n else NULL
        for i in range(rows):
            outs[i] = &dview[targets[i], 0] if n else NULL
        with nogil:
            rc = psr_matmul(_isa, &_MUL[0, 0], &cview[0, 0], rows, cols, ins, outs, n)
        if rc:
            raise MemoryError()
    finally:
        free(ins)
        free(outs)
    return 0


def encode(data, m, out=None):
    """Computes the ``(m, n)`` parity of a ``(k, n)`` uint8 stripe (reedsolo-compatible).

    See :func:`pysrbup._native.rs_pure.encode`.
    """
    data = gf256.check_data(data)
    k, n = data.shape
    coef = gf256.parity_matrix(k, m)
    out = gf256.check_out(out, (m, n))
    if np.shares_memory(out, data):
        raise ValueError("out must not overlap data")
    _apply(coef, data, range(k), out, range(m))
    return out


def reconstruct(shards, missing, k, out=None):
    """Rebuilds the ``(k, n)`` data of a ``(k + m, n)`` stripe with up to ``m`` lost rows.

    See :func:`pysrbup._native.rs_pure.reconstruct`.
    """
    shards, plan, out = gf256.prepare_reconstruct(shards, missing, k, out)
    _apply(plan.matrix, shards, plan.sources, out, plan.targets)
    return out
