//! `siovmm-bench`: boot-speed benchmark. Boots the stock kernel (vmlinux, PVH) with 2 vCPUs and
//! 512M to a busybox /init that powers off at once, N times (default 5) in one sandbox (or
//! directly where the host KVM can run Linux), and prints per-run and median figures:
//!   start → guest /init   (siovmm's boot-timer line)
//!   start → exit          (wall clock around the siovmm process)
//! Usage: siovmm-bench [RUNS]

use siovmm_tests::{placement, run_cases, GuestCase, Kernel};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let runs: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 5,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("siovmm-bench: RUNS must be a positive number");
            std::process::exit(2);
        }
    };
    let cases: Vec<GuestCase> = (0..runs)
        .map(|i| GuestCase::new(&format!("boot-{i}"), Kernel::Vmlinux, 2, "echo GUEST-UPTIME=$(cut -d' ' -f1 /proc/uptime)\npoweroff -f\n"))
        .collect();
    println!("placement: {:?}; guest: stock kernel vmlinux (PVH), 2 vCPUs, 512M, busybox /init", placement());
    // Each run gets its own sandbox: runs sharing one sandbox were measured to slow down one
    // after another (docs/boot-performance.md), which would make the median depend on RUNS.
    let mut results = Vec::new();
    for case in &cases {
        match run_cases(std::slice::from_ref(case)) {
            Ok(r) => results.extend(r),
            Err(e) => {
                eprintln!("siovmm-bench: {e}");
                std::process::exit(1);
            }
        }
    }
    let mut to_init = Vec::new();
    let mut to_exit = Vec::new();
    for r in &results {
        let init = r.boot_timer_ms().map(|ms| ms / 1000.0);
        println!(
            "{}: start->/init {} s, start->exit {} s, guest uptime at /init {} s, exit status {:?}",
            r.name,
            init.map_or("?".into(), |s| format!("{s:.2}")),
            r.seconds.map_or("?".into(), |s| format!("{s:.2}")),
            r.value("GUEST-UPTIME").unwrap_or("?"),
            r.exit_code
        );
        if r.exit_code != Some(0) || init.is_none() {
            eprintln!("siovmm-bench: run {} failed:\n{}", r.name, r.transcript());
            std::process::exit(1);
        }
        to_init.extend(init);
        to_exit.extend(r.seconds);
    }
    println!("median start->/init: {:.2} s over {} runs", median(to_init), runs);
    println!("median start->exit:  {:.2} s over {} runs", median(to_exit), runs);
}
