//! `siovmm-bench`: boot-speed benchmark. Boots the stock kernel (vmlinux, PVH) with 2 vCPUs and
//! 512M to a busybox /init that reboots at once, RUNS times (default 5), each in a fresh sandbox
//! (or directly where the host KVM can run Linux), and prints per-run and median figures:
//!   start → guest /init   (siovmm's boot-timer line)
//!   start → exit          (wall clock around the VMM process)
//!   guest uptime at /init (the guest kernel's clock)
//! and, once, how long the sandbox kernel itself takes to reach a minimal /init: a yardstick of how
//! fast this machine is right now (docs/sandbox.md: 4.0-4.3 s under QEMU 10).
//!
//! With `--baseline PATH` (another static siovmm build, or any static VMM taking siovmm's
//! --kernel/--initramfs/--cmdline/--cpus/--memory flags, such as tests/reference/krun-ref),
//! every sandbox boots the guest once with each binary, and the figures become ratios against
//! the baseline measured in the same sandbox: the only comparison that survives this machine's
//! drifting speed. The second boot in a sandbox was measured to be slower than the first whatever
//! the binary, so the binaries take turns going first, RUNS is rounded up to even, and the ratio
//! is the geometric mean of the per-sandbox ratios, in which that position effect cancels.
//!
//! With `--exits`, instead: one sandbox boot in which a guest program (tests/guest/exit_cost)
//! times exits of each kind from guest userspace (twice), under this build and the baseline.
//!
//! With `--reliability`, instead: RUNS boots (default 24) of the same guest, six per sandbox,
//! alternating with the baseline's when one is given, with no retry; prints how many finished
//! and how each failure looked (docs/testing.md has the table). `--adi N` gives siovmm's guests
//! N ADIs (not the baseline's: it has no such device).
//!
//! With `--reliability --together N`: guests side by side instead. Each sandbox starts N guests
//! of one VMM at once (1 vCPU, 256M each), siovmm's in one sandbox and the baseline's in the
//! next, taking turns; RUNS counts guests. This is the configuration in which this sandbox's
//! guests were seen to triple-fault (docs/testing.md, "Guests side by side").
//!
//! Usage: siovmm-bench [RUNS] [--baseline PATH] [--exits | --reliability [--adi N] [--together N]]

use std::path::PathBuf;

use siovmm_tests::{placement, run_cases, run_cases_once, CaseResult, GuestCase, Kernel};

const USAGE: &str =
    "usage: siovmm-bench [RUNS] [--baseline PATH-TO-STATIC-VMM] [--exits | --reliability [--adi N] [--together N]]";

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

/// Geometric mean: the right average of ratios (a ratio and its inverse average to 1).
fn geometric_mean(v: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = v.fold((0.0, 0u32), |(s, n), x| (s + x.ln(), n + 1));
    (sum / f64::from(n)).exp()
}

#[derive(Debug)]
struct Options {
    runs: Option<usize>,
    exits: bool,
    reliability: bool,
    adis: u32,
    together: usize,
    baseline: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut runs = None;
    let mut baseline = None;
    let mut exits = false;
    let mut reliability = false;
    let mut adis = 0;
    let mut together = 0;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--baseline" => {
                let p = it.next().ok_or("--baseline needs a path to a siovmm binary")?;
                let path = PathBuf::from(p);
                if !path.is_file() {
                    return Err(format!("--baseline {p}: no such file"));
                }
                baseline = Some(path);
            }
            "--exits" => exits = true,
            "--reliability" => reliability = true,
            "--adi" => {
                let v = it.next().ok_or("--adi needs a number")?;
                adis = v.parse().map_err(|_| format!("--adi {v}: not a number"))?;
            }
            "--together" => {
                let v = it.next().ok_or("--together needs a number")?;
                together = v.parse().ok().filter(|n| (2..=8).contains(n)).ok_or(format!("--together {v}: 2 to 8 guests"))?;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            n => match n.parse::<usize>() {
                Ok(r) if r > 0 => runs = Some(r),
                _ => return Err(format!("RUNS must be a positive number, not {n:?} ({USAGE})")),
            },
        }
    }
    if exits && reliability {
        return Err(format!("--exits and --reliability are different runs ({USAGE})"));
    }
    if (adis > 0 || together > 0) && !reliability {
        return Err(format!("--adi and --together go with --reliability ({USAGE})"));
    }
    Ok(Options { runs, exits, reliability, adis, together, baseline })
}

