//! Generates the gRPC server and client of seed 003's control API from `proto/rollout/lb.proto`.
//! protox compiles the `.proto` in pure Rust, so no `protoc` is needed (CI, offline image build).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    let file = format!("{dir}/rollout/lb.proto");
    // None of the generators below says when to rerun; without this any change reruns build.rs.
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([&file], [dir])?;
    tonic_prost_build::configure().build_server(true).build_client(true).build_transport(false).compile_fds(fds)?;
    Ok(())
}
