//! An 8042 keyboard controller with a PS/2 keyboard behind it, at ports
//! 0x60 (data) and 0x64 (status / command), on ISA IRQ 1.
//!
//! visor is a VMM without a display: the keyboard has no host input, so the
//! only bytes it sends are its answers to the guest's commands. What the
//! controller is for: a guest's driver finds it quickly (Linux registers
//! `serio: i8042 KBD port at 0x60,0x64 irq 1` without a timeout), and the
//! guest resets the machine through it (command 0xfe, Linux `reboot=k`).
//!
//! The controller:
//! - Status register (read 0x64): OBF (bit 0) while a byte waits in the
//!   output buffer; IBF (bit 1) always 0, every write is taken at once; the
//!   system flag (bit 2) is the command byte's bit 2 (self-test sets it);
//!   bit 3 says whether the last write went to 0x64 (command) or 0x60
//!   (data); bit 4 is 1, the keyboard is not inhibited; AUXOBF (bit 5) marks
//!   a byte of the auxiliary channel, which only the controller's own
//!   answers to 0xd3 and 0xd4 are; the timeout bit (6) comes with the answer
//!   to 0xd4; parity (7) is 0.
//! - Data port (read 0x60): the output buffer, which the read empties; a
//!   read with nothing waiting returns the last byte again.
//! - Its 32 bytes of RAM: 0x20-0x3f read byte n - 0x20, 0x60-0x7f write it
//!   (the data byte follows on 0x60); byte 0 is the command byte (CTR):
//!   keyboard interrupt enable (bit 0), auxiliary interrupt enable (bit 1),
//!   system flag (2), keyboard disabled (4), auxiliary disabled (5),
//!   translation (6, kept but not applied: the keyboard sends no scan codes).
//!   It starts as firmware leaves it: 0x65 (keyboard interrupt, system flag,
//!   auxiliary disabled, translation).
//! - 0xa7/0xa8 disable/enable the auxiliary port (CTR bit 5), 0xad/0xae the
//!   keyboard (CTR bit 4); 0xa9 tests the auxiliary port's lines (0x00), 0xaa
//!   tests the controller (0x55, sets the system flag), 0xab the keyboard
//!   port's lines (0x00).
//! - 0xd0 reads the output port (bit 0 reset line, 1 while running; bit 1
//!   A20, always 1: visor's memory never wraps at 1 MiB); 0xd1 writes it: a
//!   0 in bit 0 resets the machine. 0xd2 puts the next data byte in the
//!   output buffer as if the keyboard had sent it, 0xd3 as if from the
//!   auxiliary device. 0xd4 sends the next data byte to the auxiliary device:
//!   there is none, so the controller answers as one with an empty mouse port
//!   does, 0xfe with the timeout bit, on the auxiliary channel.
//! - 0xf0-0xff pulse the output port's low four lines for each 0 bit: a
//!   pulse of bit 0 (0xfe among others) resets the machine (the run ends
//!   with status 0, as the other reset ports).
//! - Other commands (0xc0 and the like) are ignored: no answer.
//! - A command waiting for its data byte is replaced by the next command.
//!
//! The keyboard (bytes written to 0x60 with no controller command waiting
//! for data): ACK (0xfa) for each command it knows: 0xed (LEDs) and 0xf3
//! (typematic rate) take a parameter byte, acknowledged too; 0xf0 takes one
//! (the scan code set: 1-3 selects, 0 answers the current set after the
//! ACK); 0xee echoes 0xee (no ACK); 0xf2 identifies (0xfa 0xab 0x83, an MF2
//! keyboard); 0xf4/0xf5/0xf6 enable, disable, set defaults; 0xf7-0xfd (the
//! scan code set 3 key types) are acknowledged; 0xfe sends its last byte
//! again; 0xff resets (0xfa, then 0xaa: self-test passed). Any other byte
//! gets 0xfe (resend), as a real keyboard answers a command it does not
//! know. The keyboard's answers wait in its own queue while the keyboard
//! port is disabled (CTR bit 4) or the output buffer is full.
//!
//! Interrupts: ISA IRQ 1 while the output buffer holds a byte of the
//! keyboard channel (the keyboard's, or the controller's answers) and CTR
//! bit 0 is set, ISA IRQ 12 for a byte of the auxiliary channel and CTR
//! bit 1. The lines are edge-triggered ISA lines, as the other devices' here:
//! the device signals an edge each time such a level rises (a byte loaded
//! into the empty buffer, or the enable bit set while a byte waits).

