//! `dynamo graph top`: the figures of the live graph page in the terminal, like `vector
//! top`. It reads the admin server's `/api/stats` (the graph `graph up` serves) every
//! second; `--once` (or a stdout that is not a terminal) prints one snapshot as text.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use dynamo_host::admin::Stats;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Style, Stylize};
use ratatui::widgets::{Block, Row, Table};

#[derive(clap::Args)]
pub struct TopArgs {
    /// The admin address `graph up` printed (`graph page: http://ADDR/`).
    #[arg(long, default_value = "127.0.0.1:9100")]
    admin: String,
    /// Print one snapshot as a table and exit (also what happens when stdout is not a
    /// terminal).
    #[arg(long)]
    once: bool,
}

fn stats_url(admin: &str) -> String {
    let base = if admin.starts_with("http://") || admin.starts_with("https://") {
        admin.trim_end_matches('/').to_string()
    } else {
        format!("http://{admin}")
    };
    format!("{base}/api/stats")
}

async fn fetch(client: &reqwest::Client, url: &str) -> anyhow::Result<Stats> {
    let r = client
        .get(url)
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .with_context(|| format!("no admin server at {url} (is `dynamo graph up` running?)"))?;
    r.json::<Stats>()
        .await
        .with_context(|| format!("{url} did not answer graph figures"))
}

pub fn run(args: TopArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let url = stats_url(&args.admin);
    let client = reqwest::Client::new();
    if args.once || !std::io::stdout().is_terminal() {
        // The first scrape has no rates yet: wait for the second when the graph just started.
        let mut stats = rt.block_on(fetch(&client, &url))?;
        if stats.scrapes < 2 {
            std::thread::sleep(Duration::from_millis(1100));
            stats = rt.block_on(fetch(&client, &url))?;
        }
        print!("{}", snapshot(&stats));
        return Ok(ExitCode::SUCCESS);
    }
    let mut terminal = ratatui::init();
    let result = live(&rt, &client, &url, &mut terminal);
    ratatui::restore();
    result.map(|()| ExitCode::SUCCESS)
}

fn live(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    url: &str,
    terminal: &mut ratatui::DefaultTerminal,
) -> anyhow::Result<()> {
    let mut last: Result<Stats, String> = Err("connecting…".into());
    let mut fetched = Instant::now() - Duration::from_secs(10);
    loop {
        if fetched.elapsed() >= Duration::from_secs(1) {
            last = rt
                .block_on(fetch(client, url))
                .map_err(|e| format!("{e:#}"));
            fetched = Instant::now();
        }
        terminal.draw(|f| draw(f, url, &last))?;
        if event::poll(Duration::from_millis(200))? {
            if let Event::Key(k) = event::read()? {
                let quit = matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                    || (k.code == KeyCode::Char('c')
                        && k.modifiers.contains(event::KeyModifiers::CONTROL));
                if k.kind == KeyEventKind::Press && quit {
                    return Ok(());
                }
            }
        }
    }
}

fn num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn bytes(mut x: f64) -> String {
    let units = ["B", "kB", "MB", "GB"];
    let mut i = 0;
    while x >= 1000.0 && i < units.len() - 1 {
        x /= 1000.0;
        i += 1;
    }
    format!("{} {}", num(x), units[i])
}

fn latency(ms: Option<f64>) -> String {
    ms.map_or("-".into(), |m| format!("{} ms", num(m)))
}

const NODE_HEADER: [&str; 7] = [
    "node",
    "kind",
    "health",
    "replicas",
    "req/s",
    "in flight",
    "engine",
];
const EDGE_HEADER: [&str; 8] = [
    "edge",
    "transport",
    "req/s",
    "msg/s",
    "bytes/s",
    "latency",
    "errors",
    "calls",
];

