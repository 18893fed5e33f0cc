//! Kernel console output: one line at a time, formatted by hand (`core::fmt` is
//! precompiled with SSE) and written through [`pvops`](crate::pvops).

use crate::pvops;

const CAP: usize = 160;

/// A console line under construction; [`Line::end`] writes it.
pub struct Line {
    buf: [u8; CAP],
    len: usize,
}

impl Line {
    pub fn new() -> Line {
        Line {
            buf: [0; CAP],
            len: 0,
        }
    }

    fn put(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    pub fn s(&mut self, s: &str) -> &mut Self {
        for &b in s.as_bytes() {
            self.put(b);
        }
        self
    }

    /// Printable ASCII of `s`, other bytes as '.'.
    pub fn ascii(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            self.put(if (0x20..0x7f).contains(&b) { b } else { b'.' });
        }
        self
    }

    /// Unsigned decimal.
    pub fn n(&mut self, v: u64) -> &mut Self {
        for &d in crate::rt::decimal(v, &mut [0; 20]) {
            self.put(d);
        }
        self
    }

    /// Signed decimal.
    pub fn i(&mut self, v: i64) -> &mut Self {
        if v < 0 {
            self.put(b'-');
        }
        self.n(v.unsigned_abs())
    }

    /// `v / 100` with two decimals.
    pub fn f2(&mut self, v: u64) -> &mut Self {
        let frac = v % 100;
        self.n(v / 100).s(".");
        if frac < 10 {
            self.put(b'0');
        }
        self.n(frac)
    }

    /// Hexadecimal with a 0x prefix.
    pub fn x(&mut self, v: u64) -> &mut Self {
        self.s("0x");
        let mut started = false;
        for i in (0..16).rev() {
            let d = ((v >> (i * 4)) & 0xf) as u8;
            if d != 0 || started || i == 0 {
                started = true;
                self.put(if d < 10 { b'0' + d } else { b'a' + d - 10 });
            }
        }
        self
    }

    /// Writes the line and a newline.
    pub fn end(&mut self) {
        if self.len == CAP {
            self.len -= 1;
        }
        self.put(b'\n');
        pvops::console_write(&self.buf[..self.len]);
        self.len = 0;
    }
}