use std::collections::VecDeque;
use std::sync::Arc;

use vcpu::IrqLine;

use crate::bus::{Action, Device, StopReason};

/// The data port; the status / command port is 4 above it.
pub const DATA_PORT: u16 = 0x60;
/// The status / command port.
pub const COMMAND_PORT: u16 = abi::port::I8042_COMMAND;

/// The keyboard's ISA IRQ.
pub const KBD_IRQ: u8 = 1;
/// The auxiliary (mouse) port's ISA IRQ.
pub const AUX_IRQ: u8 = 12;

/// Status register bits.
pub mod status {
    /// Output buffer full.
    pub const OBF: u8 = 1;
    /// Input buffer full (never: writes are taken at once).
    pub const IBF: u8 = 2;
    /// System flag.
    pub const SYS: u8 = 4;
    /// The last write was a command (port 0x64).
    pub const CMD: u8 = 8;
    /// The keyboard is not inhibited.
    pub const UNLOCKED: u8 = 0x10;
    /// The output buffer's byte is the auxiliary channel's.
    pub const AUXOBF: u8 = 0x20;
    /// Timeout: the auxiliary device did not answer.
    pub const TIMEOUT: u8 = 0x40;
}

/// Command byte (CTR) bits.
pub mod ctr {
    /// Keyboard interrupt (IRQ 1) enable.
    pub const KBDINT: u8 = 1;
    /// Auxiliary interrupt (IRQ 12) enable.
    pub const AUXINT: u8 = 2;
    /// System flag.
    pub const SYS: u8 = 4;
    /// Keyboard port disabled.
    pub const KBDDIS: u8 = 0x10;
    /// Auxiliary port disabled.
    pub const AUXDIS: u8 = 0x20;
    /// Scan code translation.
    pub const XLATE: u8 = 0x40;
}

/// The command byte firmware leaves.
pub const CTR_AT_BOOT: u8 = ctr::KBDINT | ctr::SYS | ctr::AUXDIS | ctr::XLATE;

/// Keyboard answers.
pub mod reply {
    /// Acknowledge.
    pub const ACK: u8 = 0xfa;
    /// Resend (a command the keyboard does not know).
    pub const RESEND: u8 = 0xfe;
    /// Basic assurance test passed (after a reset).
    pub const BAT_OK: u8 = 0xaa;
    /// Echo.
    pub const ECHO: u8 = 0xee;
    /// The controller's self-test passed.
    pub const SELF_TEST_OK: u8 = 0x55;
}

/// How many answers the keyboard queues (a PS/2 keyboard's buffer).
const KBD_QUEUE: usize = 16;

/// A controller command that waits for its data byte on port 0x60.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    WriteRam(u8),
    WriteOutputPort,
    KbdOutput,
    AuxOutput,
    AuxWrite,
}

/// The keyboard's state.
struct Keyboard {
    /// Its answers not yet in the controller's output buffer, oldest first.
    queue: VecDeque<u8>,
    /// A command that waits for its parameter byte (0xed, 0xf3, 0xf0).
    param_for: Option<u8>,
    /// The last byte it sent (for 0xfe, resend).
    last_sent: u8,
    leds: u8,
    typematic: u8,
    scan_set: u8,
    scanning: bool,
}

impl Keyboard {
    fn new() -> Keyboard {
        Keyboard {
            queue: VecDeque::new(),
            param_for: None,
            last_sent: reply::BAT_OK,
            leds: 0,
            typematic: 0x2b,
            scan_set: 2,
            scanning: true,
        }
    }

