//! Linear layers with bf16 weights and inputs and f32 accumulation, on CPUs with AVX-512 BF16
//! (`vdpbf16ps`: 32 multiply-adds per instruction, twice the f32 FMA rate).
//!
//! Why our own kernel: no maintained Rust GEMM crate has a bf16 dot-product path (`gemm` does
//! f32/f64/f16 only), and the linear layers are ~90% of the model's arithmetic. Rounding weights
//! and activations to bf16 moves the embeddings by less than 3e-5 in cosine on the reference set
//! (the bar is 1e-3); `embeds_match_the_f32_path` in `bert` keeps that checked.
//!
//! Layout: weights are packed once at load into 16-column strips; in a strip, each pair of input
//! rows `(2t, 2t+1)` is one 64-byte block holding, per column, the two bf16 values as one u32 —
//! exactly the operand `vdpbf16ps` wants. Activations are converted per call into rows of u32
//! pairs, and one pair is broadcast to every lane.

use rayon::prelude::*;

/// Columns per strip: one AVX-512 register of f32.
pub(crate) const STRIP: usize = 16;
/// Rows of the register tile.
const MR: usize = 8;
/// Strips of the register tile (8 × 3 = 24 accumulators of the 32 registers).
const NS: usize = 3;
/// Rows per parallel task: its slice of activations stays in L2 with a panel of weights.
const ROWS_PER_TASK: usize = 64;
/// Strips per parallel task.
const STRIPS_PER_TASK: usize = 6;

/// One 64-byte block: 16 columns × (2 consecutive input rows) of bf16.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Block([u32; STRIP]);

/// Whether this CPU runs the bf16 kernel.
pub(crate) fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `f32 → bf16` with round-to-nearest-even (the rounding `vcvtne2ps2bf16` does too).
#[inline(always)]
fn bf16_bits(v: f32) -> u32 {
    let b = v.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16
}

/// A weight matrix `[inputs, outputs]` packed for the kernel.
pub(crate) struct PackedWeights {
    blocks: Vec<Block>,
    inputs: usize,
    /// Input-row pairs (`ceil(inputs / 2)`).
    pairs: usize,
    outputs: usize,
}

impl PackedWeights {
    /// Packs row-major `weight[inputs × outputs]`; `outputs` must be a multiple of 16 and the
    /// CPU must have AVX-512 BF16 (so that `forward`, a safe function, can run the kernel).
    pub(crate) fn pack(weight: &[f32], inputs: usize, outputs: usize) -> Self {
        assert!(supported(), "this CPU has no AVX-512 BF16");
        assert!(
            outputs.is_multiple_of(STRIP),
            "outputs must be a multiple of {STRIP}"
        );
        assert_eq!(weight.len(), inputs * outputs);
        let pairs = inputs.div_ceil(2);
        let strips = outputs / STRIP;
        let mut blocks = vec![Block::default(); strips * pairs];
        let at = |row: usize, col: usize| {
            if row < inputs {
                bf16_bits(weight[row * outputs + col])
            } else {
                0
            }
        };
        for s in 0..strips {
            for t in 0..pairs {
                let block = &mut blocks[s * pairs + t].0;
                for (l, lane) in block.iter_mut().enumerate() {
                    let col = s * STRIP + l;
                    *lane = at(2 * t, col) | (at(2 * t + 1, col) << 16);
                }
            }
        }
        Self {
            blocks,
            inputs,
            pairs,
            outputs,
        }
    }

    /// Converts `rows` rows of `x[rows × inputs]` into the kernel's activation layout.
    pub(crate) fn convert_input(&self, x: &[f32], rows: usize, out: &mut Vec<u32>) {
        assert_eq!(
            x.len(),
            rows * self.inputs,
            "activations of the wrong shape"
        );
        out.clear();
        out.resize(rows * self.pairs, 0);
        if rows > 0 && self.inputs > 0 {
            convert_rows(x, self.inputs, self.pairs, out);
        }
    }

