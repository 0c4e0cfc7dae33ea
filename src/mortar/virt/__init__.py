"""Virtualization management (the VDSM role): storage domains, disk images, libvirt disk XML."""
