/* kv_attn_neon.c -- the attention kernel for AArch64 NEON, 4 float lanes.
 * NEON (with its float16 conversions) is part of the AArch64 baseline, so
 * no flags are needed and no run-time check; on other architectures the
 * file is empty. */
#include "kv_attn.h"

#if KV_BUILD_NEON
#define KV_ISA_NAME "neon"
#define KV_ISA_NEEDS KV_CPU_NEON
#define KV_ATTN_SYM kv_attn_kernel_neon
#include "kv_simd_neon.h"
#include "kv_attn_impl.h"
#else
typedef int kv_attn_neon_not_built;
#endif