    fn send(&mut self, b: u8) {
        if self.queue.len() < KBD_QUEUE {
            self.queue.push_back(b);
            self.last_sent = b;
        }
    }

    fn defaults(&mut self) {
        self.typematic = 0x2b;
        self.scan_set = 2;
    }

    /// A byte from the controller.
    fn receive(&mut self, b: u8) {
        if let Some(cmd) = self.param_for.take() {
            match cmd {
                0xed => self.leds = b & 7,
                0xf3 => self.typematic = b & 0x7f,
                _ => match b {
                    0 => {
                        self.send(reply::ACK);
                        self.send(self.scan_set);
                        return;
                    }
                    1..=3 => self.scan_set = b,
                    // Not a set: the keyboard asks again.
                    _ => {
                        self.param_for = Some(cmd);
                        self.send(reply::RESEND);
                        return;
                    }
                },
            }
            self.send(reply::ACK);
            return;
        }
        match b {
            0xed | 0xf3 | 0xf0 => {
                self.param_for = Some(b);
                self.send(reply::ACK);
            }
            0xee => self.send(reply::ECHO),
            0xf2 => {
                self.send(reply::ACK);
                self.send(0xab);
                self.send(0x83);
            }
            0xf4 => {
                self.scanning = true;
                self.send(reply::ACK);
            }
            0xf5 => {
                self.defaults();
                self.scanning = false;
                self.send(reply::ACK);
            }
            0xf6 => {
                self.defaults();
                self.scanning = true;
                self.send(reply::ACK);
            }
            0xf7..=0xfd => self.send(reply::ACK),
            0xfe => {
                let last = self.last_sent;
                self.send(last);
            }
            0xff => {
                self.queue.clear();
                self.defaults();
                self.leds = 0;
                self.scanning = true;
                self.send(reply::ACK);
                self.send(reply::BAT_OK);
            }
            _ => self.send(reply::RESEND),
        }
    }
}

/// The controller (see the module's documentation). Registered at ports
/// 0x60..=0x64: ports 0x61-0x63 (the PIT's port 0x61 is the engine's) read
/// 0 and ignore writes.
pub struct I8042 {
    /// RAM; byte 0 is the command byte.
    ram: [u8; 32],
    /// The output buffer: the byte and whether it is the auxiliary channel's.
    out: Option<(u8, bool)>,
    /// The last byte read from the data port.
    last_read: u8,
    timeout: bool,
    /// The last write was to the command port.
    command_last: bool,
    output_port: u8,
    pending: Option<Pending>,
    kbd: Keyboard,
    kbd_irq: Option<Arc<dyn IrqLine>>,
    aux_irq: Option<Arc<dyn IrqLine>>,
    kbd_level: bool,
    aux_level: bool,
    /// Edges signalled on IRQ 1.
    pub kbd_irqs: u64,
    /// Edges signalled on IRQ 12.
    pub aux_irqs: u64,
}

/// The output port's reset line (1: running).
const OUT_RESET: u8 = 1;
/// The output port's A20 gate.
const OUT_A20: u8 = 2;

impl Default for I8042 {
    fn default() -> Self {
        I8042::new(None, None)
    }
}

impl I8042 {
    /// A controller as firmware leaves it, interrupting on `kbd_irq` (the
    /// engine's ISA IRQ 1 line, if it has an interrupt controller) and
    /// `aux_irq` (IRQ 12).
    pub fn new(kbd_irq: Option<Arc<dyn IrqLine>>, aux_irq: Option<Arc<dyn IrqLine>>) -> I8042 {
        let mut ram = [0; 32];
        ram[0] = CTR_AT_BOOT;
        I8042 {
            ram,
            out: None,
            last_read: 0,
            timeout: false,
            command_last: false,
            output_port: OUT_RESET | OUT_A20,
            pending: None,
            kbd: Keyboard::new(),
            kbd_irq,
            aux_irq,
            kbd_level: false,
            aux_level: false,
            kbd_irqs: 0,
            aux_irqs: 0,
        }
    }

