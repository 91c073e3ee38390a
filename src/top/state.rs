//! The view's state and its key handling, as plain data: which snapshot is shown, the sort, the
//! selected VM, the fields shown and which pane is open. No terminal here; `render` draws a
//! state, the event loop (`term`) feeds it keys and snapshots.

use super::data::{Col, Snapshot, VmView};

/// A key, as the view understands it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Char(char),
    Up,
    Down,
    Home,
    End,
    Enter,
    Esc,
    /// Ctrl-C (raw mode delivers it as a key, not as SIGINT).
    Interrupt,
}

/// What the loop does after a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Quit,
}

/// The pane below the table (or over it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pane {
    /// The table alone.
    Table,
    /// The selected VM's detail below the table.
    Detail,
    /// The field list (esxtop's `f`), with its cursor.
    Fields { cursor: usize },
}

/// Where the snapshots come from and how fresh they are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceStatus {
    /// `control PATH` or `stdin`.
    pub label: String,
    /// The last problem, or what it waits for; cleared by the next snapshot.
    pub note: Option<String>,
    /// The source ended (stdin closed, the socket is gone): the last snapshot stays.
    pub ended: bool,
    /// Seconds since the last snapshot came.
    pub age_s: Option<f64>,
    /// Snapshots taken.
    pub updates: u64,
}

/// Columns the field list can hide or show: every one but the name.
pub const TOGGLEABLE: [Col; 19] = [
    Col::State,
    Col::Memsz,
    Col::Sztgt,
    Col::Grant,
    Col::Host,
    Col::Tchd,
    Col::PctActv,
    Col::TchdW,
    Col::Mctlsz,
    Col::Mctltgt,
    Col::Swcur,
    Col::Swtgt,
    Col::SwrS,
    Col::SwwS,
    Col::Ovhd,
    Col::Shares,
    Col::Resv,
    Col::Limit,
    Col::Rate,
];

/// The field list's letters, one per [`TOGGLEABLE`] column (no `f`, which closes the list, and
/// no `q`, which quits).
pub const LETTERS: &[u8; 19] = b"abcdeghijklmnoprstu";

/// Columns a host shows until the user chooses: esxtop's memory screen.
const HOST_FIELDS: &[Col] = &[
    Col::State,
    Col::Memsz,
    Col::Sztgt,
    Col::Grant,
    Col::Tchd,
    Col::PctActv,
    Col::Mctlsz,
    Col::Mctltgt,
    Col::Swcur,
    Col::Swtgt,
    Col::Ovhd,
    Col::Rate,
];

/// Columns a single run shows until the user chooses: its row's figures.
const RUN_FIELDS: &[Col] = &[
    Col::State,
    Col::Memsz,
    Col::Grant,
    Col::Host,
    Col::Tchd,
    Col::TchdW,
    Col::PctActv,
    Col::Mctlsz,
    Col::Mctltgt,
    Col::Swcur,
    Col::Swtgt,
    Col::SwrS,
    Col::Ovhd,
    Col::Rate,
];

/// The whole view.
#[derive(Clone, Debug)]
pub struct State {
    pub snapshot: Option<Snapshot>,
    /// Shown columns, by [`Col::index`] (the name always is).
    shown: [bool; Col::ALL.len()],
    /// The user toggled a field: a new kind of source keeps the choice.
    fields_chosen: bool,
    /// `None`: the source's order (the host's VMs as configured).
    pub sort: Option<Col>,
    pub descending: bool,
    /// The selected VM, by name (it stays selected as the order changes).
    pub selected: Option<String>,
    pub pane: Pane,
    /// The detail pane is open (it comes back when the field list closes).
    pub detail: bool,
    pub source: SourceStatus,
}

impl State {
    pub fn new(label: impl Into<String>) -> Self {
        let mut s = State {
            snapshot: None,
            shown: [false; Col::ALL.len()],
            fields_chosen: false,
            sort: None,
            descending: false,
            selected: None,
            pane: Pane::Detail,
            detail: true,
            source: SourceStatus {
                label: label.into(),
                ..SourceStatus::default()
            },
        };
        s.default_fields(true);
        s
    }

    fn default_fields(&mut self, host: bool) {
        self.shown = [false; Col::ALL.len()];
        self.shown[Col::Name.index()] = true;
        for c in if host { HOST_FIELDS } else { RUN_FIELDS } {
            self.shown[c.index()] = true;
        }
    }

