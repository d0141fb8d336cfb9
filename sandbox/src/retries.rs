//! Every run the harness tries again, kept in one file that `tests/run.sh` prints at the end:
//! libtest captures a passing test's stderr, so a failure that was retried and then passed
//! would otherwise leave no trace in CI (docs/testing.md, "What the failures were, and the
//! retries").

use std::io::Write;
use std::path::PathBuf;

/// Where retries are kept: `$SIOVMM_RETRY_LOG`, else `target/test-retries.log` of this
/// workspace.
pub fn log_path() -> PathBuf {
    std::env::var_os("SIOVMM_RETRY_LOG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-retries.log"))
}

/// Reports a retry: `why` (one line) and the failed attempt's transcript, to stderr and to
/// [`log_path`], each entry starting with a `=== retry:` line.
pub fn record(why: &str, transcript: &str) {
    eprintln!("{why}; its transcript follows, then it runs once more\n{transcript}");
    let path = log_path();
    if let Err(e) = append(&path, why, transcript) {
        eprintln!("siovmm-sandbox: cannot keep the retry in {}: {e}", path.display());
    }
}

fn append(path: &std::path::Path, why: &str, transcript: &str) -> std::io::Result<()> {
    let entry = format!("=== retry: {why}\n{transcript}\n");
    std::fs::OpenOptions::new().create(true).append(true).open(path)?.write_all(entry.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_appended_one_entry_each() {
        let path = std::env::temp_dir().join(format!("siovmm-retries-{}", std::process::id()));
        append(&path, "first why", "line a\nline b").unwrap();
        append(&path, "second why", "line c").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(text, "=== retry: first why\nline a\nline b\n=== retry: second why\nline c\n");
    }
}
