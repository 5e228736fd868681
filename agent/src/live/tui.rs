//! `sockacct top`: the full-screen view (ratatui over crossterm).
//!
//! Two threads feed the screen: one reads the record stream (delta and flow records),
//! one asks for `status` every second (the status line). The terminal is restored on
//! every way out: `q`, Ctrl-C, an error (a guard) and a panic (ratatui's hook).
use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use ratatui::{
    Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style, Stylize},
    text::Line,
    widgets::{Block, Cell, Paragraph, Row as TRow, Table},
};
use serde_json::Value;

use super::{Model, Row, SortBy, WINDOW_MS, human, printable, unix_ms};
use crate::{control, stream::RecordKind};

const REDRAW: Duration = Duration::from_millis(500);

enum Msg {
    Line(String),
    Ended(String),
    Status(Value),
    StatusError(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum View {
    Labels,
    Connections,
}

struct State {
    model: Model,
    view: View,
    sort: SortBy,
    paused: bool,
    status: Option<Value>,
    status_error: Option<String>,
    ended: Option<String>,
}

/// Leaves raw mode and the alternate screen however `run` returns.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Runs the view until `q` or Ctrl-C.
pub fn run(socket: &Path) -> anyhow::Result<()> {
    // Subscribe before taking the screen: "not running" or "not allowed" is printed plainly.
    let mut stream = control::subscribe(
        socket,
        &[RecordKind::Delta, RecordKind::Flow, RecordKind::Conn],
    )?;
    let (tx, rx) = mpsc::channel();
    let t = tx.clone();
    thread::spawn(move || {
        use std::io::BufRead;
        let mut line = String::new();
        loop {
            line.clear();
            let msg = match stream.read_line(&mut line) {
                Ok(0) => Msg::Ended("the agent closed the stream (it stopped?)".into()),
                Ok(_) if line.starts_with("{\"ok\":false") => Msg::Ended(
                    serde_json::from_str::<Value>(&line)
                        .ok()
                        .and_then(|v| v["error"].as_str().map(String::from))
                        .unwrap_or_else(|| line.trim().to_string()),
                ),
                Ok(_) => Msg::Line(std::mem::take(&mut line)),
                Err(e) => Msg::Ended(format!("reading the stream: {e}")),
            };
            let end = matches!(msg, Msg::Ended(_));
            if t.send(msg).is_err() || end {
                return;
            }
        }
    });
    let path: PathBuf = socket.to_owned();
    thread::spawn(move || {
        loop {
            let msg =
                match control::request(&path, &control::Request::Status, Duration::from_secs(2)) {
                    Ok(v) => Msg::Status(v),
                    Err(e) => Msg::StatusError(e.to_string()),
                };
            if tx.send(msg).is_err() {
                return;
            }
            thread::sleep(Duration::from_secs(1));
        }
    });

    let mut terminal = ratatui::try_init()?;
    let _restore = Restore;
    let mut st = State {
        model: Model::default(),
        view: View::Labels,
        sort: SortBy::Rate,
        paused: false,
        status: None,
        status_error: None,
        ended: None,
    };
    let mut last_draw = Instant::now() - REDRAW;
    loop {
        // Everything that arrived, then the keys, then (at most every REDRAW) the screen.
        while let Ok(msg) = rx.try_recv() {
            match msg {
                Msg::Line(l) => {
                    if let Err(e) = st.model.feed(&l, unix_ms()) {
                        st.ended = Some(e);
                    }
                }
                Msg::Ended(why) => st.ended = Some(why),
                Msg::Status(v) => {
                    st.status = Some(v);
                    st.status_error = None;
                }
                Msg::StatusError(e) => st.status_error = Some(e),
            }
        }
        let mut changed = false;
        if event::poll(Duration::from_millis(100))? {
            if let Event::Key(k) = event::read()? {
                if k.kind != KeyEventKind::Press {
                    continue;
                }
                match k.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                        return Ok(());
                    }
                    KeyCode::Char('c') | KeyCode::Tab => {
                        st.view = match st.view {
                            View::Labels => View::Connections,
                            View::Connections => View::Labels,
                        };
                    }
                    KeyCode::Char('s') | KeyCode::Right => st.sort = st.sort.next(),
                    KeyCode::Char('p') | KeyCode::Char(' ') => st.paused = !st.paused,
                    _ => {}
                }
                changed = true;
            } else {
                changed = true; // a resize
            }
        }
        if changed || last_draw.elapsed() >= REDRAW {
            let now = unix_ms();
            if !st.paused {
                st.model.trim(now);
            }
            if !st.paused || changed {
                terminal.draw(|f| draw(f, &st, now))?;
            }
            last_draw = Instant::now();
        }
    }
}

fn rate(v: f64) -> String {
    format!("{}/s", human(v))
}

fn draw(f: &mut Frame, st: &State, now: u64) {
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let view = match st.view {
        View::Labels => "labels",
        View::Connections => "connections",
    };
    let mut title = format!(
        " sockacct top · {view} (c: switch) · sort {} (s) · rates over {} s · p: pause · q: quit",
        st.sort.name(),
        WINDOW_MS / 1000
    );
    if st.paused {
        title.push_str(" · PAUSED");
    }
    f.render_widget(Paragraph::new(title).reversed(), head);
    match st.view {
        View::Labels => labels(f, st, now, body),
        View::Connections => connections(f, st, now, body),
    }
    f.render_widget(Paragraph::new(status_line(st)), foot);
}

fn label_cells(r: &Row) -> Vec<Cell<'static>> {
    vec![
        Cell::from(printable(&r.name)),
        Cell::from(rate(r.tx_rate)),
        Cell::from(rate(r.rx_rate)),
        Cell::from(format!("{:.0}", r.pkt_rate)),
        Cell::from(human(r.total.tx as f64)),
        Cell::from(human(r.total.rx as f64)),
    ]
}

