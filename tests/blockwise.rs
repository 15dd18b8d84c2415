//! 8-bit blockwise quantization against bitsandbytes (oracle fixture adam8bit.safetensors,
//! made with bitsandbytes' CPU kernel): the dynamic maps, codes and absmax must be equal bit
//! for bit, not merely close, because the codes are optimizer state that checkpoints carry.

use kiln::io::checkpoint::load_all;
use kiln::quant::blockwise::{
    dequantize_blockwise, dynamic_map, num_blocks, quantize_blockwise, quantize_blockwise_lut, CodeLut, BLOCKSIZE_8BIT,
};
use kiln::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

fn fixture() -> BTreeMap<String, Tensor> {
    load_all(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle/dev-set/adam8bit.safetensors")).unwrap()
}

fn bit_mismatches(a: &[f32], b: &[f32]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count()
}

/// The index of the map entry nearest `s` (ties to the lower index), the plain definition the
/// table lookup approximates.
fn nearest(map: &[f32], s: f32) -> usize {
    let d = |k: usize| (s as f64 - map[k] as f64).abs();
    (0..map.len()).fold(0, |best, k| if d(k) < d(best) { k } else { best })
}

/// The table can pick the other neighbour only for a scaled value within one table step
/// (2/65535 of the block's absmax) of the midpoint between two map entries.
const LUT_STEP: f64 = 2.0 / 65535.0;

fn near_midpoint(map: &[f32], s: f32, a: usize, b: usize) -> bool {
    let mid = 0.5 * (map[a] as f64 + map[b] as f64);
    a.abs_diff(b) == 1 && (s as f64 - mid).abs() <= LUT_STEP
}

#[test]
fn dynamic_maps_equal_bitsandbytes() {
    let f = fixture();
    let signed = dynamic_map(true);
    let unsigned = dynamic_map(false);
    for (key, ours) in [("blockwise.map", &signed), ("adam.bnb8bit.qmap1", &signed), ("adam.bnb8bit.qmap2", &unsigned)]
    {
        let theirs = f[key].f32s().unwrap();
        assert_eq!(ours.len(), 256);
        assert_eq!(bit_mismatches(ours, theirs), 0, "{key}: dynamic map differs from bitsandbytes'");
    }
    // the shape the file's docs promise: sorted, signed spans [-0.993, 1] with one zero
    assert!(signed.windows(2).all(|w| w[0] < w[1]) && unsigned.windows(2).all(|w| w[0] < w[1]));
    assert_eq!((signed[0], signed[127], signed[255]), (-0.99296874, 0.0, 1.0));
    assert_eq!((unsigned[0], unsigned[255]), (0.0, 1.0));
}

#[test]
fn codes_absmax_and_dequant_equal_bitsandbytes() {
    let f = fixture();
    let x = f["blockwise.x"].f32s().unwrap();
    let map = f["blockwise.map"].f32s().unwrap();
    let n = x.len();
    let mut codes = vec![0u8; n];
    let mut absmax = vec![0f32; num_blocks(n, BLOCKSIZE_8BIT)];
    quantize_blockwise(x, map, BLOCKSIZE_8BIT, &mut codes, &mut absmax);

    let want_codes = f["blockwise.codes"].u8s().unwrap();
    let code_mismatches = codes.iter().zip(want_codes).filter(|(a, b)| a != b).count();
    println!("codes: {code_mismatches} mismatches of {n}");
    assert_eq!(code_mismatches, 0, "codes differ from bitsandbytes' CPU kernel");
    assert_eq!(bit_mismatches(&absmax, f["blockwise.absmax"].f32s().unwrap()), 0, "absmax differs");

    let mut deq = vec![0f32; n];
    dequantize_blockwise(&codes, &absmax, map, BLOCKSIZE_8BIT, &mut deq);
    assert_eq!(bit_mismatches(&deq, f["blockwise.dequant"].f32s().unwrap()), 0, "dequant differs");

    // the table is nearest-neighbour except next to a midpoint (meta.json counts 5 such here)
    let mut off_nearest = 0;
    for (i, (&c, &v)) in codes.iter().zip(x).enumerate() {
        let s = v * (1.0 / absmax[i / BLOCKSIZE_8BIT]);
        let k = nearest(map, s);
        if k != c as usize {
            off_nearest += 1;
            assert!(near_midpoint(map, s, k, c as usize), "element {i}: code {c}, nearest {k}, scaled {s}");
        }
    }
    println!("codes that are not the nearest entry (all within a table step of a midpoint): {off_nearest}");
}

#[test]
fn partial_last_block_and_zero_block() {
    let f = fixture();
    let map = dynamic_map(true);
    let lut = CodeLut::new(&map);
    // 15 full blocks and one of 160, with block 3 all zeros
    let mut x = f["blockwise.x"].f32s().unwrap()[..15 * 256 + 160].to_vec();
    x[3 * 256..4 * 256].fill(0.0);
    let n = x.len();
    let nb = num_blocks(n, 256);
    assert_eq!(nb, 16);
    let (mut codes, mut absmax) = (vec![7u8; n], vec![-1f32; nb]);
    quantize_blockwise_lut(&x, &lut, 256, &mut codes, &mut absmax);

    // full blocks other than the zeroed one are what bitsandbytes wrote for the whole buffer
    let (want_codes, want_absmax) = (f["blockwise.codes"].u8s().unwrap(), f["blockwise.absmax"].f32s().unwrap());
    for b in (0..15).filter(|&b| b != 3) {
        assert_eq!(&codes[b * 256..(b + 1) * 256], &want_codes[b * 256..(b + 1) * 256], "block {b}");
        assert_eq!(absmax[b].to_bits(), want_absmax[b].to_bits(), "block {b}");
    }
    // the zero block: absmax 0, codes 0, dequantizes to zeros
    assert_eq!(absmax[3], 0.0);
    assert!(codes[3 * 256..4 * 256].iter().all(|&c| c == 0));
    // the partial block: absmax over its 160 elements only, codes nearest but for midpoints
    let tail = &x[15 * 256..];
    let a = tail.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_eq!(absmax[15].to_bits(), a.to_bits());
    for (&c, &v) in codes[15 * 256..].iter().zip(tail) {
        let s = v * (1.0 / a);
        let k = nearest(&map, s);
        assert!(k == c as usize || near_midpoint(&map, s, k, c as usize), "partial block: code {c} for {s}");
    }

    // round trip: every element within half the widest map gap (plus a table step) of its
    // block's absmax; the widest gap of the signed map is in the top decade, 0.9/64
    let mut deq = vec![f32::NAN; n];
    dequantize_blockwise(&codes, &absmax, &map, 256, &mut deq);
    let half_gap = map.windows(2).map(|w| (w[1] - w[0]) as f64).fold(0f64, f64::max) / 2.0;
    assert!((half_gap - 0.9 / 128.0).abs() < 1e-6, "widest half gap {half_gap}");
    let mut worst = 0f64;
    for (i, (&d, &v)) in deq.iter().zip(&x).enumerate() {
        let am = absmax[i / 256] as f64;
        let err = (d as f64 - v as f64).abs();
        worst = worst.max(err / am.max(1e-30));
        assert!(err <= (half_gap + LUT_STEP) * am + 1e-7 * am, "element {i}: error {err}, absmax {am}");
    }
    assert!(deq[3 * 256..4 * 256].iter().all(|&d| d == 0.0));
    println!("round trip: worst error {worst:.5} of the block absmax (bound {:.5})", half_gap + LUT_STEP);
}

#[test]
fn parallel_blocks_equal_one_block_at_a_time() {
    // a buffer large enough for rayon to split, with awkward scales per block
    let n = 1_000_003;
    let x: Vec<f32> =
        (0..n).map(|i| ((i as f32 * 0.7311).sin() * 3.0) * 10f32.powi((i / 256 % 7) as i32 - 4)).collect();
    for signed in [true, false] {
        let map = dynamic_map(signed);
        let lut = CodeLut::new(&map);
        let x: Vec<f32> = if signed { x.clone() } else { x.iter().map(|v| v.abs()).collect() };
        let nb = num_blocks(n, 256);
        let (mut codes, mut absmax) = (vec![0u8; n], vec![0f32; nb]);
        quantize_blockwise_lut(&x, &lut, 256, &mut codes, &mut absmax);
        for (b, &want) in absmax.iter().enumerate() {
            let r = b * 256..((b + 1) * 256).min(n);
            let mut c = vec![0u8; r.len()];
            let a = lut.quantize_block(&x[r.clone()], &mut c);
            assert_eq!(a.to_bits(), want.to_bits(), "block {b}");
            assert_eq!(c, &codes[r], "block {b}");
        }
    }
}
