//! One VM's KVM plumbing: the VM and its memslot, the vCPU, the raw ioctls kvm-ioctls lacks, the
//! GDT, and loading the guest (image, descriptor tables, page tables, boot info).

pub mod boot;
pub mod gdt;
pub mod ioctls;
pub mod vcpu;
pub mod vm;
