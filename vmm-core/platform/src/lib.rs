//! PC platform devices modelled in userspace (used with the software CPU; KVM has them in the kernel).
