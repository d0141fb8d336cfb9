//! The nested QEMU-TCG sandbox, and running what needs KVM wherever KVM is.
//!
//! Machines of our kind may have no `/dev/kvm`, or one that cannot run Linux
//! (docs/sandbox.md). Everything here exists so that every test, benchmark and
//! demo runs on any of them: [`host_kvm`] decides what the host's KVM can do (and honours
//! `SIOVMM_HIDE_KVM=1`), [`machine`] boots the sandbox on an initramfs built with [`cpio`],
//! [`ship`] carries host programs into it, [`kvm_test`] runs KVM tests there when it must, and
//! [`budget`] derives every time limit from the work. Guest-boot tests build on this in the
//! `siovmm-tests` crate.

pub mod assets;
pub mod budget;
pub mod cpio;
pub mod host_kvm;
pub mod kvm_test;
pub mod machine;
pub mod retries;
pub mod ship;

pub use assets::Assets;
#[doc(hidden)]
pub use inventory;
