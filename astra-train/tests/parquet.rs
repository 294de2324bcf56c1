//! `parquet:` text specs on shards written here in HF's layout (snappy-compressed, several row
//! groups, a nullable string `text` column beside `id` and `title`, as wikimedia/wikipedia has):
//! the split by document, the training sample, the token cache and bad input.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use astra_train::data::parquet_docs::{self, END_OF_TEXT};
use astra_train::data::text;
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

/// One cache folder (and HF home) for the whole binary, set before any test reads it (tests run
/// in parallel threads); under cargo's tmp folder, emptied at the start.
fn cache() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("parquet-tests");
        let _ = std::fs::remove_dir_all(&d);
        std::env::set_var("ASTRA_CACHE", d.join("astra"));
        std::env::set_var("HF_HOME", d.join("hf"));
        d
    })
}

/// Document `i`'s text: unique, multi-word, some non-ASCII.
fn doc(i: usize) -> String {
    format!(
        "Article {i}. Ünïcode naïve café 中文 {i}; the end of {}.",
        i * 7
    )
}

/// A shard of `texts` (None = null) in row groups of `group` rows.
fn write_shard(path: &Path, texts: &[Option<String>], group: usize) {
    let schema = parse_message_type(
        "message schema { required int64 id; optional binary title (STRING); optional binary text (STRING); }",
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).unwrap();
    for (g, chunk) in texts.chunks(group).enumerate() {
        let mut rg = w.next_row_group().unwrap();
        let ids: Vec<i64> = (0..chunk.len()).map(|i| (g * group + i) as i64).collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<Int64Type>()
            .write_batch(&ids, None, None)
            .unwrap();
        col.close().unwrap();
        for column in 0..2 {
            let cells: Vec<Option<String>> = match column {
                0 => (0..chunk.len())
                    .map(|i| Some(format!("Title {i}")))
                    .collect(),
                _ => chunk.to_vec(),
            };
            let defs: Vec<i16> = cells.iter().map(|c| c.is_some() as i16).collect();
            let values: Vec<ByteArray> =
                cells.iter().flatten().map(|s| s.as_str().into()).collect();
            let mut col = rg.next_column().unwrap().unwrap();
            col.typed::<ByteArrayType>()
                .write_batch(&values, Some(&defs), None)
                .unwrap();
            col.close().unwrap();
        }
        rg.close().unwrap();
    }
    w.close().unwrap();
}

/// Two shards of 250 rows each (docs 0..500; row 3 null, row 260 empty) in a folder.
fn wiki(dir: &Path) -> Vec<String> {
    let texts: Vec<Option<String>> = (0..500)
        .map(|i| match i {
            3 => None,
            260 => Some(String::new()),
            _ => Some(doc(i)),
        })
        .collect();
    std::fs::create_dir_all(dir.join("20231101.en")).unwrap();
    for (s, part) in texts.chunks(250).enumerate() {
        let name = format!("20231101.en/train-{s:05}-of-00002.parquet");
        write_shard(&dir.join(name), part, 64);
    }
    std::fs::write(dir.join("README.md"), "not a shard").unwrap();
    texts
        .into_iter()
        .flatten()
        .filter(|t| !t.is_empty())
        .collect()
}

/// The documents of a token stream (each closed by <|endoftext|>), decoded.
fn documents(stream: &[u32]) -> Vec<String> {
    assert_eq!(
        stream.last(),
        Some(&END_OF_TEXT),
        "a stream ends with a whole document"
    );
    stream[..stream.len() - 1]
        .split(|&t| t == END_OF_TEXT)
        .map(|ids| String::from_utf8(text::decode_bytes(ids).unwrap()).unwrap())
        .collect()
}

fn open(spec: &str) -> text::TokenCorpus {
    text::open_spec(spec, astra_train::data::split::HoldOut::Count(1), 8).unwrap()
}

