//! What a run learns: image classification (a ViT on an image data set) or next-token prediction
//! (GPT-2 on a BPE token stream). A task turns its data into (input, target) batches on the
//! device and knows how the model is scored: accuracy for images, per-token loss (perplexity)
//! for text. Both share one loss: cross-entropy over the last axis, ignoring [`text::IGNORE`].

use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::Rng;
use tch::{Device, Kind, Reduction, Tensor};

use crate::config::ModelConfig;
use crate::data::augment::Augment;
use crate::data::loader::{read_batch, BatchLoader};
use crate::data::split::HoldOut;
use crate::data::text::{self, TokenCorpus, Window};
use crate::data::{self, ImageData};
use crate::error::{Result, TrainError};
use crate::model::Model;
use crate::models::{Astra, ClsMode, DevicePartition, GroupedVq, LinkLoss};
use crate::precision::bf16_autocast;

pub enum Task {
    Images {
        data: ImageData,
        size: usize,
    },
    /// Evaluation windows start every `stride` tokens (= `context`: disjoint windows).
    Text {
        corpus: TokenCorpus,
        context: usize,
        stride: usize,
    },
}

/// The split a model is scored on: validation (held out of the training data, for selecting a
/// run's best epoch) or test (scored once for the selected model, and by the sweeps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Valid,
    Test,
}

/// Scores of a model on a split.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalMetrics {
    /// Mean cross-entropy per scored example (image or token).
    pub loss: f64,
    /// Top-1 accuracy (images) or next-token accuracy (text).
    pub accuracy: f64,
    /// Scored examples.
    pub count: usize,
}

impl EvalMetrics {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// How tokens are dealt to devices in an evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionMode {
    /// Contiguous equal chunks (the default everywhere).
    Contiguous,
    /// Equal shares, tokens shuffled: a new draw per batch from `seed` + batch index.
    Random { seed: u64 },
    /// Every token to a uniformly random device (shares vary): a new draw per batch.
    Allocation { seed: u64 },
}

impl PartitionMode {
    pub fn partition(
        &self,
        tokens: usize,
        devices: usize,
        batch: usize,
    ) -> Result<DevicePartition> {
        match *self {
            PartitionMode::Contiguous => DevicePartition::contiguous(tokens, devices),
            PartitionMode::Random { seed } => {
                DevicePartition::random(tokens, devices, seed.wrapping_add(batch as u64))
            }
            PartitionMode::Allocation { seed } => {
                DevicePartition::random_allocation(tokens, devices, seed.wrapping_add(batch as u64))
            }
        }
    }
}

/// How the model runs in an ASTRA evaluation: N devices, how tokens are dealt, the CLS mode, the
/// quantizers (None: full-precision exchange) and the probability that a remote token's indices
/// are lost on a link (0: none).
pub struct AstraEval<'a> {
    pub devices: usize,
    pub partition: PartitionMode,
    pub cls: ClsMode,
    pub vq: Option<&'a mut [GroupedVq]>,
    pub link_loss: f64,
}

/// The scores of one evaluation batch, with the FPAR of its partition (1 for the plain model).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchScore {
    pub fpar: f64,
    pub loss_sum: f64,
    pub correct: i64,
    pub count: i64,
}

impl EvalMetrics {
    /// Aggregates batch scores.
    pub fn from_batches(b: &[BatchScore]) -> Self {
        let (sum, correct, count) = b.iter().fold((0.0, 0i64, 0i64), |(s, c, n), x| {
            (s + x.loss_sum, c + x.correct, n + x.count)
        });
        let n = count.max(1) as f64;
        EvalMetrics {
            loss: sum / n,
            accuracy: correct as f64 / n,
            count: count as usize,
        }
    }
}

/// Cross-entropy of logits [.., V] against targets [..] (mean over non-ignored targets).
pub fn loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let v = *logits.size().last().expect("logits have a class axis");
    logits
        .reshape([-1, v])
        .to_kind(Kind::Float)
        .cross_entropy_loss::<Tensor>(
            &targets.reshape([-1]),
            None,
            Reduction::Mean,
            text::IGNORE,
            0.0,
        )
}

/// A training step's forward pass: the task loss (the mean over kept targets), how many kept
/// targets the argmax hits (no grad), and ASTRA's summed commitment.
pub struct StepLoss {
    pub loss: Tensor,
    pub hits: Tensor,
    pub commitment: Option<Tensor>,
}

