//! The HPET (IA-PC High Precision Event Timer, spec 1.0a) at
//! [`crate::acpi::HPET_ADDR`]: a 64-bit main counter at 100 MHz on the host's
//! monotonic clock and three comparators, each one-shot or periodic, 32- or
//! 64-bit, edge or level, with legacy replacement routing (timer 0 on ISA
//! IRQ 0, timer 1 on IRQ 8) or routed to an ISA IRQ of [`ROUTE_CAP`]. FSB
//! (MSI) delivery is not offered. A thread raises the interrupts at their
//! deadlines through the engine's interrupt lines, so it works on every
//! engine that has them. The counter and the deadlines run on the VM's
//! [`GuestClock`]: they stand while a debugger holds the guest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vcpu::{GuestClock, IrqLine};

use crate::bus::{Action, Device};

/// Comparators.
pub const TIMERS: usize = 3;
/// The counter's period in femtoseconds (10 ns: 100 MHz).
pub const PERIOD_FS: u64 = 10_000_000;
const TICK_NS: u64 = PERIOD_FS / 1_000_000;
/// The ISA IRQs a comparator may be routed to (Tn_INT_ROUTE_CAP).
pub const ROUTE_CAP: u32 = (1 << 5) | (1 << 10) | (1 << 11);

/// General capabilities: revision 1, TIMERS - 1 in bits 12:8, 64-bit
/// counter, legacy replacement capable, vendor 0x8086, the period.
pub const CAPABILITIES: u64 = (PERIOD_FS << 32) | crate::acpi::HPET_BLOCK_ID as u64;

const ENABLE_CNF: u64 = 1;
const LEG_RT_CNF: u64 = 2;
// Timer configuration bits.
const INT_TYPE_LEVEL: u64 = 1 << 1;
const INT_ENB: u64 = 1 << 2;
const TYPE_PERIODIC: u64 = 1 << 3;
const PER_INT_CAP: u64 = 1 << 4;
const SIZE_CAP: u64 = 1 << 5;
const VAL_SET: u64 = 1 << 6;
const MODE32: u64 = 1 << 8;
const ROUTE_MASK: u64 = 0x1f << 9;
/// Bits of Tn_CONF_CAP software may write.
const TIMER_WRITABLE: u64 =
    INT_TYPE_LEVEL | INT_ENB | TYPE_PERIODIC | VAL_SET | MODE32 | ROUTE_MASK;

#[derive(Clone, Copy, Default)]
struct Timer {
    config: u64,
    comparator: u64,
    period: u64,
    /// The main-counter value of the next interrupt, while armed.
    target: Option<u64>,
}

struct State {
    config: u64,
    status: u64,
    /// The counter at `since` (when it was last written or stopped).
    base: u64,
    since: Instant,
    timers: [Timer; TIMERS],
    stop: bool,
}

impl State {
    fn enabled(&self) -> bool {
        self.config & ENABLE_CNF != 0
    }

    fn counter(&self, now: Instant) -> u64 {
        if !self.enabled() {
            return self.base;
        }
        let ticks = now.saturating_duration_since(self.since).as_nanos() / TICK_NS as u128;
        self.base.wrapping_add(ticks as u64)
    }

    /// The ISA IRQ of timer `n`.
    fn irq(&self, n: usize) -> u8 {
        if self.config & LEG_RT_CNF != 0 && n < 2 {
            [0, 8][n]
        } else {
            ((self.timers[n].config & ROUTE_MASK) >> 9) as u8
        }
    }

    /// Arms timer `n` for its comparator from counter value `now`.
    fn arm(&mut self, n: usize, cnt: u64) {
        let t = &mut self.timers[n];
        t.target = (self.config & ENABLE_CNF != 0).then(|| {
            let ahead = if t.config & MODE32 != 0 {
                (t.comparator as u32).wrapping_sub(cnt as u32) as u64
            } else {
                t.comparator.wrapping_sub(cnt)
            };
            cnt.wrapping_add(ahead)
        });
    }

