//! `parquet:PATH[:COLUMN][:max-docs=N][:seed=S]`: the documents of a text column in Parquet
//! shards — HF datasets as users have them, e.g. `wikimedia/wikipedia` (config `20231101.en`, 41
//! shards with a `text` column) — as GPT-2 BPE token streams, split by document.
//!
//! PATH is a shard, a folder (every `*.parquet` below it, sorted by path), a glob in its last
//! component (`DIR/train-*.parquet`) or `hf:ORG/NAME[/SUBDIR]`: the dataset's snapshot in the HF
//! cache (`$HF_HOME/hub/datasets--ORG--NAME/snapshots/<refs/main>/SUBDIR`; nothing is downloaded).
//! COLUMN defaults to `text`.
//!
//! **The split** (our choice; the paper names none): rows are numbered across the shards in path
//! order and shuffled by one seeded permutation (ChaCha8, `seed`, default 0). Its first `h`
//! documents are the test split, the next `h` the validation split, h = 0.5% of all rows (at least
//! 1, at most 5,000); the training split is the next `max-docs` documents (default: all the rest).
//! So the held-out documents depend only on the shards and the seed — never on `max-docs` — and no
//! held-out document is ever trained on. Each document's tokens are followed by GPT-2's
//! `<|endoftext|>` (50256), as GPT-2 was trained; empty and null rows are skipped.
//!
//! Tokenizing a million Wikipedia articles takes minutes, so the three token streams are cached
//! ([`super::token_cache`]) under a key of the shards (path, size, modification time), column,
//! sample and tokenizer: a second run with the same spec starts at once.

use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::basic::Type as Physical;
use parquet::column::reader::ColumnReader;
use parquet::file::reader::{FileReader, SerializedFileReader};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use super::text::TokenCorpus;
use super::token_cache;
use crate::error::{Result, TrainError};

/// GPT-2's `<|endoftext|>`, the separator between documents.
pub const END_OF_TEXT: u32 = 50256;
/// Held-out documents per split: this fraction of all rows, within [1, MAX_HELD_OUT].
const HELD_OUT_FRACTION: f64 = 0.005;
const MAX_HELD_OUT: usize = 5_000;

/// A parsed `parquet:` spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocSpec {
    pub files: Vec<PathBuf>,
    pub column: String,
    pub max_docs: Option<usize>,
    pub seed: u64,
}

impl DocSpec {
    /// Parses the part of a spec after `parquet:` and finds its shards.
    pub fn parse(rest: &str) -> Result<Self> {
        let bad = |r: String| TrainError::invalid("data", format!("'parquet:{rest}': {r}"));
        let mut parts = rest.split(':');
        let mut path = parts.next().unwrap_or_default().to_string();
        if path == "hf" {
            // `hf:ORG/NAME…` keeps its own colon.
            path = format!("hf:{}", parts.next().unwrap_or_default());
        }
        if path.is_empty() || path == "hf:" {
            return Err(bad("give a shard, a folder, a glob or hf:ORG/NAME".into()));
        }
        let (mut column, mut max_docs, mut seed) = (None, None, 0);
        for part in parts {
            match part.split_once('=') {
                Some(("max-docs", n)) => match n.parse::<usize>() {
                    Ok(n) if n > 0 => max_docs = Some(n),
                    _ => return Err(bad(format!("max-docs={n} is not a positive integer"))),
                },
                Some(("seed", s)) => {
                    seed = s
                        .parse()
                        .map_err(|_| bad(format!("seed={s} is not an integer")))?
                }
                Some((key, _)) => {
                    return Err(bad(format!("unknown option '{key}' (max-docs=N, seed=S)")))
                }
                None if column.is_none() && !part.is_empty() => column = Some(part.to_string()),
                None => return Err(bad(format!("'{part}': one COLUMN at most, then options"))),
            }
        }
        Ok(DocSpec {
            files: shards(&path)?,
            column: column.unwrap_or_else(|| "text".into()),
            max_docs,
            seed,
        })
    }
}

