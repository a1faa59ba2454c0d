//! BERT encoder forward pass on packed (unpadded) token sequences.
//!
//! Why not `candle_transformers::models::bert::BertModel`: on this 2-core CPU it spent about two
//! thirds of its time outside matrix products (single-threaded element-wise ops, a fresh
//! page-faulted allocation per op, padding) and ran 2-2.5x slower than this. Here candle still
//! reads the weights, but the forward pass runs the same math on packed rows: each linear layer
//! is one multi-threaded gemm over all tokens of the batch, attention runs per (sequence, head)
//! in parallel, and there is no padding, so a text's embedding cannot depend on its batch.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use candle_core::{Device, Tensor};
use candle_transformers::models::bert::{Config, HiddenAct};
use gemm::Parallelism;
use rayon::prelude::*;

use super::bf16::{self, PackedWeights};
use super::kernels;

/// Below this many tokens per call, the cheap steps (attention, norms, gelu) stay on the calling
/// thread: handing tiny pieces of work to other threads costs more than it saves, especially on
/// a loaded machine, and that decides the latency of single queries.
const PARALLEL_MIN_TOKENS: usize = 128;

/// A BERT encoder's weights, laid out for `x · W` products on row-major activations.
pub(crate) struct Bert {
    hidden: usize,
    heads: usize,
    intermediate: usize,
    max_positions: usize,
    eps: f32,
    /// `[vocab, hidden]`.
    word: Vec<f32>,
    /// `[max_positions, hidden]`, with token type 0 already added (we never use type 1).
    position_and_type: Vec<f32>,
    embed_norm: Norm,
    layers: Vec<Layer>,
}

struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

struct Layer {
    /// Query, key and value fused: `[hidden, 3 * hidden]`, so one gemm computes all three.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    up: Linear,
    down: Linear,
    out_norm: Norm,
}

/// A linear layer stored transposed (`[in, out]`) with its bias.
struct Linear {
    weight: Weight,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

/// How a linear layer's weights are held and multiplied.
enum Weight {
    /// Row-major f32, multiplied by `gemm`.
    F32(Vec<f32>),
    /// Packed bf16 for the AVX-512 BF16 kernel.
    Bf16(PackedWeights),
}

/// Arithmetic of the model's linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    /// Where the CPU has AVX-512 BF16, both paths are timed on a sample batch when the model
    /// loads and the faster is kept (bf16 only if clearly faster: f32 is exact); else f32.
    #[default]
    Auto,
    /// bf16 products with f32 sums where the CPU has AVX-512 BF16 (cosine to the f32 result
    /// above 0.9999), else f32. Faster on some such CPUs (1.5x on an AMD EPYC), slower on
    /// others (0.7x on an Intel Xeon).
    Bf16,
    /// f32 everywhere.
    F32,
}

/// Token sequences [`Precision::Auto`] times both paths on: 1,024 tokens, the size of the
/// pieces documents run in while searches come in.
fn timing_sample() -> Vec<Vec<u32>> {
    (0..8u32)
        .map(|s| {
            let mut ids = vec![101];
            ids.extend((0..126u32).map(|i| 1000 + (s * 131 + i * 7919) % 20000));
            ids.push(102);
            ids
        })
        .collect()
}

/// Rounds [`Precision::Auto`] times each path (after one untimed run each); the fastest round
/// counts, so a busy moment on the machine does not decide.
const TIMING_ROUNDS: usize = 3;

/// Whether bf16 is worth keeping: it must beat f32 by 5 %, since f32 is exact.
fn bf16_wins(bf16: std::time::Duration, f32: std::time::Duration) -> bool {
    bf16.as_secs_f64() < f32.as_secs_f64() * 0.95
}

