//! The shared libtorch link set-up (../build/link_libtorch.rs), and csrc/int8_linear.cpp: a
//! small C++ shim, compiled against the same libtorch's headers as torch-sys compiles its own,
//! that reaches fbgemm's dynamic int8 linear through the dispatcher (tch does not bind it).
#[path = "../build/link_libtorch.rs"]
mod link_libtorch;

use std::path::PathBuf;

fn main() {
    link_libtorch::main();
    println!("cargo:rerun-if-changed=csrc/int8_linear.cpp");
    // Without LIBTORCH torch-sys stops the build with its own message.
    let Some(root) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        return;
    };
    // The wheels of PyTorch 2.x use the C++11 ABI, as torch-sys assumes unless told otherwise.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    cc::Build::new()
        .cpp(true)
        .file("csrc/int8_linear.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("astra_int8_linear");
}