    /// The command byte.
    pub fn ctr(&self) -> u8 {
        self.ram[0]
    }

    /// The status register.
    pub fn status(&self) -> u8 {
        let mut s = status::UNLOCKED | (self.ctr() & ctr::SYS);
        if let Some((_, aux)) = self.out {
            s |= status::OBF;
            if aux {
                s |= status::AUXOBF;
            }
        }
        if self.command_last {
            s |= status::CMD;
        }
        if self.timeout {
            s |= status::TIMEOUT;
        }
        s
    }

    /// Reads the data port: the output buffer's byte, which leaves it.
    pub fn read_data(&mut self) -> u8 {
        if let Some((b, _)) = self.out.take() {
            self.last_read = b;
            self.timeout = false;
            // The buffer was emptied: the interrupt levels fall, and rise
            // again if the keyboard has another byte to load.
            self.kbd_level = false;
            self.aux_level = false;
            self.update();
        }
        self.last_read
    }

    /// Writes the data port.
    pub fn write_data(&mut self, b: u8) -> Action {
        self.command_last = false;
        let mut action = Action::Continue;
        match self.pending.take() {
            Some(Pending::WriteRam(at)) => self.ram[at as usize & 31] = b,
            Some(Pending::WriteOutputPort) => {
                // A20 cannot be turned off.
                self.output_port = b | OUT_A20;
                if b & OUT_RESET == 0 {
                    action = Action::Stop(StopReason::Reset);
                }
            }
            Some(Pending::KbdOutput) => self.out = Some((b, false)),
            Some(Pending::AuxOutput) => self.out = Some((b, true)),
            Some(Pending::AuxWrite) => {
                // No device on the auxiliary port: the transfer times out.
                self.out = Some((reply::RESEND, true));
                self.timeout = true;
            }
            None => self.kbd.receive(b),
        }
        self.update();
        action
    }

    /// Writes the command port.
    pub fn write_command(&mut self, cmd: u8) -> Action {
        self.command_last = true;
        self.pending = None;
        let mut action = Action::Continue;
        match cmd {
            0x20..=0x3f => self.answer(self.ram[cmd as usize - 0x20]),
            0x60..=0x7f => self.pending = Some(Pending::WriteRam(cmd - 0x60)),
            0xa7 => self.ram[0] |= ctr::AUXDIS,
            0xa8 => self.ram[0] &= !ctr::AUXDIS,
            0xa9 | 0xab => self.answer(0),
            0xaa => {
                self.ram[0] |= ctr::SYS;
                self.answer(reply::SELF_TEST_OK);
            }
            0xad => self.ram[0] |= ctr::KBDDIS,
            0xae => self.ram[0] &= !ctr::KBDDIS,
            0xd0 => self.answer(self.output_port),
            0xd1 => self.pending = Some(Pending::WriteOutputPort),
            0xd2 => self.pending = Some(Pending::KbdOutput),
            0xd3 => self.pending = Some(Pending::AuxOutput),
            0xd4 => self.pending = Some(Pending::AuxWrite),
            // Pulses of the output port's lines: bit 0 is the reset line.
            0xf0..=0xff if cmd & OUT_RESET == 0 => action = Action::Stop(StopReason::Reset),
            _ => {}
        }
        self.update();
        action
    }

    /// The controller's answer to a command, on the keyboard channel.
    fn answer(&mut self, b: u8) {
        self.out = Some((b, false));
    }

    /// Loads the keyboard's next byte into an empty output buffer (while the
    /// keyboard port is enabled) and signals each interrupt level that rose.
    fn update(&mut self) {
        if self.out.is_none() && self.ctr() & ctr::KBDDIS == 0 {
            if let Some(b) = self.kbd.queue.pop_front() {
                self.out = Some((b, false));
            }
        }
        let (kbd, aux) = match self.out {
            Some((_, false)) => (self.ctr() & ctr::KBDINT != 0, false),
            Some((_, true)) => (false, self.ctr() & ctr::AUXINT != 0),
            None => (false, false),
        };
        if kbd && !self.kbd_level {
            self.kbd_irqs += 1;
            signal(&self.kbd_irq);
        }
        if aux && !self.aux_level {
            self.aux_irqs += 1;
            signal(&self.aux_irq);
        }
        self.kbd_level = kbd;
        self.aux_level = aux;
    }
}

