//! Compiles `proto/commands.proto` with protox (a pure-Rust protobuf compiler), so building
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/commands.proto");
    let descriptors = protox::compile(["proto/commands.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::CompactCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