    /// Fires the timers due at `now`; returns the IRQs to raise.
    fn fire(&mut self, now: Instant) -> Vec<u8> {
        let cnt = self.counter(now);
        let mut irqs = Vec::new();
        for n in 0..TIMERS {
            let Some(target) = self.timers[n].target else {
                continue;
            };
            // Due when the counter has reached the target (within half
            // the counter's range: the counter never runs that far ahead).
            if cnt.wrapping_sub(target) > u64::MAX / 2 {
                continue;
            }
            let irq = self.irq(n);
            let config = self.timers[n].config;
            if config & INT_ENB != 0 {
                if config & INT_TYPE_LEVEL != 0 {
                    self.status |= 1 << n;
                }
                irqs.push(irq);
            }
            let t = &mut self.timers[n];
            let wide = t.config & MODE32 == 0;
            if t.config & TYPE_PERIODIC != 0 && t.period != 0 {
                // The comparator moves on by the period; missed periods
                // collapse into one interrupt.
                let behind = cnt.wrapping_sub(target) / t.period;
                let next = target.wrapping_add((behind + 1) * t.period);
                t.comparator = if wide { next } else { next & 0xffff_ffff };
                t.target = Some(next);
            } else if wide {
                t.target = None;
            } else {
                // A 32-bit comparator matches again when the low half wraps.
                t.target = Some(target.wrapping_add(1 << 32));
            }
        }
        irqs
    }

    /// The instant of the next armed target.
    fn deadline(&self, now: Instant) -> Option<Instant> {
        let cnt = self.counter(now);
        self.timers
            .iter()
            .filter_map(|t| t.target)
            .map(|target| {
                let ticks = target.wrapping_sub(cnt).min(u64::MAX / 2);
                now + Duration::from_nanos(ticks.saturating_mul(TICK_NS))
            })
            .min()
    }
}

type Shared = Arc<(Mutex<State>, Condvar)>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// The HPET: registers on the MMIO bus, a thread for the deadlines.
pub struct Hpet {
    state: Shared,
    clock: Arc<GuestClock>,
    /// LEG_RT_CNF, for the devices whose IRQ it takes over.
    legacy: Arc<AtomicBool>,
}

/// The interrupt line of ISA IRQ n, if the engine has it.
pub type IsaLines = Vec<Option<Arc<dyn IrqLine>>>;

impl Hpet {
    /// An HPET whose interrupts go to `lines` (ISA IRQ n at index n), on
    /// the guest's `clock`.
    pub fn new(lines: IsaLines, clock: Arc<GuestClock>) -> Hpet {
        let mut timers = [Timer::default(); TIMERS];
        for t in timers.iter_mut() {
            t.config = PER_INT_CAP | SIZE_CAP | ((ROUTE_CAP as u64) << 32);
            t.comparator = u64::MAX;
        }
        let state: Shared = Arc::new((
            Mutex::new(State {
                config: 0,
                status: 0,
                base: 0,
                since: clock.now(),
                timers,
                stop: false,
            }),
            Condvar::new(),
        ));
        // The deadline thread waits without a timeout while the clock
        // stands; a resume makes it look again.
        clock.wake_on_resume(&state);
        let (s, c) = (state.clone(), clock.clone());
        std::thread::Builder::new()
            .name("hpet".into())
            .spawn(move || run(s, lines, c))
            .ok();
        Hpet {
            state,
            clock,
            legacy: Arc::default(),
        }
    }

    /// Whether legacy replacement routing is on (LEG_RT_CNF), shared: while
    /// it is, timer 1 has IRQ 8 and the RTC's interrupt is disconnected.
    pub fn legacy_replacement(&self) -> Arc<AtomicBool> {
        self.legacy.clone()
    }

    fn read64(&self, reg: u64) -> u64 {
        let s = lock(&self.state);
        match reg {
            0x000 => CAPABILITIES,
            0x010 => s.config,
            0x020 => s.status,
            0x0f0 => s.counter(self.clock.now()),
            r @ 0x100..=0x17f => {
                let t = &s.timers[((r - 0x100) / 0x20) as usize];
                match r & 0x1f {
                    0x00 => t.config,
                    0x08 => t.comparator,
                    _ => 0,
                }
            }
            _ => 0,
        }
    }