fn signal(line: &Option<Arc<dyn IrqLine>>) {
    if let Some(line) = line {
        // A line that cannot be raised loses this edge, as a disconnected
        // pin would; the status register still shows the byte.
        let _ = line.trigger();
    }
}

impl Device for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            *b = match offset.saturating_add(k as u64) {
                0 => self.read_data(),
                4 => self.status(),
                _ => 0,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let mut action = Action::Continue;
        for (k, &b) in data.iter().enumerate() {
            let a = match offset.saturating_add(k as u64) {
                0 => self.write_data(b),
                4 => self.write_command(b),
                _ => Action::Continue,
            };
            if action == Action::Continue {
                action = a;
            }
        }
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Edges;

    fn cmd(k: &mut I8042, c: u8) -> Action {
        k.write(4, &[c])
    }

    fn data(k: &mut I8042, b: u8) -> Action {
        k.write(0, &[b])
    }

    fn status(k: &mut I8042) -> u8 {
        let mut s = [0];
        k.read(4, &mut s);
        s[0]
    }

    fn read(k: &mut I8042) -> u8 {
        let mut d = [0];
        k.read(0, &mut d);
        d[0]
    }

    /// Every byte waiting, read while OBF says one waits.
    fn drain(k: &mut I8042) -> Vec<u8> {
        let mut v = Vec::new();
        while status(k) & status::OBF != 0 && v.len() < 64 {
            v.push(read(k));
        }
        v
    }

    #[test]
    fn self_test_and_port_tests() {
        let mut k = I8042::default();
        let s = status(&mut k);
        assert_eq!(s & (status::OBF | status::IBF), 0, "empty at boot");
        assert_eq!(s & status::UNLOCKED, status::UNLOCKED);
        assert_eq!(s & status::SYS, status::SYS, "firmware ran its self-test");
        // Self-test with the system flag cleared: 0x55, and the flag set.
        assert_eq!(cmd(&mut k, 0x60), Action::Continue);
        assert_eq!(status(&mut k) & status::CMD, status::CMD);
        data(&mut k, 0x00);
        assert_eq!(status(&mut k) & (status::SYS | status::CMD), 0);
        cmd(&mut k, 0xaa);
        assert_eq!(status(&mut k) & status::OBF, status::OBF);
        assert_eq!(read(&mut k), 0x55);
        assert_eq!(status(&mut k) & (status::OBF | status::SYS), status::SYS);
        // A read with nothing waiting gives the last byte again.
        assert_eq!(read(&mut k), 0x55);
        cmd(&mut k, 0xab);
        assert_eq!(drain(&mut k), [0x00]);
        cmd(&mut k, 0xa9);
        assert_eq!(drain(&mut k), [0x00]);
        // An unknown command answers nothing.
        cmd(&mut k, 0xc8);
        assert_eq!(drain(&mut k), []);
    }

    #[test]
    fn command_byte_round_trip() {
        let mut k = I8042::default();
        cmd(&mut k, 0x20);
        assert_eq!(read(&mut k), CTR_AT_BOOT);
        cmd(&mut k, 0x60);
        data(&mut k, 0x47);
        cmd(&mut k, 0x20);
        assert_eq!(drain(&mut k), [0x47]);
        assert_eq!(k.ctr(), 0x47);
        // 0xad/0xae, 0xa7/0xa8 flip bits 4 and 5.
        cmd(&mut k, 0xad);
        cmd(&mut k, 0xa7);
        assert_eq!(k.ctr(), 0x47 | ctr::KBDDIS | ctr::AUXDIS);
        cmd(&mut k, 0xae);
        cmd(&mut k, 0xa8);
        assert_eq!(k.ctr(), 0x47);
        // The rest of the RAM.
        cmd(&mut k, 0x7f);
        data(&mut k, 0x5a);
        cmd(&mut k, 0x3f);
        assert_eq!(drain(&mut k), [0x5a]);
        // A command waiting for data is replaced by the next command: the
        // byte then goes to the keyboard.
        cmd(&mut k, 0x60);
        cmd(&mut k, 0x20);
        assert_eq!(drain(&mut k), [0x47]);
        data(&mut k, 0xf4);
        assert_eq!(drain(&mut k), [reply::ACK]);
        assert_eq!(k.ctr(), 0x47);
    }

