//! Backends: what an op needs from a device, as one trait per op family, implemented by the CPU
//! backend (`cpu::Cpu`, the readable reference) and the CUDA backend (`cuda::Cuda`, over the
//! device runtime: a GPU or the emulated device). Ops are written once against these traits, in
//! `src/ops`, and `on` is the one place that picks a backend for a device.
//!
//! Methods take and return `Tensor`s on the backend's device, in its compute dtype (f32 on the
//! CPU, bf16 activations on CUDA, whose parameter gradients are f32 for the f32 masters). The ops
//! check shapes before they call; a backend checks what its buffers need (dtypes, devices).
//!
//! A fused op with no kernel on a backend keeps the trait's default method: a composition of the
//! backend's other methods (`compose`: LoRA and NF4 linear), or the CPU backend's implementation
//! over host copies with the results moved back (`on_host`: LoRA on an embedding). So every op
//! runs on every backend from the day it is written, and fast where the backend has a kernel.
//!
//! Without the `cuda` feature, `cuda` is a stand-in (`no_cuda.rs`) with the CUDA backend's
//! outward surface, whose every entry point says kiln was built without CUDA.

mod compose;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
// The stand-in takes the CUDA backend's place in a build without the feature: with the two lines
// above, the only `cfg(feature = "cuda")` that code outside src/backend/cuda needs.
#[cfg(not(feature = "cuda"))]
#[path = "no_cuda.rs"]
pub mod cuda;

use crate::quant::nf4::Nf4Weight;
use crate::{DType, Device, Error, Result, Tensor};

/// A backend: every op family, plus what the tape and the optimizers ask of a device.
pub trait Backend:
    Elementwise + Norm + RmsNorm + Rope + Matmul + Attention + Embedding + CrossEntropy + Lora + Nf4 + Optim + Sync
{
    /// The dtype activations are computed in (f32 on the CPU, bf16 on CUDA).
    fn compute_dtype(&self) -> DType;
    /// The device this backend's tensors live on.
    fn device(&self) -> Device;
    /// Waits for queued work (a no-op on the CPU): what a timer needs before it reads the clock.
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    /// (live, peak) bytes of device memory held by kiln's buffers, the peak since the last
    /// `reset_peak_memory`; None where the backend does not count (the CPU: the `kiln` binary's
    /// counting allocator, `crate::memory`, measures the host heap instead).
    fn memory_use(&self) -> Option<(usize, usize)> {
        None
    }
    /// Starts a new peak at what is live now.
    fn reset_peak_memory(&self) {}
}

/// The backend of `device`: an error when this build or this machine cannot serve it.
pub fn backend(device: Device) -> Result<&'static dyn Backend> {
    match device {
        Device::Cpu => Ok(&cpu::Cpu),
        Device::Cuda(_) => cuda::backend(),
    }
}

