fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().bytes(".").compile_protos(
        &[
            "proto/cairn/git.proto",
            "proto/cairn/admin.proto",
            "proto/cairn/pack_transfer.proto",
            "proto/cairn/raft.proto",
            "proto/cairn/cluster.proto",
            "proto/cairn/events.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
