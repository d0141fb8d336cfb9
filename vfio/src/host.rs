//! Checks that a host device named by its sysfs directory can be handed to a guest through
//! kernel VFIO, before any VM exists: it exists, it is bound to a VFIO driver, it is in an
//! IOMMU group, every other device of that group lets the group be used (the kernel's rule,
//! linux drivers/vfio/group.c and vfio_main.c: bound to a VFIO driver, to an allowed
//! driver (pci-stub, pcieport), or to none), and the group's character device can be opened.
//! Every refusal is one error naming the path and what is wrong.

use std::path::{Path, PathBuf};

/// Drivers that do not make a group unusable beside a VFIO driver (see the module doc).
const HARMLESS_DRIVERS: [&str; 2] = ["pci-stub", "pcieport"];

/// A device that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostDevice {
    /// The sysfs directory, canonical (`/sys/devices/pci0000:00/0000:00:03.0`).
    pub sysfs: PathBuf,
    /// Its name (`0000:00:03.0`, or a mediated device's UUID).
    pub name: String,
    /// Its IOMMU group number.
    pub group: u32,
}

/// Why a device cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    /// The path does not exist.
    #[error("{0}: no such device")]
    NotFound(PathBuf),
    /// Not a device directory (no `driver` link and no `iommu_group` link).
    #[error("{0}: not a PCI or mediated device's sysfs directory (expected /sys/bus/pci/devices/DDDD:BB:DD.F or /sys/bus/mdev/devices/UUID)")]
    NotADevice(PathBuf),
    /// Bound to no driver.
    #[error("{0}: not bound to any driver; bind it to vfio-pci first")]
    Unbound(PathBuf),
    /// Bound to a driver that is not a VFIO one.
    #[error("{path}: bound to {driver}, not to vfio-pci")]
    WrongDriver {
        /// The device.
        path: PathBuf,
        /// Its driver.
        driver: String,
    },
    /// No IOMMU group: the host's IOMMU is off (or absent).
    #[error("{0}: has no IOMMU group; is the host's IOMMU enabled (intel_iommu=on)?")]
    NoIommu(PathBuf),
    /// Another device in the group is bound to a host driver.
    #[error("{path}: IOMMU group {group} is not viable: it also holds {others}, bound to host drivers; bind them to vfio-pci or unbind them")]
    GroupNotViable {
        /// The device.
        path: PathBuf,
        /// Its group.
        group: u32,
        /// The other devices and their drivers, "0000:00:04.0 (e1000e), ...".
        others: String,
    },
    /// A VFIO character device cannot be opened.
    #[error("{path}: {error} (is the vfio module loaded, and may this user open it?)")]
    Inaccessible {
        /// `/dev/vfio/vfio` or `/dev/vfio/N`.
        path: PathBuf,
        /// The OS error.
        error: String,
    },
    /// The group's character device is held open already: by another VM (VFIO lets one
    /// user have a group at a time).
    #[error("{path}: its IOMMU group is in use: {group_dev} is held by another process, such as another VM")]
    Busy {
        /// The device.
        path: PathBuf,
        /// `/dev/vfio/N`.
        group_dev: PathBuf,
    },
    /// The same device named twice.
    #[error("{0}: named twice")]
    Duplicate(PathBuf),
}

/// The basename of the link at `dir/name`, if there is one.
fn link_name(dir: &Path, name: &str) -> Option<String> {
    let target = std::fs::read_link(dir.join(name)).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Whether `driver` is a VFIO driver (vfio-pci, a vfio-pci variant such as mlx5_vfio_pci, or
/// vfio_mdev).
fn is_vfio_driver(driver: &str) -> bool {
    driver.contains("vfio")
}

/// Opens `path` read-write, as VFIO will.
fn openable(path: &Path) -> Result<(), HostError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|e| HostError::Inaccessible { path: path.to_path_buf(), error: e.to_string() })
}

/// Checks one device; `dev_vfio` is where the VFIO character devices are (`/dev/vfio`).
pub fn check(path: &Path, dev_vfio: &Path) -> Result<HostDevice, HostError> {
    let sysfs = std::fs::canonicalize(path).map_err(|_| HostError::NotFound(path.to_path_buf()))?;
    let has_group_link = std::fs::symlink_metadata(sysfs.join("iommu_group")).is_ok();
    let driver = link_name(&sysfs, "driver");
    if !has_group_link && driver.is_none() && !sysfs.join("config").exists() {
        return Err(HostError::NotADevice(path.to_path_buf()));
    }
    match &driver {
        None => return Err(HostError::Unbound(path.to_path_buf())),
        Some(d) if !is_vfio_driver(d) => {
            return Err(HostError::WrongDriver { path: path.to_path_buf(), driver: d.clone() })
        }
        Some(_) => {}
    }
    let group_dir = std::fs::canonicalize(sysfs.join("iommu_group")).map_err(|_| HostError::NoIommu(path.to_path_buf()))?;
    let group: u32 = group_dir
        .file_name()
        .and_then(|n| n.to_str()?.parse().ok())
        .ok_or_else(|| HostError::NoIommu(path.to_path_buf()))?;
    let name = sysfs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut others: Vec<String> = Vec::new();
    if let Ok(members) = std::fs::read_dir(group_dir.join("devices")) {
        for member in members.flatten() {
            let member_name = member.file_name().to_string_lossy().into_owned();
            if member_name == name {
                continue;
            }
            if let Some(d) = link_name(&member.path(), "driver") {
                if !is_vfio_driver(&d) && !HARMLESS_DRIVERS.contains(&d.as_str()) {
                    others.push(format!("{member_name} ({d})"));
                }
            }
        }
    }
    if !others.is_empty() {
        others.sort();
        return Err(HostError::GroupNotViable { path: path.to_path_buf(), group, others: others.join(", ") });
    }
    openable(&dev_vfio.join("vfio"))?;
    let group_dev = dev_vfio.join(group.to_string());
    match std::fs::OpenOptions::new().read(true).write(true).open(&group_dev) {
        Ok(_) => {}
        // vfio_group_fops_open: a group is opened by one user at a time.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Err(HostError::Busy { path: path.to_path_buf(), group_dev }),
        Err(e) => return Err(HostError::Inaccessible { path: group_dev, error: e.to_string() }),
    }
    Ok(HostDevice { sysfs, name, group })
}

