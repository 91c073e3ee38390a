//! Draws a [`State`]: pure functions from the state to a frame (the tests draw on ratatui's
//! `TestBackend` and read the cells back).
//!
//! From the top: the host line (or the run's), the source's line, the table (one line per VM,
//! columns that do not fit dropped in [`Col::drop_order`]), the detail pane of the selected VM,
//! and the keys. The field list opens over the table.

use ratatui::Frame;
use ratatui::layout::{Alignment, Constraint, Flex, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Table, TableState};

use crate::row::Active;

use super::data::{Col, Header, VmView};
use super::state::{LETTERS, Pane, State, TOGGLEABLE};

/// The keys line.
pub const KEYS: &str = "q quit  ↑↓ select  s/< sort  r reverse  f fields  d detail";

/// Draws the whole view.
pub fn draw(frame: &mut Frame, state: &State) {
    let area = frame.area();
    let width = area.width;
    let head = pack(&header_items(state), width, 0);
    let detail = detail_items(state).map(|d| {
        d.iter()
            .flat_map(|(label, items)| pack_labelled(label, items, width))
            .collect::<Vec<_>>()
    });
    let vms = state.snapshot.as_ref().map_or(0, |s| s.vms.len()) as u16;
    // The host line takes what it needs up to 3 lines; the table wants its header and every VM,
    // the detail pane its lines and its title; when both do not fit, the table keeps half.
    let head_h = (head.len() as u16).clamp(1, 3).min(area.height);
    let body = area.height.saturating_sub(head_h + 2);
    let table_want = vms.saturating_add(1);
    let detail_h = match (&state.pane, &detail) {
        (Pane::Detail, Some(lines)) if body > table_want.min(body / 2) + 2 => {
            (lines.len() as u16 + 1).min(body - table_want.min(body / 2))
        }
        _ => 0,
    };
    let table_h = table_want.min(body - detail_h);
    let [top, source, table, pane, _, keys] = Layout::vertical([
        Constraint::Length(head_h),
        Constraint::Length(1),
        Constraint::Length(table_h),
        Constraint::Length(detail_h),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);
    frame.render_widget(Paragraph::new(head), top);
    let hidden = draw_table(frame, state, table);
    frame.render_widget(Paragraph::new(source_line(state, hidden)), source);
    if detail_h > 0
        && let Some(lines) = detail
    {
        let name = state.selected_vm().map_or("", |v| v.name.as_str());
        frame.render_widget(
            Paragraph::new(lines).block(
                Block::default()
                    .borders(Borders::TOP)
                    .title(format!(" {name} ")),
            ),
            pane,
        );
    }
    frame.render_widget(Paragraph::new(keys_line(state)), keys);
    if let Pane::Fields { cursor } = state.pane {
        draw_fields(
            frame,
            state,
            cursor,
            Rect {
                height: area.height.saturating_sub(1),
                ..area
            },
        );
    }
}

/// One item of a packed line: its text, bold or not. Items are never split; lines break
/// between them.
type Item = (String, bool);

fn plain(s: impl Into<String>) -> Item {
    (s.into(), false)
}

fn strong(s: impl Into<String>) -> Item {
    (s.into(), true)
}

/// Packs items into lines of at most `width` columns, two spaces apart, each line after the
/// first indented by `indent` (an item longer than a line gets a line of its own, cut by the
/// terminal).
fn pack(items: &[Item], width: u16, indent: usize) -> Vec<Line<'static>> {
    let width = usize::from(width.max(1));
    let mut lines = Vec::new();
    let mut spans: Vec<Span<'static>> = Vec::new();
    let mut used = 0;
    // Whether the current line has an item yet.
    let mut any = false;
    for (text, is_bold) in items {
        let w = text.chars().count();
        if any && used + 2 + w > width {
            lines.push(Line::from(std::mem::take(&mut spans)));
            spans.push(Span::raw(" ".repeat(indent)));
            used = indent;
            any = false;
        }
        if any {
            spans.push(Span::raw("  "));
            used += 2;
        }
        spans.push(if *is_bold {
            bold(text.clone())
        } else {
            Span::raw(text.clone())
        });
        used += w;
        any = true;
    }
    if !spans.is_empty() {
        lines.push(Line::from(spans));
    }
    lines
}

