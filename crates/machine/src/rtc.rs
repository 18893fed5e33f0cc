//! The PC's CMOS real-time clock, a Motorola MC146818A, at ports
//! [`INDEX_PORT`] (0x70: bit 7 disables NMI, bits 6:0 select a byte) and
//! [`DATA_PORT`] (0x71), interrupting on ISA IRQ [`IRQ`] (8).
//!
//! - Time and calendar (bytes 0x00-0x09, the century at [`CENTURY`], which the
//!   FADT names) in BCD or binary (register B's DM), 12- or 24-hour (B's
//!   24/12; the PM flag is bit 7 of the hours in 12-hour mode). The clock is
//!   the host's UTC time when the device is made, carried on by the host's
//!   monotonic clock (the HPET's and the PM timer's time source), plus the
//!   offset the guest sets by writing the time. The day of the week is
//!   reckoned from the date.
//! - Register A: UIP (read-only; set for the [`UIP_LEAD`] before each
//!   update), the divider (DV2-0; 11x holds the divider chain in reset: the
//!   time stands, and the first update comes 500 ms after release) and the
//!   periodic rate (RS3-0).
//! - Register B: SET (updates stop while it is set, and UIE clears), PIE,
//!   AIE, UIE, SQWE (kept; no square-wave pin), DM, 24/12, DSE (kept; no
//!   daylight-saving switch is made).
//! - Register C: IRQF, PF, AF, UF; a read returns and clears them, and
//!   lowers the interrupt request. Register D: VRT, always 1.
//! - Interrupts: periodic (PF), alarm (AF: the alarm bytes 0x01, 0x03, 0x05
//!   compared with the time at each update, a byte 0xc0-0xff matching any
//!   value), update-ended (UF). IRQF = PF·PIE + AF·AIE + UF·UIE; the line is
//!   signalled when IRQF rises, as the chip's active-low IRQ pin does on an
//!   edge-triggered ISA input. A thread raises the interrupts at their time.
//! - NVRAM: bytes 0x0e-0x7f, zero except the memory sizes QEMU stores for
//!   firmware (see [`Rtc::new`]).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vcpu::IrqLine;

use crate::bus::{Action, Device};

/// The index port; the data port follows it.
pub const INDEX_PORT: u16 = 0x70;
pub const DATA_PORT: u16 = 0x71;
/// The RTC's ISA IRQ.
pub const IRQ: u8 = 8;
/// The century byte (the FADT's CENTURY field).
pub const CENTURY: u8 = 0x32;
/// How long before an update UIP reads 1 (the data sheet's t_BUC).
pub const UIP_LEAD: Duration = Duration::from_micros(244);

// Register indices.
const SECONDS: usize = 0x00;
const SECONDS_ALARM: usize = 0x01;
const MINUTES: usize = 0x02;
const MINUTES_ALARM: usize = 0x03;
const HOURS: usize = 0x04;
const HOURS_ALARM: usize = 0x05;
const WEEKDAY: usize = 0x06;
const DAY: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const CENTURY_REG: usize = CENTURY as usize;
const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
/// The bytes that hold the time and date.
const TIME_REGS: [usize; 8] = [
    SECONDS,
    MINUTES,
    HOURS,
    WEEKDAY,
    DAY,
    MONTH,
    YEAR,
    CENTURY_REG,
];

// Register A.
pub const A_UIP: u8 = 0x80;
const A_RS_MASK: u8 = 0x0f;
// Register B.
pub const B_SET: u8 = 0x80;
pub const B_PIE: u8 = 0x40;
pub const B_AIE: u8 = 0x20;
pub const B_UIE: u8 = 0x10;
pub const B_DM_BINARY: u8 = 0x04;
pub const B_24H: u8 = 0x02;
// Register C.
pub const C_IRQF: u8 = 0x80;
pub const C_PF: u8 = 0x40;
pub const C_AF: u8 = 0x20;
pub const C_UF: u8 = 0x10;
// Register D.
pub const D_VRT: u8 = 0x80;

/// The time base the periodic rates divide (32.768 kHz).
const BASE_HZ: u128 = 32_768;
const SEC: Duration = Duration::from_secs(1);

// Calendar arithmetic on the proleptic Gregorian calendar (days since
// 1970-01-01), after Howard Hinnant's `days_from_civil`/`civil_from_days`.

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A number as the RTC holds it under register B `b`.
fn to_reg(v: u32, b: u8) -> u8 {
    let v = v % 100;
    if b & B_DM_BINARY != 0 {
        v as u8
    } else {
        (((v / 10) << 4) | (v % 10)) as u8
    }
}

