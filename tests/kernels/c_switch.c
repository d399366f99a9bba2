/* A C program switching through the kernel core's C ABI (kernels/csrc/shira_core.h), no Python involved.
 *
 * Applies an adapter to an fp32 weight and to int8 codes (per-row scales, transposed uint8 mirror), writes the
 * bytes, reverts with shira_switch (the mirror in its second pass, given the entries' mirror order), writes them
 * again, and checks that an out-of-range index and a mirror order out of order are refused with nothing written. tests/kernels/test_core_numpy.py builds the same inputs in numpy and compares the bytes.
 * Then switches the transposed copy itself as a uint8 weight (SHIRA_U8: code + 128, per-column scales, at the
 * entries' transposed positions, as an int8 bundle does) and checks it against the mirror, the revert exact, and
 * scales that do not divide it into columns refused with nothing written.
 * Output (stdout, binary): w, saved, q, q_saved, mirror, saturated[2], then w, q, mirror after the revert.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "shira_core.h"

enum { R = 33, C = 64, N = R * C, K = N / 7 - 1 };

static float w[N], w0[N], delta[K], saved[K], qdelta[K], scales[R];
static int8_t q[N], q0[N], qsaved[K];
static uint8_t mirror[C * R], mirror0[C * R];
static int32_t idx[K], order[K], tidx[K];
static uint8_t u[C * R], usaved[K];
static float udelta[K];

static int64_t tpos(int32_t j) { return (int64_t)(j % C) * R + j / C; } /* j's place in the [C][R] mirror */

static int by_tpos(const void* a, const void* b) {
  const int64_t x = tpos(idx[*(const int32_t*)a]), y = tpos(idx[*(const int32_t*)b]);
  return (x > y) - (x < y);
}

static int fail(const char* what) {
  fprintf(stderr, "c_switch: %s\n", what);
  return 1;
}

