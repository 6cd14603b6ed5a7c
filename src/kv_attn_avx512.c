/* kv_attn_avx512.c -- the attention kernel for x86 with AVX-512 (F, BW, DQ,
 * VL), 16 float lanes.
 *
 * As kv_attn_avx2.c: a target region confined to this file, entered only
 * when cpuid and xgetbv report the CPU and OS run AVX-512 (the OS must save
 * the zmm and mask registers).  Needs GCC 7 or Clang for the AVX-512
 * reduction intrinsics; older compilers build no AVX-512 variant.
 */
#include "kv_attn.h"
#include "kv_platform.h"

#if KV_BUILD_AVX512
KV_TARGET_BEGIN("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")

#define KV_ISA_NAME "avx512"
#define KV_ISA_NEEDS KV_CPU_AVX512
#define KV_ATTN_SYM kv_attn_kernel_avx512
#include "kv_simd_avx512.h"
#include "kv_attn_impl.h"

KV_TARGET_END
#else
typedef int kv_attn_avx512_not_built;
#endif