/// The shards a PATH names, sorted.
fn shards(path: &str) -> Result<Vec<PathBuf>> {
    let root = match path.strip_prefix("hf:") {
        Some(id) => hf_snapshot(id)?,
        None => PathBuf::from(path),
    };
    let mut files = if root.is_file() {
        vec![root.clone()]
    } else if root.is_dir() {
        let mut found = Vec::new();
        parquet_below(&root, &mut found)?;
        found
    } else if let Some(pattern) = glob_of(&root) {
        let dir = root.parent().unwrap_or(Path::new("."));
        let entries = std::fs::read_dir(dir).map_err(TrainError::io(dir))?;
        entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && matches_glob(&pattern, &file_name(p)))
            .collect()
    } else {
        return Err(TrainError::File {
            path: root,
            reason: "no such Parquet file or folder".into(),
        });
    };
    files.sort();
    if files.is_empty() {
        return Err(TrainError::File {
            path: root,
            reason: "holds no .parquet files".into(),
        });
    }
    Ok(files)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The last component of `p` when it is a glob (holds `*` or `?`).
fn glob_of(p: &Path) -> Option<String> {
    let name = file_name(p);
    name.contains(['*', '?']).then_some(name)
}

/// Shell-style matching of one file name: `*` any run of characters, `?` one character.
fn matches_glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some(('?', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    go(&p, &n)
}

fn parquet_below(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(TrainError::io(dir))? {
        let p = entry.map_err(TrainError::io(dir))?.path();
        if p.is_dir() {
            parquet_below(&p, out)?;
        } else if p.extension().is_some_and(|e| e == "parquet") {
            out.push(p);
        }
    }
    Ok(())
}

/// `ORG/NAME[/SUBDIR]` in the HF cache: the snapshot `refs/main` points at, plus SUBDIR.
fn hf_snapshot(id: &str) -> Result<PathBuf> {
    let mut parts = id.splitn(3, '/');
    let (Some(org), Some(name)) = (parts.next(), parts.next()) else {
        return Err(TrainError::invalid(
            "data",
            format!("'hf:{id}' is not hf:ORG/NAME[/SUBDIR]"),
        ));
    };
    let repo = hf_hub::Cache::from_env()
        .path()
        .join(format!("datasets--{org}--{name}"));
    let refs = repo.join("refs").join("main");
    let rev = std::fs::read_to_string(&refs).map_err(|_| TrainError::File {
        path: refs.clone(),
        reason: format!(
            "missing: dataset {org}/{name} is not in the HF cache (huggingface-cli download \
             --repo-type dataset {org}/{name} fetches it; nothing is downloaded here)"
        ),
    })?;
    let mut dir = repo.join("snapshots").join(rev.trim());
    if let Some(sub) = parts.next() {
        dir = dir.join(sub);
    }
    Ok(dir)
}

/// One row group of one shard: the unit of parallel reading.
struct Unit {
    file: usize,
    group: usize,
    first_row: usize,
    rows: usize,
}

/// The row groups of every shard, checking each has COLUMN as a flat text column.
fn units(spec: &DocSpec) -> Result<Vec<Unit>> {
    let mut out = Vec::new();
    let mut row = 0;
    for (file, path) in spec.files.iter().enumerate() {
        let reader = open_shard(path)?;
        column_index(&reader, path, &spec.column)?;
        for (group, rg) in reader.metadata().row_groups().iter().enumerate() {
            let rows = rg.num_rows() as usize;
            out.push(Unit {
                file,
                group,
                first_row: row,
                rows,
            });
            row += rows;
        }
    }
    Ok(out)
}

fn open_shard(path: &Path) -> Result<SerializedFileReader<File>> {
    let f = File::open(path).map_err(TrainError::io(path))?;
    SerializedFileReader::new(f).map_err(|e| TrainError::File {
        path: path.into(),
        reason: format!("not a readable Parquet file: {e}"),
    })
}

/// The leaf index of `column`, which must be a non-repeated byte array (string) column.
fn column_index(reader: &SerializedFileReader<File>, path: &Path, column: &str) -> Result<usize> {
    let schema = reader.metadata().file_metadata().schema_descr();
    let names: Vec<String> = schema.columns().iter().map(|c| c.path().string()).collect();
    let Some(i) = names.iter().position(|n| n == column) else {
        return Err(TrainError::File {
            path: path.into(),
            reason: format!("has no column '{column}' (columns: {})", names.join(", ")),
        });
    };
    let c = schema.column(i);
    if c.physical_type() != Physical::BYTE_ARRAY || c.max_rep_level() > 0 {
        return Err(TrainError::File {
            path: path.into(),
            reason: format!(
                "column '{column}' is {}{}, not a text (string) column",
                c.physical_type(),
                if c.max_rep_level() > 0 { " list" } else { "" }
            ),
        });
    }
    Ok(i)
}

/// Which split each sampled row goes to and where in it: rows of the permutation's first `h`
/// positions are test, the next `h` validation, the next `train` training documents.
struct Sample {
    /// Position in the permutation of each row, or `u32::MAX` for rows not sampled.
    position: Vec<u32>,
    held_out: usize,
    train: usize,
}

impl Sample {
    fn draw(rows: usize, max_docs: Option<usize>, seed: u64) -> Result<Self> {
        let held_out = ((rows as f64 * HELD_OUT_FRACTION).round() as usize).clamp(1, MAX_HELD_OUT);
        if rows < 2 * held_out + 1 {
            return Err(TrainError::invalid(
                "data",
                format!(
                    "{rows} documents cannot give a test, a validation and a training document"
                ),
            ));
        }
        let train = max_docs.unwrap_or(usize::MAX).min(rows - 2 * held_out);
        let mut order: Vec<u32> = (0..rows as u32).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let mut position = vec![u32::MAX; rows];
        for (pos, &row) in order[..2 * held_out + train].iter().enumerate() {
            position[row as usize] = pos as u32;
        }
        Ok(Sample {
            position,
            held_out,
            train,
        })
    }

    fn len(&self) -> usize {
        2 * self.held_out + self.train
    }
}

/// Opens a `parquet:` spec (the part after the colon) as a token corpus, from the cache when
/// this exact sample was tokenized before.
pub fn open(rest: &str) -> Result<TokenCorpus> {
    let spec = DocSpec::parse(rest)?;
    let key = token_cache::Key::of(&spec)?;
    if let Some(corpus) = token_cache::load(&key, &spec.files) {
        return Ok(corpus);
    }
    let corpus = tokenize(&spec)?;
    token_cache::store(&key, &corpus);
    Ok(corpus)
}

/// Reads the sampled documents of every shard and tokenizes them (row groups in parallel).
fn tokenize(spec: &DocSpec) -> Result<TokenCorpus> {
    let started = std::time::Instant::now();
    let units = units(spec)?;
    let rows = units.last().map_or(0, |u| u.first_row + u.rows);
    let sample = Sample::draw(rows, spec.max_docs, spec.seed)?;
    eprintln!(
        "Tokenizing {} of {rows} documents of {} shard(s) (GPT-2 BPE; cached for the next run)",
        sample.len(),
        spec.files.len()
    );
    let bar = indicatif::ProgressBar::new(sample.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "documents {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("static"),
    );
    let docs: Vec<(u32, Vec<u16>)> = units
        .par_iter()
        .map(|u| {
            let d = read_unit(spec, u, &sample)?;
            bar.inc(d.len() as u64);
            Ok(d)
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    bar.finish_and_clear();
    let corpus = assemble(docs, &sample, spec.files.clone());
    // The rehearsal report projects tokenizing the real sample from this line.
    eprintln!(
        "Tokenized {} documents into {} tokens in {:.1} s",
        sample.len(),
        corpus.train.len() + corpus.valid.len() + corpus.test.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(corpus)
}

/// The sampled rows of one row group as (permutation position, tokens).
fn read_unit(spec: &DocSpec, u: &Unit, sample: &Sample) -> Result<Vec<(u32, Vec<u16>)>> {
    let path = &spec.files[u.file];
    let reader = open_shard(path)?;
    let index = column_index(&reader, path, &spec.column)?;
    let corrupt = |e: parquet::errors::ParquetError| TrainError::File {
        path: path.clone(),
        reason: format!("row group {}: {e}", u.group),
    };
    let group = reader.get_row_group(u.group).map_err(corrupt)?;
    let ColumnReader::ByteArrayColumnReader(mut col) =
        group.get_column_reader(index).map_err(corrupt)?
    else {
        unreachable!("column_index checked the type");
    };
    let max_def = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .column(index)
        .max_def_level();
    let (mut defs, mut values, mut out) = (Vec::new(), Vec::new(), Vec::new());
    let mut row = u.first_row;
    while row < u.first_row + u.rows {
        defs.clear();
        values.clear();
        let levels = (max_def > 0).then_some(&mut defs);
        let (records, _, _) = col
            .read_records(4096, levels, None, &mut values)
            .map_err(corrupt)?;
        if records == 0 {
            return Err(TrainError::File {
                path: path.clone(),
                reason: format!(
                    "row group {} ends after {} of its {} rows (truncated?)",
                    u.group,
                    row - u.first_row,
                    u.rows
                ),
            });
        }
        let mut value = values.iter();
        for r in 0..records {
            // A null (definition level below the maximum) has no value in `values`.
            let text = (max_def == 0 || defs.get(r) == Some(&max_def))
                .then(|| value.next())
                .flatten();
            if let Some(doc) = document(text, sample.position[row], row, spec, path)? {
                out.push(doc);
            }
            row += 1;
        }
    }
    Ok(out)
}

/// The tokens of row `row` when it is sampled (`pos` is its permutation position) and holds
/// text.
fn document(
    text: Option<&parquet::data_type::ByteArray>,
    pos: u32,
    row: usize,
    spec: &DocSpec,
    path: &Path,
) -> Result<Option<(u32, Vec<u16>)>> {
    let Some(text) = text.filter(|_| pos != u32::MAX) else {
        return Ok(None);
    };
    let text = text.as_utf8().map_err(|_| TrainError::File {
        path: path.into(),
        reason: format!("row {row} of column '{}' is not UTF-8", spec.column),
    })?;
    if text.is_empty() {
        return Ok(None);
    }
    let ids = super::text::encode(text).into_iter().map(|t| t as u16);
    Ok(Some((pos, ids.collect())))
}

/// Test, validation and training streams in permutation order, each document closed by
/// [`END_OF_TEXT`].
fn assemble(mut docs: Vec<(u32, Vec<u16>)>, sample: &Sample, files: Vec<PathBuf>) -> TokenCorpus {
    docs.sort_unstable_by_key(|d| d.0);
    let h = sample.held_out as u32;
    let stream = |from: u32, to: u32| -> Vec<u32> {
        let lo = docs.partition_point(|d| d.0 < from);
        let hi = docs.partition_point(|d| d.0 < to);
        let mut out = Vec::with_capacity(docs[lo..hi].iter().map(|d| d.1.len() + 1).sum());
        for (_, ids) in &docs[lo..hi] {
            out.extend(ids.iter().map(|&t| t as u32));
            out.push(END_OF_TEXT);
        }
        out
    };
    TokenCorpus {
        test: stream(0, h),
        valid: stream(h, 2 * h),
        train: stream(2 * h, u32::MAX),
        files,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_shell_style() {
        assert!(matches_glob(
            "train-*.parquet",
            "train-00001-of-00041.parquet"
        ));
        assert!(matches_glob("*", "a"));
        assert!(matches_glob("a?c", "abc"));
        assert!(!matches_glob("train-*.parquet", "test-0.parquet"));
        assert!(!matches_glob("a?c", "ac"));
    }

    #[test]
    fn held_out_documents_do_not_depend_on_the_training_sample() {
        let all = Sample::draw(1000, None, 7).unwrap();
        let few = Sample::draw(1000, Some(10), 7).unwrap();
        assert_eq!((all.held_out, all.train, few.train), (5, 990, 10));
        for row in 0..1000 {
            let (a, f) = (all.position[row], few.position[row]);
            if a < 10 {
                assert_eq!(a, f, "row {row} is held out in both");
            }
            if f != u32::MAX {
                assert_eq!(a, f, "a sampled row keeps its place");
            }
        }
        let other_seed = Sample::draw(1000, None, 8).unwrap();
        assert_ne!(all.position, other_seed.position);
        assert!(Sample::draw(2, None, 0).is_err());
    }
}