/// Width of the detail pane's labels.
const LABEL: usize = 17;

/// A labelled group of the detail pane: the label, then its items, the lines after the first
/// indented under the first item.
fn pack_labelled(label: &str, items: &[Item], width: u16) -> Vec<Line<'static>> {
    let mut all = vec![strong(format!("{label:<w$}", w = LABEL - 2))];
    all.extend_from_slice(items);
    pack(&all, width, LABEL)
}

fn bold(s: impl Into<String>) -> Span<'static> {
    Span::styled(s.into(), Style::default().add_modifier(Modifier::BOLD))
}

/// The line on top: the host's state and budget, or the run's interval and phase.
fn header_items(state: &State) -> Vec<Item> {
    let mut items = vec![strong("memvisor top")];
    let Some(snap) = &state.snapshot else {
        items.push(plain("waiting for the first row"));
        return items;
    };
    match &snap.header {
        Header::Host(h) => {
            items.push(plain(format!("host {:.1} s", h.time_s)));
            items.push(plain(format!("period {}", h.period)));
            items.push(strong(format!("state {}", h.state)));
            items.push(plain(format!("changes {}", h.transitions)));
            items.push(plain(format!("budget {:.1}", h.budget_mib)));
            items.push(plain(format!("free {:.1}", h.free_mib)));
            items.push(plain(format!("targets {:.1} MiB", h.targets_mib)));
            items.push(plain(format!(
                "VMs {}/{} running",
                h.running,
                snap.vms.len()
            )));
        }
        Header::Run(r) => {
            items.push(plain(format!("run {:.1} s", r.time_s)));
            items.push(plain(format!("interval {}", r.interval)));
            items.push(strong(format!("phase {}", r.phase)));
            if let Some(e) = &r.end {
                items.push(strong(format!("ended: {e}")));
            }
            items.push(plain(format!("configured {:.1} MiB", r.configured_mib)));
            items.push(plain(format!("host {} MiB", opt(r.host_mib))));
            if !r.pfn_visible {
                items.push(plain("(no PFNs: sharing not seen)"));
            }
        }
    }
    items
}

/// Where the rows come from, their age, the last problem, and columns the width left out.
fn source_line(state: &State, hidden: usize) -> Line<'static> {
    let s = &state.source;
    let mut spans = vec![Span::raw(format!("from {}", s.label))];
    if let Some(age) = s.age_s {
        spans.push(Span::raw(format!("  updated {age:.1} s ago")));
    }
    if s.ended {
        spans.push(bold("  ended"));
    }
    if let Some(note) = &s.note {
        spans.push(Span::styled(
            format!("  {note}"),
            Style::default().add_modifier(Modifier::REVERSED),
        ));
    }
    if hidden > 0 {
        spans.push(Span::raw(format!(
            "  ({hidden} column{} left out: too narrow)",
            if hidden == 1 { "" } else { "s" }
        )));
    }
    Line::from(spans)
}

fn keys_line(state: &State) -> Line<'static> {
    let sort = match state.sort {
        None => "source order".to_string(),
        Some(c) => format!("{} {}", c.title(), if state.descending { "▼" } else { "▲" }),
    };
    Line::from(vec![
        Span::styled(KEYS, Style::default().add_modifier(Modifier::REVERSED)),
        Span::raw(format!("  sort: {sort}")),
    ])
}

/// The shown columns that fit in `width`: the ones dropped first go while they do not.
pub fn fitting(mut cols: Vec<Col>, width: u16) -> Vec<Col> {
    let need = |c: &[Col]| -> u32 {
        c.iter().map(|c| u32::from(c.width())).sum::<u32>() + c.len().saturating_sub(1) as u32
    };
    while cols.len() > 1 && need(&cols) > u32::from(width) {
        if let Some(i) = (0..cols.len()).max_by_key(|&i| cols[i].drop_order()) {
            cols.remove(i);
        }
    }
    cols
}

