//! Token + position embedding: gradients of wte and wpe against finite differences at every
//! coordinate, with repeated ids (rows accumulate) and unused rows (exactly zero), and errors.

mod common;

use common::{grad_check, max_abs, poison_pool, rand_tensor, rng, Objective, Tol, POOLED};
use kiln::ops::embedding::{embedding, embedding_at};
use kiln::{Error, Tape, Tensor};
use rand::Rng;

/// Tolerance. The op is linear in wte and wpe and each output is one f32 add (k ~ 1), so
/// truncation comes only from the probe (~1e-5 of the gradient scale at h = 1e-2) and rounding
/// is ~1e-6 of max|an|. Measured worst: 5e-6 of max|an|, against the shared rtol = 2e-3; a row that is overwritten instead of accumulated, or a position gradient taken from one
/// batch row only, is off by a whole dout row (> 1e-1 of max|an|).
const TOL: Tol = Tol { h: 1e-2, atol: 1e-6, rtol: 2e-3 };

struct Case {
    ids: Vec<i32>,
    bt: [usize; 2],
    v: usize,
    p: usize,
    c: usize,
}

fn cases() -> Vec<Case> {
    vec![
        // B = 2, T = 7: id 3 four times, 10 (the last row) twice, rows 5..=9 unused, and
        // P = 9 > T so position rows 7 and 8 are unused too.
        Case { ids: vec![3, 3, 0, 10, 3, 1, 4, 10, 0, 0, 2, 4, 4, 3], bt: [2, 7], v: 11, p: 9, c: 12 },
        // B = 1, T = 1, C = 13.
        Case { ids: vec![2], bt: [1, 1], v: 5, p: 4, c: 13 },
        // B = 3, T = P = 5, C = 20, every id the same.
        Case { ids: vec![6; 15], bt: [3, 5], v: 7, p: 5, c: 20 },
    ]
}

#[test]
fn embedding_grads_accumulate_and_skip_unused_rows() {
    let mut r = rng(41);
    for Case { ids, bt, v, p, c } in cases() {
        let label = format!("embedding ids={bt:?} V={v} P={p} C={c}");
        let inputs = [rand_tensor(&mut r, &[v, c], 1.0), rand_tensor(&mut r, &[p, c], 1.0)];
        let ids_t = Tensor::from_i32(ids.clone(), bt).unwrap();
        let f = |t: &mut Tape, x: &[Tensor]| embedding(t, &ids_t, &x[0], &x[1]);
        // Every coordinate: the tables are small, and each row must be seen.
        let g = grad_check(&label, &inputs, &[0, 1], Objective::Probe(42), TOL, usize::MAX, f);
        let (dwte, dwpe) = (&g[0], &g[1]);
        for row in 0..v {
            let used = ids.contains(&(row as i32));
            let m = max_abs(&dwte[row * c..(row + 1) * c]);
            assert_eq!(used, m > 0.0, "{label}: wte row {row} (used: {used}) has max|grad| {m}");
        }
        for pos in 0..p {
            let m = max_abs(&dwpe[pos * c..(pos + 1) * c]);
            assert_eq!(pos < bt[1], m > 0.0, "{label}: wpe row {pos} has max|grad| {m}");
        }
        // Both tables receive every dout row once, so their column sums agree.
        for i in 0..c {
            let col = |d: &[f32]| d.iter().skip(i).step_by(c).map(|&x| x as f64).sum::<f64>();
            let (a, b) = (col(dwte), col(dwpe));
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{label}: column {i}: {a} vs {b}");
        }
        // Watching one table alone gives the same gradient and none for the other.
        for (k, i) in [0, 1].into_iter().enumerate() {
            let one = grad_check(&label, &inputs, &[i], Objective::Probe(42), TOL, usize::MAX, f);
            assert_eq!(one[0], g[k], "{label}: input {i} watched alone");
        }
    }
}

