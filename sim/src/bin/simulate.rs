//! `simulate`: runs seeds of the control-plane simulation and prints pass/fail per seed, a
//! summary, and for each failing seed the one command that replays it.
//!
//! `simulate --seeds N [--start S] [--steps K] [--jobs J] [--budget-secs B]`, or
//! `simulate --seed S [--steps K] [--verbose]` for one seed with its trace.

// The budget and seeds/second are wall-clock on purpose, measured outside every (paused) runtime.
#![allow(clippy::disallowed_types)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use shoal_sim::{MINUTE_STEPS, Report, Settings, replay_command, run};

struct Args {
    start: u64,
    seeds: u64,
    steps: u64,
    jobs: u64,
    budget: Option<u64>,
    verbose: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args { start: 1, seeds: 1, steps: MINUTE_STEPS, jobs: 1, budget: None, verbose: false };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> Result<u64, String> {
            let v = it.next().ok_or(format!("{flag} needs a value"))?;
            v.parse().map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--seeds" => a.seeds = value()?,
            "--start" => a.start = value()?,
            "--seed" => (a.start, a.seeds) = (value()?, 1),
            "--steps" => a.steps = value()?,
            "--jobs" => a.jobs = value()?.max(1),
            "--budget-secs" => a.budget = Some(value()?),
            "--verbose" => a.verbose = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(a)
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "simulate: {e}\nusage: simulate --seeds N [--start S] [--steps K] [--jobs J] [--budget-secs B] | --seed S [--verbose]"
            );
            std::process::exit(2);
        }
    };
    let began = Instant::now();
    let next = Arc::new(AtomicU64::new(args.start));
    let reports: Arc<Mutex<Vec<Report>>> = Arc::default();
    let end = args.start + args.seeds;
    let workers: Vec<_> = (0..args.jobs)
        .map(|_| {
            let (next, reports) = (next.clone(), reports.clone());
            let (steps, verbose, budget) = (args.steps, args.verbose, args.budget);
            std::thread::spawn(move || {
                loop {
                    if budget.is_some_and(|b| began.elapsed().as_secs() >= b) {
                        return;
                    }
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= end {
                        return;
                    }
                    let t = Instant::now();
                    let r = run(&Settings { verbose, ..Settings::new(seed, steps) });
                    print_one(&r, t.elapsed().as_secs_f64(), steps);
                    reports.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let reports = reports.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let failed: Vec<&Report> = reports.iter().filter(|r| !r.passed()).collect();
    let wall = began.elapsed().as_secs_f64();
    println!(
        "summary: {} seeds, {} passed, {} failed, {:.1} s wall, {:.2} seeds/s, {} simulated s each",
        reports.len(),
        reports.len() - failed.len(),
        failed.len(),
        wall,
        reports.len() as f64 / wall.max(1e-9),
        args.steps * 20 / 1000
    );
    for r in &failed {
        println!("replay seed {}: {}", r.seed, replay_command(r.seed, args.steps));
    }
    if !failed.is_empty() {
        std::process::exit(1);
    }
}

fn print_one(r: &Report, secs: f64, steps: u64) {
    let verdict = if r.passed() { "pass" } else { "FAIL" };
    let formed = match r.bootstrap {
        Some((n, expect)) => format!("bootstrap {n}/{expect}"),
        None => "direct".to_string(),
    };
    let routing = r.routing_ms.map(|ms| format!("{ms} ms")).unwrap_or_else(|| "-".into());
    println!(
        "seed {} {verdict} hash {:016x} events {} {formed} acked {} refused {} unknown {} version {} leaders {} ({} multi-leader terms) routing {routing} {:.1} s",
        r.seed, r.hash, r.events, r.acked, r.refused, r.unknown, r.final_version, r.leaders, r.multi_leader_terms, secs
    );
    if !r.passed() {
        for v in &r.violations {
            println!("  violation: {v}");
        }
        println!("  last events:");
        for e in &r.tail {
            println!("    {e}");
        }
        println!("  replay: {}", replay_command(r.seed, steps));
    }
}
