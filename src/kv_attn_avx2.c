/* kv_attn_avx2.c -- the attention kernel for x86 with AVX2, FMA and F16C.
 *
 * Only this file is compiled for those instructions, through a target
 * region rather than -mavx2 on the command line: the rest of the extension
 * stays at the x86-64 baseline, and kv_attn.c calls in here only after
 * cpuid and xgetbv say the CPU and OS run AVX2.  Elsewhere (another
 * architecture, or a compiler without the target pragma) the file is empty
 * and the variant is simply not built.
 */
#include "kv_attn.h"
#include "kv_platform.h"

#if KV_BUILD_AVX2
KV_TARGET_BEGIN("avx2,fma,f16c")

#define KV_ISA_NAME "avx2"
#define KV_ISA_NEEDS KV_CPU_AVX2
#define KV_ATTN_SYM kv_attn_kernel_avx2
#include "kv_simd_avx2.h"
#include "kv_attn_impl.h"

KV_TARGET_END
#else
typedef int kv_attn_avx2_not_built;
#endif
