//! `spendguard-mock-provider --listen 127.0.0.1:9999`: the mock upstream as a process (demo,
//! benchmarks, Python tests).

use clap::Parser;
use spendguard_mock_provider::{MockConfig, MockProvider};

#[derive(Parser)]
#[command(about = "Mock OpenAI/Anthropic upstream with deterministic usage")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9999")]
    listen: std::net::SocketAddr,
    /// Output tokens per response (capped by the request's max tokens).
    #[arg(long, default_value_t = 16)]
    output_tokens: u32,
    /// Delay before the response starts.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Delay between stream chunks.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let mock = MockProvider::new(MockConfig {
        output_tokens: args.output_tokens,
        latency_ms: args.latency_ms,
        chunk_delay_ms: args.chunk_delay_ms,
    });
    println!("mock provider listening on {}", listener.local_addr()?);
    axum::serve(spendguard_mock_provider::nodelay(listener), mock.router()).await?;
    Ok(())
}
