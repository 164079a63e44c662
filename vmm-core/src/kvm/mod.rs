//! The KVM engine: a VM with the in-kernel interrupt controllers and PIT, guest RAM in memory slots, and
//! vCPUs behind [`tessera_vcpu::Vcpu`].

pub mod cpuid;
pub mod msi;
pub mod vcpu;
pub mod vm;

pub use vm::{provide_device, KvmEngine};