    /// Takes a new snapshot; the selection stays on its VM while that VM is there.
    pub fn update(&mut self, snap: Snapshot) {
        let kind_changed = self
            .snapshot
            .as_ref()
            .is_none_or(|s| s.is_host() != snap.is_host());
        if kind_changed && !self.fields_chosen {
            self.default_fields(snap.is_host());
        }
        self.snapshot = Some(snap);
        self.source.note = None;
        self.source.updates += 1;
        self.source.age_s = Some(0.0);
        let names = self.sorted();
        let keep = (self.selected.as_ref()).is_some_and(|n| names.iter().any(|v| &v.name == n));
        if !keep {
            self.selected = names.first().map(|v| v.name.clone());
        }
    }

    pub fn is_shown(&self, c: Col) -> bool {
        self.shown[c.index()]
    }

    /// The shown columns, in the table's order.
    pub fn columns(&self) -> Vec<Col> {
        Col::ALL.into_iter().filter(|&c| self.is_shown(c)).collect()
    }

    /// The VMs in the current order. Missing figures sort last either way.
    pub fn sorted(&self) -> Vec<&VmView> {
        let Some(snap) = &self.snapshot else {
            return Vec::new();
        };
        let mut vms: Vec<&VmView> = snap.vms.iter().collect();
        let Some(col) = self.sort else {
            return vms;
        };
        let desc = self.descending;
        vms.sort_by(|a, b| {
            use std::cmp::Ordering;
            let ord = match col {
                Col::Name => a.name.cmp(&b.name),
                Col::State => a.state.cmp(&b.state),
                _ => match (a.get(col), b.get(col)) {
                    (Some(x), Some(y)) => x.total_cmp(&y),
                    (Some(_), None) => return Ordering::Less,
                    (None, Some(_)) => return Ordering::Greater,
                    (None, None) => Ordering::Equal,
                },
            };
            let ord = if desc { ord.reverse() } else { ord };
            // Ties keep a stable order by name.
            ord.then_with(|| a.name.cmp(&b.name))
        });
        vms
    }

    pub fn selected_vm(&self) -> Option<&VmView> {
        let name = self.selected.as_ref()?;
        self.snapshot.as_ref()?.vms.iter().find(|v| &v.name == name)
    }

    /// Handles one key.
    pub fn key(&mut self, key: Key) -> Action {
        match key {
            Key::Char('q' | 'Q') | Key::Interrupt => return Action::Quit,
            _ => {}
        }
        if let Pane::Fields { cursor } = self.pane {
            self.field_key(cursor, key);
            return Action::Continue;
        }
        match key {
            Key::Up | Key::Char('k') => self.move_selection(-1),
            Key::Down | Key::Char('j') => self.move_selection(1),
            Key::Home => self.move_selection(isize::MIN),
            Key::End => self.move_selection(isize::MAX),
            Key::Char('s' | '>') => self.cycle_sort(true),
            Key::Char('<') => self.cycle_sort(false),
            Key::Char('r') => self.descending = !self.descending,
            Key::Char('f') => self.pane = Pane::Fields { cursor: 0 },
            Key::Char('d') | Key::Enter => {
                self.detail = !self.detail;
                self.pane = if self.detail {
                    Pane::Detail
                } else {
                    Pane::Table
                };
            }
            Key::Esc => {
                self.detail = false;
                self.pane = Pane::Table;
            }
            _ => {}
        }
        Action::Continue
    }

    fn field_key(&mut self, cursor: usize, key: Key) {
        let last = TOGGLEABLE.len() - 1;
        match key {
            Key::Up | Key::Char('k') if cursor > 0 => {
                self.pane = Pane::Fields { cursor: cursor - 1 }
            }
            Key::Down | Key::Char('j') if cursor < last => {
                self.pane = Pane::Fields { cursor: cursor + 1 }
            }
            Key::Home => self.pane = Pane::Fields { cursor: 0 },
            Key::End => self.pane = Pane::Fields { cursor: last },
            Key::Char(' ') => self.toggle(TOGGLEABLE[cursor]),
            Key::Char(c) if LETTERS.contains(&(c as u8)) && c.is_ascii_lowercase() => {
                let i = LETTERS.iter().position(|&l| l == c as u8).unwrap_or(0);
                self.toggle(TOGGLEABLE[i]);
                self.pane = Pane::Fields { cursor: i };
            }
            Key::Char('f') | Key::Esc | Key::Enter => {
                self.pane = if self.detail {
                    Pane::Detail
                } else {
                    Pane::Table
                };
            }
            _ => {}
        }
    }

