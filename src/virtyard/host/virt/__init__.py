"""Host virtualization: VMs on libvirt/QEMU, their domain XML and our metadata inside it."""