/// One guest boot's figures, in seconds. A baseline VMM without siovmm's boot timer has no
/// start->/init figure.
struct Boot {
    to_init: Option<f64>,
    to_exit: f64,
    uptime: Option<f64>,
}

/// `r`'s figures, printed; a run that failed, or lacks a figure its VMM must give (only a
/// `baseline` may lack the boot timer), is an error.
fn figures(r: &CaseResult, baseline: bool) -> Result<Boot, String> {
    let init = r.boot_timer_ms().map(|ms| ms / 1000.0);
    println!(
        "{}: start->/init {} s, start->exit {} s, guest uptime at /init {} s, exit status {:?}",
        r.name,
        init.map_or("?".into(), |s| format!("{s:.2}")),
        r.seconds.map_or("?".into(), |s| format!("{s:.2}")),
        r.value("GUEST-UPTIME").unwrap_or("?"),
        r.exit_code
    );
    let uptime = r.value("GUEST-UPTIME").and_then(|v| v.parse().ok());
    match (r.exit_code, r.seconds) {
        (Some(0), Some(to_exit)) if uptime.is_some() && (init.is_some() || baseline) => {
            Ok(Boot { to_init: init, to_exit, uptime })
        }
        _ => Err(format!("run {} failed:\n{}", r.name, r.transcript())),
    }
}

/// The benchmark's guest (vmlinux, 2 vCPUs, 512M) running `body`, then `reboot -f` rather than
/// poweroff: a baseline VMM without ACPI (libkrun) can only end on a reset, and siovmm ends with
/// status 0 on either. `vmm` is the baseline's binary, `None` for this build.
fn case(name: &str, vmm: Option<PathBuf>, body: &str) -> GuestCase {
    let mut c = GuestCase::new(name, Kernel::Vmlinux, 2, &format!("{body}reboot -f\n"));
    c.vmm = vmm;
    c
}

/// The boot-speed guest: reports its uptime at /init.
const BOOT_BODY: &str = "echo GUEST-UPTIME=$(cut -d' ' -f1 /proc/uptime)\n";