/// dwte [1024, 16] is a pooled buffer: the second pass takes one filled with NaN, and must still
/// give exact zeros in the rows no id uses.
#[test]
fn embedding_grads_on_recycled_buffers() {
    let mut r = rng(44);
    let (v, p, c, bt) = (1024, 64, 16, [4, 64]);
    assert!(v * c >= POOLED);
    let ids: Vec<i32> = (0..bt[0] * bt[1]).map(|_| r.random_range(0..v as i32)).collect();
    let ids_t = Tensor::from_i32(ids.clone(), bt).unwrap();
    let inputs = [rand_tensor(&mut r, &[v, c], 1.0), rand_tensor(&mut r, &[p, c], 1.0)];
    let passes: Vec<_> = (0..2)
        .map(|pass| {
            if pass == 1 {
                poison_pool(&[v * c]);
            }
            let label = format!("embedding V={v} C={c} ids={bt:?}, pass {pass}");
            grad_check(&label, &inputs, &[0, 1], Objective::Probe(45), TOL, 96, |t, x| {
                embedding(t, &ids_t, &x[0], &x[1])
            })
        })
        .collect();
    assert!(passes[0] == passes[1], "fresh and recycled buffers gave different gradients");
    for row in (0..v).filter(|&row| !ids.contains(&(row as i32))) {
        assert!(passes[1][0][row * c..(row + 1) * c].iter().all(|&g| g == 0.0), "unused row {row}");
    }
}

#[test]
fn embedding_forward_is_a_lookup() {
    let mut r = rng(43);
    let (wte, wpe) = (rand_tensor(&mut r, &[11, 12], 1.0), rand_tensor(&mut r, &[9, 12], 1.0));
    let Case { ids, bt, c, .. } = cases().remove(0);
    let ids_t = Tensor::from_i32(ids.clone(), bt).unwrap();
    let y = embedding(&mut Tape::inference(), &ids_t, &wte, &wpe).unwrap();
    assert_eq!(y.dims(), &[bt[0], bt[1], c]);
    let (y, te, pe) = (y.f32s().unwrap(), wte.f32s().unwrap(), wpe.f32s().unwrap());
    for (row, &id) in ids.iter().enumerate() {
        let (id, pos) = (id as usize, row % bt[1]);
        for i in 0..c {
            assert_eq!(y[row * c + i], te[id * c + i] + pe[pos * c + i], "row {row} col {i}");
        }
    }
}

#[test]
fn embedding_rejects_bad_inputs() {
    let mut tape = Tape::new();
    let (wte, wpe) = (Tensor::zeros([5, 8]), Tensor::zeros([4, 8]));
    let ids = |v: Vec<i32>, d: &[usize]| Tensor::from_i32(v, d).unwrap();
    let res = embedding(&mut tape, &ids(vec![0, 5, 1], &[1, 3]), &wte, &wpe);
    assert!(matches!(res, Err(Error::TokenOutOfRange { id: 5, .. })), "id = V: {res:?}");
    let res = embedding(&mut tape, &ids(vec![0, -1, 1], &[1, 3]), &wte, &wpe);
    assert!(matches!(res, Err(Error::TokenOutOfRange { id: -1, .. })), "id -1: {res:?}");
    let res = embedding(&mut tape, &ids(vec![0; 5], &[1, 5]), &wte, &wpe);
    assert!(matches!(res, Err(Error::SeqTooLong { t: 5, .. })), "T > P: {res:?}");
    for (what, res) in [
        ("ids 1-D", embedding(&mut tape, &ids(vec![0; 3], &[3]), &wte, &wpe)),
        ("widths differ", embedding(&mut tape, &ids(vec![0; 3], &[1, 3]), &wte, &Tensor::zeros([4, 9]))),
        ("wte not 2-D", embedding(&mut tape, &ids(vec![0; 3], &[1, 3]), &Tensor::zeros([5, 8, 1]), &wpe)),
    ] {
        assert!(matches!(res, Err(Error::Shape { .. })), "{what}: {res:?}");
    }
    let float_ids = Tensor::zeros([1, 3]);
    let res = embedding(&mut tape, &float_ids, &wte, &wpe);
    assert!(matches!(res, Err(Error::DType { .. })), "f32 ids: {res:?}");
}

/// The CUDA kernels (kernels/embedding.cu): host twins and the host-side bucketing against the
/// CPU backend (these run everywhere), and on a GPU each kernel against the CPU backend at T = 1,
/// 7, 97, 1025 and C = 1, 13, 768, 1000, with NaN-poisoned outputs and a determinism check.
///
/// Tolerance: none. The forward is one f32 add of two bf16-valued numbers, the same on both
/// sides, then one round to nearest even, so the device output equals bf16(cpu value) bit for
/// bit. The backward adds the same f32 values in the same order as the CPU (rows ascending, from
/// zero), so dwte and dwpe equal the CPU's bits (its axpy adds 1.0 * x, which is x exactly).
/// The CPU backward scatters rows of dwte through a raw pointer at id * C: an id outside the
/// vocabulary must panic before any write, not land past the end of the table.
#[test]
#[should_panic(expected = "token id 9 is outside the vocabulary of 8")]
fn cpu_backend_embedding_backward_rejects_an_id_past_the_vocabulary() {
    let (v, t, c) = (8, 2, 4);
    let ids = [1, 9];
    let dout = vec![1f32; ids.len() * c];
    let (mut dwte, mut dwpe) = (vec![0f32; v * c], vec![0f32; t * c]);
    kiln::backend::cpu::embedding::embedding_backward(Some(&mut dwte), Some(&mut dwpe), &dout, &ids, t, c);
}

