// rope.cuh: the per-pair math of rotary position embeddings (transformers' rotate-half
// convention), shared by kernels/rope.cu and the host twins in kernels/host/rope.cu.
//
// Dimension i < hd/2 of a head pairs with i + hd/2 and turns by the angle of its position and
// frequency: (a, b) -> (a cos - b sin, b cos + a sin). The inverse (backward) turns by the
// negative angle, i.e. the same functions with -sin, an exact negation. The cos and sin come from
// one table that the CPU builds (cpu::rope::rope_table: transformers' f32 inverse frequencies and
// angles, cos and sin in f64 rounded once), so host and device rotate by the same numbers.
#pragma once
#include "common.cuh"

KILN_HD float rope_lo(float a, float b, float c, float s) { return a * c - b * s; }
KILN_HD float rope_hi(float a, float b, float c, float s) { return b * c + a * s; }