/// The backend an op over `inputs` runs on: theirs, when they all live on one device.
pub fn on(op: &'static str, inputs: &[&Tensor]) -> Result<&'static dyn Backend> {
    let device = inputs.first().map_or(Device::Cpu, |t| t.device());
    if let Some(t) = inputs.iter().find(|t| t.device() != device) {
        return Err(Error::DeviceMismatch { op, a: device, b: t.device() });
    }
    backend(device)
}

/// `t` as an f32 CPU tensor (a copy unless it already is one).
pub fn to_host_f32(t: &Tensor) -> Result<Tensor> {
    t.to_device(Device::Cpu)?.to_dtype(DType::F32)
}

/// Moves an output of the CPU backend's implementation, run on host copies of another backend's
/// tensors, back to `device` in `dtype`: how a backend without a kernel for a fused op still runs
/// it (the trait defaults of `Lora` and `Nf4`).
fn move_back(be: &dyn Backend, device: Device, t: Tensor, dtype: DType) -> Result<Tensor> {
    let t = t.to_device(device)?;
    if t.dtype() == dtype {
        Ok(t)
    } else {
        be.cast(&t, dtype)
    }
}

/// `move_back` over the gradients a backward returns (each where it was asked for).
fn on_host<const N: usize>(
    be: &dyn Backend,
    device: Device,
    dtypes: [DType; N],
    outs: [Option<Tensor>; N],
) -> Result<[Option<Tensor>; N]> {
    let mut res: [Option<Tensor>; N] = std::array::from_fn(|_| None);
    for (i, (out, dtype)) in outs.into_iter().zip(dtypes).enumerate() {
        res[i] = out.map(|t| move_back(be, device, t, dtype)).transpose()?;
    }
    Ok(res)
}

/// Elementwise ops, the casts between compute and master dtypes, and the reductions the tape
/// runs over gradients.
pub trait Elementwise {
    /// GELU, tanh approximation.
    fn gelu(&self, x: &Tensor) -> Result<Tensor>;
    /// d/dx of `gelu` at `x`, times `dout`.
    fn gelu_backward(&self, x: &Tensor, dout: &Tensor) -> Result<Tensor>;
    /// a + b (same shapes).
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
    /// SwiGLU, the Llama MLP's gate: silu(gate) * up (same shapes), silu(g) = g * sigmoid(g).
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor>;
    /// [dgate, dup] of `swiglu` at (gate, up), given dout; each only where `needs` asks.
    fn swiglu_backward(
        &self,
        gate: &Tensor,
        up: &Tensor,
        dout: &Tensor,
        needs: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]>;
    /// Each element zeroed with probability `p` (drawn per element index from `seed`) and the
    /// rest scaled by 1 / (1 - p). The same seed draws the same mask, so this is also the
    /// backward of itself.
    fn dropout(&self, x: &Tensor, p: f32, seed: u64) -> Result<Tensor>;
    /// `x` converted to `dtype`, on this backend.
    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor>;
    /// acc += x, same dtype and size (gradient accumulation).
    fn add_assign(&self, acc: &mut Tensor, x: &Tensor) -> Result<()>;
    /// The sum of squares over every element of every tensor (f32 tensors), in one deterministic
    /// order: what a global gradient norm measures.
    fn sum_squares(&self, xs: &[&Tensor]) -> Result<f64>;
    /// x *= s, in place (an f32 tensor).
    fn scale(&self, x: &mut Tensor, s: f32) -> Result<()>;
    /// A new tensor of `dims` in the compute dtype, for the caller to write before it reads (the
    /// CPU's is zeros; a device's holds whatever was there).
    fn empty(&self, dims: &[usize]) -> Result<Tensor>;
    /// A new tensor of `dims` and src's dtype holding copies of ranges of `src`: each piece
    /// (dst offset, src offset, len) in elements. What no piece covers is left as `empty` leaves it.
    fn gather(&self, src: &Tensor, dims: &[usize], pieces: &[(usize, usize, usize)]) -> Result<Tensor>;
}

/// Checks `gather`'s pieces against the two sizes.
pub(crate) fn check_pieces(op: &'static str, src: usize, dst: usize, pieces: &[(usize, usize, usize)]) -> Result<()> {
    for &(d, s, len) in pieces {
        if d.checked_add(len).is_none_or(|e| e > dst) || s.checked_add(len).is_none_or(|e| e > src) {
            return Err(Error::shape(
                op,
                format!("a copy of {len} elements from {s} to {d} leaves a source of {src} or a result of {dst}"),
            ));
        }
    }
    Ok(())
}

/// LayerNorm's statistics: one mean and one 1 / std per row, f32.
pub struct RowStats {
    pub mean: Tensor,
    pub rstd: Tensor,
}

/// LayerNorm over the last dimension.
pub trait Norm: Elementwise {
    /// (x - mean) * rstd * w + b per row of width w.len(), with the statistics backward needs.
    fn layernorm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<(Tensor, RowStats)>;
    /// [dx, dw, db], each computed only where `needs` asks (dw, db in f32 on every backend).
    fn layernorm_backward(
        &self,
        dout: &Tensor,
        x: &Tensor,
        w: &Tensor,
        stats: &RowStats,
        needs: [bool; 3],
    ) -> Result<[Option<Tensor>; 3]>;
    /// (s = x + r, layernorm(s), its statistics); a backend with a fused kernel does it in one
    /// pass, the default is `add` then `layernorm`.
    fn add_layernorm(
        &self,
        x: &Tensor,
        r: &Tensor,
        w: &Tensor,
        b: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor, RowStats)> {
        let s = self.add(x, r)?;
        let (y, stats) = self.layernorm(&s, w, b, eps)?;
        Ok((s, y, stats))
    }
}

/// RMSNorm over the last dimension (Zhang and Sennrich 2019; Llama's norm): no mean, no bias.
pub trait RmsNorm: Elementwise {
    /// (w * (x * rstd), rstd [rows] in f32) with rstd = 1 / sqrt(mean(x^2) + eps) per row.
    fn rmsnorm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)>;
    /// [dx, dw], each computed only where `needs` asks (dw in f32 on every backend).
    fn rmsnorm_backward(
        &self,
        dout: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        needs: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]>;
    /// (s = x + r, rmsnorm(s), its rstd); a backend with a fused kernel does it in one pass, the
    /// default is `add` then `rmsnorm`.
    fn add_rmsnorm(&self, x: &Tensor, r: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
        let s = self.add(x, r)?;
        let (y, rstd) = self.rmsnorm(&s, w, eps)?;
        Ok((s, y, rstd))
    }
}

