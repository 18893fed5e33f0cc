//! The guest's clock for the devices that keep time on the host's monotonic
//! clock (the HPET, the ACPI PM timer, the paravirtual one-shot timer):
//! host time minus the time the VM stood stopped for a debugger. While it is
//! paused the guest's time stands still, and after it resumes it goes on
//! from where it stood, without a jump.
//!
//! Time is given as an [`Instant`] on the guest's time line, which started
//! when the clock was made and lags the host's by the time paused so far.
//! A thread that raises an interrupt at a guest deadline waits
//! [`GuestClock::until`] (nothing while paused) and registers a wake-up with
//! [`GuestClock::on_resume`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A VM's guest clock (see the module documentation). Shared as an `Arc`
/// by the VMM and its devices; [`Default`] makes one that runs.
pub struct GuestClock {
    start: Instant,
    state: Mutex<State>,
    wakers: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

#[derive(Default)]
struct State {
    /// The time paused before the current pause.
    paused: Duration,
    /// The host instant of the current pause.
    since: Option<Instant>,
}

impl Default for GuestClock {
    fn default() -> Self {
        GuestClock {
            start: Instant::now(),
            state: Mutex::default(),
            wakers: Mutex::default(),
        }
    }
}

impl GuestClock {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state is two plain values, usable after a panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest's time since the clock was made.
    pub fn elapsed(&self) -> Duration {
        let s = self.state();
        let host = s.since.unwrap_or_else(Instant::now);
        host.saturating_duration_since(self.start)
            .saturating_sub(s.paused)
    }

    /// The guest's time now, on its time line.
    pub fn now(&self) -> Instant {
        self.start + self.elapsed()
    }

    /// Whether the clock stands (the VM is stopped).
    pub fn is_paused(&self) -> bool {
        self.state().since.is_some()
    }

    /// The host time until the guest's time reaches `at` (zero if it has);
    /// `None` while the clock stands.
    pub fn until(&self, at: Instant) -> Option<Duration> {
        if self.is_paused() {
            return None;
        }
        Some(at.saturating_duration_since(self.now()))
    }

    /// Stops the guest's time (the VM stops for a debugger). A clock that
    /// stands already stays as it is.
    pub fn pause(&self) {
        let mut s = self.state();
        if s.since.is_none() {
            s.since = Some(Instant::now());
        }
    }

    /// Lets the guest's time go on from where it stood, and wakes the
    /// threads that wait for it. Returns how long it stood (zero if it ran).
    pub fn resume(&self) -> Duration {
        let stood = {
            let mut s = self.state();
            let Some(since) = s.since.take() else {
                return Duration::ZERO;
            };
            let stood = since.elapsed();
            s.paused = s.paused.saturating_add(stood);
            stood
        };
        // The wake-ups run without the clock's lock: they take their own
        // device's lock, under which that device reads the clock.
        for w in self.wakers.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            w();
        }
        stood
    }

    /// Runs `wake` at every [`resume`](Self::resume): a thread waiting for
    /// a guest deadline while the clock stands is told to look again.
    pub fn on_resume(&self, wake: Box<dyn Fn() + Send + Sync>) {
        self.wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(wake);
    }

    /// [`on_resume`](Self::on_resume) for a device whose deadline thread
    /// waits on `shared`'s condition variable: every resume notifies it
    /// (through a weak reference: a dropped device is left alone).
    pub fn wake_on_resume<T: Send + 'static>(&self, shared: &Arc<(Mutex<T>, Condvar)>) {
        let weak = Arc::downgrade(shared);
        self.on_resume(Box::new(move || {
            if let Some(s) = weak.upgrade() {
                let _held = s.0.lock().unwrap_or_else(|p| p.into_inner());
                s.1.notify_all();
            }
        }));
    }

    /// Waits on `cv` (releasing `guard`) until the guest's time reaches
    /// `deadline` or the condition variable is notified; with no deadline,
    /// or while the clock stands, until it is notified.
    pub fn wait_for<'a, T>(
        &self,
        cv: &Condvar,
        guard: MutexGuard<'a, T>,
        deadline: Option<Instant>,
    ) -> MutexGuard<'a, T> {
        match deadline.and_then(|d| self.until(d)) {
            Some(wait) => {
                cv.wait_timeout(guard, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
            None => cv.wait(guard).unwrap_or_else(|p| p.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// Paused, the guest's time stands; resumed, it goes on from there
    /// (the time stood is taken out), and the wake-ups run.
    #[test]
    fn pause_takes_the_stopped_time_out() {
        let c = GuestClock::default();
        let woken = Arc::new(AtomicU32::new(0));
        let w = woken.clone();
        c.on_resume(Box::new(move || {
            w.fetch_add(1, Ordering::SeqCst);
        }));
        std::thread::sleep(Duration::from_millis(5));
        c.pause();
        let at = c.elapsed();
        assert!(at >= Duration::from_millis(5));
        assert!(c.is_paused());
        assert_eq!(c.until(c.now() + Duration::from_millis(1)), None);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(c.elapsed(), at, "the time stands while paused");
        let stood = c.resume();
        assert!(stood >= Duration::from_millis(50), "stood {stood:?}");
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        let after = c.elapsed();
        assert!(
            after >= at && after < at + Duration::from_millis(40),
            "{at:?} then {after:?}"
        );
        assert_eq!(c.resume(), Duration::ZERO, "resuming a running clock");
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        let d = c.until(c.now() + Duration::from_secs(1)).unwrap();
        assert!(d > Duration::from_millis(900) && d <= Duration::from_secs(1));
    }
}