impl Bert {
    /// Reads a BERT checkpoint (`config.json` already parsed) from a safetensors file.
    pub(crate) fn load(
        weights: &Path,
        config: &Config,
        precision: Precision,
    ) -> anyhow::Result<Self> {
        if config.hidden_act != HiddenAct::Gelu {
            bail!(
                "unsupported activation {:?} (only exact gelu)",
                config.hidden_act
            );
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            bail!("hidden size is not a multiple of the head count");
        }
        let bytes =
            std::fs::read(weights).with_context(|| format!("reading {}", weights.display()))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("parsing {}", weights.display()))?;
        drop(bytes);
        // Some exports prefix every name with the model type.
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, v)| (k.strip_prefix("bert.").map(str::to_string).unwrap_or(k), v))
            .collect();
        match precision {
            Precision::F32 => Self::build(&tensors, config, false),
            Precision::Bf16 => Self::build(&tensors, config, bf16::supported()),
            Precision::Auto if !bf16::supported() => Self::build(&tensors, config, false),
            Precision::Auto => {
                let fast = Self::build(&tensors, config, true)?;
                let exact = Self::build(&tensors, config, false)?;
                drop(tensors);
                Self::faster(fast, exact)
            }
        }
    }

    /// Of the bf16 and f32 builds of one model, the one faster on this CPU now.
    ///
    /// AVX-512 BF16 does not make every CPU faster: bf16 took 0.7x the time of f32 on an AMD
    /// EPYC and 1.4x on an Intel Xeon (both 2 cores), so the flag alone cannot decide.
    fn faster(fast: Self, exact: Self) -> anyhow::Result<Self> {
        let sample = timing_sample();
        let refs: Vec<&[u32]> = sample.iter().map(Vec::as_slice).collect();
        let mut best = [std::time::Duration::MAX; 2];
        for round in 0..=TIMING_ROUNDS {
            for (model, best) in [&fast, &exact].into_iter().zip(&mut best) {
                let started = std::time::Instant::now();
                model.embed(&refs)?;
                if round > 0 {
                    *best = (*best).min(started.elapsed());
                }
            }
        }
        let keep_bf16 = bf16_wins(best[0], best[1]);
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
        tracing::info!(
            bf16_ms = ms(best[0]),
            f32_ms = ms(best[1]),
            kept = if keep_bf16 { "bf16" } else { "f32" },
            "timed the model's bf16 and f32 paths on 1,024 tokens"
        );
        Ok(if keep_bf16 { fast } else { exact })
    }

    /// Whether the linear layers multiply in bf16 (as their packed weights say).
    pub(crate) fn uses_bf16(&self) -> bool {
        self.layers
            .iter()
            .any(|l| matches!(l.qkv.weight, Weight::Bf16(_)))
    }

    /// The model from parsed tensors, its linear layers in bf16 if `use_bf16`.
    fn build(
        tensors: &HashMap<String, Tensor>,
        config: &Config,
        use_bf16: bool,
    ) -> anyhow::Result<Self> {
        let get = |name: &str, shape: &[usize]| -> anyhow::Result<Tensor> {
            let t = tensors
                .get(name)
                .ok_or_else(|| anyhow!("missing tensor {name}"))?;
            if t.dims() != shape {
                bail!("tensor {name} has shape {:?}, expected {shape:?}", t.dims());
            }
            Ok(t.to_dtype(candle_core::DType::F32)?)
        };
        let flat =
            |t: Tensor| -> anyhow::Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let (h, inter) = (config.hidden_size, config.intermediate_size);
        let norm = |prefix: &str| -> anyhow::Result<Norm> {
            Ok(Norm {
                gamma: flat(get(&format!("{prefix}.weight"), &[h])?)?,
                beta: flat(get(&format!("{prefix}.bias"), &[h])?)?,
            })
        };
        // PyTorch stores `[out, in]`; transpose once here so activations multiply on the left.
        let linear = |prefixes: &[&str], inputs: usize, outputs: usize| -> anyhow::Result<Linear> {
            let mut weights = Vec::new();
            let mut biases = Vec::new();
            for p in prefixes {
                weights.push(get(&format!("{p}.weight"), &[outputs, inputs])?);
                biases.push(get(&format!("{p}.bias"), &[outputs])?);
            }
            let weight = flat(Tensor::cat(&weights, 0)?.t()?.contiguous()?)?;
            let outputs = outputs * prefixes.len();
            let weight = if use_bf16 && outputs.is_multiple_of(bf16::STRIP) {
                Weight::Bf16(PackedWeights::pack(&weight, inputs, outputs))
            } else {
                Weight::F32(weight)
            };
            Ok(Linear {
                weight,
                bias: flat(Tensor::cat(&biases, 0)?)?,
                inputs,
                outputs,
            })
        };

        let word = flat(get(
            "embeddings.word_embeddings.weight",
            &[config.vocab_size, h],
        )?)?;
        let positions = get(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, h],
        )?;
        let types = get(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, h],
        )?;
        let position_and_type = flat(positions.broadcast_add(&types.get(0)?)?)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let attn = format!("{p}.attention.self");
            layers.push(Layer {
                qkv: linear(
                    &[
                        &format!("{attn}.query"),
                        &format!("{attn}.key"),
                        &format!("{attn}.value"),
                    ],
                    h,
                    h,
                )?,
                attn_out: linear(&[&format!("{p}.attention.output.dense")], h, h)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                up: linear(&[&format!("{p}.intermediate.dense")], h, inter)?,
                down: linear(&[&format!("{p}.output.dense")], inter, h)?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        Ok(Self {
            hidden: h,
            heads: config.num_attention_heads,
            intermediate: inter,
            max_positions: config.max_position_embeddings,
            eps: config.layer_norm_eps as f32,
            word,
            position_and_type,
            embed_norm: norm("embeddings.LayerNorm")?,
            layers,
        })
    }

    /// Mean-pooled, L2-normalized embeddings of token sequences (each with its special tokens).
    pub(crate) fn embed(&self, sequences: &[&[u32]]) -> anyhow::Result<Vec<Vec<f32>>> {
        let h = self.hidden;
        let vocab = self.word.len() / h;
        let mut offsets = Vec::with_capacity(sequences.len() + 1);
        offsets.push(0);
        for s in sequences {
            if s.len() > self.max_positions {
                bail!(
                    "sequence of {} tokens exceeds {} positions",
                    s.len(),
                    self.max_positions
                );
            }
            if let Some(bad) = s.iter().find(|&&id| id as usize >= vocab) {
                bail!("token id {bad} outside the vocabulary");
            }
            offsets.push(offsets.last().unwrap() + s.len());
        }
        let total = *offsets.last().unwrap();
        let par = total >= PARALLEL_MIN_TOKENS;
        let mut x = vec![0f32; total * h];
        let positions = sequences.iter().flat_map(|s| s.iter().enumerate());
        for (row, (pos, &id)) in x.chunks_mut(h).zip(positions) {
            let word = &self.word[id as usize * h..][..h];
            let extra = &self.position_and_type[pos * h..][..h];
            for ((r, w), e) in row.iter_mut().zip(word).zip(extra) {
                *r = w + e;
            }
        }
        layer_norm_rows(&mut x, None, &self.embed_norm, self.eps, par);

        let mut qkv = vec![0f32; total * 3 * h];
        let mut context = vec![0f32; total * h];
        let mut projected = vec![0f32; total * h];
        let mut up = vec![0f32; total * self.intermediate];
        let mut scratch = Vec::new();
        for layer in &self.layers {
            layer.qkv.forward(&x, &mut qkv, total, &mut scratch);
            self.attention(&qkv, &offsets, &mut context, par);
            layer
                .attn_out
                .forward(&context, &mut projected, total, &mut scratch);
            layer_norm_rows(&mut x, Some(&projected), &layer.attn_norm, self.eps, par);
            layer.up.forward(&x, &mut up, total, &mut scratch);
            let up = &mut up[..total * self.intermediate];
            if par {
                up.par_chunks_mut(4096).for_each(kernels::gelu);
            } else {
                kernels::gelu(up);
            }
            layer.down.forward(up, &mut projected, total, &mut scratch);
            layer_norm_rows(&mut x, Some(&projected), &layer.out_norm, self.eps, par);
        }

        Ok(offsets
            .windows(2)
            .map(|w| {
                let mut mean = vec![0f32; h];
                for row in x[w[0] * h..w[1] * h].chunks(h) {
                    mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
                }
                let n = (w[1] - w[0]).max(1) as f32;
                mean.iter_mut().for_each(|m| *m /= n);
                // Same epsilon as torch's F.normalize.
                let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                mean.iter_mut().for_each(|m| *m /= norm);
                mean
            })
            .collect())
    }

    /// Multi-head self-attention of each sequence over itself; writes `[tokens, hidden]`.
    fn attention(&self, qkv: &[f32], offsets: &[usize], context: &mut [f32], par: bool) {
        let h = self.hidden;
        let d = h / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        let tasks: Vec<(usize, usize)> = (0..offsets.len() - 1)
            .flat_map(|s| (0..self.heads).map(move |head| (s, head)))
            .collect();
        // Each (sequence, head) is independent; results are gathered, then scattered in place.
        let head_attention = |&(s, head): &(usize, usize)| {
            let (start, len) = (offsets[s], offsets[s + 1] - offsets[s]);
            let rows = &qkv[start * 3 * h..(start + len) * 3 * h];
            let q = &rows[head * d..];
            let k = &rows[h + head * d..];
            let v = &rows[2 * h + head * d..];
            let mut scores = vec![0f32; len * len];
            // scores = q · kᵀ · scale, reading kᵀ through strides.
            matmul(
                Out {
                    data: &mut scores,
                    rs: len,
                },
                (len, len, d),
                View {
                    data: q,
                    rs: 3 * h,
                    cs: 1,
                },
                View {
                    data: k,
                    rs: 1,
                    cs: 3 * h,
                },
                false,
                scale,
                Parallelism::None,
            );
            kernels::softmax_rows(&mut scores, len);
            let mut out = vec![0f32; len * d];
            matmul(
                Out {
                    data: &mut out,
                    rs: d,
                },
                (len, d, len),
                View {
                    data: &scores,
                    rs: len,
                    cs: 1,
                },
                View {
                    data: v,
                    rs: 3 * h,
                    cs: 1,
                },
                false,
                1.0,
                Parallelism::None,
            );
            out
        };
        let outputs: Vec<Vec<f32>> = if par {
            tasks.par_iter().map(head_attention).collect()
        } else {
            tasks.iter().map(head_attention).collect()
        };
        for (&(s, head), out) in tasks.iter().zip(outputs) {
            for (t, row) in out.chunks(d).enumerate() {
                let at = (offsets[s] + t) * h + head * d;
                context[at..at + d].copy_from_slice(row);
            }
        }
    }
}