    /// A write of `mask`ed bits `v` of the 64-bit register `reg`.
    fn write64(&self, reg: u64, v: u64, mask: u64) {
        let mut s = lock(&self.state);
        let now = self.clock.now();
        let merge = |old: u64| (old & !mask) | (v & mask);
        match reg {
            0x010 => {
                let cnt = s.counter(now);
                s.config = merge(s.config) & (ENABLE_CNF | LEG_RT_CNF);
                self.legacy
                    .store(s.config & LEG_RT_CNF != 0, Ordering::SeqCst);
                s.base = cnt;
                s.since = now;
                for n in 0..TIMERS {
                    s.arm(n, cnt);
                }
            }
            0x020 => s.status &= !(v & mask),
            0x0f0 => {
                // The counter may be written while it is halted.
                if !s.enabled() {
                    s.base = merge(s.base);
                }
            }
            r @ 0x100..=0x17f => {
                let n = ((r - 0x100) / 0x20) as usize;
                let cnt = s.counter(now);
                let t = &mut s.timers[n];
                match r & 0x1f {
                    0x00 => {
                        let fixed = t.config & !TIMER_WRITABLE;
                        let mut c = merge(t.config) & TIMER_WRITABLE;
                        let route = (c & ROUTE_MASK) >> 9;
                        if route >= 32 || ROUTE_CAP & (1 << route) == 0 {
                            c = (c & !ROUTE_MASK) | (t.config & ROUTE_MASK);
                        }
                        t.config = fixed | c;
                    }
                    0x08 => {
                        let value = merge(t.comparator);
                        let value = if t.config & MODE32 != 0 {
                            value & 0xffff_ffff
                        } else {
                            value
                        };
                        // In periodic mode a write sets the period, and the
                        // comparator too when VAL_SET is set (which clears).
                        if t.config & TYPE_PERIODIC == 0 || t.config & VAL_SET != 0 {
                            t.comparator = value;
                        }
                        t.period = value;
                        t.config &= !VAL_SET;
                    }
                    _ => return,
                }
                s.arm(n, cnt);
            }
            _ => return,
        }
        self.state.1.notify_all();
    }
}

impl Drop for Hpet {
    fn drop(&mut self) {
        lock(&self.state).stop = true;
        self.state.1.notify_all();
    }
}

/// The deadline thread: fires due timers, raises their lines, sleeps until
/// the next deadline (in the guest's time), a register write or the clock's
/// resume.
fn run(state: Shared, lines: IsaLines, clock: Arc<GuestClock>) {
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
        let irqs = s.fire(now);
        if !irqs.is_empty() {
            drop(s);
            for irq in irqs {
                if let Some(Some(l)) = lines.get(irq as usize) {
                    // A line that cannot be raised loses the interrupt, as
                    // a disconnected pin would.
                    let _ = l.trigger();
                }
            }
            s = lock(&state);
            continue;
        }
        let deadline = s.deadline(now);
        s = clock.wait_for(&state.1, s, deadline);
    }
}

impl Device for Hpet {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.read64(offset & !7).to_le_bytes();
        for (k, b) in data.iter_mut().enumerate() {
            *b = v.get((offset & 7) as usize + k).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        let shift = (offset & 7) * 8;
        let n = data.len().min(8 - (offset & 7) as usize);
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b) << shift;
        let mask = if n == 8 {
            u64::MAX
        } else {
            ((1u64 << (8 * n)) - 1) << shift
        };
        self.write64(offset & !7, v, mask);
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Count(AtomicU32);
    impl IrqLine for Count {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn w64(h: &mut Hpet, reg: u64, v: u64) {
        h.write(reg, &v.to_le_bytes());
    }

    fn r64(h: &mut Hpet, reg: u64) -> u64 {
        let mut b = [0u8; 8];
        h.read(reg, &mut b);
        u64::from_le_bytes(b)
    }

