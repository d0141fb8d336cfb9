//! Tests that need KVM run wherever KVM is: on the host's `/dev/kvm` when it can create VMs,
//! otherwise inside the QEMU-TCG sandbox, whose own KVM (nested SVM) runs them. Nothing is
//! skipped: a test that cannot run anywhere fails, saying why.
//!
//! Write such a test with [`kvm_test!`](crate::kvm_test!) instead of `#[test]`. When the host
//! has no usable KVM (or `SIOVMM_HIDE_KVM=1` hides it), the first KVM test of a test binary to
//! run boots one sandbox for the whole binary: the binary itself, its shared libraries and the
//! files named with [`kvm_test_needs!`](crate::kvm_test_needs!) are carried in at their own
//! paths, and every selected KVM test runs there in its own process (`--exact NAME`), under
//! its own time budget. Each test on the host then reports the outcome of its own run, with
//! that run's output when it failed. Every KVM test writes one line to stderr saying where it
//! ran (libtest does not capture direct writes to stderr).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use crate::assets::Assets;
use crate::budget;
use crate::machine::{self, shell_quote, RunFailure, SandboxImage, StepResult};

/// One KVM test, registered by [`kvm_test!`](crate::kvm_test!).
#[derive(Debug)]
pub struct KvmTest {
    /// `crate::module::function`.
    pub path: &'static str,
    /// Seconds it takes in the sandbox on an idle machine, when more than
    /// [`budget::KVM_TEST_IDLE`]; 0 for the default.
    pub sandbox_idle_secs: u64,
}

impl KvmTest {
    fn budget(&self) -> std::time::Duration {
        match self.sandbox_idle_secs {
            0 => budget::kvm_test(budget::KVM_TEST_IDLE),
            s => budget::kvm_test(std::time::Duration::from_secs(s)),
        }
    }
}
inventory::collect!(KvmTest);

/// A host file a test binary's KVM tests need at the same path in the sandbox (another
/// program they start, say), registered by [`kvm_test_needs!`](crate::kvm_test_needs!).
#[derive(Debug)]
pub struct KvmTestFile {
    /// Absolute path on the host.
    pub path: &'static str,
}
inventory::collect!(KvmTestFile);