fn labels(f: &mut Frame, st: &State, now: u64, area: ratatui::layout::Rect) {
    let rows = st.model.label_rows(now, st.sort);
    let (un, total) = st.model.summary_rows(now);
    let heads = ["LABEL", "TX", "RX", "PKT/s", "TX total", "RX total"];
    let sorted = match st.sort {
        SortBy::Name => 0,
        SortBy::TxRate => 1,
        SortBy::RxRate => 2,
        SortBy::Packets => 3,
        SortBy::Total => 4,
        SortBy::Rate => 99,
    };
    let header = TRow::new(heads.iter().enumerate().map(|(i, h)| {
        let c = Cell::from(*h);
        if i == sorted || (sorted == 99 && (i == 1 || i == 2)) {
            c.style(Style::new().add_modifier(Modifier::UNDERLINED))
        } else {
            c
        }
    }))
    .bold();
    // Room for the two summary rows at the bottom.
    let room = area.height.saturating_sub(5) as usize;
    let mut trows: Vec<TRow> = rows
        .iter()
        .take(room)
        .map(|r| TRow::new(label_cells(r)))
        .collect();
    if rows.len() > room {
        trows.push(TRow::new(vec![Cell::from(format!(
            "… {} more labels",
            rows.len() - room
        ))]));
    }
    trows.push(TRow::new(label_cells(&un)).italic());
    trows.push(TRow::new(label_cells(&total)).bold());
    let widths = [
        Constraint::Min(16),
        Constraint::Length(14),
        Constraint::Length(14),
        Constraint::Length(9),
        Constraint::Length(12),
        Constraint::Length(12),
    ];
    let t = Table::new(trows, widths)
        .header(header)
        .block(Block::bordered().title(format!(" {} labels ", rows.len())));
    f.render_widget(t, area);
}

fn connections(f: &mut Frame, st: &State, now: u64, area: ratatui::layout::Rect) {
    let conns = st.model.conn_rows(now);
    let header = TRow::new([
        "PROTO", "PROCESS", "LABEL", "LOCAL", "REMOTE", "DIR", "TX", "RX", "TX total", "RX total",
        "STATE",
    ])
    .bold();
    let trows: Vec<TRow> = conns
        .iter()
        .take(area.height.saturating_sub(3) as usize)
        .map(|(c, (tx_rate, rx_rate))| {
            let process = match c.pid {
                Some(p) => format!("{}({p})", printable(&c.process)),
                None => printable(&c.process),
            };
            TRow::new(vec![
                Cell::from(printable(&c.proto)),
                Cell::from(process),
                Cell::from(printable(&c.label)),
                Cell::from(printable(&c.local)),
                Cell::from(printable(&c.remote)),
                Cell::from(printable(&c.direction)),
                Cell::from(rate(*tx_rate)),
                Cell::from(rate(*rx_rate)),
                Cell::from(human(c.total.tx as f64)),
                Cell::from(human(c.total.rx as f64)),
                Cell::from(printable(c.closed.as_deref().unwrap_or("live"))),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(5),
        Constraint::Min(18),
        Constraint::Min(12),
        Constraint::Min(21),
        Constraint::Min(21),
        Constraint::Length(8),
        Constraint::Length(12),
        Constraint::Length(12),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(11),
    ];
    let t = Table::new(trows, widths)
        .header(header)
        .block(Block::bordered().title(format!(
            " {} connections (those that moved since the view started, and flow records) ",
            conns.len()
        )));
    f.render_widget(t, area);
}

fn status_line(st: &State) -> Line<'static> {
    if let Some(why) = &st.ended {
        return Line::from(format!(" stream ended: {} (q: quit)", printable(why)))
            .red()
            .bold();
    }
    if let Some(e) = &st.status_error {
        return Line::from(format!(" status: {}", printable(e))).red();
    }
    let Some(s) = &st.status else {
        return Line::from(" waiting for the agent's status…");
    };
    let sum = |v: &Value| -> u64 {
        v.as_object()
            .map(|o| o.values().filter_map(Value::as_u64).sum())
            .unwrap_or(0)
    };
    let spool_drops = s["spool"]["dropped"]
        .as_object()
        .map(|o| {
            o.values()
                .filter_map(|d| d["records"].as_u64())
                .sum::<u64>()
        })
        .unwrap_or(0);
    let drops =
        sum(&s["drops"]["kernel"]) + spool_drops + s["flows"]["overflow"].as_u64().unwrap_or(0);
    let spool = match s["spool"]["healthy"].as_bool() {
        Some(true) => "healthy",
        Some(false) => "UNHEALTHY",
        None => "off",
    };
    let upload = if s["upload"]["configured"] == true {
        format!(
            "{} flushes, {} failed",
            s["upload"]["flushes"].as_u64().unwrap_or(0),
            s["upload"]["failures"].as_u64().unwrap_or(0)
        )
    } else {
        "not configured".into()
    };
    let line = format!(
        " agent {} · {} sockets · map {:.1}% · drops {drops} · spool {spool} · upload {upload}{}",
        printable(s["agent"].as_str().unwrap_or("?")),
        s["sockets_tracked"].as_u64().unwrap_or(0),
        s["map_fill"].as_f64().unwrap_or(0.0) * 100.0,
        if s["paused"] == true {
            " · agent PAUSED"
        } else {
            ""
        }
    );
    if drops > 0 || spool == "UNHEALTHY" {
        Line::from(line).yellow()
    } else {
        Line::from(line)
    }
}
