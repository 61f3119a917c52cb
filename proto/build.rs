fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The list below is only read here: a new file must rebuild.
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().bytes(".").compile_protos(
        &[
            "proto/cairn/git.proto",
            "proto/cairn/admin.proto",
            "proto/cairn/pack_transfer.proto",
            "proto/cairn/raft.proto",
            "proto/cairn/cluster.proto",
            "proto/cairn/events.proto",
            "proto/cairn/identity.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
