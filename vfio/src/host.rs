//! Checks that a host device named by its sysfs directory can be handed to a guest through
//! kernel VFIO, before any VM exists: it exists, it is bound to a VFIO driver, it is in an
//! IOMMU group, every other device of that group lets the group be used (the kernel's rule,
//! linux drivers/vfio/group.c and vfio_main.c: bound to a VFIO driver, to an allowed
//! driver (pci-stub, pcieport), or to none), and the character devices VFIO will use can be
//! opened: the group's (`/dev/vfio/N`, with the legacy container) or the device's own cdev
//! (`/dev/vfio/devices/vfioN`) and `/dev/iommu` (with iommufd, [`Iommu::Iommufd`]). Every
//! refusal is one error naming the path and what is wrong.

use std::path::{Path, PathBuf};

/// Drivers that do not make a group unusable beside a VFIO driver (see the module doc).
const HARMLESS_DRIVERS: [&str; 2] = ["pci-stub", "pcieport"];

/// How siovmm reaches the host IOMMU for kernel VFIO devices (`--vfio-iommu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Iommu {
    /// The legacy interface: a container (`/dev/vfio/vfio`, type1 IOMMU) holding each
    /// device's IOMMU group (`/dev/vfio/N`).
    #[default]
    Container,
    /// The device's own character device (`/dev/vfio/devices/vfioN`) bound to an iommufd
    /// (`/dev/iommu`): Linux 6.6 or later with CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV.
    Iommufd,
}

impl Iommu {
    /// The `--vfio-iommu` value naming it.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "container" => Some(Self::Container),
            "iommufd" => Some(Self::Iommufd),
            _ => None,
        }
    }

    /// Its `--vfio-iommu` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Container => "container",
            Self::Iommufd => "iommufd",
        }
    }
}

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
    /// With iommufd: the device has no VFIO cdev. Linux 6.1 to 6.5 name the device (sysfs
    /// `vfio-dev/vfioN`) but make no character device for it; older kernels not even that.
    #[error("{path}: has no VFIO device cdev ({why}); --vfio-iommu iommufd needs a host kernel with CONFIG_VFIO_DEVICE_CDEV (Linux 6.6 or later)")]
    NoCdev {
        /// The device.
        path: PathBuf,
        /// What is missing.
        why: String,
    },
    /// With iommufd: `/dev/iommu` cannot be opened.
    #[error("{path}: {error} (--vfio-iommu iommufd needs a host kernel with CONFIG_IOMMUFD, and this user allowed to open it)")]
    NoIommufd {
        /// `/dev/iommu`.
        path: PathBuf,
        /// The OS error.
        error: String,
    },
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
fn open_rw(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).write(true).open(path)
}

/// Whether `path` opens read-write; `Inaccessible` naming it if not.
fn openable(path: &Path) -> Result<(), HostError> {
    open_rw(path).map(drop).map_err(|e| HostError::Inaccessible { path: path.to_path_buf(), error: e.to_string() })
}

/// The name of the device's VFIO cdev (`vfioN`, listed under `vfio-dev/` in its sysfs
/// directory: linux Documentation/driver-api/vfio.rst, "VFIO device cdev").
fn cdev_name(sysfs: &Path) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sysfs.join("vfio-dev"))
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vfio"))
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Checks one device for `iommu`; `dev_vfio` is where the VFIO character devices are
/// (`/dev/vfio`), iommufd's is beside it (`/dev/iommu`).
pub fn check(path: &Path, dev_vfio: &Path, iommu: Iommu) -> Result<HostDevice, HostError> {
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
    if iommu == Iommu::Iommufd {
        // Group viability still holds: iommufd claims DMA ownership for the whole group.
        let no_cdev = |why: String| HostError::NoCdev { path: path.to_path_buf(), why };
        let cdev = cdev_name(&sysfs).ok_or_else(|| no_cdev("no vfio-dev/ in its sysfs directory".into()))?;
        let cdev = dev_vfio.join("devices").join(cdev);
        if !cdev.exists() {
            return Err(no_cdev(format!("{} does not exist", cdev.display())));
        }
        openable(&cdev)?;
        let iommu_dev = dev_vfio.with_file_name("iommu");
        open_rw(&iommu_dev).map_err(|e| HostError::NoIommufd { path: iommu_dev, error: e.to_string() })?;
        return Ok(HostDevice { sysfs, name, group });
    }
    openable(&dev_vfio.join("vfio"))?;
    let group_dev = dev_vfio.join(group.to_string());
    match open_rw(&group_dev) {
        Ok(_) => {}
        // vfio_group_fops_open: a group is opened by one user at a time.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Err(HostError::Busy { path: path.to_path_buf(), group_dev }),
        Err(e) => return Err(HostError::Inaccessible { path: group_dev, error: e.to_string() }),
    }
    Ok(HostDevice { sysfs, name, group })
}

