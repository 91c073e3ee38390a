//! The terminal side of `memvisor top`, kept thin: raw mode and the alternate screen (given back
//! on every way out: `q`, an error, a panic through the panic hook, SIGINT/SIGTERM through the stop
//! flag), keys from the terminal (crossterm reads /dev/tty when standard input is the JSON
//! stream), and the loop that hands keys and snapshots to the [`State`] and draws it.

use std::io::{self, IsTerminal, Stdout};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::execute;
use crossterm::terminal::{self, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;

use crate::vmm::stop;

use super::render;
use super::source::Mailbox;
use super::state::{Action, Key, State};

/// How long the loop waits for a key before it looks at the source again.
const TICK: Duration = Duration::from_millis(200);

/// Gives the terminal back: cooked mode, the main screen, the cursor. Safe to call twice.
fn restore() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen, crossterm::cursor::Show);
}

/// Raw mode and the alternate screen while it lives.
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    fn enter() -> io::Result<Self> {
        // A panic gives the terminal back before its message is printed.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
        terminal::enable_raw_mode()?;
        let entered = execute!(io::stdout(), EnterAlternateScreen, crossterm::cursor::Hide)
            .and_then(|()| Terminal::new(CrosstermBackend::new(io::stdout())));
        match entered {
            Ok(terminal) => Ok(Screen { terminal }),
            Err(e) => {
                restore();
                Err(e)
            }
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

fn key(e: &event::KeyEvent) -> Option<Key> {
    if e.kind != KeyEventKind::Press {
        return None;
    }
    Some(match e.code {
        KeyCode::Char('c') if e.modifiers.contains(KeyModifiers::CONTROL) => Key::Interrupt,
        KeyCode::Char(c) => Key::Char(c),
        KeyCode::Up => Key::Up,
        KeyCode::Down => Key::Down,
        KeyCode::Home | KeyCode::PageUp => Key::Home,
        KeyCode::End | KeyCode::PageDown => Key::End,
        KeyCode::Enter => Key::Enter,
        KeyCode::Esc => Key::Esc,
        _ => return None,
    })
}

/// Whether standard output is a terminal to draw on.
pub fn stdout_is_terminal() -> bool {
    io::stdout().is_terminal()
}

/// Runs the view until `q` or a signal; returns the exit code (0, or 130/143 for a signal).
pub fn run(mut state: State, mail: Arc<Mailbox>) -> io::Result<u8> {
    let mut screen = Screen::enter()?;
    let result = (|| -> io::Result<u8> {
        loop {
            if let Some(reason) = stop::requested() {
                return Ok(stop::exit_code(reason));
            }
            let (latest, at, note, ended) = mail.take();
            if let Some(s) = latest {
                state.update(s);
            }
            state.source.note = note;
            state.source.ended = ended;
            state.source.age_s = at.map(|t| Instant::now().duration_since(t).as_secs_f64());
            screen.terminal.draw(|f| render::draw(f, &state))?;
            // A signal may cut the wait short: the next turn looks at the stop flag.
            let ready = match event::poll(TICK) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
                r => r?,
            };
            if ready {
                match event::read()? {
                    Event::Key(k) => {
                        if let Some(k) = key(&k)
                            && state.key(k) == Action::Quit
                        {
                            return Ok(0);
                        }
                    }
                    Event::Resize(..) => screen.terminal.autoresize()?,
                    _ => {}
                }
            }
        }
    })();
    mail.quit();
    drop(screen);
    result
}
