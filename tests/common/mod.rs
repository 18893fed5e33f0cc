pub mod initramfs;
