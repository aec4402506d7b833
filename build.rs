//! Compiles `protos/` with protox (pure Rust), so building needs no system `protoc`. The encoded
//! descriptor set is kept for gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["protos/distsrv.proto", "protos/tensorflow_compat.proto"];
    let mut compiler = protox::Compiler::new(["protos"])?;
    compiler.include_imports(true).open_files(protos)?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("distsrv_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        // Payloads are decoded as slices of the receive buffer, not copies.
        .bytes(".distsrv.v1.TensorChunk.data")
        .bytes(".distsrv.v1.TensorProto.tensor_content")
        .bytes(".distsrv.v1.Value.bytes_value")
        .generate_default_stubs(true)
        // Tasks in index order, so the same cluster always encodes to the same bytes.
        .btree_map(".distsrv.v1.JobDef.tasks")
        .compile_fds(compiler.file_descriptor_set())?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
