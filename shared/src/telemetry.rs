//! Logging set-up shared by every binary.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs a fmt subscriber filtered by `RUST_LOG` (default `default_filter`);
/// `SPOOL_LOG_JSON=1` switches to JSON lines for log shippers. Colours only on a
/// terminal: a log file keeps plain `key=value` fields that grep can find.
pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("SPOOL_LOG_JSON").is_ok_and(|v| v == "1");
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(std::io::stdout().is_terminal());
    // try_init: tests call this once per spawned app.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