#[test]
#[should_panic(expected = "token id -1 is outside the vocabulary of 8")]
fn cpu_backend_embedding_backward_rejects_a_negative_id() {
    let (v, t, c) = (8, 2, 4);
    let ids = [-1, 0];
    let dout = vec![1f32; ids.len() * c];
    let mut dwte = vec![0f32; v * c];
    kiln::backend::cpu::embedding::embedding_backward(Some(&mut dwte), None, &dout, &ids, t, c);
}

/// embedding_at(offset) gives rows offset..offset + T of the embedding of the whole sequence, bit
/// for bit, on `to_dev`'s device (an odd width takes the kernel's unvectorised path); a position
/// past wpe and a tape that wants a table's gradient are refused.
fn embedding_at_equals_the_full_rows(to_dev: &dyn Fn(&Tensor) -> Tensor) {
    let mut r = rng(41);
    for (v, p, c) in [(11, 20, 16), (7, 9, 5)] {
        let (b, t) = (2, p);
        let ids: Vec<i32> = (0..b * t).map(|_| r.random_range(0..v as i32)).collect();
        let (wte, wpe) = (to_dev(&rand_tensor(&mut r, &[v, c], 1.0)), to_dev(&rand_tensor(&mut r, &[p, c], 1.0)));
        let all = Tensor::from_i32(ids.clone(), [b, t]).unwrap();
        let full = embedding(&mut Tape::inference(), &all, &wte, &wpe).unwrap().to_f32_vec().unwrap();
        for (offset, n) in [(0, 3), (1, 1), (5, 4), (p - 1, 1)] {
            let part: Vec<i32> = (0..b).flat_map(|bi| ids[bi * t + offset..bi * t + offset + n].to_vec()).collect();
            let part = Tensor::from_i32(part, [b, n]).unwrap();
            let got = embedding_at(&mut Tape::inference(), &part, &wte, &wpe, offset).unwrap().to_f32_vec().unwrap();
            for bi in 0..b {
                let want = &full[(bi * t + offset) * c..(bi * t + offset + n) * c];
                assert!(&got[bi * n * c..(bi + 1) * n * c] == want, "V={v} C={c} offset {offset} n {n} row {bi}");
            }
        }
        let two = Tensor::from_i32(vec![0; b * 2], [b, 2]).unwrap();
        let e = embedding_at(&mut Tape::inference(), &two, &wte, &wpe, p - 1);
        assert!(matches!(e, Err(Error::SeqTooLong { t: 21 | 10, .. })), "{e:?}");
        let mut tape = Tape::new();
        tape.watch(&wpe);
        let e = embedding_at(&mut tape, &two, &wte, &wpe, 1).unwrap_err().to_string();
        assert!(e.contains("no backward"), "{e}");
    }
}

