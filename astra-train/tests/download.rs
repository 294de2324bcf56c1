//! The downloader against a local HTTP server (never the internet): an interrupted transfer
//! resumes with a Range request, a bad checksum leaves nothing behind, archives are unpacked into
//! a folder the CIFAR reader accepts, and a second install fetches nothing.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use astra_train::data::download::{fetch, install, md5_file, DatasetSource};

/// What the server saw: (path, Range header) per request.
type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Serves `files`; the first full (non-range) GET of a path in `cut` sends half the body under a
/// Content-Length for all of it, then closes, like a dropped connection.
fn serve(files: HashMap<String, Vec<u8>>, cut: Vec<String>) -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log: Log = Arc::default();
    let seen = log.clone();
    std::thread::spawn(move || {
        let mut cut = cut;
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let mut range = None;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("range") {
                        range = Some(v.trim().to_string());
                    }
                }
            }
            seen.lock().unwrap().push((path.clone(), range.clone()));
            let Some(body) = files.get(&path) else {
                let _ = s.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            let from = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
            match from {
                Some(f) if f >= body.len() => {
                    let _ = s.write_all(b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                }
                Some(f) => {
                    let part = &body[f..];
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {f}-{}/{}\r\nConnection: close\r\n\r\n",
                        part.len(),
                        body.len() - 1,
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes());
                    let _ = s.write_all(part);
                }
                None => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes());
                    if let Some(i) = cut.iter().position(|c| *c == path) {
                        cut.remove(i);
                        let _ = s.write_all(&body[..body.len() / 2]);
                    } else {
                        let _ = s.write_all(body);
                    }
                }
            }
            let _ = s.flush();
        }
    });
    (format!("http://{addr}"), log)
}

fn md5(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    std::fs::write(&p, bytes).unwrap();
    md5_file(&p).unwrap()
}

/// A CIFAR-10 binary archive as the real one is laid out: cifar-10-batches-bin/*.bin.
fn cifar_archive() -> Vec<u8> {
    let mut rec = Vec::new();
    for i in 0..4u8 {
        rec.push(i % 10);
        rec.extend((0..3072).map(|p| ((p + i as usize) % 256) as u8));
    }
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for name in (1..=5)
        .map(|i| format!("data_batch_{i}.bin"))
        .chain(["test_batch.bin".to_string(), "batches.meta.txt".to_string()])
    {
        let mut h = tar::Header::new_gnu();
        h.set_size(rec.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(
            &mut h,
            format!("cifar-10-batches-bin/{name}"),
            rec.as_slice(),
        )
        .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

#[test]
fn interrupted_download_resumes_and_installs() {
    let archive = cifar_archive();
    let (base, log) = serve(
        HashMap::from([("/c10/cifar-10-binary.tar.gz".to_string(), archive.clone())]),
        vec!["/c10/cifar-10-binary.tar.gz".into()],
    );
    let src = DatasetSource {
        id: "cifar10".into(),
        base_url: "http://127.0.0.1:9/unused".into(),
        files: vec![("cifar-10-binary.tar.gz".into(), md5(&archive))],
        unpack: true,
        kind: "cifar10".into(),
    };
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("cifar10");
    let mirror = format!("{base}/c10");
    // The connection drops half-way: a one-line error, the partial file kept.
    let e = install(&src, &target, Some(&mirror), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("run again to resume") && !e.contains('\n'),
        "{e}"
    );
    let part = target.join("cifar-10-binary.tar.gz.part");
    assert_eq!(
        std::fs::metadata(&part).unwrap().len() as usize,
        archive.len() / 2
    );
    // Run again: it resumes from the partial file with a Range request, then unpacks.
    let spec = install(&src, &target, Some(&mirror), false).unwrap();
    assert_eq!(spec, format!("cifar10:{}", target.display()));
    let ranges: Vec<Option<String>> = log.lock().unwrap().iter().map(|(_, r)| r.clone()).collect();
    assert_eq!(
        ranges,
        vec![None, Some(format!("bytes={}-", archive.len() / 2))]
    );
    assert!(!part.exists());
    assert_eq!(
        std::fs::read(target.join("cifar-10-binary.tar.gz")).unwrap(),
        archive
    );
    let ds = astra_train::data::cifar::load_cifar10(&target, true).unwrap();
    assert_eq!((ds.len(), ds.labels[3]), (20, 3));
    // Installed already: nothing is fetched.
    install(&src, &target, Some(&mirror), false).unwrap();
    assert_eq!(log.lock().unwrap().len(), 2);
}

#[test]
fn checksum_mismatch_and_http_errors_leave_nothing() {
    let (base, _) = serve(
        HashMap::from([("/f.gz".to_string(), b"these are not the bytes".to_vec())]),
        vec![],
    );
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("f.gz");
    let e = fetch(&format!("{base}/f.gz"), &dest, &"0".repeat(32), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("MD5") && e.contains("does not match"), "{e}");
    assert!(!dest.exists() && !dir.path().join("f.gz.part").exists());
    let e = fetch(&format!("{base}/missing.gz"), &dest, &"0".repeat(32), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("404"), "{e}");
    assert!(astra_train::data::download::find("imagenet")
        .unwrap_err()
        .to_string()
        .contains("cifar10"));
}