    /// Capabilities, the counter running only when enabled, a one-shot
    /// 32-bit comparator and a periodic one in legacy replacement mode (timer
    /// 0 on IRQ 0), and a routed timer on IRQ 5.
    #[test]
    fn counter_and_comparators() {
        let irq0 = Arc::new(Count(AtomicU32::new(0)));
        let irq5 = Arc::new(Count(AtomicU32::new(0)));
        let mut lines: IsaLines = vec![None; 16];
        lines[0] = Some(irq0.clone());
        lines[5] = Some(irq5.clone());
        let mut h = Hpet::new(lines, Arc::default());
        let cap = r64(&mut h, 0);
        assert_eq!(cap >> 32, 10_000_000, "10 ns period");
        assert_eq!((cap >> 8) & 0x1f, 2, "three comparators");
        assert_ne!(cap & (1 << 15), 0, "legacy replacement capable");
        assert_eq!(r64(&mut h, 0xf0), 0, "stopped");
        assert_eq!(r64(&mut h, 0x100) >> 32, ROUTE_CAP as u64);
        // Legacy replacement, timer 0 periodic every 1 ms (100,000 ticks).
        w64(&mut h, 0x100, INT_ENB | TYPE_PERIODIC | VAL_SET | MODE32);
        h.write(0x108, &100_000u32.to_le_bytes());
        h.write(0x108, &100_000u32.to_le_bytes());
        // Timer 2 one-shot on IRQ 5 at 2 ms.
        w64(&mut h, 0x140, INT_ENB | (5 << 9));
        w64(&mut h, 0x148, 200_000);
        w64(&mut h, 0x10, ENABLE_CNF | LEG_RT_CNF);
        assert!(h.legacy_replacement().load(Ordering::SeqCst));
        std::thread::sleep(Duration::from_millis(20));
        let c = r64(&mut h, 0xf0);
        assert!(c >= 2_000_000, "counter at {c} after 20 ms");
        let n0 = irq0.0.load(Ordering::SeqCst);
        assert!((5..=25).contains(&n0), "{n0} periodic interrupts in 20 ms");
        assert_eq!(irq5.0.load(Ordering::SeqCst), 1, "one-shot fired once");
        // An IRQ outside the route capabilities is not taken.
        w64(&mut h, 0x140, INT_ENB | (7 << 9));
        assert_eq!((r64(&mut h, 0x140) & ROUTE_MASK) >> 9, 5);
        // Halted, the counter stands and can be written.
        w64(&mut h, 0x10, 0);
        w64(&mut h, 0xf0, 42);
        assert_eq!(r64(&mut h, 0xf0), 42);
    }

    /// While the guest's clock stands (a debugger holds the guest) the
    /// counter stands and no interrupt falls due; after the resume the
    /// counter goes on from where it stood and the timer from where it was.
    #[test]
    fn the_counter_and_the_timers_stand_with_the_clock() {
        let irq0 = Arc::new(Count(AtomicU32::new(0)));
        let mut lines: IsaLines = vec![None; 16];
        lines[0] = Some(irq0.clone());
        let clock: Arc<GuestClock> = Arc::default();
        let mut h = Hpet::new(lines, clock.clone());
        // Timer 0 periodic every 2 ms, legacy replacement (IRQ 0).
        w64(&mut h, 0x100, INT_ENB | TYPE_PERIODIC | VAL_SET);
        w64(&mut h, 0x108, 200_000);
        w64(&mut h, 0x108, 200_000);
        w64(&mut h, 0x10, ENABLE_CNF | LEG_RT_CNF);
        std::thread::sleep(Duration::from_millis(10));
        clock.pause();
        let stood = r64(&mut h, 0xf0);
        // A moment for an interrupt raised just before the pause.
        std::thread::sleep(Duration::from_millis(5));
        let fired = irq0.0.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(r64(&mut h, 0xf0), stood, "the counter stands");
        assert_eq!(
            irq0.0.load(Ordering::SeqCst),
            fired,
            "no interrupt while paused"
        );
        assert!(clock.resume() >= Duration::from_millis(100));
        let after = r64(&mut h, 0xf0);
        // Resumed: on by the few ticks since the resume, not by the 10
        // million of the pause.
        assert!(
            after >= stood && after - stood < 3_000_000,
            "{stood} then {after}"
        );
        std::thread::sleep(Duration::from_millis(20));
        let more = irq0.0.load(Ordering::SeqCst) - fired;
        assert!(
            (3..=12).contains(&more),
            "{more} interrupts in 20 ms after the resume"
        );
    }
}
