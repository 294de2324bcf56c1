//! Data sets read from fixtures written here in the original formats (IDX with and without gzip,
//! CIFAR-10/100 binary batches), and truncated or inconsistent files named in the error.

mod common;
use common::python;

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

#[test]
fn cifar_python_batches_equal_the_binary_ones() {
    let dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/make_cifar_python.py");
    let out = std::process::Command::new(python())
        .arg(script)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin10 = dir.path().join("bin10");
    std::fs::create_dir_all(&bin10).unwrap();
    for i in 1..=5 {
        std::fs::write(
            bin10.join(format!("data_batch_{i}.bin")),
            cifar_records(3, 1, 10),
        )
        .unwrap();
    }
    std::fs::write(bin10.join("test_batch.bin"), cifar_records(2, 1, 10)).unwrap();
    let want = cifar::load_cifar10(&bin10, true).unwrap();
    for proto in [2, 4, 5] {
        // The folder the archive unpacks into is accepted as well as the batches folder.
        let root = dir.path().join(format!("p{proto}"));
        let got = cifar::load_cifar10(&root, true).unwrap();
        assert_eq!(
            (got.images.len(), got.labels.len()),
            (want.images.len(), 15)
        );
        assert!(
            got.images == want.images && got.labels == want.labels,
            "protocol {proto}"
        );
        assert_eq!(cifar::load_cifar10(&root, false).unwrap().len(), 2);
        let c100 = cifar::load_cifar100(&root.join("cifar-100-python"), true).unwrap();
        assert_eq!((c100.len(), c100.classes, c100.labels[3]), (4, 100, 3));
    }
    // A truncated pickle is named, as is a missing batch.
    let p = dir.path().join("p2/cifar-10-batches-py/data_batch_3");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = cifar::load_cifar10(&dir.path().join("p2"), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("data_batch_3") && e.contains("truncated"), "{e}");
    let e = cifar::load_cifar10(dir.path(), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds no CIFAR batches"), "{e}");
}

fn write_image(path: &std::path::Path, w: u32, h: u32, shade: u8) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([shade, (x * 10) as u8, (y * 10) as u8])
    });
    img.save(path).unwrap();
}

#[test]
fn image_folders_decode_resize_and_reject_bad_layouts() {
    use astra_train::data::open_images;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for (split, n) in [("train", 3), ("val", 1)] {
        for (c, shade) in [("n01_cat", 40u8), ("n02_dog", 200)] {
            let d = root.join(split).join(c);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                // PNG and JPEG, square and not.
                write_image(&d.join(format!("{i}.png")), 20, 12, shade);
                write_image(&d.join(format!("{i}.JPEG")), 16, 16, shade);
            }
            std::fs::write(d.join("notes.txt"), "not an image").unwrap();
        }
    }
    let hold = astra_train::data::split::HoldOut::Count(2);
    let data = open_images(&format!("imagefolder:{}", root.display()), 8, hold).unwrap();
    assert_eq!(
        (
            data.train.len(),
            data.valid.len(),
            data.test.len(),
            data.train.classes()
        ),
        (10, 2, 4, 2)
    );
    assert_eq!(data.train.shape(), (3, 8, 8));
    let mut px = vec![0u8; 3 * 64];
    data.train.read_into(0, &mut px).unwrap();
    assert_eq!(data.train.label(0), 0);
    assert!(
        px[..64].iter().all(|&v| v.abs_diff(40) <= 3),
        "{:?}",
        &px[..8]
    );
    data.train.read_into(9, &mut px).unwrap();
    assert_eq!(data.train.label(9), 1);
    assert!(px[..64].iter().all(|&v| v.abs_diff(200) <= 3));
    let (x, y) = astra_train::data::loader::read_batch(&*data.test, &[0, 3], None)
        .unwrap()
        .to_tensors(&data.mean, &data.std, 8, Device::Cpu);
    assert_eq!(
        (x.size(), Vec::<i64>::try_from(&y).unwrap()),
        (vec![2, 3, 8, 8], vec![0, 1])
    );

    // A corrupt image is named when read; a folder without classes, or a validation class the
    // training split lacks, when opened.
    std::fs::write(root.join("train/n01_cat/0.JPEG"), b"\xff\xd8 not really").unwrap();
    let e = data.train.read_into(0, &mut px).unwrap_err().to_string();
    assert!(e.contains("0.JPEG") && e.contains("cannot decode"), "{e}");
    let empty = root.join("empty");
    std::fs::create_dir_all(empty.join("train")).unwrap();
    let e = open_images(&format!("imagefolder:{}", empty.display()), 8, hold)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("holds no class folders") && !e.contains('\n'),
        "{e}"
    );
    std::fs::create_dir_all(root.join("val/n03_fox")).unwrap();
    let e = open_images(&format!("imagefolder:{}", root.display()), 8, hold)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("n03_fox") && e.contains("training split does not have"),
        "{e}"
    );
}

