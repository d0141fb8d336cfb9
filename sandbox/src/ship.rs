//! Host programs carried into the sandbox unchanged, at their own absolute paths, with the
//! shared libraries and dynamic loader they were linked against (as `ldd` resolves them on
//! this host). The sandbox runs the same Debian userland ABI as the host (both Debian 12 on
//! x86-64), so a test binary built here runs there as it is; absolute paths baked into it at
//! build time (`env!("CARGO_BIN_EXE_...")`) stay valid.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::machine::SandboxImage;

/// The shared objects `program` loads, including the dynamic loader; empty when static.
pub fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd").arg(program).output().map_err(|e| format!("running ldd {}: {e}", program.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd says "not a dynamic executable" (on stderr, status 1) for static programs.
        let err = String::from_utf8_lossy(&out.stderr);
        return if err.contains("not a dynamic executable") || text.contains("statically linked") {
            Ok(Vec::new())
        } else {
            Err(format!("ldd {}: {}", program.display(), err.trim()))
        };
    }
    parse_ldd(&text)
}

/// Library paths from `ldd` output: `name => /path (0x...)` and `/path (0x...)` lines; the
/// kernel's vDSO has no file. A library ldd could not find is an error naming it.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.contains("=> not found") {
            return Err(format!("a shared library is missing: {line}"));
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Adds `programs` and every library they need to `image`, each at its host path.
pub fn ship(image: &mut SandboxImage, programs: &[PathBuf]) -> Result<(), String> {
    let mut files = BTreeSet::new();
    for p in programs {
        files.insert(p.clone());
        files.extend(shared_libraries(p)?);
    }
    for f in files {
        let data = std::fs::read(&f).map_err(|e| format!("reading {}: {e}", f.display()))?;
        let path = f.to_str().ok_or_else(|| format!("{}: not a UTF-8 path", f.display()))?;
        image.file(path, 0o755, &data);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            ["/lib/x86_64-linux-gnu/libgcc_s.so.1", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"].map(PathBuf::from)
        );
        let missing = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(missing.contains("libfoo.so.1"), "{missing}");
    }

    /// This very test binary is dynamic: its libraries include libc and the loader.
    #[test]
    fn this_binary_needs_libc_and_the_loader() {
        let libs = shared_libraries(&std::env::current_exe().unwrap()).unwrap();
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("libc.so")), "{libs:?}");
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("ld-linux")), "{libs:?}");
    }
}
