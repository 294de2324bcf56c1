//! Plain-text corpora as GPT-2 BPE token streams (tiktoken-rs `r50k_base`, GPT-2's vocabulary,
//! compiled in), split into training, validation and test tokens, and cut into language-model
//! windows.
//!
//! Specs: `text:FILE` uses the first 90% of FILE's tokens for training and the rest as the test
//! split; `text:TRAIN,TEST` takes the two from two files (e.g. WikiText-2's `valid.txt` and
//! `test.txt` when its train split is not at hand); either way the validation split is the tail
//! of the training tokens ([`HoldOut`], in windows of the run's context), contiguous, so no
//! validation text leaks into training windows. `text:TRAIN,VALID,TEST` names all three files
//! (WikiText-103's own splits).

use std::path::{Path, PathBuf};

use tch::{Device, Tensor};

use super::split::HoldOut;
use crate::error::{Result, TrainError};

/// Target value that the loss ignores (PyTorch's `ignore_index` default).
pub const IGNORE: i64 = -100;

/// GPT-2's vocabulary size; token ids are below it.
pub const GPT2_VOCAB: i64 = 50257;

#[derive(Clone, Debug)]
pub struct TokenCorpus {
    pub train: Vec<u32>,
    pub valid: Vec<u32>,
    pub test: Vec<u32>,
    pub files: Vec<PathBuf>,
}

/// GPT-2 BPE ids of `text` (no special tokens).
pub fn encode(text: &str) -> Vec<u32> {
    tiktoken_rs::r50k_base_singleton().encode_ordinary(text)
}

/// The bytes of GPT-2 BPE tokens (a token may end inside a UTF-8 character: callers stream the
/// valid prefix); None for an id outside the vocabulary.
pub fn decode_bytes(tokens: &[u32]) -> Option<Vec<u8>> {
    tiktoken_rs::r50k_base_singleton().decode_bytes(tokens).ok()
}

fn read(path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::File {
        path: path.into(),
        reason: format!("cannot read as UTF-8 text: {e}"),
    })?;
    let ids = encode(&text);
    if ids.len() < 2 {
        return Err(TrainError::File {
            path: path.into(),
            reason: format!("holds {} tokens; a corpus needs at least 2", ids.len()),
        });
    }
    Ok(ids)
}

/// Opens a text spec: `text:FILES` ([`open`]) or `parquet:…` ([`super::parquet_docs`], whose
/// validation and test splits are documents of their own, so `hold_out` does not apply).
pub fn open_spec(spec: &str, hold_out: HoldOut, context: usize) -> Result<TokenCorpus> {
    match spec.split_once(':') {
        Some(("text", files)) => open(files, hold_out, context),
        Some(("parquet", rest)) => super::parquet_docs::open(rest),
        _ => Err(TrainError::invalid(
            "data",
            format!("'{spec}' is not a text spec"),
        )),
    }
}

/// Opens the part of a `text:` spec after the colon; a validation split not given as a file is
/// `hold_out` windows of `context` tokens cut from the end of the training tokens.
pub fn open(files: &str, hold_out: HoldOut, context: usize) -> Result<TokenCorpus> {
    let names: Vec<&str> = files.split(',').collect();
    let paths: Vec<PathBuf> = names.iter().map(PathBuf::from).collect();
    let (train, valid, test) = match names[..] {
        [train, valid, test] => (
            read(Path::new(train))?,
            read(Path::new(valid))?,
            read(Path::new(test))?,
        ),
        [train, test] => {
            let (train, valid) = hold_out_tail(read(Path::new(train))?, hold_out, context)?;
            (train, valid, read(Path::new(test))?)
        }
        [file] => {
            let mut ids = read(Path::new(file))?;
            let test = ids.split_off(ids.len() * 9 / 10);
            let (train, valid) = hold_out_tail(ids, hold_out, context)?;
            (train, valid, test)
        }
        _ => {
            return Err(TrainError::invalid(
                "data",
                format!(
                    "'text:{files}' names {} files; give FILE, TRAIN,TEST or TRAIN,VALID,TEST",
                    names.len()
                ),
            ))
        }
    };
    Ok(TokenCorpus {
        train,
        valid,
        test,
        files: paths,
    })
}

/// (train, valid): the last `hold_out` windows' worth of tokens become the validation split.
fn hold_out_tail(
    mut ids: Vec<u32>,
    hold_out: HoldOut,
    context: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let windows = ids.len() / context.max(1);
    if windows < 2 {
        return Err(TrainError::invalid(
            "data",
            format!("{} training tokens do not fill two {context}-token windows (one to train on, one to validate)", ids.len()),
        ));
    }
    let n = hold_out.count(windows)?;
    let valid = ids.split_off(ids.len() - (n * context).min(ids.len() - 2));
    Ok((ids, valid))
}

/// One evaluation window: inputs `tokens[start..start+len]`, targets shifted by one, of which
/// only the last `scored` count (the rest is context already scored by an earlier window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub len: usize,
    pub scored: usize,
}

