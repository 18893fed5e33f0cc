//! The host side of the guest console: stdin feeds COM1's receive FIFO (raw mode
//! when stdin is a terminal, restored on exit), COM1's output goes to stdout.
//! Ctrl-A x ends the run from the terminal.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use machine::devices::Serial;

/// Puts the terminal on stdin into raw mode; restores it when dropped.
pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// `None` if stdin is not a terminal.
    pub fn enable() -> Option<RawMode> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(0) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal and `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so the host terminal still maps \n.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: applying a termios derived from the terminal's own settings.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        Some(RawMode { saved })
    }

    pub fn restore(&self) {
        // SAFETY: restoring the settings read from this terminal.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Copies stdin into the UART until EOF. `on_quit` runs on Ctrl-A x.
pub fn spawn_stdin(serial: Arc<Mutex<Serial>>, on_quit: impl Fn() + Send + 'static) {
    std::thread::Builder::new()
        .name("visor-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 64];
            let mut ctrl_a = false;
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut pending: Vec<u8> = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if ctrl_a {
                        ctrl_a = false;
                        match b {
                            b'x' | b'X' => on_quit(),
                            0x01 => pending.push(0x01),
                            _ => {}
                        }
                    } else if b == 0x01 {
                        ctrl_a = true;
                    } else {
                        pending.push(b);
                    }
                }
                let mut rest = &pending[..];
                while !rest.is_empty() {
                    let took = serial
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .enqueue_input(rest);
                    rest = &rest[took..];
                    if !rest.is_empty() {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        })
        .ok();
}
