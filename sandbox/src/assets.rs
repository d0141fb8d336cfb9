//! The files tests/setup.sh prepares: the stock Debian kernel (which is both the sandbox's
//! kernel and the guests'), its KVM modules, busybox, and the static siovmm.

use std::path::{Path, PathBuf};

/// The folder of prepared files (`$SIOVMM_ASSETS`, else `<workspace>/target/guest-assets`).
#[derive(Debug, Clone)]
pub struct Assets {
    /// Folder holding them.
    pub dir: PathBuf,
}

/// What the sandbox itself needs: its kernel, busybox, the KVM modules it loads and the KVM
/// ballast it starts (sandbox/ballast/kvm_ballast.c).
pub const SANDBOX_FILES: &[&str] = &[
    "bzImage",
    "busybox",
    "kvm_ballast",
    "modules/irqbypass.ko",
    "modules/ccp.ko",
    "modules/kvm.ko",
    "modules/kvm-amd.ko",
    "modules/kvm-intel.ko",
];

impl Assets {
    /// Finds the assets and checks that `needed` (paths relative to the folder) are there.
    pub fn locate(needed: &[&str]) -> Result<Self, String> {
        let dir = std::env::var_os("SIOVMM_ASSETS")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-assets"));
        for f in SANDBOX_FILES.iter().chain(needed) {
            if !dir.join(f).exists() {
                return Err(format!("{} is missing: run tests/setup.sh first", dir.join(f).display()));
            }
        }
        Ok(Self { dir })
    }

    /// Path of one asset.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Contents of one asset.
    pub fn read(&self, name: &str) -> Result<Vec<u8>, String> {
        std::fs::read(self.path(name)).map_err(|e| format!("reading {}: {e}", self.path(name).display()))
    }
}