/// ImageNet's layout in miniature under `root`: train/<synset>/ with two images of each of two
/// classes (n01440764 dark, n01443537 light) and a flat val/ whose image 1 is dark and image 2
/// light; returns val/.
fn two_class_flat_imagenet(root: &std::path::Path) -> std::path::PathBuf {
    for (c, shade) in [("n01440764", 40u8), ("n01443537", 200)] {
        let d = root.join("train").join(c);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..2 {
            write_image(&d.join(format!("{c}_{i}.JPEG")), 12, 12, shade);
        }
    }
    let val = root.join("val");
    std::fs::create_dir_all(&val).unwrap();
    write_image(&val.join("ILSVRC2012_val_00000001.JPEG"), 12, 12, 40);
    write_image(&val.join("ILSVRC2012_val_00000002.JPEG"), 12, 12, 200);
    val
}

/// ImageNet's validation folder as distributed: flat, labelled by Kaggle's LOC_val_solution.csv
/// four levels up (beside ILSVRC/ of ILSVRC/Data/CLS-LOC/val) or by a val_labels.txt beside the images; images
/// without labels, labels without images, and unknown synsets are refused in one line.
#[test]
fn a_flat_validation_folder_is_labelled_by_its_ground_truth_file() {
    use astra_train::data::open_images;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ILSVRC/Data/CLS-LOC");
    // Kaggle's order is not the files' order; the second image is the second class.
    let val = two_class_flat_imagenet(&root);
    let csv = dir.path().join("LOC_val_solution.csv");
    std::fs::write(
        &csv,
        "ImageId,PredictionString\nILSVRC2012_val_00000002,n01443537 1 2 3 4 n01443537 5 6 7 8\nILSVRC2012_val_00000001,n01440764 1 2 3 4\n",
    )
    .unwrap();
    let spec = format!("imagefolder:{}", root.display());
    let hold = astra_train::data::split::HoldOut::Count(1);
    let data = open_images(&spec, 8, hold).unwrap();
    assert_eq!(data.test.len(), 2);
    assert_eq!((data.test.label(0), data.test.label(1)), (0, 1));
    // A val_labels.txt beside the images takes precedence.
    std::fs::write(
        val.join("val_labels.txt"),
        "ILSVRC2012_val_00000001.JPEG n01443537\nILSVRC2012_val_00000002.JPEG n01440764\n",
    )
    .unwrap();
    let data = open_images(&spec, 8, hold).unwrap();
    assert_eq!((data.test.label(0), data.test.label(1)), (1, 0));
    std::fs::remove_file(val.join("val_labels.txt")).unwrap();
    let refused = |needle: &str| {
        let e = open_images(&spec, 8, hold).err().unwrap().to_string();
        assert!(e.contains(needle) && !e.contains('\n'), "{needle}: {e}");
    };
    write_image(&val.join("ILSVRC2012_val_00000003.JPEG"), 12, 12, 9);
    refused("labels 2 images");
    std::fs::write(&csv, "ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764\nILSVRC2012_val_00000002,n01443537\nILSVRC2012_val_00000009,n01443537\n").unwrap();
    refused("has no label");
    std::fs::write(&csv, "ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764\nILSVRC2012_val_00000002,n01443537\nILSVRC2012_val_00000003,n09999999 1 2\n").unwrap();
    refused("n09999999, a class the training split does not have");
    std::fs::write(&csv, "ImageId,PredictionString\nno comma here\n").unwrap();
    refused("line 2: expected ImageId,PredictionString");
}