/// A register's number under register B `b` (a BCD byte with a digit above
/// 9 reads as its arithmetic value).
fn from_reg(v: u8, b: u8) -> u32 {
    if b & B_DM_BINARY != 0 {
        v as u32
    } else {
        (v >> 4) as u32 * 10 + (v & 0xf) as u32
    }
}

/// The time-register bytes of `secs` (seconds since 1970, UTC) under
/// register B `b`, indexed like [`TIME_REGS`].
fn encode(secs: i64, b: u8) -> [u8; 8] {
    let days = secs.div_euclid(86_400);
    let s = secs.rem_euclid(86_400) as u32;
    let (y, m, d) = civil_from_days(days);
    let (hour, min, sec) = (s / 3600, s / 60 % 60, s % 60);
    let hours = if b & B_24H != 0 {
        to_reg(hour, b)
    } else {
        let h12 = if hour % 12 == 0 { 12 } else { hour % 12 };
        to_reg(h12, b) | if hour >= 12 { 0x80 } else { 0 }
    };
    // Sunday is 1; 1970-01-01 was a Thursday.
    let weekday = (days + 4).rem_euclid(7) as u32 + 1;
    [
        to_reg(sec, b),
        to_reg(min, b),
        hours,
        to_reg(weekday, b),
        to_reg(d, b),
        to_reg(m, b),
        to_reg(y.rem_euclid(100) as u32, b),
        to_reg(y.div_euclid(100).rem_euclid(100) as u32, b),
    ]
}

/// Seconds since 1970 of the time-register bytes `r` (indexed like
/// [`TIME_REGS`]) under register B `b`. Out-of-range fields are clamped to
/// their range (a day past the month's end runs into the next month).
fn decode(r: [u8; 8], b: u8) -> i64 {
    let hour = if b & B_24H != 0 {
        from_reg(r[2], b)
    } else {
        from_reg(r[2] & 0x7f, b) % 12 + if r[2] & 0x80 != 0 { 12 } else { 0 }
    };
    let year = from_reg(r[7], b) as i64 * 100 + from_reg(r[6], b) as i64;
    let days = days_from_civil(
        year,
        from_reg(r[5], b).clamp(1, 12),
        from_reg(r[4], b).clamp(1, 31),
    );
    days * 86_400
        + hour.min(23) as i64 * 3600
        + from_reg(r[1], b).min(59) as i64 * 60
        + from_reg(r[0], b).min(59) as i64
}

/// The periodic interrupt's period in 32.768 kHz ticks for rate select
/// `rs`, if it has one (rates 1 and 2 are 256 and 128 Hz, as 8 and 9).
fn period_ticks(reg_a: u8) -> Option<u128> {
    match reg_a & A_RS_MASK {
        0 => None,
        rs @ (1 | 2) => Some(1 << (rs + 6)),
        rs => Some(1 << (rs - 1)),
    }
}

/// The clock's state, at times the caller gives (so tests can set them).
pub struct State {
    cmos: [u8; 128],
    index: u8,
    nmi_disabled: bool,
    /// The RTC's time (seconds since 1970) at `base`, an update instant:
    /// updates come at `base` + k seconds. Unused while halted, when the
    /// time registers hold the time.
    secs: i64,
    base: Instant,
    /// The divider chain's start, from which periodic ticks are counted.
    chain: Instant,
    /// Events (updates, periodic ticks) are accounted up to here.
    seen: Instant,
    /// Register C.
    flags: u8,
    stop: bool,
}

impl State {
    /// A clock reading `secs` (seconds since 1970) with `frac` of the
    /// current second gone, at `now`.
    pub fn new(secs: i64, frac: Duration, now: Instant) -> State {
        let mut cmos = [0u8; 128];
        // Registers as a BIOS leaves them: 32.768 kHz, 1024 Hz periodic
        // rate; 24-hour BCD; valid RAM and time.
        cmos[REG_A] = 0x26;
        cmos[REG_B] = B_24H;
        cmos[REG_D] = D_VRT;
        let base = now.checked_sub(frac).unwrap_or(now);
        State {
            cmos,
            index: 0,
            nmi_disabled: false,
            secs,
            base,
            chain: base,
            seen: now,
            flags: 0,
            stop: false,
        }
    }

