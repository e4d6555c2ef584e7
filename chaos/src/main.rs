//! `arca-chaos`: `run --scenario S --seed N` (seeded fault injection against real
//! processes, with invariant checkers and a report) and `drill failover`.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use arca_chaos::scenario::{self, Settings};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "arca-chaos", about = "chaos runs and drills against real arca processes")]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Run scenarios: real processes, seeded faults, a workload, invariant checkers, a report.
    Run {
        /// A scenario name, `all`, `quick` (the CI set), or a comma-separated list.
        #[arg(long, default_value = "quick")]
        scenario: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Runs per scenario (seeds seed, seed+1, …): the soak.
        #[arg(long, default_value_t = 1)]
        runs: u64,
        /// Where the report and every process's logs go.
        #[arg(long, default_value = "target/chaos")]
        out: PathBuf,
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 6)]
        clients: usize,
        #[arg(long, default_value_t = 2)]
        nodes_per_region: usize,
        /// Seconds of workload before the faults and after they heal.
        #[arg(long, default_value_t = 2)]
        settle_secs: u64,
    },
    /// Rehearsals an SRE runs.
    #[command(subcommand)]
    Drill(Drill),
}

#[derive(Subcommand)]
enum Drill {
    /// Lose the primary region, promote the standby, bring the old primary back, fail back.
    Failover {
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 10)]
        steady_secs: u64,
        #[arg(long, default_value_t = 8)]
        writers: usize,
        #[arg(long)]
        json: bool,
    },
}

fn beside_me() -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_default()
}

fn tools_dir(bin: &Path) -> PathBuf {
    // target/<profile>/ → the workspace's .tools/
    bin.ancestors()
        .nth(2)
        .map(|w| w.join(".tools"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(".tools"))
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Top::Drill(Drill::Failover { bin_dir, dir, steady_secs, writers, json }) => {
            let bin = bin_dir.unwrap_or_else(beside_me);
            let temp = tempfile::tempdir().expect("a temporary directory");
            let dir = dir.unwrap_or_else(|| temp.path().to_path_buf());
            let _ = std::fs::create_dir_all(&dir);
            match arca_chaos::drill::failover(
                &bin,
                &dir,
                Duration::from_secs(steady_secs),
                writers.clamp(1, 64),
                json,
            ) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(err) => {
                    eprintln!("arca-chaos: drill aborted: {err}");
                    eprintln!("arca-chaos: process logs are in {}", dir.display());
                    let _ = temp.keep();
                    ExitCode::from(2)
                }
            }
        }
        Top::Run { scenario, seed, runs, out, bin_dir, clients, nodes_per_region, settle_secs } => {
            let bin = bin_dir.unwrap_or_else(beside_me);
            let names: Vec<&str> = match scenario.as_str() {
                "all" => scenario::ALL.to_vec(),
                "quick" => scenario::QUICK.to_vec(),
                list => list.split(',').collect(),
            };
            let settings = Settings {
                tools: tools_dir(&bin),
                bin,
                clients: clients.clamp(1, 64),
                nodes_per_region: nodes_per_region.clamp(1, 4),
                settle: Duration::from_secs(settle_secs),
                inject: None,
            };
            let mut outcomes = Vec::new();
            let mut failed = false;
            for name in names {
                for k in 0..runs.max(1) {
                    let s = seed + k;
                    let dir = out.join(format!("{name}-{s}"));
                    let _ = std::fs::remove_dir_all(&dir);
                    match scenario::run(name, s, &dir, &settings, false) {
                        Ok(o) => {
                            if !o.pass {
                                failed = true;
                                eprintln!(
                                    "arca-chaos: {name} seed {s} FAILED — reproduce with: {}",
                                    o.reproduce
                                );
                            }
                            outcomes.push(o);
                        }
                        Err(e) => {
                            failed = true;
                            eprintln!("arca-chaos: {name} seed {s} aborted: {e} (logs in {})", dir.display());
                        }
                    }
                }
            }
            if let Err(e) = arca_chaos::report::write(&out, &outcomes) {
                eprintln!("arca-chaos: cannot write the report: {e}");
                return ExitCode::from(2);
            }
            println!("report: {}", out.join("report.md").display());
            for o in &outcomes {
                println!("{:>14} seed {:<4} {}", o.scenario, o.seed, if o.pass { "PASS" } else { "FAIL" });
            }
            if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
        }
    }
}