    #[test]
    fn keyboard_answers() {
        let mut k = I8042::default();
        data(&mut k, 0xff);
        assert_eq!(status(&mut k) & status::CMD, 0);
        assert_eq!(drain(&mut k), [0xfa, 0xaa]);
        data(&mut k, 0xf2);
        assert_eq!(drain(&mut k), [0xfa, 0xab, 0x83]);
        data(&mut k, 0xee);
        assert_eq!(drain(&mut k), [0xee]);
        for c in [0xf4, 0xf5, 0xf6] {
            data(&mut k, c);
            assert_eq!(drain(&mut k), [0xfa], "{c:#x}");
        }
        // LEDs and typematic rate: ACK, ACK.
        for c in [0xed, 0xf3] {
            data(&mut k, c);
            assert_eq!(drain(&mut k), [0xfa]);
            data(&mut k, 0x07);
            assert_eq!(drain(&mut k), [0xfa]);
        }
        assert_eq!(k.kbd.leds, 7);
        // The scan code set: get (0), set (3), a bad set is asked again.
        data(&mut k, 0xf0);
        data(&mut k, 0);
        assert_eq!(drain(&mut k), [0xfa, 0xfa, 2]);
        data(&mut k, 0xf0);
        data(&mut k, 9);
        data(&mut k, 3);
        data(&mut k, 0xf0);
        data(&mut k, 0);
        assert_eq!(drain(&mut k), [0xfa, 0xfe, 0xfa, 0xfa, 0xfa, 3]);
        // Resend repeats the last byte; an unknown command gets resend.
        data(&mut k, 0xfe);
        assert_eq!(drain(&mut k), [3]);
        data(&mut k, 0x12);
        assert_eq!(drain(&mut k), [0xfe]);
    }

    #[test]
    fn keyboard_waits_while_its_port_is_disabled() {
        let mut k = I8042::default();
        cmd(&mut k, 0xad);
        data(&mut k, 0xf2);
        assert_eq!(status(&mut k) & status::OBF, 0);
        cmd(&mut k, 0xae);
        assert_eq!(drain(&mut k), [0xfa, 0xab, 0x83]);
    }

    #[test]
    fn d2_and_d3_write_the_output_buffer() {
        let mut k = I8042::default();
        cmd(&mut k, 0xd2);
        data(&mut k, 0x1c);
        let s = status(&mut k);
        assert_eq!(s & (status::OBF | status::AUXOBF), status::OBF);
        assert_eq!(read(&mut k), 0x1c);
        assert_eq!(status(&mut k) & status::OBF, 0);
        cmd(&mut k, 0xd3);
        data(&mut k, 0x5a);
        assert_eq!(
            status(&mut k) & (status::OBF | status::AUXOBF),
            status::OBF | status::AUXOBF
        );
        assert_eq!(read(&mut k), 0x5a);
        assert_eq!(status(&mut k) & status::AUXOBF, 0);
        // No mouse: a byte for it times out with 0xfe.
        cmd(&mut k, 0xd4);
        data(&mut k, 0xff);
        let s = status(&mut k);
        assert_eq!(s & status::TIMEOUT, status::TIMEOUT);
        assert_eq!(s & status::AUXOBF, status::AUXOBF);
        assert_eq!(read(&mut k), 0xfe);
        assert_eq!(status(&mut k) & (status::TIMEOUT | status::OBF), 0);
    }