    fn divider_reset(&self) -> bool {
        self.cmos[REG_A] & 0x60 == 0x60
    }

    /// Updates are stopped: SET, or the divider chain in reset.
    fn halted(&self) -> bool {
        self.cmos[REG_B] & B_SET != 0 || self.divider_reset()
    }

    /// Updates from `base` to `t`.
    fn updates(&self, t: Instant) -> i64 {
        (t.saturating_duration_since(self.base).as_nanos() / SEC.as_nanos()) as i64
    }

    /// Periodic ticks from the chain's start to `t` at the current rate.
    fn ticks(&self, t: Instant) -> Option<u128> {
        let p = period_ticks(self.cmos[REG_A])?;
        (!self.divider_reset()).then(|| {
            t.saturating_duration_since(self.chain).as_nanos() * BASE_HZ / 1_000_000_000 / p
        })
    }

    /// The clock's time at `now` (seconds since 1970).
    pub fn time(&self, now: Instant) -> i64 {
        if self.halted() {
            decode(self.time_regs(), self.cmos[REG_B])
        } else {
            self.secs + self.updates(now)
        }
    }

    fn time_regs(&self) -> [u8; 8] {
        TIME_REGS.map(|r| self.cmos[r])
    }

    /// Whether an update comes within [`UIP_LEAD`] of `now`.
    fn uip(&self, now: Instant) -> bool {
        if self.halted() {
            return false;
        }
        let into = now.saturating_duration_since(self.base).as_nanos() % SEC.as_nanos();
        SEC.as_nanos() - into <= UIP_LEAD.as_nanos()
    }

    fn irqf(&self) -> bool {
        let b = self.cmos[REG_B];
        self.flags & b & (B_PIE | B_AIE | B_UIE) != 0
    }

    /// Accounts the updates and periodic ticks up to `now` in register C;
    /// returns whether IRQF rose (the line is to be signalled).
    pub fn advance(&mut self, now: Instant) -> bool {
        if now <= self.seen {
            return false;
        }
        let before = self.flags & C_IRQF != 0;
        if !self.halted() {
            let (from, to) = (self.updates(self.seen), self.updates(now));
            if to > from {
                self.flags |= C_UF;
                // The alarm is checked at each update; a day of updates
                // covers every alarm that can match.
                let b = self.cmos[REG_B];
                let alarm = [SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM].map(|r| self.cmos[r]);
                for k in (from + 1).max(to - 86_400)..=to {
                    let t = encode(self.secs + k, b);
                    let time = [t[0], t[1], t[2]];
                    if alarm
                        .iter()
                        .zip(time)
                        .all(|(&a, t)| a & 0xc0 == 0xc0 || a == t)
                    {
                        self.flags |= C_AF;
                        break;
                    }
                }
            }
        }
        if let (Some(from), Some(to)) = (self.ticks(self.seen), self.ticks(now)) {
            if to > from {
                self.flags |= C_PF;
            }
        }
        self.seen = now;
        if self.irqf() {
            self.flags |= C_IRQF;
        }
        !before && self.flags & C_IRQF != 0
    }

    /// When the next event that could raise IRQF is due, if one can.
    fn deadline(&self) -> Option<Instant> {
        if self.flags & C_IRQF != 0 {
            // The request stays up until register C is read.
            return None;
        }
        let b = self.cmos[REG_B];
        let update = (b & (B_AIE | B_UIE) != 0 && !self.halted())
            .then(|| self.base + SEC * (self.updates(self.seen) as u32 + 1));
        let tick = (b & B_PIE != 0)
            .then(|| {
                let p = period_ticks(self.cmos[REG_A])?;
                let next = self.ticks(self.seen)? + 1;
                let ns = (next * p * 1_000_000_000).div_ceil(BASE_HZ);
                Some(self.chain + Duration::from_nanos(ns as u64))
            })
            .flatten();
        [update, tick].into_iter().flatten().min()
    }

    /// Stops updates: the time registers take the time `secs`, under the
    /// current register B.
    fn halt(&mut self, secs: i64) {
        let t = encode(secs, self.cmos[REG_B]);
        for (r, v) in TIME_REGS.into_iter().zip(t) {
            self.cmos[r] = v;
        }
    }

