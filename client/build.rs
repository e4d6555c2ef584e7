//! Generates the gRPC client from the node's `proto/arca.proto` with protox: no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../node/proto");
    let descriptors = protox::compile(["arca.proto"], ["../node/proto"])?;
    tonic_prost_build::configure().build_server(false).compile_fds(descriptors)?;
    Ok(())
}