    /// Shows or hides a column.
    pub fn toggle(&mut self, c: Col) {
        if c != Col::Name {
            self.shown[c.index()] = !self.shown[c.index()];
            self.fields_chosen = true;
        }
    }

    fn move_selection(&mut self, by: isize) {
        let vms = self.sorted();
        if vms.is_empty() {
            return;
        }
        let at = (self.selected.as_ref())
            .and_then(|n| vms.iter().position(|v| &v.name == n))
            .unwrap_or(0);
        let to = (at as isize)
            .saturating_add(by)
            .clamp(0, vms.len() as isize - 1) as usize;
        self.selected = Some(vms[to].name.clone());
    }

    /// The next (or previous) sort: the source's order, then each shown column in turn. A text
    /// column sorts ascending first, a number descending (the largest on top, as esxtop).
    fn cycle_sort(&mut self, forward: bool) {
        let mut order: Vec<Option<Col>> = vec![None];
        order.extend(self.columns().into_iter().map(Some));
        let at = order.iter().position(|&c| c == self.sort).unwrap_or(0);
        let n = order.len();
        let next = if forward {
            (at + 1) % n
        } else {
            (at + n - 1) % n
        };
        self.sort = order[next];
        self.descending = self.sort.is_some_and(|c| !c.is_text());
    }
}

#[cfg(test)]
mod tests {
    use super::super::data::{Header, HostHeader};
    use super::*;

    pub fn vm(name: &str, grant: f64, tchd: f64) -> VmView {
        let mut v = VmView {
            name: name.into(),
            state: "run".into(),
            ..VmView::default()
        };
        v.figures[Col::Grant.index()] = Some(grant);
        v.figures[Col::Tchd.index()] = Some(tchd);
        v
    }

    fn host(vms: Vec<VmView>) -> Snapshot {
        Snapshot {
            header: Header::Host(HostHeader::default()),
            vms,
        }
    }

    fn names(s: &State) -> Vec<String> {
        s.sorted().iter().map(|v| v.name.clone()).collect()
    }

    #[test]
    fn sort_keys_cycle_and_reverse() {
        let mut s = State::new("stdin");
        s.update(host(vec![
            vm("b", 30.0, 1.0),
            vm("a", 10.0, 3.0),
            vm("c", 20.0, 2.0),
        ]));
        assert_eq!(names(&s), ["b", "a", "c"], "the source's order first");
        assert_eq!(s.key(Key::Char('s')), Action::Continue);
        assert_eq!(s.sort, Some(Col::Name));
        assert_eq!(names(&s), ["a", "b", "c"]);
        s.key(Key::Char('r'));
        assert_eq!(names(&s), ["c", "b", "a"]);
        // On to the columns after NAME: STATE, MEMSZ, SZTGT, GRANT (numbers: largest first).
        for _ in 0..4 {
            s.key(Key::Char('>'));
        }
        assert_eq!(s.sort, Some(Col::Grant));
        assert_eq!(names(&s), ["b", "c", "a"]);
        s.key(Key::Char('r'));
        assert_eq!(names(&s), ["a", "c", "b"]);
        s.key(Key::Char('s'));
        assert_eq!(s.sort, Some(Col::Tchd));
        assert_eq!(names(&s), ["a", "c", "b"]);
        s.key(Key::Char('<'));
        assert_eq!(s.sort, Some(Col::Grant));
        // Around the end back to the source's order.
        let n = s.columns().len();
        for _ in 0..n - 4 {
            s.key(Key::Char('s'));
        }
        assert_eq!(s.sort, None);
        assert_eq!(names(&s), ["b", "a", "c"]);
    }

    #[test]
    fn missing_figures_sort_last_either_way() {
        let mut s = State::new("stdin");
        let mut none = vm("none", 0.0, 0.0);
        none.figures[Col::Grant.index()] = None;
        s.update(host(vec![none, vm("x", 5.0, 0.0), vm("y", 7.0, 0.0)]));
        s.sort = Some(Col::Grant);
        s.descending = true;
        assert_eq!(names(&s), ["y", "x", "none"]);
        s.descending = false;
        assert_eq!(names(&s), ["x", "y", "none"]);
    }