    /// Starts updates again from the time registers: from the next update
    /// on the old phase (SET cleared), or 500 ms from now (the divider
    /// chain released).
    fn resume(&mut self, now: Instant, released: bool) {
        self.secs = decode(self.time_regs(), self.cmos[REG_B]);
        if released {
            self.base = now.checked_sub(SEC / 2).unwrap_or(now);
            self.chain = now;
        } else {
            self.base += SEC * self.updates(now) as u32;
        }
        self.seen = now;
    }

    /// A read of the data port at `now`.
    pub fn read(&mut self, now: Instant) -> u8 {
        let r = self.index as usize;
        match r {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY_REG
                if !self.halted() =>
            {
                let t = encode(self.time(now), self.cmos[REG_B]);
                t[TIME_REGS.iter().position(|&x| x == r).unwrap_or(0)]
            }
            REG_A => (self.cmos[REG_A] & !A_UIP) | if self.uip(now) { A_UIP } else { 0 },
            REG_C => {
                let c = self.flags;
                self.flags = 0;
                c
            }
            REG_D => D_VRT,
            _ => self.cmos[r],
        }
    }

    /// A write of `v` to the data port at `now`; returns whether IRQF rose.
    pub fn write(&mut self, v: u8, now: Instant) -> bool {
        let r = self.index as usize;
        let was_halted = self.halted();
        let was_reset = self.divider_reset();
        let running = self.time(now);
        match r {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY_REG => {
                if was_halted {
                    self.cmos[r] = v;
                } else {
                    // The time changes now; the phase of the updates stays.
                    self.halt(running);
                    self.cmos[r] = v;
                    self.resume(now, false);
                }
                return false;
            }
            REG_A => self.cmos[REG_A] = v & !A_UIP,
            REG_B => {
                // SET clears UIE.
                self.cmos[REG_B] = if v & B_SET != 0 { v & !B_UIE } else { v };
            }
            REG_C | REG_D => return false,
            _ => {
                self.cmos[r] = v;
                return false;
            }
        }
        if !was_halted && self.halted() {
            self.halt(running);
        } else if was_halted && !self.halted() {
            self.resume(now, was_reset);
        } else if was_reset && !self.divider_reset() {
            // Released while SET holds the time: the chain starts now.
            self.chain = now;
        }
        // An enable of a pending flag raises the request.
        let before = self.flags & C_IRQF != 0;
        if self.irqf() {
            self.flags |= C_IRQF;
        }
        !before && self.flags & C_IRQF != 0
    }

    /// A write of the index port: bit 7 disables NMI, bits 6:0 select.
    pub fn select(&mut self, v: u8) {
        self.nmi_disabled = v & 0x80 != 0;
        self.index = v & 0x7f;
    }

    /// Whether the index port's NMI-disable bit is set (kept only: visor
    /// raises no NMI through it).
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    /// Sets NVRAM byte `at` (0x0e-0x7f).
    fn set_nvram(&mut self, at: usize, v: u8) {
        if (0x0e..0x80).contains(&at) {
            self.cmos[at] = v;
        }
    }
}

/// The RTC's interrupt line as the board wires it: cut while the HPET's
/// legacy replacement routing (`legacy`, [`crate::hpet::Hpet::legacy_replacement`])
/// gives IRQ 8 to the HPET's timer 1.
pub struct RtcLine {
    pub line: Arc<dyn IrqLine>,
    pub legacy: Arc<std::sync::atomic::AtomicBool>,
}

impl IrqLine for RtcLine {
    fn trigger(&self) -> std::io::Result<()> {
        if self.legacy.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.line.trigger()
    }
}

type Shared = Arc<(Mutex<State>, Condvar)>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// The RTC on the port bus (two ports from [`INDEX_PORT`]), with a thread
/// that raises its interrupts.
pub struct Rtc {
    state: Shared,
    line: Option<Arc<dyn IrqLine>>,
    clock: Arc<vcpu::GuestClock>,
}