/// The sliding-window protocol of HF's perplexity guide: windows of at most `context` tokens
/// starting every `stride` tokens; every token from the second on is predicted exactly once,
/// with as much context as the window allows. `stride == context`: disjoint windows.
pub fn strided_windows(n_tokens: usize, context: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let last_target = n_tokens.saturating_sub(1); // targets are tokens 1..n
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < last_target && context > 0 && stride > 0 {
        let end = (begin + context).min(last_target);
        out.push(Window {
            start: begin,
            len: end - begin,
            scored: end - prev_end,
        });
        prev_end = end;
        if end == last_target {
            break;
        }
        begin += stride;
    }
    out
}

/// Training windows of one epoch: `context` tokens (and their next-token targets) every
/// `context` tokens from `offset` (which varies the cut from epoch to epoch).
pub fn training_starts(n_tokens: usize, context: usize, offset: usize) -> Vec<usize> {
    (offset..)
        .step_by(context.max(1))
        .take_while(|s| s + context < n_tokens)
        .collect()
}

/// Inputs [B, T] and targets [B, T] (i64) for windows of equal length; targets before each
/// window's scored part are [`IGNORE`].
pub fn lm_batch(tokens: &[u32], windows: &[Window], device: Device) -> (Tensor, Tensor) {
    let t = windows[0].len;
    let mut x = Vec::with_capacity(windows.len() * t);
    let mut y = Vec::with_capacity(windows.len() * t);
    for w in windows {
        debug_assert_eq!(w.len, t);
        x.extend(tokens[w.start..w.start + t].iter().map(|&v| v as i64));
        y.extend(
            tokens[w.start + 1..w.start + t + 1]
                .iter()
                .enumerate()
                .map(|(i, &v)| if i + w.scored >= t { v as i64 } else { IGNORE }),
        );
    }
    let b = windows.len() as i64;
    (
        crate::libtorch::upload(&Tensor::from_slice(&x).view([b, t as i64]), device),
        crate::libtorch::upload(&Tensor::from_slice(&y).view([b, t as i64]), device),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpe_is_gpt2s() {
        // Reference ids from GPT-2's tokenizer (HF `gpt2`): "Hello world" → [15496, 995].
        assert_eq!(encode("Hello world"), vec![15496, 995]);
        assert_eq!(encode(" the"), vec![262]);
    }

    #[test]
    fn validation_is_the_contiguous_tail_of_the_training_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
        let words: String = (0..400).map(|i| format!(" w{i}")).collect();
        std::fs::write(&a, &words).unwrap();
        std::fs::write(&b, " the end").unwrap();
        let all = encode(&words);
        let one = open(a.to_str().unwrap(), HoldOut::Count(3), 8).unwrap();
        assert_eq!(one.valid.len(), 24);
        let joined: Vec<u32> = [&one.train[..], &one.valid, &one.test].concat();
        assert_eq!(joined, all);
        assert_eq!(one.test.len(), all.len() - all.len() * 9 / 10);
        let two = open(
            &format!("{},{}", a.display(), b.display()),
            HoldOut::default(),
            8,
        )
        .unwrap();
        assert_eq!([&two.train[..], &two.valid].concat(), all);
        assert_eq!(
            two.valid.len(),
            ((all.len() / 8) as f64 * 0.1).round() as usize * 8
        );
        assert_eq!(two.test, encode(" the end"));
        let three = format!("{},{},{}", a.display(), b.display(), b.display());
        let three = open(&three, HoldOut::Count(1), 8).unwrap();
        assert_eq!((three.train.len(), three.valid.len()), (all.len(), 2));
        assert!(open(b.to_str().unwrap(), HoldOut::Count(1), 8).is_err());
        let four = format!("{0},{0},{0},{0}", a.display());
        assert!(open(&four, HoldOut::Count(1), 8).is_err());
    }

    #[test]
    fn strided_windows_score_every_token_once() {
        for (n, ctx, stride) in [(10, 4, 4), (10, 4, 2), (11, 3, 1), (5, 8, 8), (2, 4, 4)] {
            let ws = strided_windows(n, ctx, stride);
            let mut scored = vec![0; n];
            for w in &ws {
                assert!(w.len <= ctx && w.scored <= w.len && w.start + w.len < n);
                for t in w.start + w.len - w.scored..w.start + w.len {
                    scored[t + 1] += 1;
                }
            }
            assert_eq!(scored[0], 0);
            assert!(
                scored[1..].iter().all(|&c| c == 1),
                "{n} {ctx} {stride}: {scored:?}"
            );
        }
        assert!(strided_windows(1, 4, 4).is_empty());
    }

    #[test]
    fn lm_batch_shifts_targets_and_masks_context() {
        let toks: Vec<u32> = (0..10).collect();
        let w = [Window {
            start: 2,
            len: 3,
            scored: 1,
        }];
        let (x, y) = lm_batch(&toks, &w, Device::Cpu);
        assert_eq!(Vec::<i64>::try_from(x.view([-1])).unwrap(), vec![2, 3, 4]);
        assert_eq!(
            Vec::<i64>::try_from(y.view([-1])).unwrap(),
            vec![IGNORE, IGNORE, 5]
        );
        assert_eq!(training_starts(10, 3, 1), vec![1, 4]);
    }
}