fn node_rows(s: &Stats) -> Vec<[String; 7]> {
    s.nodes
        .iter()
        .map(|n| {
            let up = n.replicas.iter().filter(|r| r.state == "up").count();
            let cap: f64 = n.replicas.iter().filter_map(|r| r.kv_capacity).sum();
            let engine = if cap > 0.0 {
                let sum = |f: fn(&dynamo_host::admin::stats::ReplicaStats) -> Option<f64>| {
                    n.replicas.iter().filter_map(f).sum::<f64>()
                };
                format!(
                    "run {} wait {} KV {}/{}",
                    sum(|r| r.running),
                    sum(|r| r.waiting),
                    sum(|r| r.kv_active),
                    cap
                )
            } else {
                String::new()
            };
            [
                n.node.clone(),
                n.kind.clone(),
                n.health.clone(),
                format!("{up}/{} up", n.replicas.len()),
                num(n.requests_per_s),
                format!("{}", n.inflight),
                engine,
            ]
        })
        .collect()
}

fn edge_rows(s: &Stats) -> Vec<[String; 8]> {
    s.edges
        .iter()
        .map(|e| {
            let arrow = if e.kind == "feedback" { "~>" } else { "->" };
            [
                format!("{} {arrow} {}", e.from, e.to),
                e.transport.clone(),
                num(e.requests_per_s),
                num(e.responses_per_s),
                if e.transport == "in-process" {
                    "-".into()
                } else {
                    format!("{}/s", bytes(e.bytes_per_s))
                },
                latency(e.latency_ms),
                format!("{}", e.errors_total),
                format!("{}", e.requests_total),
            ]
        })
        .collect()
}

/// Columns padded to their widest cell.
fn text_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l: String = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}  "))
            .collect();
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// One snapshot as plain text: a node table, then an edge table.
pub fn snapshot(s: &Stats) -> String {
    format!(
        "graph {} (rates over the last {:.1} s, refresh #{})\n\n{}\n{}",
        s.graph,
        s.interval_s,
        s.scrapes,
        text_table(NODE_HEADER, &node_rows(s)),
        text_table(EDGE_HEADER, &edge_rows(s)),
    )
}

fn draw(f: &mut ratatui::Frame, url: &str, last: &Result<Stats, String>) {
    let s = match last {
        Ok(s) => s,
        Err(e) => {
            let block = Block::bordered().title(format!(" dynamo graph top — {url} "));
            f.render_widget(
                ratatui::widgets::Paragraph::new(e.as_str()).block(block),
                f.area(),
            );
            return;
        }
    };
    let nodes = node_rows(s);
    let edges = edge_rows(s);
    let [top, bottom] = Layout::vertical([
        Constraint::Length(nodes.len() as u16 + 3),
        Constraint::Min(3),
    ])
    .areas(f.area());
    let health = |h: &str| match h {
        "ok" => Style::default().fg(Color::Green),
        "degraded" => Style::default().fg(Color::Yellow),
        _ => Style::default().fg(Color::Red),
    };
    let node_table = Table::new(
        nodes
            .iter()
            .map(|r| Row::new(r.clone()).style(health(&r[2]))),
        [
            Constraint::Length(14),
            Constraint::Length(12),
            Constraint::Length(9),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Min(20),
        ],
    )
    .header(Row::new(NODE_HEADER).bold())
    .block(Block::bordered().title(format!(
        " graph {} — nodes (refresh #{}, q quits) ",
        s.graph, s.scrapes
    )));
    let edge_table = Table::new(
        edges.iter().map(|r| Row::new(r.clone())),
        [
            Constraint::Min(34),
            Constraint::Length(11),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(11),
            Constraint::Length(10),
            Constraint::Length(7),
            Constraint::Length(8),
        ],
    )
    .header(Row::new(EDGE_HEADER).bold())
    .block(Block::bordered().title(" edges "));
    f.render_widget(node_table, top);
    f.render_widget(edge_table, bottom);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_become_the_stats_url() {
        assert_eq!(
            stats_url("127.0.0.1:9100"),
            "http://127.0.0.1:9100/api/stats"
        );
        assert_eq!(
            stats_url("http://127.0.0.1:9/"),
            "http://127.0.0.1:9/api/stats"
        );
    }

    #[test]
    fn text_tables_pad_columns() {
        let t = text_table(["a", "bb"], &[["xxx".into(), "y".into()]]);
        assert_eq!(t, "a    bb\nxxx  y\n");
    }
}