/// The forward pass and loss of a training step, plain or under `astra`. A language model on a
/// device with the CUDA kernels takes its loss through the fused head
/// ([`crate::models::lm_head`]), which never forms the logits, unless `ASTRA_LM_LOSS=unfused`
/// (the logits and [`loss`], kept to measure the difference). Elsewhere the logits are formed:
/// the fused head's ATen form measured slower than autograd's cross-entropy.
pub fn step_loss(model: &Model, x: &Tensor, y: &Tensor, astra: Option<Astra>) -> Result<StepLoss> {
    static UNFUSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let unfused =
        *UNFUSED.get_or_init(|| std::env::var("ASTRA_LM_LOSS").is_ok_and(|v| v == "unfused"));
    let m = model.astra_model();
    let fused = !unfused && crate::cuda::kernels(x.device()).is_some();
    if let Some(head) = m.lm_head().filter(|_| fused) {
        let (states, commitment) = m.final_states(x, astra)?;
        let l = head.loss(&states, y, text::IGNORE);
        return Ok(StepLoss {
            loss: l.loss,
            hits: l.hits,
            commitment,
        });
    }
    let (logits, commitment) = match astra {
        Some(a) => {
            let out = m.forward_astra(x, a)?;
            (out.logits, Some(out.commitment))
        }
        None => (m.forward(x)?, None),
    };
    let hits = tch::no_grad(|| hits(&logits, y));
    Ok(StepLoss {
        loss: loss(&logits, y),
        hits,
        commitment,
    })
}

/// How many non-ignored targets the logits' argmax hits (fp32 scalar, on the logits' device).
fn hits(logits: &Tensor, targets: &Tensor) -> Tensor {
    let v = *logits.size().last().expect("class axis");
    let y = targets.reshape([-1]);
    logits
        .reshape([-1, v])
        .argmax(-1, false)
        .eq_tensor(&y)
        .logical_and(&y.ne(text::IGNORE))
        .sum(Kind::Float)
}

/// (sum of losses, correct, counted) over non-ignored targets.
fn score(logits: &Tensor, targets: &Tensor) -> (f64, i64, i64) {
    let v = *logits.size().last().expect("class axis");
    let (l, y) = (
        logits.reshape([-1, v]).to_kind(Kind::Float),
        targets.reshape([-1]),
    );
    let sum = l
        .cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, text::IGNORE, 0.0)
        .double_value(&[]);
    let keep = y.ne(text::IGNORE);
    let correct = hits(&l, &y).double_value(&[]) as i64;
    (sum, correct, keep.sum(Kind::Int64).int64_value(&[]))
}

impl Task {
    /// Opens the data of `spec` for a model of `model` (checking they fit together), holding
    /// `hold_out` of the training data out for validation ([`crate::data::split`]).
    pub fn open(
        spec: &str,
        model: &ModelConfig,
        context: Option<usize>,
        hold_out: HoldOut,
    ) -> Result<Self> {
        if data::is_text(spec) {
            let Some((vocab, positions)) = model.language_model() else {
                return Err(TrainError::invalid(
                    "data",
                    format!("'{spec}' is text; the model is not a language model"),
                ));
            };
            // Text is tokenized with GPT-2's BPE (a Llama-shaped model trained here uses it too).
            if vocab < text::GPT2_VOCAB {
                return Err(TrainError::config(
                    "vocab_size",
                    format!(
                        "{vocab} is below GPT-2's BPE vocabulary ({}), which tokenizes the text",
                        text::GPT2_VOCAB
                    ),
                ));
            }
            let context = context.unwrap_or(positions as usize);
            if context < 2 || context as i64 > positions {
                return Err(TrainError::invalid(
                    "context",
                    format!("{context} must be in 2..={positions} (the model's positions)"),
                ));
            }
            let corpus = text::open_spec(spec, hold_out, context)?;
            if corpus.train.len() <= context {
                return Err(TrainError::invalid(
                    "data",
                    format!(
                        "{} training tokens do not fill one {context}-token window",
                        corpus.train.len()
                    ),
                ));
            }
            return Ok(Task::Text {
                corpus,
                context,
                stride: context,
            });
        }
        let ModelConfig::ViT(v) = model else {
            return Err(TrainError::invalid(
                "data",
                format!("'{spec}' is images; the model is not a ViT"),
            ));
        };
        let data = data::open_images(spec, v.image_size as usize, hold_out)?;
        let (c, _, _) = data.train.shape();
        if c as i64 != v.num_channels {
            return Err(TrainError::invalid(
                "model",
                format!(
                    "expects {}-channel images, the data has {c}",
                    v.num_channels
                ),
            ));
        }
        Ok(Task::Images {
            data,
            size: v.image_size as usize,
        })
    }

    /// Sets the evaluation stride of a text task (1..=context; see `text::strided_windows`).
    pub fn with_stride(mut self, s: usize) -> Result<Self> {
        if let Task::Text {
            context, stride, ..
        } = &mut self
        {
            if s == 0 || s > *context {
                return Err(TrainError::invalid(
                    "stride",
                    format!("{s} must be in 1..={context} (the context)"),
                ));
            }
            *stride = s;
        }
        Ok(self)
    }