/// Where rotary position embeddings put each head's pairs: transformers' rotate-half convention
/// (dimension i pairs with i + hd/2), frequencies theta^(-2i/hd), positions offset, offset + 1, ...
/// along T.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeArgs {
    pub heads: Heads,
    pub theta: f32,
    /// The position of the first row of T (the cached length during generation).
    pub offset: usize,
}

/// Rotary position embeddings (Su et al. 2021), fused with the packing of q, k and v into the
/// attention's qkv layout, or with the attention itself.
pub trait Rope: Attention {
    /// qkv [B, T, (nh + 2 nkv) hd] from q [B, T, nh hd], k and v [B, T, nkv hd]: q and k rotated,
    /// v copied.
    fn rope_pack(&self, q: &Tensor, k: &Tensor, v: &Tensor, args: &RopeArgs) -> Result<Tensor>;
    /// [dq, dk, dv] from dqkv: the inverse rotation of the q and k parts (the rotation's
    /// transpose), the v part copied.
    fn rope_unpack(&self, dqkv: &Tensor, args: &RopeArgs) -> Result<[Tensor; 3]>;
    /// Causal attention over q [B, T, nh hd], k and v [B, T, nkv hd] as a Llama block's three
    /// projections give them, q and k rotated first: (out, lse) of `attention(rope_pack(q, k, v))`.
    /// The default computes just that; the CUDA backend rotates inside the attention kernels' loads
    /// and never makes the packed copy.
    fn rope_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, args: &RopeArgs) -> Result<(Tensor, Tensor)> {
        pack_then_attend(self, q, k, v, args)
    }
    /// [dq, dk, dv] of `rope_attention` from dout and its out and lse. The default packs q, k and
    /// v again (the op keeps them, not their packed copy), then runs attention's backward and
    /// rope_unpack.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention_backward(
        &self,
        dout: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        args: &RopeArgs,
    ) -> Result<[Tensor; 3]> {
        pack_then_attend_backward(self, dout, [q, k, v], out, lse, args)
    }
}

/// `Rope::rope_attention` as rope_pack, then attention over the packed rows: the default, and
/// what a backend that fuses them falls back to where it cannot.
pub fn pack_then_attend<B: Rope + ?Sized>(
    be: &B,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    args: &RopeArgs,
) -> Result<(Tensor, Tensor)> {
    let qkv = be.rope_pack(q, k, v, args)?;
    be.attention(&qkv, args.heads)
}

/// The backward of `pack_then_attend`: q, k and v packed again, attention's backward, rope_unpack.
pub fn pack_then_attend_backward<B: Rope + ?Sized>(
    be: &B,
    dout: &Tensor,
    [q, k, v]: [&Tensor; 3],
    out: &Tensor,
    lse: &Tensor,
    args: &RopeArgs,
) -> Result<[Tensor; 3]> {
    let qkv = be.rope_pack(q, k, v, args)?;
    let dqkv = be.attention_backward(dout, &qkv, out, lse, args.heads)?;
    be.rope_unpack(&dqkv, args)
}

