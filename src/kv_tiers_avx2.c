/* kv_tiers_avx2.c -- the tier codecs compiled for x86 with AVX2, F16C, FMA.
 *
 * The same source as kv_tiers.c, inside a target region: only the functions
 * here use those instructions (the rest of the extension stays at the
 * baseline), and kv_codecs_select() calls them only on a CPU and OS that run
 * them.  No intrinsics: the compiler vectorises the branch-free loops 8 wide.
 * -ffp-contract=off still applies, so results stay bit-identical to the
 * scalar build and the numpy reference (tested).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kv_platform.h"
#include "kv_tiers.h"

#if KV_HAVE_X86_VARIANTS
KV_TARGET_BEGIN("avx2,f16c,fma")

#define KV_TIERS_VARIANT 1
#undef KV_CODEC
#define KV_CODEC(name) name##_avx2
#include "kv_tiers.c"

KV_TARGET_END
#else
/* Not x86 (or not GCC/Clang): nothing to build; keeps the unit non-empty. */
typedef int kv_tiers_avx2_unused;
#endif
