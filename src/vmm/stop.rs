//! Graceful stops. SIGINT and SIGTERM only set a flag (async-signal-safe); the VMM's kicker thread
//! sees it within a few milliseconds and kicks the vCPU out of `KVM_RUN`, and the run loop then ends
//! the run as it would at the guest's end: the partial interval becomes the last row, marked with
//! why, and the map is written. `memvisor` exits with 130 or 143, as a shell reports a process the
//! signal killed; a timeout exits with 124, as `timeout(1)` does.

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use crate::row::EndReason;

static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// SIGINT and SIGTERM received so far.
static COUNT: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
    COUNT.fetch_add(1, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to the stop flag (the binary calls this once; library users choose).
pub fn install_handlers() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
        // stores to an atomic, which is async-signal-safe; the pointer casts follow sigaction(2).
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The stop a signal asked for, if any.
pub fn requested() -> Option<EndReason> {
    match SIGNAL.load(Ordering::SeqCst) {
        libc::SIGINT => Some(EndReason::Sigint),
        libc::SIGTERM => Some(EndReason::Sigterm),
        _ => None,
    }
}

/// The exit codes as `memvisor --help` shows them (README's "How a run stops, and exit codes").
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    the guest ran its whole workload (last row: (end))
  1    an error: bad options (before anything runs), a guest failure (fault, out of memory,
       triple fault, halting early), a VMM failure, or a swapped page that could not be read
       back (last row: (end: guest-error), (end: swap-error))
  2    a usage error (unknown option)
  124  --timeout ran out (last row: (end: timeout))
  130  SIGINT (last row: (end: sigint))
  141  standard output was closed (memvisor run | head): the run stops quietly
  143  SIGTERM, or stop on the control socket (last row: (end: sigterm), (end: stopped))
A stop loses no result: the partial interval is printed as the last row, marked with why.";

/// How many SIGINTs and SIGTERMs arrived so far: a wait after the run (`--prometheus-linger`)
/// ends at the next one, whether or not one ended the run.
pub fn signal_count() -> u32 {
    COUNT.load(Ordering::SeqCst)
}

/// The process exit code for a run that ended for `reason` (0 for a finished run).
pub fn exit_code(reason: EndReason) -> u8 {
    match reason {
        EndReason::Done => 0,
        EndReason::GuestError | EndReason::SwapError => 1,
        EndReason::Timeout => 124,
        EndReason::Sigint => 128 + libc::SIGINT as u8,
        // A stop asked for on the control socket ends the run as SIGTERM does.
        EndReason::Sigterm | EndReason::Stopped => 128 + libc::SIGTERM as u8,
        EndReason::OutputClosed => 128 + libc::SIGPIPE as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_help_lists_every_exit_code_with_its_end() {
        for r in [
            EndReason::Done,
            EndReason::GuestError,
            EndReason::Timeout,
            EndReason::Sigint,
            EndReason::Sigterm,
            EndReason::OutputClosed,
            EndReason::Stopped,
            EndReason::SwapError,
        ] {
            let code = format!("\n  {:<4} ", exit_code(r));
            assert!(EXIT_CODES_HELP.contains(&code), "no {code:?}");
            if !matches!(r, EndReason::Done | EndReason::OutputClosed) {
                let end = format!("(end: {})", r.as_str());
                assert!(EXIT_CODES_HELP.contains(&end), "no {end}");
            }
        }
    }

    #[test]
    fn exit_codes_follow_shell_conventions() {
        assert_eq!(exit_code(EndReason::Done), 0);
        assert_eq!(exit_code(EndReason::Timeout), 124);
        assert_eq!(exit_code(EndReason::Sigint), 130);
        assert_eq!(exit_code(EndReason::Sigterm), 143);
        assert_eq!(exit_code(EndReason::Stopped), 143);
        assert_eq!(exit_code(EndReason::OutputClosed), 141);
    }

    #[test]
    fn a_raised_signal_is_seen_as_a_stop_request() {
        install_handlers().unwrap();
        assert_eq!(requested(), None);
        let before = signal_count();
        // SAFETY: raise delivers SIGTERM to this thread; the handler installed above only sets
        // the flag, so the test process survives it.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        assert_eq!(requested(), Some(EndReason::Sigterm));
        assert_eq!(signal_count(), before + 1);
        SIGNAL.store(0, Ordering::SeqCst);
    }
}