/// Checks every device for `iommu`, and that none is named twice (by any path that leads to it).
pub fn check_all(paths: &[PathBuf], dev_vfio: &Path, iommu: Iommu) -> Result<Vec<HostDevice>, HostError> {
    let mut devices: Vec<HostDevice> = Vec::new();
    for path in paths {
        let device = check(path, dev_vfio, iommu)?;
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

        /// Gives `device` the VFIO cdev vfioN: in its sysfs directory and under the fake /dev/vfio.
        fn cdev(&self, device: &Path, n: u32) {
            std::fs::create_dir_all(device.join("vfio-dev").join(format!("vfio{n}"))).unwrap();
            std::fs::create_dir_all(self.dev().join("devices")).unwrap();
            std::fs::write(self.dev().join("devices").join(format!("vfio{n}")), b"").unwrap();
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
        let d = check(&nvme, &t.dev(), Iommu::Container).unwrap();
        assert_eq!((d.name.as_str(), d.group), ("0000:00:03.0", 7));
    }

    #[test]
    fn every_refusal_names_the_path_and_the_problem() {
        let t = Tree::new("refusals");
        let e = |p: &Path| check(p, &t.dev(), Iommu::Container).unwrap_err().to_string();
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
        let err = check(&a, &t.dev(), Iommu::Container).unwrap_err();
        assert!(matches!(&err, HostError::Inaccessible { path, .. } if path.ends_with("dev/3")), "{err}");
        std::fs::write(t.dev().join("3"), b"").unwrap();
        // The same device through a second path (a symlink, as /sys/bus/pci/devices has).
        let alias = t.root.join("alias");
        symlink(&a, &alias).unwrap();
        let err = check_all(&[a.clone(), alias.clone()], &t.dev(), Iommu::Container).unwrap_err();
        assert_eq!(err, HostError::Duplicate(alias));
        assert_eq!(check_all(std::slice::from_ref(&a), &t.dev(), Iommu::Container).unwrap().len(), 1);
    }

    #[test]
    fn with_iommufd_the_device_cdev_and_dev_iommu_are_checked_instead_of_the_group() {
        let t = Tree::new("iommufd");
        let nvme = t.device("0000:00:03.0", Some("vfio-pci"), Some(4));
        let check_fd = |p: &Path| check(p, &t.dev(), Iommu::Iommufd);
        // A kernel without device cdevs (the sandbox's 6.1): named, with what it needs.
        assert_eq!(
            check_fd(&nvme).unwrap_err().to_string(),
            format!("{}: has no VFIO device cdev (no vfio-dev/ in its sysfs directory); --vfio-iommu iommufd needs a host kernel with CONFIG_VFIO_DEVICE_CDEV (Linux 6.6 or later)", nvme.display())
        );
        // Linux 6.1-6.5: the device is named in sysfs, no character device is made (seen in
        // the sandbox).
        std::fs::create_dir_all(nvme.join("vfio-dev/vfio0")).unwrap();
        assert!(check_fd(&nvme).unwrap_err().to_string().contains(&format!(": has no VFIO device cdev ({} does not exist)", t.dev().join("devices/vfio0").display())));
        t.cdev(&nvme, 0);
        let err = check_fd(&nvme).unwrap_err();
        assert!(matches!(&err, HostError::NoIommufd { path, .. } if path == &t.root.join("iommu")), "{err}");
        assert!(err.to_string().contains("CONFIG_IOMMUFD"), "{err}");
        std::fs::write(t.root.join("iommu"), b"").unwrap();
        // The group's character device is not needed (nor /dev/vfio/vfio).
        std::fs::remove_file(t.dev().join("4")).unwrap();
        std::fs::remove_file(t.dev().join("vfio")).unwrap();
        assert_eq!(check_fd(&nvme).unwrap().group, 4);
        assert!(check(&nvme, &t.dev(), Iommu::Container).is_err());
        // The group must still be viable.
        t.device("0000:00:03.1", Some("nvme"), Some(4));
        assert!(matches!(check_fd(&nvme).unwrap_err(), HostError::GroupNotViable { group: 4, .. }));
    }

    #[test]
    fn iommu_names_round_trip() {
        for i in [Iommu::Container, Iommu::Iommufd] {
            assert_eq!(Iommu::from_name(i.name()), Some(i));
        }
        assert_eq!(Iommu::from_name("type1"), None);
    }
}