/// A figure as the table prints it.
pub fn cell(c: Col, v: Option<f64>) -> String {
    let Some(v) = v else {
        return "-".into();
    };
    match c {
        Col::PctActv | Col::Shares => format!("{v:.0}"),
        Col::Rate => si(v),
        _ if v.abs() >= 99_999.95 => format!("{v:.0}"),
        _ => format!("{v:.1}"),
    }
}

/// 1.5M for 1.5e6 (a rate of page accesses).
fn si(v: f64) -> String {
    match v.abs() {
        x if x < 1e3 => format!("{v:.0}"),
        x if x < 1e6 => format!("{:.1}k", v / 1e3),
        x if x < 1e9 => format!("{:.1}M", v / 1e6),
        _ => format!("{:.1}G", v / 1e9),
    }
}

fn text(v: &VmView, c: Col) -> String {
    match c {
        Col::Name => v.name.clone(),
        Col::State => v.state.clone(),
        _ => cell(c, v.get(c)),
    }
}

/// The table; returns how many shown columns did not fit.
fn draw_table(frame: &mut Frame, state: &State, area: Rect) -> usize {
    let shown = state.columns();
    let cols = fitting(shown.clone(), area.width);
    let align = |c: Col| {
        if c.is_text() {
            Alignment::Left
        } else {
            Alignment::Right
        }
    };
    let header = Row::new(cols.iter().map(|&c| {
        let mut style = Style::default().add_modifier(Modifier::BOLD);
        if state.sort == Some(c) {
            style = style.add_modifier(Modifier::UNDERLINED);
        }
        Cell::from(Line::from(c.title()).alignment(align(c))).style(style)
    }));
    let vms = state.sorted();
    let selected = (state.selected.as_ref()).and_then(|n| vms.iter().position(|v| &v.name == n));
    let rows = vms.iter().map(|v| {
        Row::new(
            cols.iter()
                .map(|&c| Cell::from(Line::from(text(v, c)).alignment(align(c)))),
        )
    });
    let table = Table::new(rows, cols.iter().map(|c| Constraint::Length(c.width())))
        .header(header)
        .column_spacing(1)
        .flex(Flex::Start)
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED));
    let mut ts = TableState::default().with_selected(selected);
    frame.render_stateful_widget(table, area, &mut ts);
    shown.len() - cols.len()
}

fn opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

fn estimate(a: &Active) -> Vec<Item> {
    let mut items = vec![
        strong(format!("{:.1} MiB", a.estimate_mib)),
        plain(format!("95% CI {:.1}–{:.1}", a.ci_low_mib, a.ci_high_mib)),
        plain(format!("fast {:.1}", a.fast_mib)),
        plain(format!("slow {:.1}", a.slow_mib)),
        plain(format!("max {:.1}", a.max_mib)),
        plain(format!("exact {:.1}", a.exact_mib)),
        plain(format!(
            "sample {}/{} of {:.1}",
            a.t, a.n, a.sampled_from_mib
        )),
    ];
    if let Some(e) = a.error_mib {
        items.push(plain(format!("error {e:+.1}")));
    }
    items
}