/// Declares a test that needs KVM (see the module documentation). Attributes and doc
/// comments before `fn` are kept. A test that takes longer than
/// [`budget::KVM_TEST_IDLE`] in the sandbox starts with `sandbox_idle_secs: N;` (its measured
/// idle time there), from which its budget is derived. A test that measures its own process
/// (open files, threads) starts with `alone;`: on the host it then runs in a process of its
/// own, as every KVM test does in the sandbox, so that tests running beside it on other
/// threads cannot disturb its counts. Both: `alone; sandbox_idle_secs: N;`.
#[macro_export]
macro_rules! kvm_test {
    (sandbox_idle_secs: $idle:literal; $(#[$attr:meta])* fn $name:ident() $body:block) => {
        $crate::kvm_test!(@define $idle, false; $(#[$attr])* fn $name() $body);
    };
    (alone; sandbox_idle_secs: $idle:literal; $(#[$attr:meta])* fn $name:ident() $body:block) => {
        $crate::kvm_test!(@define $idle, true; $(#[$attr])* fn $name() $body);
    };
    (alone; $(#[$attr:meta])* fn $name:ident() $body:block) => {
        $crate::kvm_test!(@define 0, true; $(#[$attr])* fn $name() $body);
    };
    ($(#[$attr:meta])* fn $name:ident() $body:block) => {
        $crate::kvm_test!(@define 0, false; $(#[$attr])* fn $name() $body);
    };
    (@define $idle:literal, $alone:literal; $(#[$attr:meta])* fn $name:ident() $body:block) => {
        $crate::inventory::submit! {
            $crate::kvm_test::KvmTest {
                path: concat!(module_path!(), "::", stringify!($name)),
                sandbox_idle_secs: $idle,
            }
        }
        $(#[$attr])*
        #[test]
        fn $name() {
            $crate::kvm_test::run(concat!(module_path!(), "::", stringify!($name)), $alone, || $body)
        }
    };
}

/// Names a host file (absolute path) that this binary's KVM tests need in the sandbox too.
#[macro_export]
macro_rules! kvm_test_needs {
    ($path:expr) => {
        $crate::inventory::submit! { $crate::kvm_test::KvmTestFile { path: $path } }
    };
}

/// Set in the sandbox: the body runs right here.
const INSIDE: &str = "SIOVMM_KVM_TEST_INSIDE";

/// libtest's name for a test at `module_path!()::name`: the path without the crate's name.
fn libtest_name(path: &str) -> &str {
    path.split_once("::").map_or(path, |(_, rest)| rest)
}

/// Runs one KVM test (called by the code [`kvm_test!`](crate::kvm_test!) generates); `alone`
/// runs it on the host in a process of its own.
pub fn run(path: &str, alone: bool, body: impl FnOnce()) {
    let name = libtest_name(path);
    if std::env::var_os(INSIDE).is_some() {
        body();
        return;
    }
    match crate::host_kvm::usable() {
        Ok(()) => {
            let start = Instant::now();
            if alone {
                run_alone(name);
            } else {
                body();
            }
            note(&format!("kvm-test {name}: ran on the host's /dev/kvm ({:.1} s)", start.elapsed().as_secs_f64()));
        }
        Err(why) => {
            static BATCH: OnceLock<Batch> = OnceLock::new();
            let batch = BATCH.get_or_init(|| run_in_sandbox(&why, name));
            match batch.outcomes.get(name) {
                Some(o) if passed(o) => {
                    // Its output there, through libtest's capture (shown with --nocapture).
                    eprintln!("{}", o.output.join("\n"));
                    note(&format!(
                        "kvm-test {name}: passed inside the QEMU-TCG sandbox ({:.1} s; host KVM not used: {why})",
                        o.seconds.unwrap_or(0.0)
                    ))
                }
                Some(o) => panic!(
                    "kvm-test {name} failed inside the QEMU-TCG sandbox (status {:?}{}, {:.1} s; host KVM not used: {why}); its output there:\n{}",
                    o.status,
                    if o.status == Some(137) { ": killed when its time budget ran out" } else { "" },
                    o.seconds.unwrap_or(0.0),
                    o.output.join("\n")
                ),
                None => panic!(
                    "kvm-test {name}: no result from the sandbox (host KVM not used: {why}): {}",
                    batch.failure.as_deref().unwrap_or("it did not report this test")
                ),
            }
        }
    }
}

/// Runs the test `name` of this test binary in a child process of its own, where it runs
/// directly (as inside the sandbox); panics with its output when it fails.
fn run_alone(name: &str) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(exe)
        .args([name, "--exact", "--test-threads", "1", "--nocapture"])
        .env(INSIDE, "1")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("starting the test binary again");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // libtest exits 0 also when its filter matched nothing: require the test's own line.
    let ran = text.contains(&format!("test {name} ... ok"));
    assert!(out.status.success() && ran, "kvm-test {name} failed in its own process ({}):\n{text}", out.status);
    // What the test printed (figures, counts), through libtest's capture: shown with
    // --nocapture, as a test in this process would be.
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
}

/// A line on the real stderr, past libtest's capture.
fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// What the sandbox run reported: each test that finished there, and why the run itself
/// failed, if it did (tests that finished before that keep their own outcome).
#[derive(Debug)]
struct Batch {
    outcomes: BTreeMap<String, StepResult>,
    failure: Option<String>,
}

/// Passed: status 0 and libtest ran exactly one test (a name that matches nothing also exits 0).
fn passed(o: &StepResult) -> bool {
    o.status == Some(0) && o.output.iter().any(|l| l.contains("test result: ok. 1 passed"))
}

/// The KVM tests of this binary that the current libtest arguments select, always
/// including `asking` (the test that triggered the run).
fn selected(asking: &str) -> Vec<&'static KvmTest> {
    let all: Vec<&'static KvmTest> = inventory::iter::<KvmTest>.into_iter().collect();
    let names: Vec<&str> = all.iter().map(|t| libtest_name(t.path)).collect();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let chosen = select(&names, &args);
    let mut tests: Vec<&'static KvmTest> =
        all.into_iter().filter(|t| libtest_name(t.path) == asking || chosen.iter().any(|c| c == libtest_name(t.path))).collect();
    tests.sort_by_key(|t| t.path);
    tests.dedup_by_key(|t| t.path);
    tests
}

/// libtest's selection: free arguments are filters (substring, or whole name with `--exact`),
/// `--skip X` removes matches; options that take a value are not filters.
fn select(all: &[&str], args: &[String]) -> Vec<String> {
    const WITH_VALUE: &[&str] = &["--test-threads", "--skip", "--format", "--color", "--logfile", "-Z", "--shuffle-seed"];
    let exact = args.iter().any(|a| a == "--exact");
    let (mut filters, mut skips) = (Vec::new(), Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--skip" {
            skips.extend(it.next());
        } else if WITH_VALUE.contains(&a.as_str()) {
            it.next();
        } else if !a.starts_with('-') {
            filters.push(a.as_str());
        }
    }
    let matches = |name: &str, f: &str| if exact { name == f } else { name.contains(f) };
    all.iter()
        .filter(|n| filters.is_empty() || filters.iter().any(|f| matches(n, f)))
        .filter(|n| !skips.iter().any(|s| matches(n, s)))
        .map(|n| n.to_string())
        .collect()
}

/// Boots one sandbox that runs the selected KVM tests of this binary, one process each.
fn run_in_sandbox(why: &str, asking: &str) -> Batch {
    let tests = selected(asking);
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Batch { outcomes: BTreeMap::new(), failure: Some(format!("finding this test binary: {e}")) },
    };
    note(&format!(
        "kvm-test: host KVM not used ({why}): running {} KVM test(s) of {} inside the QEMU-TCG sandbox",
        tests.len(),
        exe.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
    ));
    let early = |message| RunFailure { message, lines: Vec::new() };
    let run = || -> Result<Vec<String>, RunFailure> {
        let assets = Assets::locate(&[]).map_err(early)?;
        let mut image = SandboxImage::new(&assets).map_err(early)?;
        let mut programs = vec![exe.clone()];
        programs.extend(inventory::iter::<KvmTestFile>.into_iter().map(|f| PathBuf::from(f.path)));
        crate::ship::ship(&mut image, &programs).map_err(early)?;
        let total = budget::sandbox_boot() + tests.iter().map(|t| t.budget()).sum::<std::time::Duration>();
        machine::run_keeping_output(&assets, image.finish(&script(&exe, &tests)), total)
    };
    match run() {
        Ok(lines) => {
            let outcomes = parse(&lines);
            let failure = (outcomes.len() != tests.len())
                .then(|| format!("the sandbox reported {} of {} tests:\n{}", outcomes.len(), tests.len(), lines.join("\n")));
            Batch { outcomes, failure }
        }
        Err(f) => Batch { outcomes: parse(&f.lines), failure: Some(f.message) },
    }
}

/// The sandbox script: each test in its own process, a [`machine::step`] under its budget.
fn script(exe: &std::path::Path, tests: &[&KvmTest]) -> String {
    let mut s = format!("export {INSIDE}=1\ncd /tmp\n{}", machine::same_fd_limits());
    if let Ok(bt) = std::env::var("RUST_BACKTRACE") {
        s.push_str(&format!("export RUST_BACKTRACE={}\n", shell_quote(&bt)));
    }
    let exe = shell_quote(&exe.display().to_string());
    for test in tests {
        let name = libtest_name(test.path);
        s.push_str(&machine::step(name, test.budget(), &format!("{exe} --exact {} --nocapture --test-threads=1", shell_quote(name))));
    }
    s
}

/// Per-test outcomes from the sandbox console.
fn parse(lines: &[String]) -> BTreeMap<String, StepResult> {
    machine::steps(lines).into_iter().map(|r| (r.name.clone(), r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_drop_the_crate() {
        assert_eq!(libtest_name("siovmm::kvm_tests::pio"), "kvm_tests::pio");
        assert_eq!(libtest_name("cli::triple_fault"), "triple_fault");
    }

    #[test]
    fn selection_follows_libtest_filters() {
        let all = ["kvm_tests::a_one", "kvm_tests::b_two", "other::a_three"];
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(select(&all, &[]).len(), 3);
        assert_eq!(select(&all, &args("a_")), ["kvm_tests::a_one", "other::a_three"]);
        assert_eq!(select(&all, &args("--exact kvm_tests::b_two")), ["kvm_tests::b_two"]);
        assert_eq!(select(&all, &args("--exact b_two")), Vec::<String>::new());
        assert_eq!(select(&all, &args("kvm_tests --skip one")), ["kvm_tests::b_two"]);
        assert_eq!(select(&all, &args("--test-threads 2 --nocapture")).len(), 3, "option values are not filters");
    }

    #[test]
    fn outcomes_are_read_per_test() {
        let console: Vec<String> = [
            "noise",
            "@@STEP kvm_tests::a",
            "running 1 test",
            "test kvm_tests::a ... ok",
            "test result: ok. 1 passed; 0 failed",
            "@@STEP-END kvm_tests::a 0 123",
            "@@STEP kvm_tests::b",
            "thread panicked at boom",
            "@@STEP-END kvm_tests::b 101 7",
            "@@STEP kvm_tests::c",
            "test result: ok. 0 passed; 0 failed",
            "@@STEP-END kvm_tests::c 0 1",
            "@@STEP kvm_tests::d",
            "@@STEP-END kvm_tests::d 137 6000",
        ]
        .map(String::from)
        .to_vec();
        let o = parse(&console);
        assert!(passed(&o["kvm_tests::a"]));
        assert!((o["kvm_tests::a"].seconds.unwrap() - 1.23).abs() < 1e-9);
        assert!(!passed(&o["kvm_tests::b"]) && o["kvm_tests::b"].output == ["thread panicked at boom"]);
        assert!(!passed(&o["kvm_tests::c"]), "a filter that ran nothing is not a pass");
        assert!(!passed(&o["kvm_tests::d"]), "killed at its budget");
    }
}