/// Whether an operand of a GEMM is read transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    /// As stored, row-major.
    No,
    /// Transposed: a stored [cols, rows] matrix read as [rows, cols].
    Yes,
}

impl Trans {
    pub fn from_bool(t: bool) -> Trans {
        if t {
            Trans::Yes
        } else {
            Trans::No
        }
    }
    pub fn is_t(self) -> bool {
        self == Trans::Yes
    }
    /// The other one.
    pub fn flip(self) -> Trans {
        Trans::from_bool(!self.is_t())
    }
}

/// What a GEMM computes after the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// op(A) @ op(B) (+ bias).
    Plain,
    /// GELU(op(A) @ op(B) + bias), keeping the pre-activation for backward.
    Gelu,
}

/// One GEMM: C [m, n] = epilogue(op(A) [m, k] @ op(B) [k, n]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmDesc {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Trans,
    pub b: Trans,
    pub epilogue: Epilogue,
    /// The operands' row pitches, where they are not dense.
    pub pitch: Pitch,
}

/// Row pitches (leading dimensions, in elements) of a GEMM's A, B and C as stored; `None` is a
/// dense matrix (the pitch is its stored width). A padded pitch lets a product read or write a
/// matrix whose rows are wider than the columns it uses, with no copy: the classifier's logits
/// [rows, V] lie in rows of round_up(V, 128) elements, which the wgmma GEMM can read by TMA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pitch {
    pub a: Option<usize>,
    pub b: Option<usize>,
    pub c: Option<usize>,
}

impl GemmDesc {
    /// A plain product.
    pub fn new(m: usize, n: usize, k: usize, a: Trans, b: Trans) -> Self {
        GemmDesc { m, n, k, a, b, epilogue: Epilogue::Plain, pitch: Pitch::default() }
    }
    /// A's stored shape [rows, cols]: [m, k], or [k, m] transposed.
    pub fn a_stored(&self) -> [usize; 2] {
        if self.a.is_t() {
            [self.k, self.m]
        } else {
            [self.m, self.k]
        }
    }
    /// B's stored shape [rows, cols]: [k, n], or [n, k] transposed.
    pub fn b_stored(&self) -> [usize; 2] {
        if self.b.is_t() {
            [self.n, self.k]
        } else {
            [self.k, self.n]
        }
    }
    /// A's row pitch in elements.
    pub fn lda(&self) -> usize {
        self.pitch.a.unwrap_or(self.a_stored()[1])
    }
    /// B's row pitch in elements.
    pub fn ldb(&self) -> usize {
        self.pitch.b.unwrap_or(self.b_stored()[1])
    }
    /// C's row pitch in elements.
    pub fn ldc(&self) -> usize {
        self.pitch.c.unwrap_or(self.n)
    }
    /// The elements A, B and C occupy: rows times pitch.
    pub fn lens(&self) -> [usize; 3] {
        [self.a_stored()[0] * self.lda(), self.b_stored()[0] * self.ldb(), self.m * self.ldc()]
    }
    /// The same product with these pitches.
    pub fn with_pitch(self, pitch: Pitch) -> Self {
        GemmDesc { pitch, ..self }
    }
    /// Errors unless every pitch holds its matrix's stored width.
    pub fn check_pitch(&self, op: &'static str) -> Result<()> {
        for (name, pitch, width) in
            [("A", self.lda(), self.a_stored()[1]), ("B", self.ldb(), self.b_stored()[1]), ("C", self.ldc(), self.n)]
        {
            if pitch < width {
                return Err(Error::shape(
                    op,
                    format!("{name}'s row pitch {pitch} is narrower than its {width} columns"),
                ));
            }
        }
        Ok(())
    }
    /// A [m, k] @ B [k, n] (BLAS's "NN").
    pub fn nn(m: usize, n: usize, k: usize) -> Self {
        Self::new(m, n, k, Trans::No, Trans::No)
    }
    /// A [m, k] @ B^T, B stored [n, k] ("NT").
    pub fn nt(m: usize, n: usize, k: usize) -> Self {
        Self::new(m, n, k, Trans::No, Trans::Yes)
    }
    /// A^T @ B [k, n], A stored [k, m] ("TN").
    pub fn tn(m: usize, n: usize, k: usize) -> Self {
        Self::new(m, n, k, Trans::Yes, Trans::No)
    }
    /// A^T @ B^T ("TT").
    pub fn tt(m: usize, n: usize, k: usize) -> Self {
        Self::new(m, n, k, Trans::Yes, Trans::Yes)
    }
    /// The same product with a GELU epilogue.
    pub fn with_gelu(self) -> Self {
        GemmDesc { epilogue: Epilogue::Gelu, ..self }
    }
}