    pub fn is_text(&self) -> bool {
        matches!(self, Task::Text { .. })
    }

    /// Classes of an image task.
    pub fn classes(&self) -> Option<usize> {
        match self {
            Task::Images { data, .. } => Some(data.train.classes()),
            Task::Text { .. } => None,
        }
    }

    /// Training examples (images, or windows) an epoch would see.
    pub fn train_len(&self) -> usize {
        match self {
            Task::Images { data, .. } => data.train.len(),
            Task::Text {
                corpus, context, ..
            } => text::training_starts(corpus.train.len(), *context, 0).len(),
        }
    }

    /// The epoch's batches in order: a shuffled subset of at most `limit` examples drawn with
    /// `rng`, augmented (images) with per-example seeds derived from `aug_seed`.
    #[allow(clippy::too_many_arguments)]
    pub fn train_batches<'a>(
        &'a self,
        batch: usize,
        limit: Option<usize>,
        augment: &Augment,
        aug_seed: u64,
        rng: &mut impl Rng,
        device: Device,
        shard: (usize, usize),
    ) -> Box<dyn Iterator<Item = Result<(Tensor, Tensor)>> + 'a> {
        match self {
            Task::Images { data, size } => {
                let n = limit.map_or(data.train.len(), |l| l.min(data.train.len()));
                let mut order: Vec<usize> = (0..n).collect();
                order.shuffle(rng);
                let aug = (!augment.is_identity()).then(|| (augment.clone(), aug_seed));
                let loader =
                    BatchLoader::start(Arc::clone(&data.train), order, batch, aug, 3, shard);
                let (mean, std, size) = (data.mean.clone(), data.std.clone(), *size);
                Box::new(loader.map(move |b| b.map(|b| b.to_tensors(&mean, &std, size, device))))
            }
            Task::Text {
                corpus, context, ..
            } => {
                let offset = rng.random_range(0..*context);
                let mut starts = text::training_starts(corpus.train.len(), *context, offset);
                starts.shuffle(rng);
                starts.truncate(limit.unwrap_or(usize::MAX));
                let ctx = *context;
                let (rank, world) = shard;
                let windows: Vec<Vec<Window>> = starts
                    .chunks(batch.max(1))
                    .filter(|c| c.len() >= world)
                    .map(|c| {
                        let (lo, len) = crate::train::parallel::shard(c.len() as i64, rank, world);
                        c[lo as usize..(lo + len) as usize]
                            .iter()
                            .map(|&s| Window {
                                start: s,
                                len: ctx,
                                scored: ctx,
                            })
                            .collect()
                    })
                    .collect();
                Box::new(
                    windows
                        .into_iter()
                        .map(move |w| Ok(text::lm_batch(&corpus.train, &w, device))),
                )
            }
        }
    }

    /// Scores the model on `split` (images: `limit` of its images; text: its tokens in
    /// `stride`-spaced windows, `limit` of them). A limit draws a fixed random subset
    /// ([`EVAL_SEED`]) spread over the split, never its first examples: ImageNet's validation
    /// folders are sorted by class.
    pub fn evaluate(
        &self,
        model: &Model,
        split: Split,
        limit: Option<usize>,
        astra: Option<AstraEval>,
        bf16: bool,
        device: Device,
    ) -> Result<EvalMetrics> {
        let b = self.evaluate_batches(model, split, limit, astra, bf16, device, 256)?;
        Ok(EvalMetrics::from_batches(&b))
    }

    /// Scores per batch of at most `batch` images (text: 8 windows), so results can be grouped by
    /// the FPAR of each batch's partition.
    #[allow(clippy::too_many_arguments)]
    pub fn evaluate_batches(
        &self,
        model: &Model,
        split: Split,
        limit: Option<usize>,
        mut astra: Option<AstraEval>,
        bf16: bool,
        device: Device,
        batch: usize,
    ) -> Result<Vec<BatchScore>> {
        let batches = self.eval_inputs(split, limit, batch.max(1), device)?;
        let mut out = Vec::with_capacity(batches.len());
        tch::no_grad(|| -> Result<()> {
            for (i, (x, y)) in batches.iter().enumerate() {
                let mut fpar = 1.0;
                let logits = bf16_autocast(bf16, || -> Result<Tensor> {
                    match astra.as_mut() {
                        None => model.forward(x),
                        Some(a) => {
                            let tokens = model.content_tokens(x) as usize;
                            // The last text window can be shorter than N tokens.
                            let p = a.partition.partition(tokens, a.devices.min(tokens), i)?;
                            fpar = p.fpar();
                            let link_loss = (a.link_loss > 0.0).then_some(LinkLoss {
                                p: a.link_loss,
                                seed: 0x5EED ^ i as u64,
                            });
                            Ok(model
                                .forward_astra(
                                    x,
                                    Astra {
                                        partition: &p,
                                        cls: a.cls,
                                        vq: a.vq.as_deref_mut(),
                                        train: false,
                                        link_loss,
                                    },
                                )?
                                .logits)
                        }
                    }
                })??;
                let (loss_sum, correct, count) = score(&logits, y);
                out.push(BatchScore {
                    fpar,
                    loss_sum,
                    correct,
                    count,
                });
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The (input, target) batches of `split` an evaluation scores: `limit` examples of it at
    /// most (a fixed random subset), `batch` images or up to 8 equal-length text windows each.
    fn eval_inputs(
        &self,
        split: Split,
        limit: Option<usize>,
        batch: usize,
        device: Device,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        Ok(match self {
            Task::Images { data, size } => {
                let set = match split {
                    Split::Valid => &data.valid,
                    Split::Test => &data.test,
                };
                let n = limit.map_or(set.len(), |l| l.min(set.len()));
                let idx = sample_sorted(set.len(), n, EVAL_SEED);
                idx.chunks(batch)
                    .map(|c| {
                        read_batch(&**set, c, None)
                            .map(|b| b.to_tensors(&data.mean, &data.std, *size, device))
                    })
                    .collect::<Result<_>>()?
            }
            Task::Text {
                corpus,
                context,
                stride,
            } => {
                let tokens = match split {
                    Split::Valid => &corpus.valid,
                    Split::Test => &corpus.test,
                };
                let all = text::strided_windows(tokens.len(), *context, *stride);
                let ws: Vec<Window> =
                    sample_sorted(all.len(), limit.unwrap_or(usize::MAX), EVAL_SEED)
                        .into_iter()
                        .map(|i| all[i])
                        .collect();
                // Batches of equal-length windows (only the last window can be shorter).
                let mut out = Vec::new();
                let mut i = 0;
                while i < ws.len() {
                    let mut j = i;
                    while j < ws.len()
                        && j - i < batch.min(8)
                        && ws[j].len == ws[i].len
                        && ws[j].scored == ws[i].scored
                    {
                        j += 1;
                    }
                    out.push(text::lm_batch(tokens, &ws[i..j], device));
                    i = j;
                }
                out
            }
        })
    }

    /// The inputs calibration collects block inputs from: `n` training examples (images, or
    /// text windows) drawn at random from the whole training set with `seed`, in data order.
    /// Never the first n: image folders are sorted by class and corpora by document, so a prefix
    /// would fit the codebooks to a few classes or one part of the text.
    pub fn calibration_batches(&self, n: usize, seed: u64, device: Device) -> Result<Vec<Tensor>> {
        match self {
            Task::Images { data, size } => {
                let idx = sample_sorted(data.train.len(), n, seed);
                idx.chunks(256)
                    .map(|c| {
                        read_batch(&*data.train, c, None)
                            .map(|b| b.to_tensors(&data.mean, &data.std, *size, device).0)
                    })
                    .collect()
            }
            Task::Text {
                corpus, context, ..
            } => {
                let starts = text::training_starts(corpus.train.len(), *context, 0);
                let ws: Vec<Window> = sample_sorted(starts.len(), n, seed)
                    .into_iter()
                    .map(|i| starts[i])
                    .map(|s| Window {
                        start: s,
                        len: *context,
                        scored: *context,
                    })
                    .collect();
                Ok(ws
                    .chunks(16)
                    .map(|w| text::lm_batch(&corpus.train, w, device).0)
                    .collect())
            }
        }
    }
}

/// The seed of the evaluation subset a `--max-test` limit draws (the same for every run, so runs
/// compare on the same examples).
pub const EVAL_SEED: u64 = 0x7E57;

/// `n` distinct indices of `0..len` drawn uniformly with `seed`, ascending (all of them when
/// n ≥ len).
pub fn sample_sorted(len: usize, n: usize, seed: u64) -> Vec<usize> {
    use rand::SeedableRng;
    if n >= len {
        return (0..len).collect();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut idx = rand::seq::index::sample(&mut rng, len, n).into_vec();
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod sample_tests {
    #[test]
    fn samples_spread_over_the_whole_range_and_repeat_for_a_seed() {
        let a = super::sample_sorted(10_000, 100, 3);
        assert_eq!(a, super::sample_sorted(10_000, 100, 3));
        assert_eq!(a.len(), 100);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        // Not a prefix: the sample reaches the last tenth of the range.
        assert!(*a.last().unwrap() > 9_000, "{:?}", a.last());
        assert_ne!(a, super::sample_sorted(10_000, 100, 4));
        assert_eq!(super::sample_sorted(5, 9, 1), vec![0, 1, 2, 3, 4]);
    }
}
