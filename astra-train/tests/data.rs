//! Data sets read from fixtures written here in the original formats (IDX with and without gzip,
//! CIFAR-10/100 binary batches), and truncated or inconsistent files named in the error.

use std::io::Write;

use astra_train::data::{cifar, idx};
use tch::Device;

fn idx_images(n: u32, r: u32, c: u32) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2051u32, n, r, c] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend((0..n * r * c).map(|i| (i % 251) as u8));
    b
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2049u32, labels.len() as u32] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(labels);
    b
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn idx_gzip_and_plain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("train-images-idx3-ubyte.gz"),
        gz(&idx_images(6, 4, 4)),
    )
    .unwrap();
    std::fs::write(
        d.join("train-labels-idx1-ubyte.gz"),
        gz(&idx_labels(&[0, 1, 2, 3, 4, 9])),
    )
    .unwrap();
    std::fs::write(d.join("t10k-images-idx3-ubyte"), idx_images(2, 4, 4)).unwrap();
    std::fs::write(d.join("t10k-labels-idx1-ubyte"), idx_labels(&[7, 8])).unwrap();
    let train = idx::load(d, true).unwrap();
    assert_eq!(
        (
            train.len(),
            train.channels,
            train.height,
            train.width,
            train.classes
        ),
        (6, 1, 4, 4, 10)
    );
    assert_eq!(train.labels[5], 9);
    let test = idx::load(d, false).unwrap();
    assert_eq!(test.labels, vec![7, 8]);
    let (x, y) = train.batch(&[1, 5], &[0.5], &[0.5], Device::Cpu);
    assert_eq!(x.size(), vec![2, 1, 4, 4]);
    assert_eq!(Vec::<i64>::try_from(&y).unwrap(), vec![1, 9]);
    // pixel 0 of image 1 is 16 % 251 = 16 → (16/255 − 0.5)/0.5
    let v = x.double_value(&[0, 0, 0, 0]);
    assert!((v - (16.0 / 255.0 - 0.5) / 0.5).abs() < 1e-6, "{v}");

    // Truncated images, label count mismatch, wrong magic.
    let img = idx_images(6, 4, 4);
    std::fs::write(
        d.join("train-images-idx3-ubyte.gz"),
        gz(&img[..img.len() - 5]),
    )
    .unwrap();
    let e = idx::load(d, true).unwrap_err().to_string();
    assert!(
        e.contains("train-images-idx3-ubyte.gz") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(
        d.join("train-images-idx3-ubyte.gz"),
        gz(&idx_images(5, 4, 4)),
    )
    .unwrap();
    assert!(idx::load(d, true)
        .unwrap_err()
        .to_string()
        .contains("6 labels for 5 images"));
    std::fs::write(d.join("t10k-labels-idx1-ubyte"), idx_images(1, 1, 1)).unwrap();
    assert!(idx::load(d, false)
        .unwrap_err()
        .to_string()
        .contains("magic 2049"));
    let empty = tempfile::tempdir().unwrap();
    assert!(idx::load(empty.path(), true)
        .unwrap_err()
        .to_string()
        .contains("missing"));
}

fn cifar_records(n: usize, label_bytes: usize, classes: u8) -> Vec<u8> {
    let mut b = Vec::new();
    for i in 0..n {
        for _ in 0..label_bytes {
            b.push((i as u8) % classes);
        }
        b.extend((0..3072).map(|p| ((p + i) % 256) as u8));
    }
    b
}

#[test]
fn cifar_binary_batches() {
    let dir = tempfile::tempdir().unwrap();
    let d10 = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&d10).unwrap();
    for i in 1..=5 {
        std::fs::write(
            d10.join(format!("data_batch_{i}.bin")),
            cifar_records(3, 1, 10),
        )
        .unwrap();
    }
    std::fs::write(d10.join("test_batch.bin"), cifar_records(2, 1, 10)).unwrap();
    let train = cifar::load_cifar10(&d10, true).unwrap();
    assert_eq!(
        (train.len(), train.channels, train.height, train.classes),
        (15, 3, 32, 10)
    );
    assert_eq!(cifar::load_cifar10(&d10, false).unwrap().len(), 2);
    let (x, _) = train.batch(
        &[0, 14],
        &[0.49, 0.48, 0.45],
        &[0.25, 0.24, 0.26],
        Device::Cpu,
    );
    assert_eq!(x.size(), vec![2, 3, 32, 32]);

    let d100 = dir.path().join("cifar-100-binary");
    std::fs::create_dir_all(&d100).unwrap();
    std::fs::write(d100.join("train.bin"), cifar_records(4, 2, 100)).unwrap();
    std::fs::write(d100.join("test.bin"), cifar_records(1, 2, 100)).unwrap();
    let c100 = cifar::load_cifar100(&d100, true).unwrap();
    assert_eq!((c100.len(), c100.classes, c100.labels[3]), (4, 100, 3));

    // A truncated batch and a missing one are named.
    let rec = cifar_records(3, 1, 10);
    std::fs::write(d10.join("data_batch_2.bin"), &rec[..rec.len() - 100]).unwrap();
    let e = cifar::load_cifar10(&d10, true).unwrap_err().to_string();
    assert!(
        e.contains("data_batch_2.bin") && e.contains("truncated"),
        "{e}"
    );
    std::fs::remove_file(d10.join("data_batch_2.bin")).unwrap();
    assert!(cifar::load_cifar10(&d10, true)
        .unwrap_err()
        .to_string()
        .contains("data_batch_2.bin"));
    let mut bad = cifar_records(1, 1, 10);
    bad[0] = 10;
    std::fs::write(d10.join("test_batch.bin"), bad).unwrap();
    assert!(cifar::load_cifar10(&d10, false)
        .unwrap_err()
        .to_string()
        .contains("label 10 out of range"));
}
