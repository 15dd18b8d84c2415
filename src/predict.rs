//! `kiln bench train-step --device emu --predict`: a floor under one training step's time on a
//! GPU, from what the emulated device counted while running the step's kernels.
//!
//! Each launch is charged the longest of three times at the chip's ceilings:
//! - its bytes: the fewest it must move (the distinct 32-byte sectors it read plus those it
//!   wrote, each once) at the copy bandwidth;
//! - its tensor-core math: mma.sync instructions times the 4096 FLOPs of an m16n8k16, at the
//!   dense bf16 matrix rate;
//! - its CUDA-core math: the FLOPs its threads declare with KILN_FLOPS (kernels/common.cuh), at
//!   the fp32 rate.
//!
//! A launch of fewer blocks than the chip has multiprocessors uses only that share of the chip, so
//! its time is divided by the share. The step's floor is the sum over launches: kernels run one
//! after another on kiln's one stream. It is a floor, not a measurement: no kernel reaches every
//! ceiling, and launch gaps, tail waves and cache misses only add to it. What it says is where the
//! step cannot go below, kernel by kernel, so the order of the work is set by numbers.

/// The ceilings a floor is taken at.
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    pub name: &'static str,
    /// Device-to-device copy, bytes read plus written per second.
    pub bandwidth: f64,
    /// Dense bf16 tensor-core FLOP/s.
    pub tensor: f64,
    /// fp32 CUDA-core FLOP/s.
    pub fp32: f64,
    pub sms: u64,
}

/// One H200: the copy bandwidth (4.3 TB/s) and the 8192^3 bf16 product's rate on random data
/// (790 TFLOP/s) measured through PyTorch on the machines lent to this project; the fp32 rate is
/// the H100 SXM datasheet's (67 TFLOP/s), which the H200 shares; 132 multiprocessors.
pub const H200: Ceilings = Ceilings { name: "H200", bandwidth: 4.3e12, tensor: 790e12, fp32: 67e12, sms: 132 };

/// llm.c's published GPT-2 124M training rate on one H100 (cuBLAS and cuDNN), tokens per second.
pub const LLM_C_TOKENS_PER_S: f64 = 471e3;

/// FLOPs of one mma.sync m16n8k16: 16 x 8 outputs, 16 products and sums each.
pub const MMA_FLOPS: f64 = 2.0 * 16.0 * 8.0 * 16.0;

/// One launch as the emulated device counted it (scaled to its whole grid when it ran a sample of
/// the blocks).
#[derive(Clone, Debug)]
pub struct Launch {
    pub kernel: &'static str,
    pub blocks: u64,
    pub run_blocks: u64,
    /// The bytes its warps' requests moved, as 32-byte sectors.
    pub moved_bytes: f64,
    /// The fewest bytes it could move: distinct sectors read plus written.
    pub fewest_bytes: f64,
    pub tensor_flops: f64,
    pub core_flops: f64,
}

/// What bounds a launch's floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    Memory,
    Tensor,
    Fp32,
}

impl Bound {
    pub fn name(self) -> &'static str {
        match self {
            Bound::Memory => "memory",
            Bound::Tensor => "tensor",
            Bound::Fp32 => "fp32",
        }
    }
}

impl Launch {
    /// Adds another launch's blocks, bytes and FLOPs to this one's.
    fn add(&mut self, o: &Launch) {
        self.blocks += o.blocks;
        self.run_blocks += o.run_blocks;
        self.moved_bytes += o.moved_bytes;
        self.fewest_bytes += o.fewest_bytes;
        self.tensor_flops += o.tensor_flops;
        self.core_flops += o.core_flops;
    }

    /// The share of the chip a launch of this many blocks can use (one block runs on one
    /// multiprocessor).
    pub fn share(&self, c: &Ceilings) -> f64 {
        (self.blocks as f64 / c.sms as f64).min(1.0)
    }

    /// The launch's floor in seconds and what sets it.
    pub fn floor(&self, c: &Ceilings) -> (f64, Bound) {
        let times = [
            (self.fewest_bytes / c.bandwidth, Bound::Memory),
            (self.tensor_flops / c.tensor, Bound::Tensor),
            (self.core_flops / c.fp32, Bound::Fp32),
        ];
        let (t, b) = times.into_iter().fold((0.0, Bound::Memory), |a, x| if x.0 > a.0 { x } else { a });
        (t / self.share(c), b)
    }
}