/// Checks every device, and that none is named twice (by any path that leads to it).
pub fn check_all(paths: &[PathBuf], dev_vfio: &Path) -> Result<Vec<HostDevice>, HostError> {
    let mut devices: Vec<HostDevice> = Vec::new();
    for path in paths {
        let device = check(path, dev_vfio)?;
        if devices.iter().any(|d| d.sysfs == device.sysfs) {
            return Err(HostError::Duplicate(path.clone()));
        }
        devices.push(device);
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake sysfs and /dev/vfio: devices under `devices/`, drivers under `drivers/`, groups
    /// under `groups/N/devices/`.
    struct Tree {
        root: PathBuf,
    }

    impl Tree {
        fn new(name: &str) -> Self {
            let root = std::env::temp_dir().join(format!("siovmm-host-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for d in ["devices", "drivers/vfio-pci", "drivers/nvme", "drivers/pcieport", "dev"] {
                std::fs::create_dir_all(root.join(d)).unwrap();
            }
            std::fs::write(root.join("dev/vfio"), b"").unwrap();
            Self { root }
        }

        /// A device `name` bound to `driver` (if any) in `group` (if any).
        fn device(&self, name: &str, driver: Option<&str>, group: Option<u32>) -> PathBuf {
            let dev = self.root.join("devices").join(name);
            std::fs::create_dir_all(&dev).unwrap();
            std::fs::write(dev.join("config"), [0u8; 64]).unwrap();
            if let Some(d) = driver {
                symlink(self.root.join("drivers").join(d), dev.join("driver")).unwrap();
            }
            if let Some(g) = group {
                let gdir = self.root.join("groups").join(g.to_string());
                std::fs::create_dir_all(gdir.join("devices")).unwrap();
                symlink(&gdir, dev.join("iommu_group")).unwrap();
                symlink(&dev, gdir.join("devices").join(name)).unwrap();
                std::fs::write(self.root.join("dev").join(g.to_string()), b"").unwrap();
            }
            dev
        }

        fn dev(&self) -> PathBuf {
            self.root.join("dev")
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn a_vfio_bound_device_in_a_viable_group_passes() {
        let t = Tree::new("ok");
        let nvme = t.device("0000:00:03.0", Some("vfio-pci"), Some(7));
        // A root port in the same group does not make it unusable.
        t.device("0000:00:1c.0", Some("pcieport"), Some(7));
        let d = check(&nvme, &t.dev()).unwrap();
        assert_eq!((d.name.as_str(), d.group), ("0000:00:03.0", 7));
    }

    #[test]
    fn every_refusal_names_the_path_and_the_problem() {
        let t = Tree::new("refusals");
        let e = |p: &Path| check(p, &t.dev()).unwrap_err().to_string();
        let missing = t.root.join("devices/0000:00:09.0");
        assert_eq!(e(&missing), format!("{}: no such device", missing.display()));
        let plain = t.root.join("drivers");
        assert!(e(&plain).contains("not a PCI or mediated device"), "{}", e(&plain));
        let unbound = t.device("0000:00:04.0", None, Some(8));
        assert!(e(&unbound).contains("not bound to any driver"));
        let host = t.device("0000:00:05.0", Some("nvme"), Some(9));
        assert_eq!(e(&host), format!("{}: bound to nvme, not to vfio-pci", host.display()));
        let no_iommu = t.device("0000:00:06.0", Some("vfio-pci"), None);
        assert!(e(&no_iommu).contains("has no IOMMU group"));
        let shared = t.device("0000:00:07.0", Some("vfio-pci"), Some(10));
        t.device("0000:00:07.1", Some("nvme"), Some(10));
        t.device("0000:00:07.2", None, Some(10));
        assert_eq!(
            e(&shared),
            format!("{}: IOMMU group 10 is not viable: it also holds 0000:00:07.1 (nvme), bound to host drivers; bind them to vfio-pci or unbind them", shared.display())
        );
    }

    #[test]
    fn an_unopenable_group_device_and_a_duplicate_are_refused() {
        let t = Tree::new("access");
        let a = t.device("0000:00:03.0", Some("vfio-pci"), Some(3));
        std::fs::remove_file(t.dev().join("3")).unwrap();
        let err = check(&a, &t.dev()).unwrap_err();
        assert!(matches!(&err, HostError::Inaccessible { path, .. } if path.ends_with("dev/3")), "{err}");
        std::fs::write(t.dev().join("3"), b"").unwrap();
        // The same device through a second path (a symlink, as /sys/bus/pci/devices has).
        let alias = t.root.join("alias");
        symlink(&a, &alias).unwrap();
        let err = check_all(&[a.clone(), alias.clone()], &t.dev()).unwrap_err();
        assert_eq!(err, HostError::Duplicate(alias));
        assert_eq!(check_all(std::slice::from_ref(&a), &t.dev()).unwrap().len(), 1);
    }
}
