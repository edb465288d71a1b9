// Binaries that link libtorch get no rpath from torch-sys: without one they exit 127
// ("libtorch_cpu.so: cannot open") unless LD_LIBRARY_PATH is set. torch-sys tells its
// direct dependents where the libraries are; LIBTORCH is the fallback.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let dir = std::env::var_os("DEP_TCH_LIBTORCH_LIB")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("LIBTORCH").map(|root| std::path::PathBuf::from(root).join("lib")));
    if let Some(dir) = dir {
        println!("cargo:rustc-link-arg=-Wl,-rpath={}", dir.display());
    }
}