    /// `out[rows × outputs] = a · W + bias`, with `a` from [`Self::convert_input`].
    pub(crate) fn forward(&self, a: &[u32], rows: usize, bias: &[f32], out: &mut [f32]) {
        let n = self.outputs;
        assert!(a.len() >= rows * self.pairs, "activations too short");
        assert!(out.len() >= rows * n, "output too short");
        assert_eq!(bias.len(), n);
        if rows == 0 {
            return;
        }
        let strips = n / STRIP;
        let row_tasks = rows.div_ceil(ROWS_PER_TASK);
        let strip_tasks = strips.div_ceil(STRIPS_PER_TASK);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let task = |i: usize| {
            let (rt, st) = (i / strip_tasks, i % strip_tasks);
            let r0 = rt * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(rows);
            let s0 = st * STRIPS_PER_TASK;
            let s1 = (s0 + STRIPS_PER_TASK).min(strips);
            // SAFETY: tasks cover disjoint (row range × strip range) tiles of `out`, all inside
            // `rows × n` (asserted above); the CPU has AVX-512 BF16 (`pack` asserts it, and a
            // `PackedWeights` only comes from `pack`).
            unsafe { self.tile(a, r0..r1, s0..s1, bias, out_ptr) };
        };
        let tasks = row_tasks * strip_tasks;
        if tasks > 1 {
            (0..tasks).into_par_iter().for_each(task);
        } else {
            task(0);
        }
    }

