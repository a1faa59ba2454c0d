//! Compiles `smartdb/v1/*.proto` with `protox` (pure Rust, so a fresh machine needs no `protoc`)
//! and generates tonic stubs plus the encoded descriptor set served by reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "smartdb/v1/knowledge_base.proto",
        "smartdb/v1/document.proto",
        "smartdb/v1/search.proto",
        "smartdb/v1/admin.proto",
        "smartdb/v1/embed.proto",
        "smartdb/v1/index.proto",
        "smartdb/v1/telemetry.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("smartdb_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