/// One kernel's launches in a step, summed.
#[derive(Clone, Debug)]
pub struct KernelRow {
    /// Its launches' blocks, bytes and FLOPs added up, under the kernel's name.
    pub sum: Launch,
    pub launches: u64,
    /// Summed floors of its launches, seconds.
    pub floor: f64,
    /// What bounds most of that time.
    pub bound: Bound,
    /// Launches with fewer blocks than the chip has multiprocessors.
    pub underfilled: u64,
}

/// A step's floor, kernel by kernel (the largest first).
#[derive(Clone, Debug)]
pub struct Prediction {
    pub ceilings: Ceilings,
    pub rows: Vec<KernelRow>,
    pub tokens: usize,
    /// The model's FLOPs for the step (bench::train_step_flops), for the utilisation at the floor.
    pub model_flops: f64,
}

impl Prediction {
    pub fn new(launches: &[Launch], ceilings: Ceilings, tokens: usize, model_flops: f64) -> Prediction {
        let mut rows: Vec<(KernelRow, [f64; 3])> = Vec::new();
        for l in launches {
            let (t, bound) = l.floor(&ceilings);
            let (r, by_bound) = match rows.iter().position(|(r, _)| r.sum.kernel == l.kernel) {
                Some(i) => {
                    let (r, by_bound) = &mut rows[i];
                    r.sum.add(l);
                    (r, by_bound)
                }
                None => {
                    let row = KernelRow { sum: l.clone(), launches: 0, floor: 0.0, bound, underfilled: 0 };
                    rows.push((row, [0.0; 3]));
                    let (r, by_bound) = rows.last_mut().unwrap();
                    (r, by_bound)
                }
            };
            r.launches += 1;
            r.floor += t;
            r.underfilled += (l.blocks < ceilings.sms) as u64;
            by_bound[bound as usize] += t;
        }
        let mut rows: Vec<KernelRow> = rows
            .into_iter()
            .map(|(mut r, by)| {
                let top = (0..3).fold(0, |a, i| if by[i] > by[a] { i } else { a });
                r.bound = [Bound::Memory, Bound::Tensor, Bound::Fp32][top];
                r
            })
            .collect();
        rows.sort_by(|a, b| b.floor.total_cmp(&a.floor).then(a.sum.kernel.cmp(b.sum.kernel)));
        Prediction { ceilings, rows, tokens, model_flops }
    }

    /// The step's floor in seconds.
    pub fn floor(&self) -> f64 {
        self.rows.iter().map(|r| r.floor).sum()
    }

    pub fn launches(&self) -> u64 {
        self.rows.iter().map(|r| r.launches).sum()
    }