int main(void) {
  char err[512];
  for (int i = 0; i < N; ++i) {
    w[i] = (float)((i * 37) % 101) / 8.0f - 6.0f;
    q[i] = (int8_t)((i * 31) % 255 - 127);
  }
  for (int r = 0; r < R; ++r) {
    scales[r] = 0.01f * (float)(r + 1);
    for (int c = 0; c < C; ++c) mirror[c * R + r] = (uint8_t)q[r * C + c] ^ 0x80;
  }
  for (int k = 0; k < K; ++k) {
    idx[k] = 3 + 7 * k;
    delta[k] = (float)(k % 13) / 16.0f - 0.4f;
    qdelta[k] = (float)(k % 17) * 0.05f - 0.3f;
  }
  for (int k = 0; k < K; ++k) order[k] = k;
  qsort(order, K, sizeof order[0], by_tpos); /* the mirror order: entries by ascending transposed position */
  memcpy(w0, w, sizeof w);
  memcpy(q0, q, sizeof q);
  memcpy(mirror0, mirror, sizeof mirror);
  memcpy(u, mirror, sizeof mirror); /* the copy an int8 bundle stores: switched by itself below */
  for (int k = 0; k < K; ++k) tidx[k] = (int32_t)tpos(idx[order[k]]), udelta[k] = qdelta[order[k]];

  shira_item items[2];
  memset(items, 0, sizeof items);
  items[0].weight = w, items[0].numel = N, items[0].dtype = SHIRA_F32, items[0].index_bits = 32;
  items[0].indices = idx, items[0].count = K, items[0].delta = delta, items[0].saved = saved;
  items[1].weight = q, items[1].numel = N, items[1].dtype = SHIRA_I8, items[1].index_bits = 32;
  items[1].indices = idx, items[1].count = K, items[1].delta = qdelta, items[1].saved = qsaved;
  items[1].scales = scales, items[1].n_scales = R;
  items[1].mirror = mirror, items[1].mirror_kind = SHIRA_MIRROR_U8T, items[1].rows = R, items[1].cols = C;
  if (shira_abi_version() != SHIRA_ABI_VERSION || shira_item_size() != (int64_t)sizeof(shira_item))
    return fail("ABI mismatch");

  int64_t sat[2] = {0, 0};
  if (shira_apply(items, 2, sat, 1, 2, err, sizeof err) != 0) return fail(err);
  fwrite(w, sizeof w, 1, stdout);
  fwrite(saved, sizeof saved, 1, stdout);
  fwrite(q, sizeof q, 1, stdout);
  fwrite(qsaved, sizeof qsaved, 1, stdout);
  fwrite(mirror, sizeof mirror, 1, stdout);
  fwrite(sat, sizeof sat, 1, stdout);

  /* a mirror order out of order is refused, nothing written */
  order[0] ^= order[1], order[1] ^= order[0], order[0] ^= order[1];
  items[1].mirror_order = order;
  if (shira_switch(items, 2, NULL, 0, NULL, 1, 2, err, sizeof err) != 1) return fail("a bad mirror order was accepted");
  if (!strstr(err, "shira::switch_: outgoing tensor 1: mirror order entry 1")) return fail(err);
  order[0] ^= order[1], order[1] ^= order[0], order[0] ^= order[1];

  /* the revert: restore both (shira_switch with no incoming items), the mirror written in its second pass */
  if (shira_switch(items, 2, NULL, 0, NULL, 0, 1, err, sizeof err) != 0) return fail(err);
  fwrite(w, sizeof w, 1, stdout);
  fwrite(q, sizeof q, 1, stdout);
  fwrite(mirror, sizeof mirror, 1, stdout);
  if (memcmp(w, w0, sizeof w) || memcmp(q, q0, sizeof q) || memcmp(mirror, mirror0, sizeof mirror))
    return fail("the revert is not exact");

  /* refused before any write: the last index of the int8 item is out of range */
  items[1].mirror_order = NULL;
  idx[K - 1] = N;
  if (shira_apply(items, 2, sat, 1, 2, err, sizeof err) != 1) return fail("an out-of-range index was accepted");
  if (!strstr(err, "shira::apply_: tensor 0: index 2112 out of range for 2112 elements")) return fail(err);
  if (memcmp(w, w0, sizeof w) || memcmp(q, q0, sizeof q)) return fail("a refused call wrote");

  /* the copy as a uint8 weight: the same codes as the mirror above, the same saturation count */
  shira_item cp;
  memset(&cp, 0, sizeof cp);
  cp.weight = u, cp.numel = N, cp.dtype = SHIRA_U8, cp.index_bits = 32, cp.indices = tidx, cp.count = K;
  cp.delta = udelta, cp.saved = usaved, cp.scales = scales, cp.n_scales = R + 1;
  if (shira_apply(&cp, 1, NULL, 1, 2, err, sizeof err) != 1) return fail("scales of the wrong count were accepted");
  if (!strstr(err, "scales do not divide a weight of 2112 elements into columns")) return fail(err);
  if (memcmp(u, mirror0, sizeof u)) return fail("a refused call wrote");
  cp.n_scales = R;
  int64_t usat = 0;
  if (shira_apply(&cp, 1, &usat, 1, 2, err, sizeof err) != 0) return fail(err);
  memcpy(q, q0, sizeof q), memcpy(mirror, mirror0, sizeof mirror);
  items[1].mirror_order = NULL, idx[K - 1] = 3 + 7 * (K - 1);
  int64_t qsat[1] = {0};
  if (shira_apply(items + 1, 1, qsat, 1, 2, err, sizeof err) != 0) return fail(err);
  if (memcmp(u, mirror, sizeof u) || usat != qsat[0]) return fail("the uint8 copy differs from the int8 mirror");
  if (shira_restore(&cp, 1, 1, 2, err, sizeof err) != 0) return fail(err);
  if (memcmp(u, mirror0, sizeof u)) return fail("the uint8 copy's revert is not exact");
  return 0;
}
