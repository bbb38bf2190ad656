/* kvzoo's gemv shim: a `cblas_sgemm` that sends one-row and one-column products to `cblas_sgemv`.
 *
 * MLX's CPU backend calls cblas_sgemm for every fp32 matmul, including the M == 1 products of
 * decoding (x[1, K] @ W^T). OpenBLAS 0.3.21's sgemm runs those through its blocked gemm kernels
 * and reads the weights at a third of the speed its own sgemv reads them (newer OpenBLAS forwards
 * small-M gemm to gemv by itself). This library exports cblas_sgemm; kvzoo/blas.py loads it into
 * the global symbol scope before OpenBLAS and before mlx.core, so libmlx's cblas_sgemm binds here.
 * It forwards:
 *
 *   M == 1 or N == 1 (K > 0)  ->  the real cblas_sgemv, with transposes, alpha, beta, lda/ldb/ldc
 *   everything else           ->  the real cblas_sgemm
 *
 * "Real" means the function pointers that kvzoo_gemv_shim_init received (from OpenBLAS's handle),
 * so this file links against no BLAS and its own cblas_sgemm can never call itself.
 * kvzoo_gemv_shim_counts reports how many calls took each path: the proof that MLX calls us.
 *
 * Build: cc -O2 -shared -fPIC -o libkvzoo_gemv.so gemv_shim.c   (setup.py does this at install;
 * kvzoo/blas.py does it at first use into a cache folder when no built copy ships).
 */

#include <stddef.h>

/* CBLAS enum values (cblas.h): fixed by the standard, so no header is needed. */
enum { RowMajor = 101, ColMajor = 102 };
enum { NoTrans = 111, Trans = 112, ConjTrans = 113 };

typedef void (*sgemm_fn)(int order, int transa, int transb, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);
typedef void (*sgemv_fn)(int order, int trans, int m, int n, float alpha, const float *a, int lda,
                         const float *x, int incx, float beta, float *y, int incy);

static sgemm_fn real_sgemm = NULL;
static sgemv_fn real_sgemv = NULL;
static int forwarding = 1;
/* Counters: relaxed atomics, so MLX calling from several threads never loses a count. */
static long calls_gemv = 0;
static long calls_gemm = 0;

/* Called once by kvzoo/blas.py with the addresses of the real OpenBLAS functions. */
int kvzoo_gemv_shim_init(void *sgemm, void *sgemv) {
    real_sgemm = (sgemm_fn)sgemm;
    real_sgemv = (sgemv_fn)sgemv;
    return real_sgemm != NULL && real_sgemv != NULL;
}

/* 1: forward one-row/one-column products to sgemv (the default); 0: every call to sgemm. */
void kvzoo_gemv_shim_set_forwarding(int on) { forwarding = on; }

void kvzoo_gemv_shim_counts(long *gemv, long *gemm) {
    *gemv = __atomic_load_n(&calls_gemv, __ATOMIC_RELAXED);
    *gemm = __atomic_load_n(&calls_gemm, __ATOMIC_RELAXED);
}

static int is_trans(int t) { return t == Trans || t == ConjTrans; /* real data: conj == trans */ }

/* y[i * inc] = 0 for i < n: with beta == 0, BLAS says C is not read, but a gemv scales y by 0,
 * and whether NaNs in MLX's fresh (uninitialised) output survive that differs between OpenBLAS
 * versions (0.3.21 zeroes them). Zeroing first makes it not matter. */
static void zero(float *y, int n, int inc) {
    for (int i = 0; i < n; ++i) y[(size_t)i * inc] = 0.0f;
}

void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (order == ColMajor) {
        /* Column-major C = op(A) op(B) is row-major C^T = op(B)^T op(A)^T: swap the operands. */
        cblas_sgemm(RowMajor, transb, transa, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
        return;
    }
    if (!forwarding || real_sgemv == NULL || k <= 0 || m <= 0 || n <= 0 || (m != 1 && n != 1)) {
        __atomic_fetch_add(&calls_gemm, 1, __ATOMIC_RELAXED);
        real_sgemm(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    __atomic_fetch_add(&calls_gemv, 1, __ATOMIC_RELAXED);
    if (m == 1) {
        /* c[0, :] (length n, stride 1) = alpha * a_row @ op(B) + beta * c.
         * a_row[k]: A[k] (A is [1, K], NoTrans) or A[k * lda] (A is [K, 1] stored, Trans). */
        int inca = is_trans(transa) ? lda : 1;
        if (beta == 0.0f) zero(c, n, 1);
        if (is_trans(transb)) /* B stored [N, K]: c = B a */
            real_sgemv(RowMajor, NoTrans, n, k, alpha, b, ldb, a, inca, beta, c, 1);
        else /* B stored [K, N]: c = B^T a */
            real_sgemv(RowMajor, Trans, k, n, alpha, b, ldb, a, inca, beta, c, 1);
    } else {
        /* n == 1: c[:, 0] (length m, stride ldc) = alpha * op(A) @ b_col + beta * c.
         * b_col[k]: B[k * ldb] (B is [K, 1], NoTrans) or B[k] (B is [1, K] stored, Trans). */
        int incb = is_trans(transb) ? 1 : ldb;
        if (beta == 0.0f) zero(c, m, ldc);
        if (is_trans(transa)) /* A stored [K, M]: c = A^T b */
            real_sgemv(RowMajor, Trans, k, m, alpha, a, lda, b, incb, beta, c, ldc);
        else /* A stored [M, K]: c = A b */
            real_sgemv(RowMajor, NoTrans, m, k, alpha, a, lda, b, incb, beta, c, ldc);
    }
}
