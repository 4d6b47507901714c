//! Trace replay without the `dynamo` binary:
//! `cargo run -p dynamo-bench --example replay -- ../shared/data/mooncake_conversation_trace.jsonl --url http://127.0.0.1:8000 --time-scale 0.1 --max-requests 200`

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    let args = match dynamo_bench::ReplayArgs::parse_from(std::env::args()) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let json = args.json;
    match dynamo_bench::replay(args).await {
        Ok(report) if json => {
            println!("{}", report.to_json());
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", report.to_text());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
