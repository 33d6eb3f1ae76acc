//! criterion benches of dbproxy's hot path live in `benches/`; run `cargo bench -p proxy-benches`.
