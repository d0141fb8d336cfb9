//! A writer for the "newc" cpio format the Linux kernel unpacks as an initramfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst).

/// Builds an archive in memory. Parent folders of every entry are created on first use, so a
/// host file can be placed at its own absolute path (see `ship`).
#[derive(Debug, Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: std::collections::BTreeSet<String>,
}

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let name = name.trim_start_matches('/');
        // The kernel does not create missing parents when it unpacks (init/initramfs.c).
        let mut parent = 0;
        while let Some(i) = name[parent..].find('/') {
            let dir = &name[..parent + i];
            if self.dirs.insert(dir.to_string()) {
                self.raw_entry(dir, S_IFDIR | 0o755, &[], (0, 0));
            }
            parent += i + 1;
        }
        if mode & S_IFMT == S_IFDIR && !self.dirs.insert(name.to_string()) {
            return;
        }
        self.raw_entry(name, mode, data, rdev);
    }

    fn raw_entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            namesize as u32,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, S_IFDIR | 0o755, &[], (0, 0));
        self
    }

    /// A regular file with `perm` bits.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> &mut Self {
        self.entry(name, S_IFREG | perm, data, (0, 0));
        self
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(name, S_IFCHR | 0o600, &[], (major, minor));
        self
    }

    /// Finishes the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.raw_entry("TRAILER!!!", 0, &[], (0, 0));
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

/// The skeleton every initramfs here starts with: /bin/busybox, /dev/console, mount points.
pub fn busybox_root(busybox: &[u8]) -> Cpio {
    let mut c = Cpio::new();
    for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "etc", "usr", "usr/bin", "usr/sbin"] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    c.file("bin/busybox", 0o755, busybox);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let mut c = Cpio::new();
        c.file("init", 0o755, b"#!/bin/sh\n");
        let out = c.finish();
        assert_eq!(&out[..6], b"070701");
        // mode field (second) = 0o100755
        assert_eq!(&out[14..22], b"000081ed");
        // filesize field (seventh)
        assert_eq!(&out[54..62], b"0000000a");
        // name right after the 110-byte header
        assert_eq!(&out[110..115], b"init\0");
        assert_eq!(out.len() % 512, 0);
        let trailer = out.windows(10).position(|w| w == b"TRAILER!!!");
        assert!(trailer.is_some());
    }

    /// Names of the entries, in archive order.
    fn names(archive: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        let mut at = 0;
        let field = |at: usize, i: usize| usize::from_str_radix(std::str::from_utf8(&archive[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap(), 16).unwrap();
        while at + 110 <= archive.len() && &archive[at..at + 6] == b"070701" {
            let (size, namesize) = (field(at, 6), field(at, 11));
            names.push(String::from_utf8_lossy(&archive[at + 110..at + 110 + namesize - 1]).into_owned());
            at = (at + 110 + namesize).next_multiple_of(4);
            at = (at + size).next_multiple_of(4);
        }
        names
    }

    #[test]
    fn parents_are_created_once_and_before_their_files() {
        let mut c = Cpio::new();
        c.dir("lib");
        c.file("/lib/x86_64-linux-gnu/libc.so.6", 0o755, b"elf");
        c.file("lib/x86_64-linux-gnu/libgcc_s.so.1", 0o755, b"elf");
        c.dir("lib/x86_64-linux-gnu");
        let names = names(&c.finish());
        assert_eq!(
            names,
            ["lib", "lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu/libc.so.6", "lib/x86_64-linux-gnu/libgcc_s.so.1", "TRAILER!!!"]
        );
    }

    /// Round trip through the system's cpio when it is installed (tests/setup.sh installs it).
    #[test]
    fn cpio_tool_lists_our_archive() {
        if std::process::Command::new("cpio").arg("--version").output().is_err() {
            panic!("cpio is not installed; run tests/setup.sh");
        }
        let mut c = busybox_root(b"fake");
        c.file("init", 0o755, b"x");
        let data = c.finish();
        let path = std::env::temp_dir().join(format!("siovmm-cpio-{}.cpio", std::process::id()));
        std::fs::write(&path, data).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -it < {}", path.display()))
            .output()
            .unwrap();
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(list.contains("bin/busybox") && list.contains("dev/console") && list.contains("init"), "{list}");
        let _ = std::fs::remove_file(path);
    }
}