    #[test]
    fn resets() {
        let mut k = I8042::default();
        assert_eq!(cmd(&mut k, 0xfe), Action::Stop(StopReason::Reset));
        assert_eq!(cmd(&mut k, 0xf0), Action::Stop(StopReason::Reset));
        assert_eq!(cmd(&mut k, 0xff), Action::Continue);
        assert_eq!(cmd(&mut k, 0xfd), Action::Continue);
        // The output port: A20 and the reset line read 1; writing bit 0
        // clear resets.
        cmd(&mut k, 0xd0);
        assert_eq!(read(&mut k) & 3, 3);
        cmd(&mut k, 0xd1);
        assert_eq!(data(&mut k, 0xdf), Action::Continue);
        cmd(&mut k, 0xd1);
        assert_eq!(data(&mut k, 0xde), Action::Stop(StopReason::Reset));
        // A word write reaching 0x64 through offset 0 still resets.
        assert_eq!(
            k.write(3, &[0, 0xfe]),
            Action::Stop(StopReason::Reset),
            "byte 1 at 0x64"
        );
    }

    #[test]
    fn irq_1_only_with_ctr_bit_0() {
        let kbd = Arc::new(Edges::default());
        let aux = Arc::new(Edges::default());
        let mut k = I8042::new(Some(kbd.clone()), Some(aux.clone()));
        // Interrupts off: bytes come, no edge.
        cmd(&mut k, 0x60);
        data(&mut k, CTR_AT_BOOT & !ctr::KBDINT);
        data(&mut k, 0xf2);
        assert_eq!(drain(&mut k), [0xfa, 0xab, 0x83]);
        assert_eq!(kbd.count(), 0);
        // Enabling them while a byte waits raises the line once.
        data(&mut k, 0xee);
        assert_eq!(kbd.count(), 0);
        cmd(&mut k, 0x60);
        data(&mut k, CTR_AT_BOOT);
        assert_eq!(kbd.count(), 1);
        assert_eq!(read(&mut k), 0xee);
        // One edge per byte loaded.
        data(&mut k, 0xf2);
        assert_eq!(kbd.count(), 2);
        assert_eq!(read(&mut k), 0xfa);
        assert_eq!(kbd.count(), 3);
        assert_eq!(drain(&mut k), [0xab, 0x83]);
        assert_eq!(kbd.count(), 4);
        // The controller's answers come on IRQ 1 too.
        cmd(&mut k, 0xaa);
        assert_eq!(kbd.count(), 5);
        read(&mut k);
        // The auxiliary channel: IRQ 12 with CTR bit 1 only.
        cmd(&mut k, 0xd3);
        data(&mut k, 1);
        read(&mut k);
        assert_eq!(aux.count(), 0);
        cmd(&mut k, 0x60);
        data(&mut k, CTR_AT_BOOT | ctr::AUXINT);
        cmd(&mut k, 0xd3);
        data(&mut k, 1);
        assert_eq!(aux.count(), 1);
        assert_eq!(kbd.count(), 5);
        assert_eq!((k.kbd_irqs, k.aux_irqs), (5, 1));
    }

    /// Any sequence of accesses: no panic, and the status register never
    /// says the input buffer is full.
    #[test]
    fn any_bytes() {
        let mut k = I8042::default();
        let mut x: u32 = 0x1234_5678;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let b = (x >> 8) as u8;
            match x % 4 {
                0 => {
                    k.write(0, &[b]);
                }
                1 => {
                    k.write(4, &[b]);
                }
                2 => {
                    let mut d = [0u8; 8];
                    k.read((x >> 16) as u64 % 6, &mut d[..(x as usize >> 24) % 8]);
                }
                _ => {
                    k.write((x >> 16) as u64 % 6, &[b, b ^ 0x5a]);
                }
            }
            assert_eq!(k.status() & status::IBF, 0);
            assert!(k.kbd.queue.len() <= KBD_QUEUE);
        }
    }
}