impl Rtc {
    /// A clock set to the host's UTC time, interrupting on `line` (the
    /// engine's ISA IRQ 8 line, if it has one), for a guest with
    /// `low_ram` bytes of RAM below 4 GiB and `high_ram` above. The
    /// NVRAM holds, as QEMU's does for firmware: bytes 0x34-0x35, the RAM
    /// between 16 MiB and 4 GiB in 64 KiB units (at most 0xffff), and
    /// bytes 0x5b-0x5d, the RAM above 4 GiB in 64 KiB units; all
    /// little-endian. It runs on the guest's `clock` (it stands while a
    /// debugger holds the guest).
    pub fn new(
        line: Option<Arc<dyn IrqLine>>,
        low_ram: u64,
        high_ram: u64,
        clock: Arc<vcpu::GuestClock>,
    ) -> Rtc {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut s = State::new(
            wall.as_secs() as i64,
            Duration::from_nanos(wall.subsec_nanos() as u64),
            clock.now(),
        );
        let mid = (low_ram.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        let high = (high_ram >> 16).min(0xff_ffff) as u32;
        for (at, v) in [
            (0x34, mid as u8),
            (0x35, (mid >> 8) as u8),
            (0x5b, high as u8),
            (0x5c, (high >> 8) as u8),
            (0x5d, (high >> 16) as u8),
        ] {
            s.set_nvram(at, v);
        }
        let state: Shared = Arc::new((Mutex::new(s), Condvar::new()));
        // The thread waits without a timeout while the clock stands; a
        // resume makes it look again.
        clock.wake_on_resume(&state);
        let (s, l, c) = (state.clone(), line.clone(), clock.clone());
        std::thread::Builder::new()
            .name("rtc".into())
            .spawn(move || run(s, l, c))
            .ok();
        Rtc { state, line, clock }
    }

    fn signal(&self, rose: bool) {
        if rose {
            if let Some(l) = &self.line {
                // A line that cannot be raised loses the interrupt, as a
                // disconnected pin would; register C still shows it.
                let _ = l.trigger();
            }
        }
    }
}

impl Drop for Rtc {
    fn drop(&mut self) {
        lock(&self.state).stop = true;
        self.state.1.notify_all();
    }
}

/// The interrupt thread: accounts events, signals the line when IRQF rises,
/// sleeps until the next event that could raise it or a register access.
fn run(state: Shared, line: Option<Arc<dyn IrqLine>>, clock: Arc<vcpu::GuestClock>) {
    let mut s = lock(&state);
    loop {
        if s.stop {
            return;
        }
        if clock.is_paused() {
            s = state.1.wait(s).unwrap_or_else(|p| p.into_inner());
            continue;
        }
        let now = clock.now();
        if s.advance(now) {
            drop(s);
            if let Some(l) = &line {
                let _ = l.trigger();
            }
            s = lock(&state);
            continue;
        }
        let deadline = s.deadline();
        s = clock.wait_for(&state.1, s, deadline);
    }
}

impl Device for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut rose = false;
        let mut cleared = false;
        {
            let mut s = lock(&self.state);
            for (k, b) in data.iter_mut().enumerate() {
                *b = match offset + k as u64 {
                    // The index register is write-only.
                    0 => 0xff,
                    1 => {
                        let now = self.clock.now();
                        rose |= s.advance(now);
                        cleared |= s.index as usize == REG_C;
                        s.read(now)
                    }
                    _ => 0xff,
                };
            }
        }
        // Reading register C lowers IRQF: the thread has deadlines again.
        if cleared {
            self.state.1.notify_all();
        }
        self.signal(rose);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let mut rose = false;
        {
            let mut s = lock(&self.state);
            for (k, &b) in data.iter().enumerate() {
                match offset + k as u64 {
                    0 => s.select(b),
                    1 => {
                        let now = self.clock.now();
                        rose |= s.advance(now);
                        rose |= s.write(b, now);
                    }
                    _ => {}
                }
            }
        }
        self.state.1.notify_all();
        self.signal(rose);
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Edges;

    /// 2024-02-29 13:45:30 UTC, a Thursday.
    const LEAP_DAY: i64 = 1_709_214_330;

    fn rd(s: &mut State, r: u8, now: Instant) -> u8 {
        s.select(r);
        s.advance(now);
        s.read(now)
    }

    fn wr(s: &mut State, r: u8, v: u8, now: Instant) -> bool {
        s.select(r);
        let a = s.advance(now);
        s.write(v, now) | a
    }

    fn time_regs(s: &mut State, now: Instant) -> Vec<u8> {
        TIME_REGS.iter().map(|&r| rd(s, r as u8, now)).collect()
    }

