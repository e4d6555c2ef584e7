//! Generates the gRPC code from `proto/arca.proto` with protox: no system protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(["proto/arca.proto"], ["proto"])?;
    tonic_prost_build::configure().codec_path("crate::codec::StrictCodec").compile_fds(descriptors)?;
    Ok(())
}