/// The devkit's ground truth (line n: the ILSVRC2012_ID of val image n) labels a flat folder
/// through meta.mat's synsets, whose IDs are not in synset order; the MAT-files are written by
/// scipy's savemat, compressed (v7) and not (v5).
#[test]
fn the_devkit_ground_truth_labels_a_flat_folder_through_meta_mat() {
    use astra_train::data::{matlab, open_images};
    let dir = common::fixture("make_imagenet_devkit.py");
    let root = dir.path().join("imagenet");
    two_class_flat_imagenet(&root);
    // The devkit unpacked one level above the data folder.
    let devkit = dir.path().join("ILSVRC2012_devkit_t12");
    let spec = format!("imagefolder:{}", root.display());
    let hold = astra_train::data::split::HoldOut::Count(1);
    let data = open_images(&spec, 8, hold).unwrap();
    // Image 1 is ID 2 = n01440764 (class 0), image 2 is ID 1 = n01443537 (class 1).
    assert_eq!((data.test.label(0), data.test.label(1)), (0, 1));

    // v5 (uncompressed) and v7 (compressed) files read the same.
    let meta = devkit.join("data/meta.mat");
    let a = matlab::variable(&meta, "synsets").unwrap();
    let b = matlab::variable(&dir.path().join("meta_plain.mat"), "synsets").unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 3);
    assert_eq!(a.field(2, "WNID").unwrap().text(), Some("n02512053"));
    assert!(a
        .field(2, "gloss")
        .unwrap()
        .text()
        .unwrap()
        .ends_with("ünïcode"));
    assert_eq!(a.field(2, "ILSVRC2012_ID").unwrap().scalar(), Some(1001.0));
    assert!(
        matches!(a.field(2, "children"), Some(matlab::MatArray::Numeric { values, .. }) if values == &[1.0, 2.0])
    );

    let truth = devkit.join("data/ILSVRC2012_validation_ground_truth.txt");
    let refused = |needle: &str| {
        let e = open_images(&spec, 8, hold).err().unwrap().to_string();
        assert!(e.contains(needle) && !e.contains('\n'), "{needle}: {e}");
    };
    std::fs::write(&truth, "2\n7\n").unwrap();
    refused("line 2: '7' is not an ILSVRC2012_ID");
    std::fs::write(&truth, "2\n1\n1\n").unwrap();
    refused("labels 3 images");
    std::fs::write(&truth, "2\n1\n").unwrap();
    std::fs::write(&meta, b"MATLAB 5.0 MAT-file, truncated").unwrap();
    refused("not a MAT-file");
    std::fs::remove_file(&meta).unwrap();
    refused("meta.mat: missing: the devkit's synset table");
}

/// Every kind of MAT-file variable the reader handles, as scipy writes them.
#[test]
fn mat_files_read_numbers_text_cells_and_structs() {
    use astra_train::data::matlab::{self, MatArray};
    let dir = common::fixture("make_imagenet_devkit.py");
    let vars = matlab::read(&dir.path().join("kinds.mat")).unwrap();
    let get = |n: &str| vars.iter().find(|v| v.0 == n).unwrap().1.clone();
    assert_eq!(
        get("matrix"),
        MatArray::Numeric {
            dims: vec![2, 3],
            values: vec![1.5, 4.0, -2.0, 5.0, 3.0, 6.25]
        }
    );
    let numbers = |n: &str| match get(n) {
        MatArray::Numeric { values, .. } => values,
        other => panic!("{n}: {other:?}"),
    };
    assert_eq!(numbers("small_ints"), vec![1.0, 2.0, 300.0]);
    assert_eq!(numbers("int64s"), vec![-5.0, 2f64.powi(40)]);
    assert_eq!(numbers("singles"), vec![0.5, 1.5]);
    assert_eq!(get("name").text(), Some("café"));
    let MatArray::Cell { cells, .. } = get("cells") else {
        panic!("cells")
    };
    assert_eq!(
        cells.iter().map(|c| c.text().unwrap()).collect::<Vec<_>>(),
        ["a", "bc"]
    );
    let nested = get("nested");
    assert_eq!(nested.field(0, "label").unwrap().text(), Some("ok"));
    let inner = nested.field(0, "inner").unwrap();
    assert_eq!(inner.field(0, "x").unwrap().scalar(), Some(7.0));
    assert!(get("empty").is_empty());
    let e = matlab::variable(&dir.path().join("kinds.mat"), "synsets").unwrap_err();
    assert!(
        e.to_string()
            .contains("has no variable 'synsets' (it holds: matrix, "),
        "{e}"
    );
}