    #[test]
    fn calendar() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        for d in [-800_000, -1, 0, 11_016, 19_782, 2_932_896] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        assert_eq!(civil_from_days(LEAP_DAY / 86_400), (2024, 2, 29));
    }

    /// The default registers: 24-hour BCD, then binary, then 12-hour (PM
    /// in bit 7, noon and midnight as 12).
    #[test]
    fn encodings() {
        let t0 = Instant::now();
        let mut s = State::new(LEAP_DAY, Duration::ZERO, t0);
        assert_eq!(rd(&mut s, 0x0a, t0), 0x26);
        assert_eq!(rd(&mut s, 0x0b, t0), B_24H);
        assert_eq!(rd(&mut s, 0x0d, t0), D_VRT);
        // Seconds, minutes, hours, weekday (Thursday = 5), day, month,
        // year, century.
        assert_eq!(
            time_regs(&mut s, t0),
            [0x30, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
        wr(&mut s, 0x0b, B_24H | B_DM_BINARY, t0);
        assert_eq!(time_regs(&mut s, t0), [30, 45, 13, 5, 29, 2, 24, 20]);
        wr(&mut s, 0x0b, 0, t0);
        assert_eq!(rd(&mut s, 0x04, t0), 0x81, "1 PM in BCD");
        wr(&mut s, 0x0b, B_DM_BINARY, t0);
        assert_eq!(rd(&mut s, 0x04, t0), 0x81, "1 PM in binary");
        let noon = State::new(LEAP_DAY - 6330, Duration::ZERO, t0);
        assert_eq!(encode(noon.time(t0), 0)[2], 0x92, "12 PM");
        assert_eq!(encode(LEAP_DAY - 13 * 3600 - 2730, 0)[2], 0x12, "12 AM");
        assert_eq!(encode(LEAP_DAY - 3 * 3600, 0)[2], 0x10, "10 AM");
        for b in [0, B_24H, B_DM_BINARY, B_24H | B_DM_BINARY] {
            for t in [0, LEAP_DAY, LEAP_DAY + 43_200, 4_102_444_800 + 86_399] {
                assert_eq!(decode(encode(t, b), b), t, "b={b:#x} t={t}");
            }
        }
        // Bad BCD and out-of-range values do not panic.
        let _ = decode([0xff; 8], 0);
        let _ = decode([0xff; 8], B_DM_BINARY);
        let _ = decode([0; 8], B_24H);
    }

    /// The guest sets the time (SET, the registers, SET cleared); it reads
    /// back, and goes on from there: the offset is kept. A write of one
    /// register while the clock runs changes that field alone.
    #[test]
    fn set_time_and_offset() {
        let t0 = Instant::now();
        let mut s = State::new(LEAP_DAY, Duration::ZERO, t0);
        wr(&mut s, 0x0b, B_SET | B_24H, t0);
        for (r, v) in [
            (0, 0x59),
            (2, 0x59),
            (4, 0x23),
            (7, 0x31),
            (8, 0x12),
            (9, 0x99),
        ] {
            wr(&mut s, r, v, t0);
        }
        wr(&mut s, CENTURY, 0x19, t0);
        // While SET is set the time stands.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(rd(&mut s, 0, t1), 0x59);
        assert_eq!(rd(&mut s, 0x0c, t1) & C_UF, 0, "no update while SET");
        wr(&mut s, 0x0b, B_24H, t1);
        assert_eq!(
            time_regs(&mut s, t1 + Duration::from_millis(10)),
            [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19],
            "1999-12-31 (a Friday)"
        );
        // Two seconds on: 2000-01-01 00:00:01.
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(
            time_regs(&mut s, t2),
            [0x01, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]
        );
        assert_eq!(s.time(t2), 946_684_801);
        // One register written while the clock runs.
        wr(&mut s, 9, 0x24, t2);
        assert_eq!(rd(&mut s, 9, t2), 0x24);
        assert_eq!(rd(&mut s, 0, t2), 0x01);
        assert_eq!(
            s.time(t2),
            946_684_801 + days_from_civil(2024, 1, 1) * 86_400 - 946_684_800
        );
    }

    /// SET stops the updates and clears UIE; the phase of the updates is
    /// kept when it clears. Holding the divider in reset (DV 11x) stops
    /// them too, and the first update comes 500 ms after the release.
    #[test]
    fn set_and_divider_halt_updates() {
        let t0 = Instant::now();
        let mut s = State::new(LEAP_DAY, Duration::from_millis(300), t0);
        wr(&mut s, 0x0b, B_24H | B_UIE, t0);
        wr(&mut s, 0x0b, B_SET | B_24H | B_UIE, t0);
        assert_eq!(rd(&mut s, 0x0b, t0), B_SET | B_24H, "SET clears UIE");
        let t1 = t0 + Duration::from_millis(3500);
        assert_eq!(rd(&mut s, 0, t1), 0x30);
        assert_eq!(rd(&mut s, 0x0a, t1) & A_UIP, 0, "no UIP while SET");
        wr(&mut s, 0x0b, B_24H, t1);
        // The old phase: updates at t0 + 0.7 s + k s; t1 is 0.2 s before one.
        assert_eq!(rd(&mut s, 0, t1 + Duration::from_millis(150)), 0x30);
        assert_eq!(rd(&mut s, 0, t1 + Duration::from_millis(250)), 0x31);
        // The divider held in reset.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(rd(&mut s, 0, t2), 0x31);
        wr(&mut s, 0x0a, 0x70 | 6, t2);
        assert_eq!(rd(&mut s, 0, t2 + Duration::from_secs(4)), 0x31);
        let t3 = t2 + Duration::from_secs(5);
        wr(&mut s, 0x0a, 0x26, t3);
        assert_eq!(rd(&mut s, 0, t3 + Duration::from_millis(499)), 0x31);
        assert_eq!(rd(&mut s, 0, t3 + Duration::from_millis(501)), 0x32);
        assert!(!s.nmi_disabled());
        s.select(0x80 | 0x0e);
        assert!(s.nmi_disabled());
    }

    /// UIP reads 1 only in the 244 µs before an update, so a guest that
    /// waits for it to clear sees it clear.
    #[test]
    fn uip_timing() {
        let t0 = Instant::now();
        let mut s = State::new(LEAP_DAY, Duration::ZERO, t0);
        let uip = |s: &mut State, at: Duration| rd(s, 0x0a, t0 + at) & A_UIP != 0;
        assert!(!uip(&mut s, Duration::ZERO));
        assert!(!uip(&mut s, Duration::from_micros(999_700)));
        assert!(uip(&mut s, Duration::from_micros(999_760)));
        assert!(uip(&mut s, Duration::from_micros(999_999)));
        assert!(!uip(&mut s, Duration::from_micros(1_000_001)));
        assert_eq!(rd(&mut s, 0, t0 + Duration::from_micros(999_999)), 0x30);
        assert_eq!(rd(&mut s, 0, t0 + Duration::from_micros(1_000_001)), 0x31);
        // Writes to UIP are ignored.
        wr(&mut s, 0x0a, 0xa6, t0 + Duration::from_secs(2));
        assert_eq!(rd(&mut s, 0x0a, t0 + Duration::from_secs(2)), 0x26);
    }

    /// Register C: UF at each update, AF when the alarm matches (0xc0-0xff
    /// match anything), PF at the periodic rate; IRQF for the enabled ones;
    /// a read clears them all.
    #[test]
    fn interrupt_flags() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut s = State::new(LEAP_DAY, Duration::ZERO, t0);
        // The default rate (1024 Hz) runs; no interrupt is enabled.
        assert_eq!(rd(&mut s, 0x0c, ms(0)), 0);
        assert_eq!(rd(&mut s, 0x0c, ms(2)), C_PF);
        assert_eq!(rd(&mut s, 0x0c, ms(2)), 0, "read clears");
        assert_eq!(rd(&mut s, 0x0c, ms(1001)), C_PF | C_UF);
        // Rate 0: no periodic flag.
        wr(&mut s, 0x0a, 0x20, ms(1001));
        assert_eq!(rd(&mut s, 0x0c, ms(1500)), 0);
        // Periodic interrupt at 2 Hz (rate 15): IRQF rises at 500 ms.
        wr(&mut s, 0x0a, 0x2f, ms(1500));
        assert!(!wr(&mut s, 0x0b, B_24H | B_PIE, ms(1500)));
        assert!(!s.advance(ms(1999)));
        assert!(s.advance(ms(2001)), "IRQF rose");
        assert!(!s.advance(ms(2600)), "it stays up until C is read");
        let c = rd(&mut s, 0x0c, ms(2600));
        assert_eq!(c, C_IRQF | C_PF | C_UF);
        assert_eq!(s.deadline(), Some(ms(3000)));
        // Update-ended interrupt.
        wr(&mut s, 0x0b, B_24H | B_UIE, ms(2600));
        assert_eq!(s.deadline(), Some(ms(3000)));
        assert!(s.advance(ms(3000)));
        assert_eq!(rd(&mut s, 0x0c, ms(3000)), C_IRQF | C_UF | C_PF);
        // The alarm: 13:45:40 (the clock reads 13:45:33).
        wr(&mut s, 0x0b, B_24H | B_AIE, ms(3000));
        assert_eq!(rd(&mut s, 0, ms(3000)), 0x33);
        wr(&mut s, 1, 0x40, ms(3000));
        wr(&mut s, 3, 0x45, ms(3000));
        wr(&mut s, 5, 0xc0, ms(3000));
        assert!(!s.advance(ms(9900)));
        assert_eq!(rd(&mut s, 0x0c, ms(9900)), C_UF | C_PF, "no alarm yet");
        assert!(s.advance(ms(10_000)), "13:45:40");
        assert_eq!(
            rd(&mut s, 0x0c, ms(10_000)) & (C_IRQF | C_AF),
            C_IRQF | C_AF
        );
        assert!(!s.advance(ms(11_000)));
        assert_eq!(rd(&mut s, 0x0c, ms(11_000)) & C_AF, 0);
        // Don't-care in every byte: every update.
        wr(&mut s, 1, 0xff, ms(11_000));
        wr(&mut s, 3, 0xc0, ms(11_000));
        assert!(s.advance(ms(12_000)));
        // A flag pending when its interrupt is enabled raises IRQF.
        rd(&mut s, 0x0c, ms(12_000));
        wr(&mut s, 0x0b, B_24H, ms(12_000));
        assert!(!s.advance(ms(13_000)));
        assert!(wr(&mut s, 0x0b, B_24H | B_UIE, ms(13_000)));
    }

    /// The device's thread raises the update-ended interrupt on its line
    /// once per second while register C is read; the line is cut while the
    /// HPET's legacy replacement routing has IRQ 8.
    #[test]
    fn update_interrupts_on_the_line() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let edges = Arc::new(Edges::default());
        let legacy = Arc::new(AtomicBool::new(false));
        let line = Arc::new(RtcLine {
            line: edges.clone(),
            legacy: legacy.clone(),
        });
        let mut rtc = Rtc::new(Some(line), 64 << 20, 0, Arc::default());
        let mut c = [0u8];
        rtc.write(0, &[0x0b]);
        rtc.write(1, &[B_24H | B_UIE]);
        let until = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
            rtc.write(0, &[0x0c]);
            rtc.read(1, &mut c);
        }
        let n = edges.count();
        assert!((2..=3).contains(&n), "{n} update interrupts in 2.5 s");
        legacy.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1100));
        rtc.write(0, &[0x0c]);
        rtc.read(1, &mut c);
        assert_ne!(c[0] & C_IRQF, 0, "the request was made");
        assert_eq!(edges.count(), n, "but the line was cut");
    }

    #[test]
    fn ports_and_nvram() {
        let mut rtc = Rtc::new(None, 3 << 30, 5 << 30, Arc::default());
        fn get(rtc: &mut Rtc, r: u8) -> u8 {
            let mut b = [0u8];
            rtc.write(0, &[r]);
            rtc.read(1, &mut b);
            b[0]
        }
        assert_eq!(get(&mut rtc, 0x34), 0x00);
        assert_eq!(
            get(&mut rtc, 0x35),
            0xbf,
            "3 GiB - 16 MiB = 0xbf00 * 64 KiB"
        );
        assert_eq!(
            [
                get(&mut rtc, 0x5b),
                get(&mut rtc, 0x5c),
                get(&mut rtc, 0x5d)
            ],
            [0x00, 0x40, 0x01],
            "5 GiB = 0x14000 * 64 KiB"
        );
        assert_eq!(get(&mut rtc, 0x0e), 0);
        rtc.write(0, &[0x80 | 0x7f]);
        rtc.write(1, &[0x5a]);
        assert_eq!(get(&mut rtc, 0x7f), 0x5a);
        assert_eq!(get(&mut rtc, 0x0d), D_VRT);
        // The clock reads the host's time (the year within a day of it).
        let year = |rtc: &mut Rtc| {
            from_reg(get(rtc, 0x32), 0) as i64 * 100 + from_reg(get(rtc, 9), 0) as i64
        };
        let host = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(year(&mut rtc), civil_from_days(host as i64 / 86_400).0);
        let mut idx = [0u8];
        rtc.read(0, &mut idx);
        assert_eq!(idx[0], 0xff, "the index port is write-only");
    }
}
