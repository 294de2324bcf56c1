//! The downloader for data sets with public URLs (CIFAR-10/100 in both forms, MNIST,
//! Fashion-MNIST): HTTP(S) GET into `FILE.part`, resumed with a `Range` request after an
//! interruption, MD5-checked against the value the data set's authors publish, renamed into place
//! only when it matches, then (for archives) unpacked. Files already present and correct are not
//! fetched again, so running it twice is cheap.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::{Digest, Md5};

use crate::error::{Result, TrainError};

/// A downloadable data set: files under one base URL, each with its MD5.
#[derive(Clone, Debug)]
pub struct DatasetSource {
    pub id: String,
    pub base_url: String,
    pub files: Vec<(String, String)>,
    /// The files are .tar.gz archives to unpack into the target folder.
    pub unpack: bool,
    /// The spec kind (`cifar10`, …) the unpacked folder is read as.
    pub kind: String,
}

const TORONTO: &str = "https://www.cs.toronto.edu/~kriz";

fn source(id: &str, base: &str, files: &[(&str, &str)], unpack: bool, kind: &str) -> DatasetSource {
    DatasetSource {
        id: id.into(),
        base_url: base.into(),
        files: files
            .iter()
            .map(|(f, m)| (f.to_string(), m.to_string()))
            .collect(),
        unpack,
        kind: kind.into(),
    }
}

/// The data sets we know how to fetch, with the checksums their publishers (and torchvision) list.
pub fn catalogue() -> Vec<DatasetSource> {
    vec![
        source(
            "cifar10",
            TORONTO,
            &[("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530")],
            true,
            "cifar10",
        ),
        source(
            "cifar10-python",
            TORONTO,
            &[("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")],
            true,
            "cifar10",
        ),
        source(
            "cifar100",
            TORONTO,
            &[(
                "cifar-100-binary.tar.gz",
                "03b5dce01913d631647c71ecec9e9cb8",
            )],
            true,
            "cifar100",
        ),
        source(
            "cifar100-python",
            TORONTO,
            &[(
                "cifar-100-python.tar.gz",
                "eb9058c3a382ffc7106e4002c42a8d85",
            )],
            true,
            "cifar100",
        ),
        source(
            "mnist",
            "https://ossci-datasets.s3.amazonaws.com/mnist",
            &[
                (
                    "train-images-idx3-ubyte.gz",
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                ),
                (
                    "train-labels-idx1-ubyte.gz",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                ),
                (
                    "t10k-images-idx3-ubyte.gz",
                    "9fb629c4189551a2d022fa330f9573f3",
                ),
                (
                    "t10k-labels-idx1-ubyte.gz",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                ),
            ],
            false,
            "mnist",
        ),
        source(
            "fashion-mnist",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
            &[
                (
                    "train-images-idx3-ubyte.gz",
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                ),
                (
                    "train-labels-idx1-ubyte.gz",
                    "25c81989df183df01b3e8a0aad5dffbe",
                ),
                (
                    "t10k-images-idx3-ubyte.gz",
                    "bef4ecab320f06d8554ea6380940ec79",
                ),
                (
                    "t10k-labels-idx1-ubyte.gz",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ),
            ],
            false,
            "fashion-mnist",
        ),
    ]
}

