//! Log capture for the tests that check what the fleet writes: the same JSON lines production
//! writes, at `debug`, kept in memory for the whole test binary (so a test greps what every
//! role of every test wrote), while the test's stderr gets `warn` (or `RUST_LOG`).

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

static CAPTURED: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

fn buffer() -> &'static Mutex<Vec<u8>> {
    CAPTURED.get_or_init(|| Mutex::new(Vec::new()))
}

struct Capture;

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        buffer()
            .lock()
            .map_err(|_| std::io::Error::other("log buffer poisoned"))?
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber once per process; later calls do nothing.
pub fn init() {
    let stderr = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,redis::cluster_handling=error"));
    // The broker client's frame-level chatter is volume, not information.
    let captured = EnvFilter::new(
        "debug,lapin=info,amq_protocol=info,pinky_swear=info,redis::cluster_handling=error",
    );
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_writer(std::io::stderr)
                .with_filter(stderr),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_writer(|| Capture)
                .with_filter(captured),
        )
        .try_init();
}

/// Everything logged so far by this test binary.
pub fn captured() -> String {
    String::from_utf8_lossy(&buffer().lock().expect("log buffer")).into_owned()
}
