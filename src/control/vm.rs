//! The control socket's answers for one running VM: each request becomes a call on the VM's
//! [`Controller`], which never blocks (it reads the latest row, or queues a command the VM takes
//! at its next exit).

use serde_json::Value;

use super::protocol::{Answer, ErrorClass, Request};
use super::server::Handler;
use crate::vmm::command::{Command, CommandError, Controller};

/// The handler that serves `controller`'s VM.
pub fn handler(controller: Controller) -> Handler {
    Box::new(move |request| answer(&controller, request))
}

/// The answer to one request.
pub fn answer(controller: &Controller, request: Request) -> Answer {
    let done = match request {
        Request::Query => {
            // The same object `run --json` prints (null before the first row).
            let row = controller.latest();
            return Answer::Return(
                row.and_then(|r| serde_json::to_value(&*r).ok())
                    .unwrap_or(Value::Null),
            );
        }
        Request::SetBalloonTarget { mib } => controller.set_balloon_target(mib),
        Request::SetSwapTarget { mib } => controller.set_swap_target(mib),
        Request::Pause => controller.send(Command::Pause),
        Request::Resume => controller.send(Command::Resume),
        Request::Stop => controller.stop(),
    };
    match done {
        Ok(()) => Answer::ok(),
        Err(e) => Answer::error(class(e), e.to_string()),
    }
}

/// The error class a refused command is answered with.
fn class(e: CommandError) -> ErrorClass {
    match e {
        CommandError::NoBalloon | CommandError::SwapOff => ErrorClass::DeviceNotActive,
        CommandError::Busy => ErrorClass::Busy,
        CommandError::Ended => ErrorClass::Ended,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::Row;
    use crate::vmm::command::{Abilities, Inbox};

    #[test]
    fn requests_become_commands_and_refusals_their_classes() {
        let (inbox, c) = Inbox::new(Abilities {
            balloon: true,
            swap: false,
        });
        assert_eq!(answer(&c, Request::Query), Answer::Return(Value::Null));
        inbox.publish(&Row {
            interval: 4,
            phase: "idle".into(),
            ..Row::default()
        });
        let Answer::Return(row) = answer(&c, Request::Query) else {
            panic!("query failed")
        };
        assert_eq!(
            row,
            serde_json::from_str::<Value>(&crate::output::json_row(&Row {
                interval: 4,
                phase: "idle".into(),
                ..Row::default()
            }))
            .unwrap(),
            "the same object --json prints"
        );
        assert_eq!(
            answer(&c, Request::SetBalloonTarget { mib: 8 }),
            Answer::ok()
        );
        assert_eq!(inbox.take(), Some(Command::SetBalloonTarget { mib: 8 }));
        let Answer::Error { class, desc } = answer(&c, Request::SetSwapTarget { mib: 8 }) else {
            panic!("swap is off")
        };
        assert_eq!(class, ErrorClass::DeviceNotActive);
        assert!(desc.contains("swap is off"), "{desc}");
        assert_eq!(answer(&c, Request::Pause), Answer::ok());
        assert_eq!(inbox.take(), Some(Command::Pause));
        assert_eq!(answer(&c, Request::Resume), Answer::ok());
        assert_eq!(inbox.take(), Some(Command::Resume));
        assert_eq!(answer(&c, Request::Stop), Answer::ok());
        assert_eq!(inbox.take(), Some(Command::Stop));
        drop(inbox);
        assert!(matches!(
            answer(&c, Request::Stop),
            Answer::Error {
                class: ErrorClass::Ended,
                ..
            }
        ));
    }
}