/// Matrix products.
pub trait Matmul {
    /// epilogue(op(A) @ op(B) + bias) shaped `out_dims` (m x n elements), and the
    /// pre-activation when the epilogue is GELU.
    fn matmul(
        &self,
        a: &Tensor,
        b: &Tensor,
        bias: Option<&Tensor>,
        desc: &GemmDesc,
        out_dims: &[usize],
    ) -> Result<(Tensor, Option<Tensor>)>;
    /// op(A) @ op(B) into a new tensor of `dtype` shaped `dims` (backward's products: f32 for
    /// the gradient of a parameter, the compute dtype for an activation's).
    fn gemm(&self, a: &Tensor, b: &Tensor, desc: &GemmDesc, dtype: DType, dims: &[usize]) -> Result<Tensor>;
    /// The sum over rows of g [rows, n], in f32: a bias gradient.
    fn bias_grad(&self, g: &Tensor, n: usize) -> Result<Tensor>;
    /// out += op(A) @ op(B), the addition done in the GEMM's epilogue (f32, one rounding to out's
    /// dtype): how a LoRA update lands on its base output without a separate add.
    fn gemm_accumulate(&self, out: &mut Tensor, a: &Tensor, b: &Tensor, desc: &GemmDesc) -> Result<()>;
}

/// The heads of an attention: `n_head` query heads over `n_kv_head` key/value heads, each KV
/// head serving n_head / n_kv_head consecutive query heads (grouped-query attention, Ainslie et
/// al. 2023); n_kv_head = n_head is multi-head attention (GPT-2). The packed qkv row holds the
/// query heads, then the key heads, then the value heads: (n_head + 2 n_kv_head) hd columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub n_head: usize,
    pub n_kv_head: usize,
}

impl Heads {
    /// Multi-head attention: one KV head per query head.
    pub fn mha(n_head: usize) -> Self {
        Heads { n_head, n_kv_head: n_head }
    }
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.n_head / self.n_kv_head.max(1)
    }
    /// Heads in a packed qkv row.
    pub fn packed(&self) -> usize {
        self.n_head + 2 * self.n_kv_head
    }
    /// Whether the counts make a grouping (both positive, n_kv_head divides n_head).
    pub fn is_valid(&self) -> bool {
        self.n_head > 0 && self.n_kv_head > 0 && self.n_head % self.n_kv_head == 0
    }
}

/// The sizes of a causal multi-head attention: batch, sequence length, model width C and heads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub c: usize,
    pub nh: usize,
}

/// The sizes of attention against a KV cache: batch, new positions n, positions already cached
/// (`past`), the cache's capacity and the model width C.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvDims {
    pub b: usize,
    pub n: usize,
    pub past: usize,
    pub cap: usize,
    pub c: usize,
}