impl Linear {
    /// `out[rows, outputs] = x[rows, inputs] · W + b`; `scratch` holds converted inputs.
    fn forward(&self, x: &[f32], out: &mut [f32], rows: usize, scratch: &mut Vec<u32>) {
        let x = &x[..rows * self.inputs];
        let out = &mut out[..rows * self.outputs];
        let weight = match &self.weight {
            Weight::Bf16(packed) => {
                packed.convert_input(x, rows, scratch);
                packed.forward(scratch, rows, &self.bias, out);
                return;
            }
            Weight::F32(weight) => weight,
        };
        // Start from the bias and let gemm accumulate: saves a pass over the output.
        out.chunks_mut(self.outputs)
            .for_each(|row| row.copy_from_slice(&self.bias));
        matmul(
            Out {
                data: out,
                rs: self.outputs,
            },
            (rows, self.outputs, self.inputs),
            View {
                data: x,
                rs: self.inputs,
                cs: 1,
            },
            View {
                data: weight,
                rs: self.outputs,
                cs: 1,
            },
            true,
            1.0,
            // gemm itself stays on one thread when the product is too small to split.
            Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

/// A strided matrix operand.
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// A row-major destination with row stride `rs`.
struct Out<'a> {
    data: &'a mut [f32],
    rs: usize,
}

/// `dst (+)= scale · lhs[m×k] · rhs[k×n]`; checks every access is in bounds so callers stay safe.
fn matmul(
    dst: Out<'_>,
    (m, n, k): (usize, usize, usize),
    lhs: View<'_>,
    rhs: View<'_>,
    accumulate: bool,
    scale: f32,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        dst.rs >= n && last(m, n, dst.rs, 1) < dst.data.len(),
        "gemm dst out of bounds"
    );
    if k == 0 {
        if !accumulate {
            dst.data.iter_mut().for_each(|v| *v = 0.0);
        }
        return;
    }
    assert!(
        last(m, k, lhs.rs, lhs.cs) < lhs.data.len(),
        "gemm lhs out of bounds"
    );
    assert!(
        last(k, n, rhs.rs, rhs.cs) < rhs.data.len(),
        "gemm rhs out of bounds"
    );
    // SAFETY: the asserts above bound every element gemm reads or writes; `dst` is a unique
    // borrow, so it cannot alias `lhs` or `rhs`; dst rows don't overlap since dst.rs >= n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `x = LayerNorm(x + residual)` row by row, in parallel when `par`.
fn layer_norm_rows(x: &mut [f32], residual: Option<&[f32]>, norm: &Norm, eps: f32, par: bool) {
    let h = norm.gamma.len();
    // Rows per parallel task: enough work to be worth a hand-off.
    let rows = 16;
    let apply = |(x, residual): (&mut [f32], Option<&[f32]>)| {
        kernels::add_layer_norm(x, residual, &norm.gamma, &norm.beta, eps)
    };
    match (residual, par) {
        (Some(res), true) => x
            .par_chunks_mut(rows * h)
            .zip(res.par_chunks(rows * h))
            .for_each(|(x, r)| apply((x, Some(r)))),
        (None, true) => x.par_chunks_mut(rows * h).for_each(|x| apply((x, None))),
        (residual, false) => apply((x, residual)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real model's weights file and parsed config.
    fn model_files() -> (std::path::PathBuf, Config) {
        let dir = crate::model::ensure_model(
            &crate::model::default_models_dir(),
            &crate::model::MINILM_L6_V2,
        )
        .unwrap();
        let config: Config =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        (dir.join("model.safetensors"), config)
    }

    /// The bf16 path against the f32 one on the real weights. Without AVX-512 BF16 both would
    /// be the f32 path, which proves nothing: ignored there, visibly (the reference-vector tests
    /// in `local` check the path that does run).
    #[test]
    #[cfg_attr(
        not(cpu_avx512bf16),
        ignore = "this CPU has no AVX-512 BF16: there is no bf16 path to compare with f32"
    )]
    fn embeds_match_the_f32_path() {
        assert!(
            super::super::bf16::supported(),
            "built for a CPU with AVX-512 BF16, running on one without"
        );
        let (weights, config) = model_files();
        let fast = Bert::load(&weights, &config, Precision::Bf16).unwrap();
        let exact = Bert::load(&weights, &config, Precision::F32).unwrap();
        assert!(fast.uses_bf16() && !exact.uses_bf16());
        // Token ids of several lengths (1 to 256 tokens, one batch), framed by [CLS] and [SEP].
        let sequences: Vec<Vec<u32>> = [1usize, 9, 17, 64, 200, 254]
            .iter()
            .map(|&n| {
                let mut ids = vec![101];
                ids.extend((0..n as u32).map(|i| 1000 + (i * 7919) % 20000));
                ids.push(102);
                ids
            })
            .collect();
        let refs: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
        for (a, b) in fast
            .embed(&refs)
            .unwrap()
            .iter()
            .zip(exact.embed(&refs).unwrap())
        {
            let cosine: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(
                cosine > 0.9999,
                "cosine {cosine} between the bf16 and f32 paths"
            );
        }
    }

    /// `Auto` keeps one of the two real paths, whole: its embeddings are bit-identical to the
    /// path it reports. Without AVX-512 BF16 that is always f32 (said in the output).
    #[test]
    fn auto_keeps_one_real_path() {
        let (weights, config) = model_files();
        let auto = Bert::load(&weights, &config, Precision::Auto).unwrap();
        if !super::super::bf16::supported() {
            eprintln!("this CPU has no AVX-512 BF16: Auto can only keep f32, checked as such");
            assert!(!auto.uses_bf16());
        }
        let kept = if auto.uses_bf16() {
            Precision::Bf16
        } else {
            Precision::F32
        };
        eprintln!("Auto kept {kept:?} on this CPU");
        let same = Bert::load(&weights, &config, kept).unwrap();
        let sample = timing_sample();
        let refs: Vec<&[u32]> = sample.iter().map(Vec::as_slice).collect();
        assert_eq!(auto.embed(&refs).unwrap(), same.embed(&refs).unwrap());
    }

    #[test]
    fn bf16_is_kept_only_when_clearly_faster() {
        let ms = std::time::Duration::from_millis;
        assert!(bf16_wins(ms(60), ms(100)));
        assert!(!bf16_wins(ms(140), ms(100)), "slower");
        assert!(!bf16_wins(ms(97), ms(100)), "within noise: exact f32 wins");
        let sample = timing_sample();
        assert_eq!(sample.iter().map(Vec::len).sum::<usize>(), 1024);
    }

    #[test]
    fn matmul_matches_naive_with_strides() {
        // lhs 2×3 row-major, rhs given transposed (3×2 read through strides).
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let bt = [1.0, 0.0, -1.0, 2.0, 1.0, 0.5]; // rows of bᵀ: [1,0,-1], [2,1,0.5]
        let mut out = [10.0; 4];
        matmul(
            Out {
                data: &mut out,
                rs: 2,
            },
            (2, 2, 3),
            View {
                data: &a,
                rs: 3,
                cs: 1,
            },
            View {
                data: &bt,
                rs: 1,
                cs: 3,
            },
            true,
            2.0,
            Parallelism::None,
        );
        // a·b = [[-2, 5.5], [-2, 16]]; out = 10 + 2·(a·b).
        assert_eq!(out, [6.0, 21.0, 6.0, 42.0]);
    }
}