/// The selected VM's detail, as labelled groups: both estimates with their intervals, the
/// guest's truth and view, host usage, balloon, swap, and for a host's VM its scheduling. `None`
/// without a VM.
pub fn detail_items(state: &State) -> Option<Vec<(&'static str, Vec<Item>)>> {
    let v = state.selected_vm()?;
    let mut out = Vec::new();
    let host = state.snapshot.as_ref().is_some_and(|s| s.is_host());
    if host {
        let mut items = vec![
            strong(v.state.clone()),
            plain(format!("target {}", opt(v.get(Col::Sztgt)))),
            plain(format!("granted {}", opt(v.get(Col::Grant)))),
            plain(format!(
                "TCHD {} (from {})",
                opt(v.get(Col::Tchd)),
                v.active_source.as_deref().unwrap_or("-")
            )),
            plain(format!("shares {}", cell(Col::Shares, v.get(Col::Shares)))),
            plain(format!("resv {}", opt(v.get(Col::Resv)))),
            plain(format!("limit {}", opt(v.get(Col::Limit)))),
        ];
        if v.order_errors > 0 {
            items.push(plain(format!("{} order(s) refused", v.order_errors)));
        }
        out.push(("host", items));
    }
    let Some(r) = &v.row else {
        let items = if state.source.label == "stdin" {
            vec![
                plain("no row of its own here"),
                plain("(host --json has the host's figures only):"),
                plain("memvisor top --control on the host's socket"),
                plain("shows both estimates, their intervals"),
                plain("and the guest's view"),
            ]
        } else {
            vec![plain("no row from this VM (yet)")]
        };
        out.push(("", items));
        return Some(out);
    };
    let mut items = vec![
        plain(format!("interval {}", r.interval)),
        plain(format!("{:.1} s", r.time_s)),
        plain(format!("phase {}", r.phase)),
    ];
    if let Some(e) = r.end {
        items.push(strong(format!("ended: {}", e.as_str())));
    }
    if r.paused_s > 0.0 {
        items.push(plain(format!("paused {:.2} s", r.paused_s)));
    }
    out.push(("row", items));
    out.push((
        "active (r+w)",
        match &r.active {
            Some(a) => estimate(a),
            None => vec![plain("- (reads are not seen: the access sampler is off)")],
        },
    ));
    if let Some(a) = &r.active_writes {
        out.push(("active (writes)", estimate(a)));
    }
    if let Some(t) = &r.truth {
        out.push((
            "guest truth",
            vec![
                plain(format!("touched {:.1}", t.touched_mib)),
                plain(format!("written {:.1} MiB", t.written_mib)),
                plain(format!("rate {} accesses/s", si(t.rate))),
            ],
        ));
    }
    let g = &r.guest;
    let mut items = vec![
        plain(format!("allocated {:.1}", g.allocated_mib)),
        plain(format!("free {:.1} MiB", g.free_mib)),
    ];
    if g.out_of_memory {
        items.push(strong("OUT OF MEMORY"));
    }
    if let Some(s) = r.balloon.as_ref().and_then(|b| b.guest_stats.as_ref()) {
        items.push(plain(format!("· balloon stats: free {}", opt(s.free_mib))));
        items.push(plain(format!("available {}", opt(s.available_mib))));
        items.push(plain(format!("total {} MiB", opt(s.total_mib))));
    }
    out.push(("guest view", items));
    if let Some(h) = &r.host {
        out.push((
            "host usage",
            vec![
                strong(format!("{:.1} MiB", h.host_mib)),
                plain(format!(
                    "= backed {:.1} + overhead {:.1}",
                    h.backed_mib, h.overhead_mib
                )),
                plain(format!("zero {:.1}", h.zero_mib)),
                plain(format!("untouched {:.1}", h.untouched_mib)),
                plain(format!("released {:.1}", h.released_mib)),
                plain(format!("swapped {:.1}", h.swapped_mib)),
                plain(format!("shared {:.1}", h.shared_mib)),
            ],
        ));
    }
    if let Some(b) = &r.balloon {
        let mut items = vec![
            plain(format!("size {:.1}", b.balloon_mib)),
            plain(format!("target {:.1}", b.target_mib)),
            plain(format!(
                "reported free {:.1} MiB ({} extents)",
                b.reported_mib, b.reported_extents
            )),
        ];
        if b.errors > 0 {
            items.push(strong(format!("{} bad requests", b.errors)));
        }
        out.push(("balloon", items));
    }
    if let Some(s) = &r.swap {
        let us = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.0}"));
        let mut items = vec![
            plain(format!("swapped {:.1}", s.swapped_mib)),
            plain(format!("target {:.1} MiB", s.target_mib)),
            plain(format!("in {:.1}", s.in_mib_s)),
            plain(format!("out {:.1} MiB/s", s.out_mib_s)),
            plain(format!(
                "page-in p50 {}  p99 {} us",
                us(s.page_in_us_p50),
                us(s.page_in_us_p99)
            )),
        ];
        if s.stopped {
            items.push(strong("STOPPED"));
        }
        out.push(("swap", items));
    }
    Some(out)
}