/// Causal attention over packed qkv [B, T, (nh + 2 nkv) hd] (GPT-2's [B, T, 3C] when nkv = nh),
/// with C = nh hd the output width and Ckv = nkv hd the width of the keys and of the values.
pub trait Attention {
    /// (out [B, T, C], lse [B, nh, T] in f32).
    fn attention(&self, qkv: &Tensor, heads: Heads) -> Result<(Tensor, Tensor)>;
    /// dqkv, shaped as qkv.
    fn attention_backward(
        &self,
        dout: &Tensor,
        qkv: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        heads: Heads,
    ) -> Result<Tensor>;
    /// Generation with a KV cache: writes the keys and values of qkv [B, n, (nh + 2 nkv) hd] at
    /// rows len..len + n of k and v [B, cap, Ckv], then attends new query i (position len + i) to
    /// rows 0..=len + i: out [B, n, C].
    fn attention_cached(
        &self,
        qkv: &Tensor,
        k: &mut Tensor,
        v: &mut Tensor,
        len: usize,
        heads: Heads,
    ) -> Result<Tensor>;
}

/// Token + position embedding. Token ids are host i32 values the op has checked.
pub trait Embedding {
    /// out [B, T, C] = wte[ids] + wpe[offset + t] for `ids` [B, T] (row-major, T = `t`); without
    /// `wpe` (a model with rotary positions), wte[ids] alone.
    fn embedding(&self, ids: &[i32], t: usize, wte: &Tensor, wpe: Option<&Tensor>, offset: usize) -> Result<Tensor>;
    /// [dwte, dwpe] in f32, each only where `needs` asks.
    fn embedding_backward(
        &self,
        dout: &Tensor,
        ids: &[i32],
        t: usize,
        dims: [&[usize]; 2],
        needs: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]>;
}

/// What the cross-entropy forward leaves: the loss sum over counted rows, their count, and what
/// backward needs (per-row lse in f32, the targets on the backend's device).
pub struct XentSaved {
    pub sum: f64,
    pub count: usize,
    pub lse: Tensor,
    pub targets: Tensor,
}

/// Fused softmax cross-entropy over rows of logits [rows, pitch] whose first `v` columns are the
/// vocabulary (pitch = the last dim, >= v; the columns past v are padding, never read).
pub trait CrossEntropy {
    /// `targets` is the host I32 tensor (checked: each in [0, v) or IGNORE).
    fn cross_entropy(&self, logits: &Tensor, targets: &Tensor, v: usize) -> Result<XentSaved>;
    /// (softmax(logits) - onehot(target)) * scale in the first v columns, zero rows where the
    /// target is IGNORE: written over `logits` (a copy of them first where another tensor shares
    /// their storage), the padding left as it was.
    fn cross_entropy_backward(&self, logits: Tensor, saved: &XentSaved, scale: f32, v: usize) -> Result<Tensor>;
}

/// The row pitch kiln gives a vocabulary of `v` logits: the next multiple of 128, so the
/// classifier's GEMMs read and write the logits in 16-byte-aligned rows (TMA) and whole tiles.
pub fn padded_vocab(v: usize) -> usize {
    v.next_multiple_of(128)
}

/// Dropout with probability `p` whose mask is drawn from `seed` per element index, the rule of
/// `Elementwise::dropout` (so every backend draws the same mask from the same seed, and a backward
/// redraws it instead of keeping it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

/// A LoRA linear layer's operands: y = x op(W) + bias + scaling * dropout(x) A^T B^T, with
/// x [m, k], W [k, n] (or [n, k] when `w_trans`), A [r, k], B [n, r].
#[derive(Clone, Copy)]
pub struct LoraArgs<'a> {
    pub x: &'a Tensor,
    pub w: &'a Tensor,
    pub w_trans: bool,
    pub bias: Option<&'a Tensor>,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f32,
    /// The dropout on the adapter's input, when it applies.
    pub dropout: Option<Dropout>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
}

/// LoRA embedding operands: scaling * A[:, ids]^T B^T, A [r, v], B [c, r].
#[derive(Clone, Copy)]
pub struct LoraEmbeddingArgs<'a> {
    pub ids: &'a [i32],
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f32,
    pub v: usize,
    pub c: usize,
    pub r: usize,
}

