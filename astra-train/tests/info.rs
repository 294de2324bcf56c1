//! The libtorch set-up works as documented: the binary runs with no LD_LIBRARY_PATH (rpath), sees
//! libtorch 2.11, and keeps libtorch_cuda.so linked whenever the libtorch in use has it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn libtorch_lib() -> PathBuf {
    let root = std::env::var_os("LIBTORCH")
        .map(PathBuf::from)
        .expect("cargo sets LIBTORCH (.cargo/config.toml)");
    root.join("lib")
}

#[test]
fn info_runs_without_library_path_and_reports_libtorch_2_11() {
    let out = Command::new(env!("CARGO_BIN_EXE_astra-train"))
        .args(["info", "--json"])
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("LD_PRELOAD")
        .output()
        .expect("spawn astra-train");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let loaded = v["libtorch_loaded_version"].as_str().unwrap();
    assert!(loaded.starts_with("2.11.0"), "loaded libtorch {loaded}");
    assert!(v["cpu_threads"].as_i64().unwrap() >= 1);
    assert_eq!(
        v["cuda_available"].as_bool().unwrap(),
        v["cuda_device_count"].as_i64().unwrap() > 0
    );
}

#[test]
fn binary_links_libtorch_cuda_when_available() {
    let lib = libtorch_lib();
    let out = Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_astra-train")])
        .output()
        .expect("readelf (binutils) is needed for this test");
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(dynamic.contains("libtorch_cpu.so"), "{dynamic}");
    assert!(
        dynamic.contains(&lib.display().to_string()),
        "no rpath to {}: {dynamic}",
        lib.display()
    );
    let has_cuda = Path::new(&lib).join("libtorch_cuda.so").exists();
    assert_eq!(
        dynamic.contains("libtorch_cuda.so"),
        has_cuda,
        "libtorch_cuda.so linked iff present in {}",
        lib.display()
    );
}
