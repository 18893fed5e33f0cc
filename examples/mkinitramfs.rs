//! Writes the test initramfs (busybox; /init prints a marker and reboots) to the
//! path given: `cargo run --example mkinitramfs -- OUT.cpio`.

#[path = "../tests/common/initramfs.rs"]
mod initramfs;

fn main() {
    let out = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: mkinitramfs OUT.cpio");
        std::process::exit(2)
    });
    let Some(bb) = initramfs::busybox() else {
        eprintln!("mkinitramfs: no busybox (apt-get install busybox-static)");
        std::process::exit(2)
    };
    if let Err(e) = std::fs::write(&out, initramfs::build(&bb)) {
        eprintln!("mkinitramfs: {out}: {e}");
        std::process::exit(2)
    }
    if let Some(k) = initramfs::debian_kernel() {
        println!("{}", k.display());
    }
}