/// The LoRA ops. The linear layer's defaults compose it from other families' methods (`compose`:
/// GEMMs, casts, dropout, adds) on the backend's own device; the embedding's run the CPU's
/// implementation over host copies (a column gather the traits do not have).
pub trait Lora: Elementwise + Matmul {
    /// (y [m, n], us = scaling * dropout(x) A^T [m, r], which backward needs).
    fn lora_linear(&self, args: &LoraArgs) -> Result<(Tensor, Tensor)> {
        compose::lora_linear(self.as_backend(), args)
    }
    /// [dx, dW, dA, dB, dbias], each only where `needs` asks; parameter gradients in f32.
    fn lora_linear_backward(
        &self,
        args: &LoraArgs,
        us: &Tensor,
        dout: &Tensor,
        needs: [bool; 5],
    ) -> Result<[Option<Tensor>; 5]> {
        compose::lora_linear_backward(self.as_backend(), args, us, dout, needs)
    }
    /// (scaling * A[:, ids]^T B^T [ids.len(), c], us = scaling * A[:, ids]^T [ids.len(), r]).
    fn lora_embedding(&self, args: &LoraEmbeddingArgs) -> Result<(Tensor, Tensor)> {
        let (a, b) = (to_host_f32(args.a)?, to_host_f32(args.b)?);
        let (y, us) = cpu::Cpu.lora_embedding(&LoraEmbeddingArgs { a: &a, b: &b, ..*args })?;
        let (be, device) = (self.as_backend(), args.b.device());
        Ok((move_back(be, device, y, be.compute_dtype())?, move_back(be, device, us, DType::F32)?))
    }
    /// [dA, dB] in f32, each only where `needs` asks.
    fn lora_embedding_backward(
        &self,
        args: &LoraEmbeddingArgs,
        us: &Tensor,
        dout: &Tensor,
        needs: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]> {
        let (a, b, us, dout) = (to_host_f32(args.a)?, to_host_f32(args.b)?, to_host_f32(us)?, to_host_f32(dout)?);
        let g = cpu::Cpu.lora_embedding_backward(&LoraEmbeddingArgs { a: &a, b: &b, ..*args }, &us, &dout, needs)?;
        on_host(self.as_backend(), args.b.device(), [DType::F32; 2], g)
    }
    /// This backend as a `Backend` (for the defaults).
    fn as_backend(&self) -> &dyn Backend;
}

/// An NF4 linear layer's operands: y = x deq(W) + bias (+ the LoRA update with `lora`), W
/// [k, n] (a Conv1D's [in, out]) or, with `w_trans`, [n, k] (an nn.Linear's [out, in]: y = x
/// deq(W)^T).
#[derive(Clone, Copy)]
pub struct Nf4Args<'a> {
    pub x: &'a Tensor,
    pub w: &'a Nf4Weight,
    pub w_trans: bool,
    pub bias: Option<&'a Tensor>,
    /// (A [r, k], B [n, r], scaling) of the adapter.
    pub lora: Option<(&'a Tensor, &'a Tensor, f32)>,
    /// The dropout on the adapter's input, when it applies.
    pub dropout: Option<Dropout>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub r: usize,
}