#[test]
fn documents_split_by_a_seeded_permutation_and_come_back_from_the_cache() {
    let cache = cache().join("astra/tokens");
    let dir = tempfile::tempdir().unwrap();
    let all = wiki(dir.path());
    let spec = format!("parquet:{}", dir.path().display());
    let c = open(&spec);
    let (test, valid, train) = (documents(&c.test), documents(&c.valid), documents(&c.train));
    // 500 rows: 0.5% = 3 held-out documents per split (the null row, if drawn, is skipped).
    assert!(test.len() <= 3 && valid.len() <= 3 && test.len() + valid.len() >= 4);
    let mut every: Vec<String> = [test.clone(), valid.clone(), train.clone()].concat();
    assert_eq!(every.len(), all.len(), "every non-empty document once");
    every.sort();
    let mut expected = all.clone();
    expected.sort();
    assert_eq!(
        every, expected,
        "the documents' text survives BPE and the split"
    );
    assert_ne!(
        train[..5],
        all[..5],
        "training documents come in the permutation's order"
    );

    // The cache: one file; a second open reads it.
    let cached: Vec<PathBuf> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    let again = open(&spec);
    assert_eq!(
        (again.train, again.valid, again.test),
        (c.train.clone(), c.valid.clone(), c.test.clone())
    );

    // A training sample of 20 documents keeps the held-out documents (and the cache keys differ).
    let few = open(&format!("{spec}:text:max-docs=20"));
    assert_eq!(
        (few.test.clone(), few.valid.clone()),
        (c.test.clone(), c.valid.clone())
    );
    let few_docs = documents(&few.train);
    assert_eq!(
        few_docs,
        train[..few_docs.len()],
        "the sample is the permutation's next documents"
    );
    assert!((19..=20).contains(&few_docs.len()));
    // Another seed draws other held-out documents; a glob names the same shards as the folder.
    let seeded = open(&format!("{spec}:seed=1"));
    assert_ne!(seeded.test, c.test);
    let glob = open(&format!(
        "parquet:{}/20231101.en/train-*.parquet",
        dir.path().display()
    ));
    assert_eq!(glob.test, c.test);
    // A changed shard misses the cache: the stale tokens are not read.
    let shard = dir.path().join("20231101.en/train-00001-of-00002.parquet");
    write_shard(
        &shard,
        &vec![Some("Only one document now.".to_string()); 250],
        250,
    );
    let changed = open(&spec);
    assert!(documents(&changed.train).contains(&"Only one document now.".to_string()));
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        4,
        "all, 20 docs, seed 1, changed"
    );

    // A corrupt cache file costs a warning and a re-tokenization, not the run.
    for f in std::fs::read_dir(&cache).unwrap() {
        std::fs::write(f.unwrap().path(), b"garbage").unwrap();
    }
    assert_eq!(open(&spec).train, changed.train);
}

#[test]
fn the_hf_cache_layout_is_found_by_dataset_id() {
    let hf = cache().join("hf/hub/datasets--wikimedia--wikipedia");
    let snap = hf.join("snapshots/0123abc");
    wiki(&snap);
    std::fs::create_dir_all(hf.join("refs")).unwrap();
    std::fs::write(hf.join("refs/main"), "0123abc\n").unwrap();
    let by_id = parquet_docs::DocSpec::parse("hf:wikimedia/wikipedia/20231101.en:text").unwrap();
    assert_eq!(by_id.files.len(), 2);
    assert!(by_id.files[0].ends_with("20231101.en/train-00000-of-00002.parquet"));
    let by_dir = parquet_docs::DocSpec::parse(snap.join("20231101.en").to_str().unwrap()).unwrap();
    assert_eq!(by_id, by_dir);
}

#[test]
fn bad_shards_and_specs_are_refused_in_one_line() {
    cache();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_shard(&d.join("ok.parquet"), &[Some(doc(1)), Some(doc(2))], 1);
    std::fs::write(d.join("corrupt.parquet"), b"PAR1 this is not parquet PAR1").unwrap();
    std::fs::create_dir_all(d.join("empty")).unwrap();
    let err = |spec: &str| {
        let e = text::open_spec(spec, astra_train::data::split::HoldOut::Count(1), 8)
            .err()
            .unwrap_or_else(|| panic!("{spec} was accepted"))
            .to_string();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    };
    let ok = d.join("ok.parquet");
    let p = |s: &str| format!("parquet:{}{s}", ok.display());
    assert!(err(&p(":body")).contains("has no column 'body' (columns: id, title, text)"));
    assert!(err(&p(":id")).contains("column 'id' is INT64"));
    assert!(err(&p(":text:max-docs=0")).contains("max-docs=0 is not a positive integer"));
    assert!(err(&p(":text:shuffle=yes")).contains("unknown option 'shuffle'"));
    assert!(err(&p(":text:title")).contains("one COLUMN at most"));
    assert!(err(&p("")).contains("2 documents cannot give a test, a validation and a training"));
    let corrupt = format!("parquet:{}", d.join("corrupt.parquet").display());
    assert!(err(&corrupt).contains("not a readable Parquet file"));
    assert!(
        err(&format!("parquet:{}", d.join("empty").display())).contains("holds no .parquet files")
    );
    assert!(err(&format!("parquet:{}", d.join("missing").display()))
        .contains("no such Parquet file or folder"));
    assert!(
        err(&format!("parquet:{}/x-*.parquet", d.display())).contains("holds no .parquet files")
    );
    assert!(err("parquet:hf:nobody/nothing").contains("not in the HF cache"));
    assert!(err("parquet:").contains("give a shard"));
    // A folder with one bad shard among good ones is refused, naming the bad one.
    assert!(err(&format!("parquet:{}", d.display())).contains("corrupt.parquet"));
}
