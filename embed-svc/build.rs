//! Tells the tests whether this machine can run the AVX-512 BF16 kernel, so that tests of that
//! kernel show up as "ignored" (with the reason) on other CPUs instead of passing silently.
//! Builds and tests run on the same machine here; a test binary moved to a CPU without the
//! feature fails loudly instead (the tests assert support at run time too).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-check-cfg=cfg(cpu_avx512bf16)");
    let target_is_x86_64 = std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64");
    if target_is_x86_64 && host_has_avx512bf16() {
        println!("cargo:rustc-cfg=cpu_avx512bf16");
    }
}

#[cfg(target_arch = "x86_64")]
fn host_has_avx512bf16() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn host_has_avx512bf16() -> bool {
    false
}