/// NF4 linear (QLoRA's frozen base). The defaults compose it (`compose`): the base product by
/// `nf4_matmul`, the adapter as the LoRA linear's.
pub trait Nf4: Lora {
    /// The weight [k, n] dequantized, in the compute dtype, on this backend's device (a device
    /// keeps the packed weight resident: see `nf4_to_device`). The default dequantizes on the
    /// host.
    fn nf4_dequantize(&self, w: &Nf4Weight) -> Result<Tensor> {
        let be = self.as_backend();
        let host = Tensor::from_f32(w.dequantize()?, w.dims)?;
        move_back(be, be.device(), host, be.compute_dtype())
    }
    /// x [m, k] @ W (+ bias) for an NF4 weight W [in, out] (`trans` false: k = in), or
    /// x @ W^T (`trans` true: k = out, the input gradient), in the compute dtype. The default
    /// dequantizes W for the call and runs the GEMM; a backend with a fused kernel never
    /// materialises W.
    fn nf4_matmul(&self, x: &Tensor, w: &Nf4Weight, bias: Option<&Tensor>, trans: bool) -> Result<Tensor> {
        compose::nf4_matmul(self.as_backend(), x, w, bias, trans)
    }
    /// Keeps `w`'s packed form on this backend's device from now on (nothing on the CPU).
    fn nf4_to_device(&self, _w: &Nf4Weight) -> Result<()> {
        Ok(())
    }
    /// NF4 codes and absmax of an f32 tensor on this backend's device, in blocks of `blocksize`,
    /// returned to the host (what a checkpoint writer stores): bitsandbytes' quantize_4bit. The
    /// default quantizes a host copy.
    fn nf4_quantize(&self, x: &Tensor, blocksize: usize) -> Result<crate::quant::nf4::Nf4> {
        crate::quant::nf4::quantize_nf4(to_host_f32(x)?.f32s()?, blocksize)
    }
    /// (y [m, n], us [m, r]; r = 0 without an adapter).
    fn nf4_linear(&self, args: &Nf4Args) -> Result<(Tensor, Tensor)> {
        compose::nf4_linear(self.as_backend(), args)
    }
    /// [dx, dA, dB, dbias] (no dW: the quantized base is frozen), each only where `needs` asks.
    fn nf4_linear_backward(
        &self,
        args: &Nf4Args,
        us: &Tensor,
        dout: &Tensor,
        needs: [bool; 4],
    ) -> Result<[Option<Tensor>; 4]> {
        compose::nf4_linear_backward(self.as_backend(), args, us, dout, needs)
    }
}

/// One parameter's AdamW update: p, its two f32 moments and its gradient, on one device.
pub struct AdamWSlot<'a> {
    pub p: &'a mut Tensor,
    pub m: &'a mut Tensor,
    pub v: &'a mut Tensor,
    pub g: &'a Tensor,
    /// Weight decay applies (matrices, never biases or norms).
    pub decay: bool,
}

/// The moments of one parameter under 8-bit AdamW, on the parameter's device.
pub enum Adam8State<'a> {
    /// m and v in f32 [n]: parameters under bitsandbytes' min_8bit_size.
    F32 { m: &'a mut Tensor, v: &'a mut Tensor },
    /// bitsandbytes' blockwise state: U8 codes [n] of m (signed dynamic map) and of v (unsigned),
    /// with one f32 absmax per block of 256 [ceil(n / 256)] each.
    Q8 { state1: &'a mut Tensor, absmax1: &'a mut Tensor, state2: &'a mut Tensor, absmax2: &'a mut Tensor },
}

/// One parameter's 8-bit AdamW update: p, its gradient and its moments, on one device.
pub struct AdamW8bitSlot<'a> {
    pub p: &'a mut Tensor,
    pub g: &'a Tensor,
    pub state: Adam8State<'a>,
    /// Weight decay applies (matrices, never biases or norms).
    pub decay: bool,
}

/// Optimizer updates.
pub trait Optim {
    /// One AdamW step over every slot, with the step's scalars (`decay` is applied per slot).
    fn adamw(&self, slots: &mut [AdamWSlot], scalars: &crate::abi::AdamWScalars) -> Result<()>;
    /// One 8-bit AdamW step (bitsandbytes' arithmetic) over every slot.
    fn adamw8bit(&self, slots: &mut [AdamW8bitSlot], scalars: &crate::abi::AdamWScalars) -> Result<()>;
}

/// (B, T, C) of packed qkv [B, T, (nh + 2 nkv) hd] for `heads` (C = nh hd), or the error that
/// says why not.
pub(crate) fn qkv_dims(op: &'static str, qkv: &Tensor, heads: Heads) -> Result<(usize, usize, usize)> {
    let Heads { n_head, n_kv_head } = heads;
    match *qkv.dims() {
        [b, t, w] if heads.is_valid() && w > 0 && w % heads.packed() == 0 => Ok((b, t, w / heads.packed() * n_head)),
        _ => Err(Error::shape(
            op,
            format!(
                "qkv must be [B, T, (n_head + 2 n_kv_head) hd] for {n_head} query heads over {n_kv_head} KV heads \
                 (n_kv_head dividing n_head), got {:?}",
                qkv.dims()
            ),
        )),
    }
}
