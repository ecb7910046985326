//! The test upstream over stdio, for this crate's tests (see `haven_federation::testing`).
//! Its label is the first argument (default `stdio`).

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let label = std::env::args().nth(1).unwrap_or_else(|| "stdio".into());
    if let Err(e) = haven_federation::testing::serve_stdio(&label).await {
        eprintln!("test upstream: {e}");
        std::process::exit(1);
    }
}
