//! The one-shot timer of `set_timer_op`: a thread that raises the line bound
//! with `event_channel_op` when the deadline passes. The thread is started
//! when a guest first uses the timer and ends when the [`Timer`] is dropped
//! (with the hypercall service, with the VM): the drop tells it to stop and
//! joins it. The deadline is in the guest's time ([`GuestClock`]): while a
//! debugger holds the guest the timer does not fall due.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use vcpu::{GuestClock, IrqLine};

/// What the timer thread and the hypercalls share.
#[derive(Default)]
pub(crate) struct State {
    /// When the line is raised next, on the guest's time line; `None`:
    /// disarmed.
    pub deadline: Option<Instant>,
    /// The event line (`event_channel_op(BIND_VIRQ, VIRQ_TIMER)`).
    pub line: Option<Arc<dyn IrqLine>>,
    /// `event_channel_op(MASK)`: an expiry while masked is dropped.
    pub masked: bool,
    /// Events delivered.
    pub fired: u64,
    /// Set by the drop: the thread returns.
    stop: bool,
}

/// The state and the condition variable the thread waits on (notified by
/// the hypercalls and by the clock's resume).
type Shared = (Mutex<State>, Condvar);

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A poisoned lock means the other side panicked while holding it; the
    // state is plain data and stays usable.
    shared.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// The thread: waits for the deadline on the guest's time (while the clock
/// stands, for the resume), raises the line, until told to stop.
fn run(shared: &Shared, clock: &GuestClock) {
    let mut st = lock(shared);
    while !st.stop {
        let due = st
            .deadline
            .is_some_and(|d| clock.until(d).is_some_and(|w| w.is_zero()));
        if !due {
            let deadline = st.deadline;
            st = clock.wait_for(&shared.1, st, deadline);
            continue;
        }
        st.deadline = None;
        if let (Some(line), false) = (&st.line, st.masked) {
            // A line that cannot be raised (the engine's VM is going away)
            // loses the event, as a masked one does.
            if line.trigger().is_ok() {
                st.fired += 1;
            }
        }
    }
}

/// The timer of one VM and its thread.
pub(crate) struct Timer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Timer {
    /// Starts the thread, with deadlines on `clock`. Fails if the host
    /// cannot create one.
    pub fn start(clock: Arc<GuestClock>) -> std::io::Result<Timer> {
        let shared: Arc<Shared> = Arc::default();
        clock.wake_on_resume(&shared);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("visor-pv-timer".into())
            .spawn(move || run(&s, &clock))?;
        Ok(Timer {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs `f` on the state and wakes the thread to look at it again.
    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut lock(&self.shared));
        self.shared.1.notify_all();
        r
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.with(|s| s.stop = true);
        if let Some(t) = self.thread.take() {
            // The thread only waits and raises a line: it returns at once.
            // A panic in it has been reported on stderr already.
            let _ = t.join();
        }
    }
}