    #[test]
    fn the_selection_follows_its_vm() {
        let mut s = State::new("stdin");
        s.update(host(vec![
            vm("a", 1.0, 0.0),
            vm("b", 2.0, 0.0),
            vm("c", 3.0, 0.0),
        ]));
        assert_eq!(s.selected.as_deref(), Some("a"));
        s.key(Key::Down);
        s.key(Key::Char('j'));
        s.key(Key::Down);
        assert_eq!(s.selected.as_deref(), Some("c"), "stops at the last");
        s.key(Key::Home);
        assert_eq!(s.selected.as_deref(), Some("a"));
        s.key(Key::End);
        s.key(Key::Up);
        assert_eq!(s.selected.as_deref(), Some("b"));
        // A new order keeps the selected VM selected; a VM that leaves hands it to the first.
        s.sort = Some(Col::Grant);
        s.descending = true;
        s.update(host(vec![
            vm("a", 1.0, 0.0),
            vm("b", 2.0, 0.0),
            vm("c", 3.0, 0.0),
        ]));
        assert_eq!(s.selected_vm().unwrap().name, "b");
        s.key(Key::Up);
        assert_eq!(s.selected.as_deref(), Some("c"));
        s.update(host(vec![vm("a", 1.0, 0.0), vm("b", 2.0, 0.0)]));
        assert_eq!(s.selected.as_deref(), Some("b"));
    }

    #[test]
    fn the_field_list_toggles_columns() {
        let mut s = State::new("stdin");
        s.update(host(vec![vm("a", 1.0, 0.0)]));
        assert!(s.is_shown(Col::Grant));
        assert!(!s.is_shown(Col::TchdW));
        s.key(Key::Char('f'));
        assert_eq!(s.pane, Pane::Fields { cursor: 0 });
        // GRANT's letter (its place among the toggleable columns).
        let g = TOGGLEABLE.iter().position(|&c| c == Col::Grant).unwrap();
        s.key(Key::Char(LETTERS[g] as char));
        assert!(!s.is_shown(Col::Grant));
        assert_eq!(s.pane, Pane::Fields { cursor: g });
        // The cursor and space toggle too; keys of the table do nothing here.
        s.key(Key::Down);
        s.key(Key::Char(' '));
        assert!(s.is_shown(TOGGLEABLE[g + 1]) != State::new("x").is_shown(TOGGLEABLE[g + 1]));
        s.key(Key::Char('r'));
        assert!(!s.descending);
        // `f` closes it and the detail pane comes back; the choice survives a new kind of source.
        s.key(Key::Char('f'));
        assert_eq!(s.pane, Pane::Detail);
        s.update(Snapshot {
            header: Header::Run(Default::default()),
            vms: vec![vm("solo", 1.0, 1.0)],
        });
        assert!(!s.is_shown(Col::Grant));
        // NAME cannot be hidden.
        s.toggle(Col::Name);
        assert!(s.is_shown(Col::Name));
    }

    #[test]
    fn a_run_and_a_host_get_their_own_default_fields() {
        let mut s = State::new("stdin");
        s.update(Snapshot {
            header: Header::Run(Default::default()),
            vms: vec![vm("solo", 1.0, 1.0)],
        });
        assert!(s.is_shown(Col::TchdW) && s.is_shown(Col::Host));
        assert!(!s.is_shown(Col::Sztgt));
        s.update(host(vec![vm("a", 1.0, 0.0)]));
        assert!(s.is_shown(Col::Sztgt));
        assert!(!s.is_shown(Col::TchdW));
    }

    #[test]
    fn panes_and_quitting() {
        let mut s = State::new("stdin");
        assert_eq!(s.pane, Pane::Detail);
        s.key(Key::Char('d'));
        assert_eq!(s.pane, Pane::Table);
        s.key(Key::Enter);
        assert_eq!(s.pane, Pane::Detail);
        s.key(Key::Esc);
        assert_eq!(s.pane, Pane::Table);
        // Keys with no VM do nothing.
        s.key(Key::Down);
        assert_eq!(s.selected, None);
        assert_eq!(s.key(Key::Char('q')), Action::Quit);
        assert_eq!(s.key(Key::Interrupt), Action::Quit);
        s.key(Key::Char('f'));
        assert_eq!(
            s.key(Key::Char('q')),
            Action::Quit,
            "q quits from the list too"
        );
    }
}
