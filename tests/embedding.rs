//! Token + position embedding: gradients of wte and wpe against finite differences at every
//! coordinate, with repeated ids (rows accumulate) and unused rows (exactly zero), and errors.

mod common;

use common::{grad_check, max_abs, poison_pool, rand_tensor, rng, Objective, Tol, POOLED};
use kiln::ops::embedding::embedding;
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