/// `--exits`: per-exit costs seen from the guest, one sandbox, each VMM in turn.
fn exit_costs(baseline: Option<PathBuf>) -> Result<(), String> {
    let assets = siovmm_tests::guest_assets()?;
    let probe = assets.read("exit_cost")?;
    let probed = |name: &str, vmm: Option<PathBuf>| {
        let mut c = case(name, vmm, "/exit_cost\n/exit_cost\n");
        c.files.push(("exit_cost".into(), 0o755, probe.clone()));
        c
    };
    let mut cases = vec![probed("exits", None)];
    cases.extend(baseline.map(|b| probed("exits-baseline", Some(b))));
    for r in run_cases(&cases)? {
        let costs = r.lines_with("EXIT-COST-");
        if costs.len() < 10 {
            return Err(format!("{}: the probe did not report:\n{}", r.name, r.transcript()));
        }
        println!("{} (µs per instruction, best batch of 1,000; two passes):", r.name);
        for l in costs {
            println!("  {}", l.trim().trim_start_matches("EXIT-COST-").replace("-US=", ": "));
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = parse_args(&args).unwrap_or_else(|e| {
        eprintln!("siovmm-bench: {e}");
        std::process::exit(2);
    });
    let result = if opts.exits {
        exit_costs(opts.baseline)
    } else if opts.reliability {
        reliability(&opts)
    } else {
        boot_speed(&opts)
    };
    if let Err(e) = result {
        eprintln!("siovmm-bench: {e}");
        std::process::exit(1);
    }
}

/// Boots per sandbox in `--reliability`: enough to amortize the sandbox's own boot, few
/// enough that a sandbox-level failure (a stuck sandbox kernel) costs a handful of boots.
const BOOTS_PER_SANDBOX: usize = 6;

/// How one boot ended, for the reliability table.
fn outcome(r: &CaseResult) -> String {
    if r.exit_code == Some(0) && r.value("GUEST-UPTIME").is_some() {
        return "finished".into();
    }
    match r.exit_code {
        Some(137) => "killed at its time budget (no end)".into(),
        // libkrun ends with 0 on any guest reset; before /init that is a triple fault (its
        // vCPU's shutdown exit is in the sandbox's flight record).
        Some(0) => "reset before /init (a triple fault: exit 0 without the guest's report)".into(),
        code => {
            let why = r.lines.iter().rev().find(|l| l.starts_with("siovmm: ") || l.contains("triple fault") || l.contains("Kernel panic"));
            format!("exit {code:?}: {}", why.map_or("no message", |l| l.as_str()))
        }
    }
}

/// A reliability boot of siovmm (`None`) or the baseline, siovmm's with `opts.adis` ADIs.
fn reliability_case(opts: &Options, name: &str, vmm: Option<PathBuf>) -> GuestCase {
    let mut c = case(name, vmm, BOOT_BODY);
    if opts.adis > 0 && c.vmm.is_none() {
        c.extra_args = vec!["--adi".into(), opts.adis.to_string()];
    }
    c
}

/// `n` boots of siovmm, each followed or preceded by one of the baseline's (taking turns).
fn in_turn(opts: &Options, sandbox: usize, n: usize) -> Vec<GuestCase> {
    let mut cases = Vec::new();
    for i in 0..n {
        cases.push(reliability_case(opts, &format!("s{sandbox}-boot{i}"), None));
        if let Some(b) = &opts.baseline {
            let theirs = reliability_case(opts, &format!("s{sandbox}-boot{i}-baseline"), Some(b.clone()));
            if (sandbox + i).is_multiple_of(2) {
                cases.push(theirs);
            } else {
                cases.insert(cases.len() - 1, theirs);
            }
        }
    }
    cases
}

/// `n` guests of one VMM started at once (all but the last in the background; the harness
/// waits for every one): siovmm's in even sandboxes, the baseline's in odd ones.
fn side_by_side(opts: &Options, sandbox: usize, n: usize) -> Vec<GuestCase> {
    let baseline = opts.baseline.clone().filter(|_| sandbox % 2 == 1);
    let tag = if baseline.is_some() { "-baseline" } else { "" };
    (0..n)
        .map(|i| {
            let mut c = reliability_case(opts, &format!("s{sandbox}-guest{i}{tag}"), baseline.clone());
            (c.cpus, c.memory, c.background) = (1, "256M".into(), i + 1 < n);
            c
        })
        .collect()
}

/// `--reliability`: how often a boot finishes, siovmm and the baseline in the same sandboxes.
fn reliability(opts: &Options) -> Result<(), String> {
    let boots = opts.runs.unwrap_or(24);
    println!(
        "placement: {:?}; guest: stock kernel vmlinux, {}, siovmm with {} ADIs; {}, no retries",
        placement(),
        if opts.together > 0 { "1 vCPU, 256M" } else { "2 vCPUs, 512M" },
        opts.adis,
        if opts.together > 0 {
            format!("{} guests at once per sandbox, one VMM per sandbox", opts.together)
        } else {
            format!("{BOOTS_PER_SANDBOX} boots per sandbox")
        }
    );
    let mut tallies: Vec<(String, std::collections::BTreeMap<String, usize>)> = Vec::new();
    let mut tally = |vmm: &str, what: String| {
        let i = tallies.iter().position(|(v, _)| v == vmm).unwrap_or_else(|| {
            tallies.push((vmm.to_string(), Default::default()));
            tallies.len() - 1
        });
        *tallies[i].1.entry(what).or_default() += 1;
    };
    let mut made = 0;
    let mut sandbox = 0;
    while made < boots {
        let per_sandbox = if opts.together > 0 { opts.together } else { BOOTS_PER_SANDBOX };
        let n = per_sandbox.min(boots - made);
        let cases = if opts.together > 0 { side_by_side(opts, sandbox, n) } else { in_turn(opts, sandbox, n) };
        made += n;
        match run_cases_once(&cases) {
            Ok(results) => {
                for (r, c) in results.iter().zip(&cases) {
                    let vmm = if c.vmm.is_some() { "baseline" } else { "siovmm" };
                    let o = outcome(r);
                    println!("sandbox {sandbox} {}: {o}", r.name);
                    if o != "finished" {
                        println!("{}", r.lines.iter().rev().take(30).rev().cloned().collect::<Vec<_>>().join("\n"));
                    }
                    tally(vmm, o);
                }
            }
            Err(e) => {
                println!("sandbox {sandbox}: failed as a whole: {}", e.lines().next().unwrap_or(""));
                // The message holds the console's end (with a stall's diagnosis: machine::diagnose_stall).
                println!("{e}");
                for c in &cases {
                    tally(if c.vmm.is_some() { "baseline" } else { "siovmm" }, "sandbox failed as a whole".into());
                }
            }
        }
        sandbox += 1;
    }
    for (vmm, t) in &tallies {
        let total: usize = t.values().sum();
        println!("{vmm}: {} of {total} boots finished", t.get("finished").copied().unwrap_or(0));
        for (what, n) in t.iter().filter(|(w, _)| *w != "finished") {
            println!("  {n} x {what}");
        }
    }
    Ok(())
}

/// The boot-speed benchmark proper.
fn boot_speed(opts: &Options) -> Result<(), String> {
    println!("placement: {:?}; guest: stock kernel vmlinux (PVH), 2 vCPUs, 512M, busybox /init", placement());
    let yardstick = siovmm_tests::sandbox_yardstick()?;
    let runs = opts.runs.unwrap_or(5);
    let runs = if opts.baseline.is_some() { runs.next_multiple_of(2) } else { runs };
    let mut ours = Vec::new();
    let mut base = Vec::new();
    for i in 0..runs {
        // A fresh sandbox per run: runs sharing one sandbox were measured to slow down one after
        // another (docs/boot-performance.md). With a baseline, the two binaries share the sandbox
        // and take turns going first.
        let mut cases = vec![case(&format!("run{i}"), None, BOOT_BODY)];
        if let Some(b) = &opts.baseline {
            let c = case(&format!("run{i}-baseline"), Some(b.clone()), BOOT_BODY);
            if i % 2 == 0 {
                cases.push(c);
            } else {
                cases.insert(0, c);
            }
        }
        for (r, c) in run_cases(&cases)?.iter().zip(&cases) {
            let baseline = c.vmm.is_some();
            let boot = figures(r, baseline)?;
            if baseline {
                base.push(boot);
            } else {
                ours.push(boot);
            }
        }
    }
    let med = |v: &[Boot], f: fn(&Boot) -> Option<f64>| median(v.iter().filter_map(f).collect());
    println!("median start->/init: {:.2} s over {} runs", med(&ours, |b| b.to_init), ours.len());
    println!("median start->exit:  {:.2} s over {} runs", med(&ours, |b| Some(b.to_exit)), ours.len());
    println!("median guest uptime at /init: {:.2} s", med(&ours, |b| b.uptime));
    if let Some(y) = yardstick {
        println!("yardstick: the sandbox kernel alone reached /init at {y:.2} s (docs/sandbox.md: 4.0-4.3 s under QEMU 10; above that, this machine is slower now)");
    }
    if !base.is_empty() {
        let seconds = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.2} s") };
        println!(
            "baseline median start->/init: {}, start->exit: {}, guest uptime at /init: {}",
            seconds(med(&base, |b| b.to_init)),
            seconds(med(&base, |b| Some(b.to_exit))),
            seconds(med(&base, |b| b.uptime))
        );
        let ratio = |f: fn(&Boot) -> Option<f64>| {
            let pairs: Vec<f64> = ours.iter().zip(&base).filter_map(|(o, b)| Some(f(o)? / f(b)?)).collect();
            if pairs.len() == ours.len() {
                format!("{:.3}", geometric_mean(pairs.into_iter()))
            } else {
                "- (the baseline has no boot timer)".into()
            }
        };
        println!(
            "ratio this build / baseline (geometric mean of per-sandbox ratios): start->/init {}, start->exit {}, guest uptime at /init {}",
            ratio(|b| b.to_init),
            ratio(|b| Some(b.to_exit)),
            ratio(|b| b.uptime)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options() {
        assert_eq!(parse_args(&args(&[])).unwrap().runs, None);
        assert_eq!(parse_args(&args(&["3"])).unwrap().runs, Some(3));
        assert!(parse_args(&args(&["--adi", "8"])).is_err(), "--adi only with --reliability");
        assert_eq!(parse_args(&args(&["--reliability", "--adi", "8"])).unwrap().adis, 8);
        assert!(parse_args(&args(&["0"])).unwrap_err().contains("\"0\""));
        assert!(parse_args(&args(&["--baseline"])).unwrap_err().contains("needs a path"));
        assert!(parse_args(&args(&["--baseline", "/nonexistent/siovmm"])).unwrap_err().contains("/nonexistent/siovmm"));
        let exe = std::env::current_exe().unwrap();
        let o = parse_args(&args(&["2", "--baseline", exe.to_str().unwrap()])).unwrap();
        assert_eq!((o.runs, o.baseline, o.exits), (Some(2), Some(exe), false));
        assert!(parse_args(&args(&["--exits"])).unwrap().exits);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
        // A position effect of 1.5x on whichever binary goes second cancels out.
        let g = geometric_mean([0.8 / 1.5, 0.8 * 1.5].into_iter());
        assert!((g - 0.8).abs() < 1e-12, "{g}");
        assert!(geometric_mean(std::iter::empty()).is_nan());
    }
}
