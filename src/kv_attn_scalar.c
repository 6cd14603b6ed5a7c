/* kv_attn_scalar.c -- the attention kernel in portable C, built everywhere:
 * the variant every other one is tested against, and the one that covers
 * every geometry. */
#define KV_ISA_NAME "scalar"
#define KV_ISA_NEEDS 0
#define KV_ATTN_SYM kv_attn_kernel_scalar
#include "kv_simd_scalar.h"
#include "kv_attn_impl.h"