/// The field list over the table: each column with its letter and whether it is shown.
fn draw_fields(frame: &mut Frame, state: &State, cursor: usize, area: Rect) {
    let w = area.width.min(80);
    let h = area.height.min(TOGGLEABLE.len() as u16 + 2);
    let r = Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    };
    let inner = h.saturating_sub(2) as usize;
    // Keep the cursor in view.
    let first = cursor.saturating_sub(inner.saturating_sub(1));
    let lines: Vec<Line> = TOGGLEABLE
        .iter()
        .enumerate()
        .skip(first)
        .take(inner)
        .map(|(i, &c)| {
            let mark = if state.is_shown(c) { "[x]" } else { "[ ]" };
            let text = format!(
                "{} {mark} {:<8} {}",
                LETTERS[i] as char,
                c.title(),
                c.describe()
            );
            if i == cursor {
                Line::styled(text, Style::default().add_modifier(Modifier::REVERSED))
            } else {
                Line::from(text)
            }
        })
        .collect();
    frame.render_widget(Clear, r);
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::bordered().title(" fields: letter or space toggles, f/Enter/Esc closes "),
        ),
        r,
    );
}

#[cfg(test)]
mod tests {
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use super::super::data::{self, Snapshot, parse_value};
    use super::super::state::Key;
    use super::*;
    use crate::host::testing;
    use crate::row::Row as RunRow;

