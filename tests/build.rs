//! Tells the tests whether a Qdrant server is configured (`SMARTDB_TEST_QDRANT_URL`), so that
//! the conformance suite of the Qdrant backend shows up as "ignored" (with the reason) instead of
//! passing silently when there is none. Rebuilt when the variable changes.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SMARTDB_TEST_QDRANT_URL");
    println!("cargo:rustc-check-cfg=cfg(qdrant_server)");
    if std::env::var_os("SMARTDB_TEST_QDRANT_URL").is_some_and(|url| !url.is_empty()) {
        println!("cargo:rustc-cfg=qdrant_server");
    }
}
