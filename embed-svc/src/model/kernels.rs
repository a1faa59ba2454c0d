//! Element-wise steps of the forward pass (softmax, GELU, layer norm), compiled for AVX-512,
//! AVX2 and baseline x86-64 and picked at run time by `multiversion`.
//!
//! Why hand-shaped loops: `f32::exp` is a libm call that LLVM cannot vectorize, and strict
//! floating-point order keeps sums scalar. Softmax and GELU evaluate about 25 exponentials per
//! token and layer for every head and intermediate unit, so scalar `exp` took about a quarter of
//! the whole forward pass. Here `exp` is a branch-free polynomial and sums run in 16 lanes, so
//! the compiler turns each loop into full-width vector code.

use multiversion::multiversion;

/// Lanes of the partial sums: one AVX-512 register of f32.
const LANES: usize = 16;

/// `e^x` within 2 ulp for x in [-87, 88] (Cephes `expf` polynomial), branch-free so it
/// vectorizes. Below the range it returns ~1e-38 instead of 0, which no caller can tell apart.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let poly = p * r * r + r + 1.0;
    // n sits in the low bits of `shifted`; move it into the exponent field of 2^n.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    poly * two_n
}

/// Sum of `values` in 16 independent lanes (vectorizes; order differs from a sequential sum
/// only in rounding).
#[inline(always)]
fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Largest of `values` (at least one), in 16 lanes.
#[inline(always)]
fn max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l = if *v > *l { *v } else { *l };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Softmax of every `len`-long row of `scores`, in place.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
pub(crate) fn softmax_rows(scores: &mut [f32], len: usize) {
    for row in scores.chunks_mut(len) {
        let top = max(row);
        for v in row.iter_mut() {
            *v = exp(*v - top);
        }
        let inv = 1.0 / sum(row);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// Exact (erf) GELU, BERT's "gelu", in place.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
pub(crate) fn gelu(values: &mut [f32]) {
    for v in values.iter_mut() {
        let x = *v;
        *v = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// erf with absolute error < 1.5e-7 (Abramowitz & Stegun 7.1.26).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let (a1, a2, a3, a4, a5, p) = (
        0.254_829_6_f32,
        -0.284_496_74_f32,
        1.421_413_7_f32,
        -1.453_152_1_f32,
        1.061_405_4_f32,
        0.327_591_1_f32,
    );
    let ax = x.abs();
    let t = 1.0 / (1.0 + p * ax);
    let y = 1.0 - ((((a5 * t + a4) * t + a3) * t + a2) * t + a1) * t * exp(-ax * ax);
    y.copysign(x)
}

/// `row = LayerNorm(row + residual)` for every `gamma.len()`-long row of `x`.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
pub(crate) fn add_layer_norm(
    x: &mut [f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    let h = gamma.len();
    for (i, row) in x.chunks_mut(h).enumerate() {
        if let Some(res) = residual {
            for (v, r) in row.iter_mut().zip(&res[i * h..(i + 1) * h]) {
                *v += r;
            }
        }
        let n = h as f32;
        let mean = sum(row) / n;
        let mut lanes = [0f32; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(chunk) {
                *l += (v - mean) * (v - mean);
            }
        }
        let var = (lanes.iter().sum::<f32>()
            + chunks
                .remainder()
                .iter()
                .map(|v| (v - mean) * (v - mean))
                .sum::<f32>())
            / n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0f32;
        for i in -87_000..=88_000 {
            let x = i as f32 / 1000.0;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp(-1000.0) < 1e-37);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn erf_is_accurate() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (-2.0, -0.995_322_3),
            (4.0, 1.0),
        ] {
            assert!((erf(x) - want).abs() < 3e-7, "erf({x}) = {}", erf(x));
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_order() {
        // 2 rows of 37 (not a multiple of the lanes), large values to test the max shift.
        let mut scores: Vec<f32> = (0..74).map(|i| (i % 37) as f32 + 50.0).collect();
        softmax_rows(&mut scores, 37);
        for row in scores.chunks(37) {
            let total: f32 = row.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "row sums to {total}");
            assert!(row.windows(2).all(|w| w[0] < w[1]));
            // The largest entry: 1 / Σ_k e^(-k) over k = 0..36.
            let want = 1.0 / (0..37).map(|k| (-(k as f64)).exp()).sum::<f64>();
            assert!((row[36] as f64 - want).abs() < 1e-6);
        }
    }

    #[test]
    fn gelu_matches_the_definition() {
        let mut values: Vec<f32> = (-40..=40).map(|i| i as f32 / 8.0).collect();
        let inputs = values.clone();
        gelu(&mut values);
        for (x, got) in inputs.iter().zip(&values) {
            // 0.5·x·(1 + erf(x/√2)) in f64 with a series-free erf: integrate numerically.
            let x64 = *x as f64;
            let steps = 20_000;
            let z = x64 / std::f64::consts::SQRT_2;
            let h = z / steps as f64;
            let integral: f64 = (0..steps)
                .map(|k| {
                    let t = (k as f64 + 0.5) * h;
                    (-t * t).exp()
                })
                .sum::<f64>()
                * h;
            let want = 0.5 * x64 * (1.0 + 2.0 / std::f64::consts::PI.sqrt() * integral);
            assert!(
                (*got as f64 - want).abs() < 2e-6,
                "gelu({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn layer_norm_normalizes_each_row() {
        let h = 40;
        let mut x: Vec<f32> = (0..2 * h).map(|i| (i * i % 17) as f32).collect();
        let residual: Vec<f32> = (0..2 * h).map(|i| i as f32 * 0.1).collect();
        let gamma = vec![2.0; h];
        let beta = vec![0.5; h];
        let summed: Vec<f32> = x.iter().zip(&residual).map(|(a, b)| a + b).collect();
        add_layer_norm(&mut x, Some(&residual), &gamma, &beta, 1e-12);
        for (row, input) in x.chunks(h).zip(summed.chunks(h)) {
            let mean = input.iter().sum::<f32>() / h as f32;
            let var = input.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / h as f32;
            for (got, v) in row.iter().zip(input) {
                let want = (v - mean) / var.sqrt() * 2.0 + 0.5;
                assert!((got - want).abs() < 1e-4, "{got} vs {want}");
            }
        }
    }
}
