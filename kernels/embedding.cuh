// embedding.cuh: the arithmetic of the embedding family, shared by kernels/embedding.cu and the
// host twins in kernels/host/embedding.cu. It is one f32 add per element in either direction: the
// forward adds the token and position rows, the backward sums gradient rows in row order. Both
// repeat src/backend/cpu/embedding.rs exactly (the CPU adds rows in the same order, starting from
// zero), so with bf16-valued inputs the kernels' f32 results equal the CPU's bit for bit and the
// bf16 forward output is the CPU value rounded to nearest even.
#pragma once
#include "common.cuh"

KILN_HD float emb_add(float a, float b) { return a + b; }

// True when a token id may index a table of `vocab` rows.
KILN_HD bool emb_valid(int32_t id, int vocab) { return id >= 0 && id < vocab; }