    /// Tokens per second at the floor.
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.floor()
    }

    /// The model FLOPs utilisation at the floor: the step's model FLOPs over the floor, against
    /// the tensor-core rate.
    pub fn mfu(&self) -> f64 {
        self.model_flops / self.floor() / self.ceilings.tensor
    }

    /// The table and the step's floor, with llm.c's published rate beside it.
    pub fn print(&self) {
        let c = &self.ceilings;
        println!(
            "predicted floor on one {} ({:.1} TB/s copy, {:.0} TFLOP/s bf16 tensor cores, {:.0} TFLOP/s fp32, {} SMs):",
            c.name,
            c.bandwidth / 1e12,
            c.tensor / 1e12,
            c.fp32 / 1e12,
            c.sms
        );
        println!(
            "  {:<34} {:>5} {:>9} {:>10} {:>7} {:>10} {:>9} {:>9} {:>6} {:<7}",
            "kernel", "runs", "fewer SM", "fewest MB", "moved", "mma GFLOP", "fp32 GFLOP", "floor ms", "share", "bound"
        );
        let total = self.floor();
        for r in &self.rows {
            println!(
                "  {:<34} {:>5} {:>9} {:>10.1} {:>6.2}x {:>10.1} {:>9.1} {:>9.3} {:>5.1}% {:<7}",
                r.sum.kernel,
                r.launches,
                r.underfilled,
                r.sum.fewest_bytes / 1e6,
                r.sum.moved_bytes / r.sum.fewest_bytes.max(1.0),
                r.sum.tensor_flops / 1e9,
                r.sum.core_flops / 1e9,
                r.floor * 1e3,
                100.0 * r.floor / total,
                r.bound.name()
            );
        }
        let llmc = self.tokens as f64 / LLM_C_TOKENS_PER_S;
        println!(
            "  step floor: {:.2} ms for {} tokens = {:.0} tokens/s, {} launches; model FLOPs utilisation at the floor {:.0}%",
            total * 1e3,
            self.tokens,
            self.tokens_per_s(),
            self.launches(),
            100.0 * self.mfu()
        );
        println!(
            "  llm.c, published (one H100, cuBLAS + cuDNN): {:.0} tokens/s = {:.2} ms for these {} tokens",
            LLM_C_TOKENS_PER_S,
            llmc * 1e3,
            self.tokens
        );
        println!(
            "  This is a floor, not a measurement: each launch at the chip's copy bandwidth for the fewest bytes it \
             must move, or at the peak rate of the units its math runs on, whichever is longer (divided by the share \
             of the {} SMs a launch of fewer blocks can use). No kernel reaches every ceiling; launch gaps, tail \
             waves and cache misses only add. fewer SM: launches of fewer blocks than SMs; moved: sectors the warps' \
             requests touched over the fewest (caches serve part of them on a GPU).",
            c.sms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(kernel: &'static str, blocks: u64, fewest: f64, tensor: f64, core: f64) -> Launch {
        Launch {
            kernel,
            blocks,
            run_blocks: blocks.min(8),
            moved_bytes: 2.0 * fewest,
            fewest_bytes: fewest,
            tensor_flops: tensor,
            core_flops: core,
        }
    }

    #[test]
    fn each_launch_takes_its_slowest_ceiling() {
        // 4.3 GB at 4.3 TB/s is 1 ms; 0.79 PFLOP at 790 TFLOP/s is 1 s; 0.67 TFLOP fp32 is 10 ms.
        let mem = launch("copy", 1000, 4.3e9, 0.0, 0.0);
        assert_eq!(mem.floor(&H200), (1e-3, Bound::Memory));
        let gemm = launch("gemm", 1000, 4.3e9, 0.79e15, 0.0);
        assert_eq!(gemm.floor(&H200).1, Bound::Tensor);
        assert!((gemm.floor(&H200).0 - 1.0).abs() < 1e-12);
        let core = launch("attn", 1000, 4.3e9, 0.0, 0.67e12);
        assert_eq!(core.floor(&H200).1, Bound::Fp32);
        assert!((core.floor(&H200).0 - 1e-2).abs() < 1e-12);
        // 33 blocks use a quarter of 132 SMs: four times as long.
        let small = launch("copy", 33, 4.3e9, 0.0, 0.0);
        assert!((small.floor(&H200).0 - 4e-3).abs() < 1e-12);
    }

    #[test]
    fn kernels_sum_their_launches_and_sort_by_floor() {
        let launches = [
            launch("a", 1000, 4.3e9, 0.0, 0.0),
            launch("b", 1000, 0.0, 0.79e13, 0.0),
            launch("a", 66, 4.3e9, 0.0, 0.0),
        ];
        let p = Prediction::new(&launches, H200, 1000, 0.79e13);
        assert_eq!(p.rows.len(), 2);
        assert_eq!(p.rows[0].sum.kernel, "b");
        assert_eq!(p.rows[0].bound, Bound::Tensor);
        assert_eq!(p.rows[1].launches, 2);
        assert_eq!(p.rows[1].underfilled, 1);
        assert!((p.rows[1].floor - 3e-3).abs() < 1e-12);
        assert!((p.floor() - 13e-3).abs() < 1e-12);
        assert!((p.tokens_per_s() - 1000.0 / 13e-3).abs() < 1e-6);
        assert!((p.mfu() - 10.0 / 13.0).abs() < 1e-12);
        assert_eq!(p.launches(), 3);
    }
}
