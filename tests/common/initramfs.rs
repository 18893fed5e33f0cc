//! A busybox initramfs in the cpio "newc" format, written from scratch: `/init`
//! prints a marker line and reboots (visor's i8042 reset ends the run). With
//! `visor.input=1` on the kernel command line it first prints [`READY`], reads a
//! line from the console and echoes it after [`INPUT`]. With
//! `visor.poweroff=1` it prints /proc/interrupts before the marker and powers
//! off (`poweroff -f`: ACPI S5) instead of rebooting. With
//! `visor.powerbutton=1` it first loads the ACPI button and evdev modules of
//! the kernel (Debian builds them as modules), opens the "Power Button"
//! input device (events before the open would be lost), prints
//! [`POWER_READY`], waits for an input event from it and prints
//! [`POWER_PRESSED`]: what a user-space power-button daemon (acpid,
//! systemd-logind) does before it powers the machine off.

/// The line the test kernel's init prints, followed by the size of /proc/cmdline.
pub const MARKER: &str = "VISOR-LINUX-BOOT-OK";
pub const READY: &str = "VISOR-READY";
pub const INPUT: &str = "VISOR-INPUT:";
/// Printed when init waits for the power button (followed by its event device).
pub const POWER_READY: &str = "VISOR-POWER-BUTTON-READY";
/// Printed when the power button's input event came.
pub const POWER_PRESSED: &str = "VISOR-POWER-BUTTON-PRESSED";
/// Followed by how many `unchecked MSR access` lines the kernel logged.
pub const MSR_WARNINGS: &str = "VISOR-MSR-WARNINGS:";

struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

/// Builds the initramfs around the static busybox at `busybox`.
pub fn build(busybox: &[u8]) -> Vec<u8> {
    let mut c = Cpio {
        out: Vec::new(),
        ino: 0,
    };
    let init = format!(
        "#!/bin/busybox sh\n\
         B=/bin/busybox\n\
         $B mount -t proc proc /proc\n\
         if $B grep -q visor.input=1 /proc/cmdline; then\n\
         \x20 $B echo {READY}\n\
         \x20 read -t 120 line\n\
         \x20 $B echo {INPUT}$line\n\
         fi\n\
         $B echo {MSR_WARNINGS}$($B dmesg | $B grep -c 'unchecked MSR access')\n\
         if $B grep -q visor.powerbutton=1 /proc/cmdline; then\n\
         \x20 $B insmod /lib/evdev.ko\n\
         \x20 $B insmod /lib/button.ko\n\
         \x20 $B mount -t devtmpfs dev /dev\n\
         \x20 ev=$($B grep -A5 'Name=\"Power Button\"' /proc/bus/input/devices | $B sed -n 's/.*Handlers=.*\\(event[0-9]*\\).*/\\1/p')\n\
         \x20 exec 3</dev/input/$ev\n\
         \x20 $B echo {POWER_READY} $ev\n\
         \x20 $B dd of=/dev/null bs=24 count=1 <&3 2>/dev/null\n\
         \x20 $B echo {POWER_PRESSED}\n\
         fi\n\
         if $B grep -q visor.poweroff=1 /proc/cmdline; then\n\
         \x20 $B cat /proc/interrupts\n\
         \x20 $B echo {MARKER} $($B cat /proc/cmdline | $B wc -c)\n\
         \x20 $B poweroff -f\n\
         fi\n\
         $B echo {MARKER} $($B cat /proc/cmdline | $B wc -c)\n\
         $B reboot -f\n"
    );
    for d in ["bin", "dev", "proc"] {
        c.entry(d, 0o040755, (0, 0), &[]);
    }
    c.entry("dev/console", 0o020600, (5, 1), &[]);
    c.entry("bin/busybox", 0o100755, (0, 0), busybox);
    c.entry("lib", 0o040755, (0, 0), &[]);
    for (name, data) in power_button_modules() {
        c.entry(&format!("lib/{name}"), 0o100644, (0, 0), &data);
    }
    c.entry("init", 0o100755, (0, 0), init.as_bytes());
    c.entry("TRAILER!!!", 0, (0, 0), &[]);
    c.out
}

/// Debian's kernel and busybox (installed by test.sh).
pub fn debian_kernel() -> Option<std::path::PathBuf> {
    let mut k: Vec<_> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    k.sort();
    k.pop()
}

/// The ACPI button and evdev modules of [`debian_kernel`] (none if they are
/// not installed: init then says insmod failed).
fn power_button_modules() -> Vec<(&'static str, Vec<u8>)> {
    let Some(version) = debian_kernel().and_then(|k| {
        k.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .map(str::to_string)
    }) else {
        return Vec::new();
    };
    let dir = format!("/lib/modules/{version}/kernel/drivers");
    [
        ("evdev.ko", "input/evdev.ko"),
        ("button.ko", "acpi/button.ko"),
    ]
    .into_iter()
    .filter_map(|(name, path)| Some((name, std::fs::read(format!("{dir}/{path}")).ok()?)))
    .collect()
}

pub fn busybox() -> Option<Vec<u8>> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find_map(|p| std::fs::read(p).ok())
}
