/* kv_tiers_avx2.c -- the tier codecs for x86 with AVX2, F16C and FMA.
 *
 * As kv_attn_avx2.c: only this file is compiled for those instructions,
 * through a target region rather than -mavx2 on the command line, and
 * kv_codecs_select() calls in here only after cpuid and xgetbv say the CPU
 * and OS run AVX2.  No intrinsics: the compiler vectorises the codecs'
 * branch-free loops 8 wide.  -ffp-contract=off still applies, so the FMA
 * units are never used to contract q * scale + zero: the bytes are those of
 * the scalar build and the numpy reference (tested).  Elsewhere (another
 * architecture, or a compiler without the target pragma) the file is empty
 * and the variant is simply not built.
 */
#include "kv_platform.h"

#if KV_BUILD_AVX2
KV_TARGET_BEGIN("avx2,f16c,fma")

#define KV_ISA_NAME "avx2"
#define KV_ISA_NEEDS KV_CPU_AVX2
#define KV_CODECS_SYM kv_codecs_avx2
#include "kv_tiers_impl.h"

KV_TARGET_END
#else
typedef int kv_tiers_avx2_not_built;
#endif
