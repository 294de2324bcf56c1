//! Build script shared by the crates whose binaries link libtorch (astra-train, astra-eval).
//!
//! 1. An rpath to `$LIBTORCH/lib`, so the binaries run without LD_LIBRARY_PATH. It is the path as
//!    given (`.libtorch`, a link made by scripts/setup.sh), not its target, so re-running set-up
//!    against another libtorch needs no rebuild. It is a RUNPATH: LD_LIBRARY_PATH still wins, which
//!    is how the GPU machine substitutes its own libtorch.
//! 2. `libtorch_cuda.so` kept with --no-as-needed when the libtorch has it: nothing in our code refers
//!    to its symbols, so the linker would drop it and the binaries would never register CUDA.
//! 3. The libtorch version seen at build time, for `astra-train info`.
//! 4. The commit the binaries are built from (`ASTRA_BUILD_COMMIT`, empty outside a git checkout),
//!    so result tables name the code that made them: binaries are built on one machine and run
//!    on another, whose checkout may be anything.
use std::path::PathBuf;

pub fn main() {
    build_commit();
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    // Without LIBTORCH torch-sys stops the build with its own message; scripts/setup.sh sets it up.
    let Some(root) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        return;
    };
    let lib = root.join("lib");
    if !lib.is_dir() {
        return;
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    let version = std::fs::read_to_string(root.join("build-version"))
        .ok()
        .or_else(|| {
            let py = std::fs::read_to_string(root.join("version.py")).ok()?;
            py.lines()
                .find_map(|l| l.strip_prefix("__version__ = "))
                .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!(
        "cargo:rustc-env=ASTRA_LIBTORCH_BUILD_VERSION={}",
        version.trim()
    );
}

fn build_commit() {
    // A branch switch changes HEAD; a new commit changes the branch's ref (loose or packed).
    for f in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        println!("cargo:rerun-if-changed={f}");
    }
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=ASTRA_BUILD_COMMIT={commit}");
}
