//! Driving a running VM from another thread: the commands it takes ([`Command`]) and the handle
//! that sends them and reads its latest row ([`Controller`]).
//!
//! The handle never blocks and never makes the VM wait: a command goes into a small bounded
//! queue (a full queue answers [`CommandError::Busy`]), and the run loop takes what is queued at
//! its next exit or tick without waiting (the kicker thread makes that exit come within a few
//! milliseconds, even while the guest computes without exits). The latest row is shared as one
//! pointer, swapped by the run loop and cloned by readers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::row::Row;

/// Commands queued and not yet taken by the VM; beyond this a command is refused as busy.
pub const QUEUE: usize = 16;

/// What a running VM can be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Hold this many MiB of guest RAM in the balloon (0 deflates it; clipped to guest RAM).
    SetBalloonTarget { mib: u64 },
    /// Keep this many MiB of guest memory swapped out by the VMM.
    SetSwapTarget { mib: u64 },
    /// Hold the vCPU out of the guest until [`Command::Resume`]: the intervals go on (their rows
    /// leave after the grace, with no truth, and swap works at their boundaries); the guest's
    /// clock runs on, as a paused VM's does.
    Pause,
    /// Let a paused vCPU run again (nothing if it runs).
    Resume,
    /// End the run as a stop signal would: the partial interval becomes the last row, marked
    /// `stopped`, and the map is written.
    Stop,
}

/// Why a command was not taken.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("this VM has no balloon device (its RAM covers the device's registers)")]
    NoBalloon,
    #[error("swap is off for this VM")]
    SwapOff,
    #[error("the VM has not taken its previous {QUEUE} commands yet; try again")]
    Busy,
    #[error("the run has ended")]
    Ended,
}

/// What a VM offers to be driven (fixed at set-up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abilities {
    pub balloon: bool,
    pub swap: bool,
}

/// The state the run loop and its controllers share.
#[derive(Default)]
struct Shared {
    /// The latest complete row.
    latest: Mutex<Option<Arc<Row>>>,
    /// A command is queued: the kicker thread kicks the vCPU out of the guest so that it is
    /// taken soon.
    pending: AtomicBool,
}

/// A handle to a VM that is set up or running: `Send`, cheap to clone, and never blocks.
#[derive(Clone)]
pub struct Controller {
    tx: SyncSender<Command>,
    shared: Arc<Shared>,
    abilities: Abilities,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("abilities", &self.abilities)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// Queues `command` for the VM, which applies it at its next exit. An error says why the VM
    /// will not take it; `Ok` means it is queued.
    pub fn send(&self, command: Command) -> Result<(), CommandError> {
        match command {
            Command::SetBalloonTarget { .. } if !self.abilities.balloon => {
                return Err(CommandError::NoBalloon);
            }
            Command::SetSwapTarget { .. } if !self.abilities.swap => {
                return Err(CommandError::SwapOff);
            }
            _ => {}
        }
        match self.tx.try_send(command) {
            Ok(()) => {
                self.shared.pending.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(CommandError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(CommandError::Ended),
        }
    }

    /// Sets the balloon's target in MiB.
    pub fn set_balloon_target(&self, mib: u64) -> Result<(), CommandError> {
        self.send(Command::SetBalloonTarget { mib })
    }

    /// Sets the swap target in MiB.
    pub fn set_swap_target(&self, mib: u64) -> Result<(), CommandError> {
        self.send(Command::SetSwapTarget { mib })
    }

    /// Asks the run to end gracefully.
    pub fn stop(&self) -> Result<(), CommandError> {
        self.send(Command::Stop)
    }

    /// The latest complete row (`None` before the first). The last row stays after the run.
    pub fn latest(&self) -> Option<Arc<Row>> {
        self.shared
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What this VM can do.
    pub fn abilities(&self) -> Abilities {
        self.abilities
    }
}

/// The run loop's end of the controllers.
pub struct Inbox {
    rx: Receiver<Command>,
    shared: Arc<Shared>,
}

impl Inbox {
    /// A new inbox and its first controller.
    pub fn new(abilities: Abilities) -> (Inbox, Controller) {
        let (tx, rx) = sync_channel(QUEUE);
        let shared = Arc::new(Shared::default());
        let inbox = Inbox {
            rx,
            shared: shared.clone(),
        };
        (
            inbox,
            Controller {
                tx,
                shared,
                abilities,
            },
        )
    }

    /// The next queued command, without waiting. At most [`QUEUE`] are queued at once, so a
    /// caller that takes them in a loop is bounded.
    pub fn take(&self) -> Option<Command> {
        self.shared.pending.store(false, Ordering::SeqCst);
        self.rx.try_recv().ok()
    }

    /// Whether a command was queued since the last [`take`](Self::take) (for the kicker).
    pub fn pending(&self) -> PendingFlag {
        PendingFlag(self.shared.clone())
    }

    /// Makes `row` the latest one controllers see.
    pub fn publish(&self, row: &Row) {
        let row = Arc::new(row.clone());
        *self.shared.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(row);
    }
}

/// A view of the "command pending" flag, for the kicker thread.
#[derive(Clone)]
pub struct PendingFlag(Arc<Shared>);

impl PendingFlag {
    /// True once per queued batch: reading it clears it.
    pub fn take(&self) -> bool {
        self.0.pending.swap(false, Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_queued_bounded_and_refused_by_ability() {
        let (inbox, c) = Inbox::new(Abilities {
            balloon: true,
            swap: false,
        });
        assert_eq!(c.set_swap_target(1), Err(CommandError::SwapOff));
        let flag = inbox.pending();
        assert!(!flag.take());
        c.set_balloon_target(64).unwrap();
        assert!(flag.take(), "a queued command raises the flag");
        assert!(!flag.take(), "once");
        for _ in 1..QUEUE {
            c.stop().unwrap();
        }
        assert_eq!(c.stop(), Err(CommandError::Busy), "the queue is bounded");
        assert_eq!(inbox.take(), Some(Command::SetBalloonTarget { mib: 64 }));
        let mut n = 1;
        while inbox.take().is_some() {
            n += 1;
        }
        assert_eq!(n, QUEUE);
        assert!(c.latest().is_none());
        let row = Row {
            interval: 3,
            ..Row::default()
        };
        inbox.publish(&row);
        assert_eq!(c.latest().unwrap().interval, 3);
        drop(inbox);
        assert_eq!(c.stop(), Err(CommandError::Ended));
        assert_eq!(c.latest().unwrap().interval, 3, "the last row stays");
        let none = Inbox::new(Abilities {
            balloon: false,
            swap: false,
        })
        .1;
        assert_eq!(none.set_balloon_target(1), Err(CommandError::NoBalloon));
    }

    #[test]
    fn a_controller_is_send() {
        fn send<T: Send + Sync>() {}
        send::<Controller>();
    }
}
