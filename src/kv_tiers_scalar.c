/* kv_tiers_scalar.c -- the tier codecs at the build's baseline ISA (SSE2 on
 * x86-64, whatever the target has elsewhere), built everywhere: the variant
 * the numpy reference is first checked against, and the one the
 * KVCACHE_DISABLE_SIMD kill switch selects. */
#define KV_ISA_NAME "scalar"
#define KV_ISA_NEEDS 0
#define KV_CODECS_SYM kv_codecs_scalar
#include "kv_tiers_impl.h"