    /// The screen as lines of text.
    fn screen(state: &State, w: u16, h: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, state)).unwrap();
        let b = t.backend().buffer();
        (0..h)
            .map(|y| {
                (0..w)
                    .map(|x| b[(x, y)].symbol())
                    .collect::<String>()
                    .trim_end()
                    .to_string()
            })
            .collect()
    }

    fn find<'a>(lines: &'a [String], needle: &str) -> Option<(usize, &'a String)> {
        lines.iter().enumerate().find(|(_, l)| l.contains(needle))
    }

    /// A host period of three VMs, each with its own row (as the host's control socket answers).
    fn three_vms() -> Snapshot {
        let mut row = testing::rows(2).remove(1);
        let mut app = testing::vm("app", 60.0, 80.0, 45.0);
        app.shares = 2000;
        row.vms.push(app);
        for (i, v) in row.vms.iter_mut().enumerate() {
            let mut r: RunRow = data::tests::run_row();
            let e = 10.0 * (i as f64 + 1.0);
            for a in [
                r.active.as_mut().unwrap(),
                r.active_writes.as_mut().unwrap(),
            ] {
                a.estimate_mib = e;
                a.ci_low_mib = e - 1.5;
                a.ci_high_mib = e + 2.5;
            }
            r.interval = 100 + i as u64;
            v.row = Some(r);
        }
        let v = crate::host::control::answer(&row);
        parse_value(v, "-").unwrap().unwrap()
    }

    fn state_with(s: Snapshot) -> State {
        let mut st = State::new("control /tmp/host.sock");
        st.update(s);
        st
    }

    /// The VM names in the order their lines appear on the screen.
    fn order(lines: &[String], names: &[&str]) -> Vec<String> {
        let mut found: Vec<(usize, String)> = names
            .iter()
            .map(|n| {
                let (y, _) = lines
                    .iter()
                    .enumerate()
                    .find(|(_, l)| l.starts_with(&format!("{n} ")))
                    .unwrap_or_else(|| panic!("no line for {n}:\n{}", lines.join("\n")));
                (y, n.to_string())
            })
            .collect();
        found.sort();
        found.into_iter().map(|(_, n)| n).collect()
    }

    #[test]
    fn a_host_of_three_vms_shows_the_host_line_and_one_line_each() {
        let st = state_with(three_vms());
        let lines = screen(&st, 120, 30);
        let all = lines.join("\n");
        assert!(lines[0].starts_with("memvisor top  host"), "{all}");
        assert!(lines[0].contains("state high"), "{all}");
        assert!(lines[0].contains("budget 200.0"), "{all}");
        assert!(lines[0].contains("VMs 1/3 running"), "{all}");
        assert!(lines[1].contains("from control /tmp/host.sock"), "{all}");
        let (hy, header) = find(&lines, "MEMSZ").expect("a header");
        for t in [
            "NAME", "STATE", "SZTGT", "GRANT", "TCHD", "%ACTV", "MCTLSZ", "MCTLTGT", "SWCUR",
            "SWTGT", "OVHD", "RATE",
        ] {
            assert!(header.contains(t), "{t} in {header}");
        }
        assert_eq!(order(&lines, &["web", "db", "app"]), ["web", "db", "app"]);
        let (wy, web) = find(&lines, "web ").unwrap();
        assert_eq!(wy, hy + 1, "the VMs follow the header");
        // web's figures in period 1 (testing::rows): granted 48, target 66, active 37.
        assert!(
            web.contains(" 48.0 ") && web.contains(" 66.0 ") && web.contains(" 37.0 "),
            "{web}"
        );
        assert!(web.contains("1.5M"), "the rate: {web}");
        // The keys are on screen.
        assert!(lines.last().unwrap().contains(KEYS), "{all}");
    }

    #[test]
    fn the_sort_key_changes_the_order() {
        let mut st = state_with(three_vms());
        let names = ["web", "db", "app"];
        assert_eq!(order(&screen(&st, 120, 30), &names), ["web", "db", "app"]);
        // NAME, STATE, MEMSZ, SZTGT, GRANT: granted db 86 > app 60 > web 48.
        for _ in 0..5 {
            st.key(Key::Char('s'));
        }
        let lines = screen(&st, 120, 30);
        assert_eq!(order(&lines, &names), ["db", "app", "web"]);
        assert!(lines.last().unwrap().contains("sort: GRANT ▼"));
        st.key(Key::Char('r'));
        let lines = screen(&st, 120, 30);
        assert_eq!(order(&lines, &names), ["web", "app", "db"]);
        assert!(lines.last().unwrap().contains("sort: GRANT ▲"));
        st.key(Key::Char('<'));
        st.key(Key::Char('<'));
        st.key(Key::Char('<'));
        st.key(Key::Char('<'));
        assert_eq!(st.sort, Some(Col::Name));
        assert_eq!(order(&screen(&st, 120, 30), &names), ["app", "db", "web"]);
    }

    #[test]
    fn toggling_a_field_removes_its_column() {
        let mut st = state_with(three_vms());
        let header = |st: &State| find(&screen(st, 120, 30), "NAME").unwrap().1.clone();
        assert!(header(&st).contains("MCTLTGT"));
        st.key(Key::Char('f'));
        let lines = screen(&st, 120, 30);
        let (_, l) = find(&lines, "MCTLTGT  balloon target").expect("the field list");
        assert!(l.contains("[x]"), "{l}");
        let i = TOGGLEABLE.iter().position(|&c| c == Col::Mctltgt).unwrap();
        st.key(Key::Char(LETTERS[i] as char));
        let lines = screen(&st, 120, 30);
        assert!(
            find(&lines, "MCTLTGT  balloon target")
                .unwrap()
                .1
                .contains("[ ]")
        );
        st.key(Key::Char('f'));
        let h = header(&st);
        assert!(!h.contains("MCTLTGT"), "{h}");
        assert!(h.contains("MCTLSZ"), "{h}");
        // And back.
        st.key(Key::Char('f'));
        st.key(Key::Char(LETTERS[i] as char));
        st.key(Key::Esc);
        assert!(header(&st).contains("MCTLTGT"));
    }

    #[test]
    fn the_detail_pane_shows_the_selected_vms_intervals() {
        let mut st = state_with(three_vms());
        let lines = screen(&st, 120, 30);
        let all = lines.join("\n");
        // web is selected first: its estimates are 10.0 [8.5, 12.5].
        assert!(
            find(&lines, " web ").is_some_and(|(_, l)| l.contains('─')),
            "{all}"
        );
        let (_, a) = find(&lines, "active (r+w)").expect(&all);
        assert!(
            a.contains("10.0 MiB") && a.contains("95% CI 8.5–12.5"),
            "{a}"
        );
        let (_, w) = find(&lines, "active (writes)").expect(&all);
        assert!(w.contains("95% CI 8.5–12.5"), "{w}");
        assert!(
            find(&lines, "balloon ").is_some_and(|(_, l)| l.contains("target 32.0")),
            "{all}"
        );
        assert!(find(&lines, "guest view").is_some(), "{all}");
        assert!(
            find(&lines, "host usage").is_some_and(|(_, l)| l.contains("110.0 MiB")),
            "{all}"
        );
        // Down twice: app, whose estimates are 30.0 [28.5, 32.5].
        st.key(Key::Down);
        st.key(Key::Down);
        let lines = screen(&st, 120, 30);
        let (_, a) = find(&lines, "active (r+w)").unwrap();
        assert!(
            a.contains("30.0 MiB") && a.contains("95% CI 28.5–32.5"),
            "{a}"
        );
        assert!(find(&lines, "shares 2000").is_some());
        // `d` closes it.
        st.key(Key::Char('d'));
        assert!(find(&screen(&st, 120, 30), "active (r+w)").is_none());
    }

    #[test]
    fn at_80_columns_the_last_columns_give_way() {
        let st = state_with(three_vms());
        let lines = screen(&st, 80, 24);
        let all = lines.join("\n");
        let (_, header) = find(&lines, "NAME").unwrap();
        assert!(header.len() <= 80);
        for t in ["STATE", "MEMSZ", "GRANT", "TCHD", "%ACTV"] {
            assert!(header.contains(t), "{t} kept: {header}");
        }
        assert!(!header.contains("RATE"), "{header}");
        assert!(
            lines.len() == 24 && lines[2].contains("left out: too narrow"),
            "{all}"
        );
        assert!(
            lines[1].starts_with("free 47.0"),
            "the host line goes on: {all}"
        );
        assert!(order(&lines, &["web", "db", "app"]).len() == 3);
    }

    #[test]
    fn a_single_run_and_a_host_stream_without_rows() {
        let v = serde_json::to_value(data::tests::run_row()).unwrap();
        let st = state_with(parse_value(v, "solo").unwrap().unwrap());
        let lines = screen(&st, 120, 30);
        let all = lines.join("\n");
        assert!(
            lines[0].contains("run 12.0 s  interval 11  phase touch"),
            "{all}"
        );
        let (_, header) = find(&lines, "NAME").unwrap();
        assert!(
            header.contains("TCHD_W") && header.contains("HOST"),
            "{header}"
        );
        let (_, solo) = find(&lines, "solo ").unwrap();
        assert!(solo.contains("110.0") && solo.contains("20.0"), "{solo}");
        assert!(find(&lines, "95% CI 48.0–52.0").is_some(), "{all}");
        // `host --json` has no rows: the pane says where to find them.
        let v = serde_json::to_value(&testing::rows(1)[0]).unwrap();
        let mut st = State::new("stdin");
        st.update(parse_value(v, "-").unwrap().unwrap());
        let all = screen(&st, 120, 30).join("\n");
        assert!(all.contains("no row of its own here"), "{all}");
    }

    #[test]
    fn before_the_first_row_and_on_a_tiny_terminal() {
        let mut st = State::new("stdin");
        st.source.note = Some("line 1 is not JSON".into());
        let lines = screen(&st, 80, 10);
        assert!(lines[0].contains("waiting for the first row"));
        assert!(lines[1].contains("line 1 is not JSON"));
        // Nothing panics however small.
        let st = state_with(three_vms());
        for (w, h) in [(1, 1), (10, 3), (30, 5), (80, 6)] {
            screen(&st, w, h);
        }
        let mut st = st;
        st.key(Key::Char('f'));
        for (w, h) in [(1, 1), (10, 3), (30, 5)] {
            screen(&st, w, h);
        }
    }

    #[test]
    fn figures_print_compactly() {
        assert_eq!(cell(Col::Grant, Some(1234.56)), "1234.6");
        assert_eq!(cell(Col::Grant, Some(123456.7)), "123457");
        assert_eq!(cell(Col::Grant, None), "-");
        assert_eq!(cell(Col::PctActv, Some(45.4)), "45");
        assert_eq!(cell(Col::Rate, Some(1.52e6)), "1.5M");
        assert_eq!(cell(Col::Rate, Some(950.0)), "950");
        let cols = fitting(Col::ALL.to_vec(), 40);
        assert!(cols.iter().map(|c| c.width() + 1).sum::<u16>() <= 41);
        assert_eq!(cols[0], Col::Name);
    }
}
