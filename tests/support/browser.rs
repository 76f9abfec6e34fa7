//! Headless Chromium for the dashboard tests (Debian's `chromium`, installed by `.ci/run`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::TIMEOUT;

pub fn chromium_path() -> std::path::PathBuf {
    ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .unwrap_or_else(|| {
            panic!("chromium is not installed: run `apt-get install -y chromium` (the dashboard test drives the page in it)")
        })
        .into()
}

/// The value of a JavaScript expression in the page.
pub fn js(tab: &headless_chrome::Tab, expr: &str) -> Value {
    tab.evaluate(&format!("JSON.stringify({expr})"), false)
        .unwrap_or_else(|e| panic!("evaluate {expr}: {e}"))
        .value
        .and_then(|v| v.as_str().and_then(|s| serde_json::from_str(s).ok()))
        .unwrap_or(Value::Null)
}

/// Waits until a JavaScript condition holds in the page (it refreshes every 2 s).
pub fn wait_js(tab: &headless_chrome::Tab, cond: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while js(tab, cond) != Value::Bool(true) {
        assert!(
            Instant::now() < deadline,
            "the page never showed {cond}; it shows: {}",
            js(tab, "document.body.innerText")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A headless Chromium with its profile under `dir`, started with the flags a closed
/// network needs.
pub fn launch(chromium: std::path::PathBuf, dir: &std::path::Path) -> headless_chrome::Browser {
    headless_chrome::Browser::new(
        headless_chrome::LaunchOptions::default_builder()
            .path(Some(chromium))
            .sandbox(false)
            .window_size(Some((1600, 1000)))
            .user_data_dir(Some(dir.join("profile")))
            .idle_browser_timeout(Duration::from_secs(120))
            .args(
                [
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                ]
                .iter()
                .map(std::ffi::OsStr::new)
                .collect(),
            )
            .build()
            .expect("launch options"),
    )
    .expect("start chromium")
}