pub fn find(id: &str) -> Result<DatasetSource> {
    let all = catalogue();
    all.iter().find(|s| s.id == id).cloned().ok_or_else(|| {
        TrainError::invalid(
            "dataset",
            format!(
                "'{id}' is not one of {}",
                all.iter()
                    .map(|s| s.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError {
    TrainError::io(path)
}

/// MD5 of a file, hex.
pub fn md5_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(file_err(path))?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(file_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Fetches `url` to `dest` (via `dest.part`, resuming what an earlier attempt left there) and
/// checks its MD5. A mismatch deletes the partial file and fails; `dest` appears only when good.
pub fn fetch(url: &str, dest: &Path, md5: &str, progress: bool) -> Result<()> {
    let part = PathBuf::from(format!("{}.part", dest.display()));
    let have = std::fs::metadata(&part).map_or(0, |m| m.len());
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(20))
        .timeout_read(Duration::from_secs(60))
        .build();
    let mut req = agent.get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let net = |reason: String| TrainError::invalid(format!("download {url}"), reason);
    let resp = match req.call() {
        Ok(r) => Some(r),
        // The partial file already holds everything.
        Err(ureq::Error::Status(416, _)) if have > 0 => None,
        Err(ureq::Error::Status(code, r)) => {
            return Err(net(format!("HTTP {code} {}", r.status_text())))
        }
        Err(e) => return Err(net(e.to_string())),
    };
    if let Some(resp) = resp {
        let resumed = resp.status() == 206;
        let total = resp
            .header("Content-Length")
            .and_then(|v| v.parse::<u64>().ok())
            .map(|n| if resumed { n + have } else { n });
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(&part)
            .map_err(file_err(&part))?;
        let bar = if progress {
            let b = indicatif::ProgressBar::new(total.unwrap_or(0));
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} {bar:30} {bytes}/{total_bytes} [{elapsed_precise}<{eta_precise}]",
                )
                .expect("static"),
            );
            b.set_message(
                dest.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            );
            b.set_position(if resumed { have } else { 0 });
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut got = if resumed { have } else { 0 };
        loop {
            let n = match reader.read(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    out.flush().map_err(file_err(&part))?;
                    return Err(net(format!(
                        "interrupted after {got} bytes ({e}); run again to resume from {}",
                        part.display()
                    )));
                }
            };
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(file_err(&part))?;
            got += n as u64;
            bar.set_position(got);
        }
        out.sync_all().map_err(file_err(&part))?;
        bar.finish_and_clear();
        if let Some(t) = total {
            if got != t {
                return Err(net(format!(
                    "ended after {got} of {t} bytes; run again to resume from {}",
                    part.display()
                )));
            }
        }
    }
    let got = md5_file(&part)?;
    if got != md5 {
        let _ = std::fs::remove_file(&part);
        return Err(TrainError::File {
            path: dest.into(),
            reason: format!(
                "MD5 {got} does not match the published {md5}; the partial download was deleted"
            ),
        });
    }
    std::fs::rename(&part, dest).map_err(file_err(dest))
}

/// Unpacks a .tar.gz into `dir` (entries stay inside it: `unpack_in` refuses `..` paths).
fn unpack(archive: &Path, dir: &Path) -> Result<()> {
    let f = std::fs::File::open(archive).map_err(file_err(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let bad = |e: std::io::Error| TrainError::File {
        path: archive.into(),
        reason: format!("cannot unpack: {e}"),
    };
    for entry in tar.entries().map_err(bad)? {
        entry.map_err(bad)?.unpack_in(dir).map_err(bad)?;
    }
    Ok(())
}

/// Makes `dir` hold the data set (fetching what is missing or wrong, unpacking archives once);
/// `base_url` replaces the source's (a mirror). Returns the spec to train on, e.g. `cifar10:DIR`.
pub fn install(
    src: &DatasetSource,
    dir: &Path,
    base_url: Option<&str>,
    progress: bool,
) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(file_err(dir))?;
    let base = base_url.unwrap_or(&src.base_url).trim_end_matches('/');
    for (name, md5) in &src.files {
        let dest = dir.join(name);
        let present = dest.exists() && md5_file(&dest)? == *md5;
        if !present {
            let _ = std::fs::remove_file(&dest);
            fetch(&format!("{base}/{name}"), &dest, md5, progress)?;
        }
        if src.unpack {
            let marker = dir.join(format!(".{name}.unpacked"));
            if !present || !marker.exists() {
                unpack(&dest, dir)?;
                std::fs::write(&marker, md5).map_err(file_err(&marker))?;
            }
        }
    }
    Ok(format!("{}:{}", src.kind, dir.display()))
}