#[test]
fn embedding_at_an_offset() {
    embedding_at_equals_the_full_rows(&|x| x.clone());
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::common::dev::{assert_bits, poisoned, rounded, to_bf};
    use super::common::{self, rng, uniform};
    use kiln::backend::cpu::embedding as cpu;
    use kiln::backend::cuda::embedding::{self as gpu, twin, Buckets};
    use kiln::backend::cuda::{bf16, Cuda};
    use rand::Rng;

    const TS: [usize; 4] = [1, 7, 97, 1025];
    const CS: [usize; 4] = [1, 13, 768, 1000];

    /// ids drawn mostly from a few popular tokens (long buckets) and the rest of the vocabulary.
    fn ids(seed: u64, rows: usize, vocab: usize) -> Vec<i32> {
        let mut r = rng(seed);
        (0..rows)
            .map(|_| {
                if r.random_bool(0.5) {
                    r.random_range(0..vocab.min(5) as i32)
                } else {
                    r.random_range(0..vocab as i32)
                }
            })
            .collect()
    }

    #[test]
    fn buckets_group_rows_by_id_and_drop_bad_ids() {
        let b = Buckets::new(&[3, 1, 3, -1, 7, 1, 3, 9], 8);
        assert_eq!(b.ids, vec![1, 3, 7]);
        assert_eq!(b.start, vec![0, 2, 5, 6]);
        assert_eq!(b.rows, vec![1, 5, 0, 2, 6, 4]);
        let empty = Buckets::new(&[], 8);
        assert_eq!((empty.ids.len(), empty.start, empty.rows.len()), (0, vec![0], 0));
    }

    /// The twins (the kernels' loops over the host bucketing) give the CPU's bits.
    #[test]
    fn twin_matches_cpu_bits() {
        for (k, (b, t, c, vocab)) in [(1, 1, 1, 3), (2, 7, 13, 50), (3, 97, 64, 1000)].into_iter().enumerate() {
            let rows = b * t;
            let mut r = rng(10 + k as u64);
            let (wte, wpe) = (uniform(&mut r, vocab * c, 1.0), uniform(&mut r, (t + 2) * c, 1.0));
            let (id, dout) = (ids(20 + k as u64, rows, vocab), uniform(&mut r, rows * c, 1.0));
            let label = format!("twin B={b} T={t} C={c}");
            let (mut o1, mut o2) = (vec![f32::NAN; rows * c], vec![f32::NAN; rows * c]);
            twin::embedding_forward(&mut o1, &id, &wte, &wpe, t, c);
            cpu::embedding_forward(&mut o2, &id, &wte, &wpe, t, c);
            assert_bits(&format!("{label} out"), &o1, &o2);
            let (mut a1, mut p1) = (vec![f32::NAN; vocab * c], vec![f32::NAN; (t + 2) * c]);
            let (mut a2, mut p2) = (a1.clone(), p1.clone());
            twin::embedding_backward(Some(&mut a1), Some(&mut p1), &dout, &id, t, c);
            cpu::embedding_backward(Some(&mut a2), Some(&mut p2), &dout, &id, t, c);
            assert_bits(&format!("{label} dwte"), &a1, &a2);
            assert_bits(&format!("{label} dwpe"), &p1, &p2);
        }
    }

    struct Run {
        out: Vec<bf16>,
        dwte: Vec<f32>,
        dwpe: Vec<f32>,
    }

    #[allow(clippy::too_many_arguments)]
    fn run(cu: &Cuda, id: &[i32], wte: &[f32], wpe: &[f32], dout: &[f32], t: usize, c: usize) -> Run {
        let rows = id.len();
        let (did, dte, dpe, dg) = (
            cu.upload(id).unwrap(),
            cu.upload(&to_bf(wte)).unwrap(),
            cu.upload(&to_bf(wpe)).unwrap(),
            cu.upload(&to_bf(dout)).unwrap(),
        );
        let mut out = poisoned(cu, rows * c, bf16::NAN);
        gpu::embedding_forward(&mut out, &did, &dte, &dpe, t, c).unwrap();
        let (mut dwte, mut dwpe) = (poisoned(cu, wte.len(), f32::NAN), poisoned(cu, wpe.len(), f32::NAN));
        gpu::embedding_backward(Some(&mut dwte), Some(&mut dwpe), &dg, id, t, c).unwrap();
        Run { out: cu.download(&out).unwrap(), dwte: cu.download(&dwte).unwrap(), dwpe: cu.download(&dwpe).unwrap() }
    }

    /// Forward, backward and a second run, every shape; wpe has more positions than T (as GPT-2's
    /// [n_positions, C] table does), so dwpe's rows past T must come back zero.
    #[test]
    fn gpu_matches_cpu_bits_and_repeats() {
        let Some(cu) = common::gpu("embedding gpu_matches_cpu_bits_and_repeats") else { return };
        let vocab = 1000;
        for (k, (&t, &c)) in TS.iter().flat_map(|t| CS.iter().map(move |c| (t, c))).enumerate() {
            let b = if t > 97 { 2 } else { 3 };
            let rows = b * t;
            let mut r = rng(100 + k as u64);
            let (wte, wpe) = (rounded(uniform(&mut r, vocab * c, 1.0)), rounded(uniform(&mut r, (t + 3) * c, 1.0)));
            let (id, dout) = (ids(200 + k as u64, rows, vocab), rounded(uniform(&mut r, rows * c, 1.0)));
            let label = format!("gpu B={b} T={t} C={c}");
            let got = run(cu, &id, &wte, &wpe, &dout, t, c);
            let mut out = vec![0f32; rows * c];
            cpu::embedding_forward(&mut out, &id, &wte, &wpe, t, c);
            let want: Vec<bf16> = to_bf(&out);
            for (i, (g, w)) in got.out.iter().zip(&want).enumerate() {
                assert!(g.to_bits() == w.to_bits(), "{label}: out[{i}] = {g} vs bf16(cpu) {w}");
            }
            let (mut dwte, mut dwpe) = (vec![f32::NAN; vocab * c], vec![f32::NAN; (t + 3) * c]);
            cpu::embedding_backward(Some(&mut dwte), Some(&mut dwpe), &dout, &id, t, c);
            assert_bits(&format!("{label} dwte"), &got.dwte, &dwte);
            assert_bits(&format!("{label} dwpe"), &got.dwpe, &dwpe);
            let again = run(cu, &id, &wte, &wpe, &dout, t, c);
            assert!(
                again.out.iter().zip(&got.out).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{label}: out, second run"
            );
            assert_bits(&format!("{label} dwte, second run"), &again.dwte, &got.dwte);
            assert_bits(&format!("{label} dwpe, second run"), &again.dwpe, &got.dwpe);
        }
    }

    /// Ids outside the table (which the op rejects before launching) neither fault nor write out
    /// of bounds: the forward writes a NaN row, the backward leaves their rows out of dwte.
    #[test]
    fn gpu_bad_ids_are_contained() {
        let Some(cu) = common::gpu("embedding gpu_bad_ids_are_contained") else { return };
        let (vocab, t, c) = (50, 4, 13);
        let mut r = rng(300);
        let (wte, wpe) = (rounded(uniform(&mut r, vocab * c, 1.0)), rounded(uniform(&mut r, t * c, 1.0)));
        let id = vec![3, -7, 49, 50, 3, 1000, 0, 2];
        let dout = rounded(uniform(&mut r, id.len() * c, 1.0));
        let got = run(cu, &id, &wte, &wpe, &dout, t, c);
        for (row, &i) in id.iter().enumerate() {
            let bad = !(0..vocab as i32).contains(&i);
            let o = &got.out[row * c..(row + 1) * c];
            assert!(o.iter().all(|x| x.is_nan() == bad), "row {row} (id {i}): {o:?}");
        }
        let keep: Vec<usize> = (0..id.len()).filter(|&r| (0..vocab as i32).contains(&id[r])).collect();
        let kid: Vec<i32> = keep.iter().map(|&r| id[r]).collect();
        let kdout: Vec<f32> = keep.iter().flat_map(|&r| dout[r * c..(r + 1) * c].to_vec()).collect();
        let mut dwte = vec![f32::NAN; vocab * c];
        cpu::embedding_backward(Some(&mut dwte), None, &kdout, &kid, t, c);
        assert_bits("dwte without the bad rows", &got.dwte, &dwte);
    }

    /// Token rows alone (no position table, as Llama embeds): each output row is its table row
    /// bit for bit (signed zeros and NaN payloads included, which an add of zero would change),
    /// on the 16-byte path (C = 64) and the scalar one (C = 13); bad ids give NaN rows.
    #[test]
    fn gpu_token_embedding_copies_rows() {
        let Some(cu) = common::gpu("embedding gpu_token_embedding_copies_rows") else { return };
        let vocab = 40;
        for (k, c) in [64usize, 13].into_iter().enumerate() {
            let mut table: Vec<bf16> = to_bf(&rounded(uniform(&mut rng(500 + k as u64), vocab * c, 1.0)));
            table[3 * c] = bf16::from_bits(0x8000); // -0.0
            table[3 * c + 1] = bf16::from_bits(0x7fc1); // a NaN with a payload
            let id = vec![3, 0, 39, 3, 40, -1, 17];
            let (did, dte) = (cu.upload(&id).unwrap(), cu.upload(&table).unwrap());
            let mut out = poisoned(cu, id.len() * c, bf16::from_f32(7.0));
            gpu::token_embedding_forward(&mut out, &did, &dte, c).unwrap();
            let got = cu.download(&out).unwrap();
            for (row, &i) in id.iter().enumerate() {
                let o = &got[row * c..(row + 1) * c];
                if (0..vocab as i32).contains(&i) {
                    let want = &table[i as usize * c..(i as usize + 1) * c];
                    assert!(o.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "C={c} row {row} (id {i})");
                } else {
                    assert!(o.iter().all(|x| x.is_nan()), "C={c} row {row} (bad id {i}): {o:?}");
                }
            }
        }
    }

    /// embedding_at on the device (the forward kernel over a view of wpe from row `offset`).
    #[test]
    fn gpu_embedding_at_an_offset() {
        let Some(_) = common::gpu("embedding gpu_embedding_at_an_offset") else { return };
        super::embedding_at_equals_the_full_rows(&|x| {
            let x = x.to_device(kiln::Device::Cuda(0)).unwrap();
            kiln::ops::elementwise::to_compute_dtype(&mut kiln::Tape::inference(), &x).unwrap()
        });
    }
}