    /// Computes rows `rows` × strips `strips` of the output.
    ///
    /// # Safety
    /// No other thread may write that tile of `out` while this runs; it must lie inside the
    /// `rows × outputs` matrix `out` points to; the CPU must support AVX-512 BF16.
    unsafe fn tile(
        &self,
        a: &[u32],
        rows: std::ops::Range<usize>,
        strips: std::ops::Range<usize>,
        bias: &[f32],
        out: SendPtr,
    ) {
        let n = self.outputs;
        let mut s = strips.start;
        while s < strips.end {
            let ns = (strips.end - s).min(NS);
            let mut r = rows.start;
            while r < rows.end {
                let mr = (rows.end - r).min(MR);
                let args = KernelArgs {
                    a: a[r * self.pairs..].as_ptr(),
                    pairs: self.pairs,
                    b: self.blocks[s * self.pairs..].as_ptr(),
                    bias: bias[s * STRIP..].as_ptr(),
                    // SAFETY: (r, s·16) is inside `out` (caller's contract).
                    c: unsafe { out.0.add(r * n + s * STRIP) },
                    ldc: n,
                };
                // SAFETY: the kernel reads `mr` rows of `pairs` u32 from `a` (in bounds: `a`
                // holds `rows × pairs`), `ns` strips of `pairs` blocks from `b` (s + ns ≤
                // strips), `ns·16` biases, and writes an `mr × ns·16` tile of `out`.
                unsafe { kernel_dispatch(mr, ns, &args) };
                r += mr;
            }
            s += ns;
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used to hand disjoint output tiles to rayon tasks (see `forward`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Converts f32 rows into u32 bf16 pairs, padding an odd last column with zero.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
fn convert_rows(x: &[f32], inputs: usize, pairs: usize, out: &mut [u32]) {
    for (src, dst) in x.chunks(inputs).zip(out.chunks_mut(pairs)) {
        let mut even = src.chunks_exact(2);
        for (d, p) in dst.iter_mut().zip(&mut even) {
            *d = bf16_bits(p[0]) | (bf16_bits(p[1]) << 16);
        }
        if let [last] = even.remainder() {
            dst[pairs - 1] = bf16_bits(*last);
        }
    }
}

struct KernelArgs {
    a: *const u32,
    pairs: usize,
    b: *const Block,
    bias: *const f32,
    c: *mut f32,
    ldc: usize,
}

/// Picks the kernel instance for an `mr × ns` tile.
///
/// # Safety
/// As [`kernel`].
unsafe fn kernel_dispatch(mr: usize, ns: usize, args: &KernelArgs) {
    macro_rules! go {
        ($($m:literal)*) => {
            match (mr, ns) {
                $(($m, 1) => unsafe { kernel::<$m, 1>(args) },
                  ($m, 2) => unsafe { kernel::<$m, 2>(args) },
                  ($m, 3) => unsafe { kernel::<$m, 3>(args) },)*
                _ => unreachable!("tile {mr}×{ns}"),
            }
        };
    }
    go!(1 2 3 4 5 6 7 8)
}

/// `c[M × 16·S] = a[M × 2·pairs] · b + bias` for one register tile.
///
/// # Safety
/// `a` holds `M` rows of `pairs` u32 at stride `pairs`; `b` holds `S` strips of `pairs` blocks at
/// stride `pairs`; `bias` has `16·S` floats; `c` has `M` rows of `16·S` floats at stride `ldc`
/// that nobody else accesses; the CPU supports AVX-512F and AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const M: usize, const S: usize>(args: &KernelArgs) {
    use std::arch::x86_64::*;
    let KernelArgs {
        a,
        pairs,
        b,
        bias,
        c,
        ldc,
    } = *args;
    // SAFETY (whole body): every pointer offset below stays inside the regions the caller
    // guarantees; loads and stores are unaligned-tolerant.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); S]; M];
        for row in acc.iter_mut() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(bias.add(j * STRIP));
            }
        }
        for t in 0..pairs {
            let mut w = [_mm512_setzero_si512(); S];
            for (j, v) in w.iter_mut().enumerate() {
                *v = _mm512_load_si512(b.add(j * pairs + t) as *const __m512i);
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_epi32(a.add(i * pairs + t).read() as i32);
                for (j, v) in row.iter_mut().enumerate() {
                    // Same 512 bits, seen as 32 bf16 values.
                    *v = _mm512_dpbf16_ps(
                        *v,
                        std::mem::transmute::<__m512i, __m512bh>(x),
                        std::mem::transmute::<__m512i, __m512bh>(w[j]),
                    );
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                _mm512_storeu_ps(c.add(i * ldc + j * STRIP), *v);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const M: usize, const S: usize>(_: &KernelArgs) {
    unreachable!("the bf16 path is only chosen on x86-64 with AVX-512 BF16")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_round(v: f32) -> f32 {
        f32::from_bits(bf16_bits(v) << 16)
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(bf16_round(1.0), 1.0);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(bf16_round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(bf16_round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(bf16_round(-2.5), -2.5);
    }

    #[test]
    #[cfg_attr(
        not(cpu_avx512bf16),
        ignore = "this CPU has no AVX-512 BF16: the bf16 kernel cannot run here"
    )]
    fn forward_matches_a_naive_product_of_the_rounded_values() {
        assert!(
            supported(),
            "built for a CPU with AVX-512 BF16, running on one without"
        );
        // Shapes with every kind of tail: odd inputs, rows not a multiple of 8 or of a task,
        // strips not a multiple of 3 or of a task.
        for (rows, inputs, outputs) in [(1, 7, 16), (13, 33, 80), (70, 64, 112), (130, 385, 208)] {
            let weight: Vec<f32> = (0..inputs * outputs)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let x: Vec<f32> = (0..rows * inputs)
                .map(|i| ((i * 104_729) % 997) as f32 / 300.0 - 1.5)
                .collect();
            let bias: Vec<f32> = (0..outputs).map(|i| i as f32 * 0.01).collect();
            let packed = PackedWeights::pack(&weight, inputs, outputs);
            let mut a = Vec::new();
            packed.convert_input(&x, rows, &mut a);
            let mut out = vec![f32::NAN; rows * outputs];
            packed.forward(&a, rows, &bias, &mut out);
            for r in 0..rows {
                for c in 0..outputs {
                    let want: f64 = bias[c] as f64
                        + (0..inputs)
                            .map(|k| {
                                bf16_round(x[r * inputs + k]) as f64
                                    * bf16_round(weight[k * outputs + c]) as f64
                            })
                            .sum::<f64>();
                    let got = out[r * outputs + c] as f64;
                    assert!(
                        (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                        "{rows}×{inputs}×{outputs} at ({r},{c}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
