//! The I/O APIC of the software engines (an 82093AA, as KVM models it in the
//! kernel): 24 pins, registers through IOREGSEL (offset 0x00) and IOWIN
//! (0x10) at [`IOAPIC_BASE`]: ID (0), version (1), arbitration (2) and the
//! redirection table (0x10 + 2n, low and high halves). The ISA IRQs reach it
//! as on a PC: IRQ n on pin n, except the timer's IRQ 0 on pin 2 (the MADT's
//! interrupt source override).
//!
//! An edge on an unmasked pin with fixed or lowest-priority delivery becomes
//! a message (vector, destination) that the local APIC takes at its next
//! poll and accepts if the destination names it; a level-triggered entry
//! keeps its Remote IRR until the local APIC's EOI of that vector. Other
//! delivery modes (SMI, NMI, INIT, ExtINT) are not delivered.

/// The guest-physical address of the registers.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Redirection-table entries.
pub const PINS: usize = 24;

const MASKED: u64 = 1 << 16;
const REMOTE_IRR: u64 = 1 << 14;
const LEVEL: u64 = 1 << 15;
const LOGICAL: u64 = 1 << 11;

/// The pin of ISA IRQ `irq`.
pub fn isa_pin(irq: u8) -> u8 {
    if irq == 0 {
        2
    } else {
        irq
    }
}

/// An interrupt message to the local APICs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    /// The vector.
    pub vector: u8,
    /// The destination field (APIC ID, or logical set with `logical`).
    pub dest: u8,
    /// Logical destination mode.
    pub logical: bool,
    /// Level-triggered (the local APIC sets TMR and EOIs back).
    pub level: bool,
}

impl Message {
    /// Whether the local APIC with `id` and logical destination register
    /// `ldr` (flat model) accepts the message.
    pub fn accepted_by(&self, id: u32, ldr: u32) -> bool {
        if self.logical {
            (ldr >> 24) as u8 & self.dest != 0
        } else {
            self.dest == 0xff || self.dest as u32 == id
        }
    }
}

/// The I/O APIC's state.
#[derive(Clone, Debug)]
pub struct Ioapic {
    id: u32,
    sel: u32,
    redir: [u64; PINS],
    /// Messages not yet taken by the local APIC.
    out: Vec<Message>,
}

impl Ioapic {
    /// An I/O APIC with ID `id`, every pin masked (its reset state).
    pub fn new(id: u32) -> Ioapic {
        Ioapic {
            id,
            sel: 0,
            redir: [MASKED; PINS],
            out: Vec::new(),
        }
    }

    fn read_reg(&self) -> u32 {
        match self.sel {
            0 => (self.id & 0xf) << 24,
            // Version 0x11, maximum redirection entry PINS - 1.
            1 => 0x11 | ((PINS as u32 - 1) << 16),
            2 => (self.id & 0xf) << 24,
            r @ 0x10..=0x3f => {
                let e = self.redir[(r as usize - 0x10) / 2];
                if r & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_reg(&mut self, v: u32) {
        match self.sel {
            0 => self.id = (v >> 24) & 0xf,
            r @ 0x10..=0x3f => {
                let e = &mut self.redir[(r as usize - 0x10) / 2];
                *e = if r & 1 == 0 {
                    // Delivery status and Remote IRR are read-only.
                    let keep = *e & (REMOTE_IRR | (1 << 12));
                    (*e & !0xffff_ffff) | (v as u64 & !(REMOTE_IRR | (1 << 12))) | keep
                } else {
                    (*e & 0xffff_ffff) | ((v as u64 & 0xff00_0000) << 32)
                };
            }
            _ => {}
        }
    }

    /// A read of the register window at `offset` from [`IOAPIC_BASE`].
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let v = match offset & !3 {
            0x00 => self.sel,
            0x10 => self.read_reg(),
            _ => 0,
        }
        .to_le_bytes();
        for (k, b) in data.iter_mut().enumerate() {
            *b = v.get((offset & 3) as usize + k).copied().unwrap_or(0);
        }
    }

    /// A write of the register window (32-bit accesses).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x00 => self.sel = v & 0xff,
            0x10 => self.write_reg(v),
            _ => {}
        }
    }

    /// An edge (or an assertion of a level) on `pin`.
    pub fn raise(&mut self, pin: u8) {
        let Some(e) = self.redir.get_mut(pin as usize) else {
            return;
        };
        let mode = (*e >> 8) & 7;
        if *e & MASKED != 0 || mode > 1 {
            return;
        }
        let level = *e & LEVEL != 0;
        if level {
            if *e & REMOTE_IRR != 0 {
                return;
            }
            *e |= REMOTE_IRR;
        }
        self.out.push(Message {
            vector: *e as u8,
            dest: (*e >> 56) as u8,
            logical: *e & LOGICAL != 0,
            level,
        });
    }

    /// Takes the messages sent since the last call.
    pub fn take(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.out)
    }

    /// Whether messages are waiting.
    pub fn pending(&self) -> bool {
        !self.out.is_empty()
    }

    /// The local APIC's EOI of level-triggered `vector`: Remote IRR clears.
    pub fn eoi(&mut self, vector: u8) {
        for e in self.redir.iter_mut() {
            if *e & LEVEL != 0 && *e as u8 == vector {
                *e &= !REMOTE_IRR;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(io: &mut Ioapic, reg: u32, v: u32) {
        io.write(0, &reg.to_le_bytes());
        io.write(0x10, &v.to_le_bytes());
    }

    fn get(io: &mut Ioapic, reg: u32) -> u32 {
        io.write(0, &reg.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(0x10, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn registers_masking_and_level_eoi() {
        let mut io = Ioapic::new(1);
        assert_eq!(get(&mut io, 0), 1 << 24);
        assert_eq!(get(&mut io, 1), 0x0017_0011);
        assert_eq!(get(&mut io, 0x10 + 4), 1 << 16, "masked at reset");
        io.raise(2);
        assert!(!io.pending(), "a masked pin sends nothing");
        // Pin 2: vector 0x30, fixed, physical, to APIC 0.
        set(&mut io, 0x14, 0x30);
        set(&mut io, 0x15, 0);
        io.raise(isa_pin(0));
        let m = io.take();
        assert_eq!(
            m,
            vec![Message {
                vector: 0x30,
                dest: 0,
                logical: false,
                level: false
            }]
        );
        assert!(m[0].accepted_by(0, 0));
        assert!(!m[0].accepted_by(1, 0));
        // Pin 9: level, logical destination 1.
        set(&mut io, 0x10 + 18, 0x39 | (1 << 15) | (1 << 11));
        set(&mut io, 0x10 + 19, 1 << 24);
        io.raise(9);
        io.raise(9);
        let m = io.take();
        assert_eq!(m.len(), 1, "Remote IRR holds the second assertion");
        assert!(m[0].level && m[0].accepted_by(0, 1 << 24));
        assert_ne!(get(&mut io, 0x10 + 18) & (1 << 14), 0, "Remote IRR");
        io.eoi(0x39);
        assert_eq!(get(&mut io, 0x10 + 18) & (1 << 14), 0);
        io.raise(9);
        assert_eq!(io.take().len(), 1);
        // Pins beyond the table are ignored.
        io.raise(200);
        assert!(!io.pending());
    }
}
