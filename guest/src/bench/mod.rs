//! In-guest benchmarks (`bench=` on the command line), run after READY.
//!
//! Every benchmark times one operation per sample with `lfence; rdtsc;
//! lfence` around it, subtracts the median of an empty measurement taken at
//! the same privilege level (`overhead`), and sends one BENCH report: `name`,
//! `id` (unique: name plus variant), `unit=cycles`, `n`, `p50`, `p99`,
//! `min`, `max`, `cpl`, `overhead`, `backend`, and where relevant `impl`
//! (`list`|`fast`) and `freelist_len` (free-list blocks when measured) with
//! `freelist_target`. A `BENCH ...` line is printed for each.
//!
//! `bench=1` (or `cpl0`): the CPL0 set. `bench=cpl3`: the CPL3 set (and the
//! same operations at CPL0). `bench=all`: both. `bench=a,b`: just those
//! benchmark names (from either set). `bench=heap`: the heap's alloc+free
//! shapes at every free-list length (CPL3, and 64 B at CPL0 too).
//! `heap_frag` (in the CPL3 set): fragmentation after a random churn trace
//! on both backing allocators (INFO `event=heap_frag`).

mod cpl0;
mod frag;
mod icount;
pub mod timing;
pub mod user;
pub mod cpl3;

use crate::abi::{Backend, ReportKind};
use crate::report;
use crate::{boot_info, println};
pub use timing::Stats;

/// Extra keys of a BENCH report.
#[derive(Clone, Copy, Default)]
pub struct Extra {
    pub imp: Option<&'static str>,
    pub freelist_len: Option<u64>,
    pub freelist_target: Option<u64>,
    /// Operations per sample (the figures are per operation).
    pub batch: Option<u64>,
}

/// Sends the BENCH report and prints its line.
pub fn emit(name: &str, id: &str, cpl: u8, st: &Stats, extra: Extra) {
    let backend = Backend::from_raw(boot_info().backend).name();
    report::send(ReportKind::Bench, |r| {
        r.kv("name", name)
            .kv("id", id)
            .kv("unit", "cycles")
            .kv("n", st.n)
            .kv("p50", st.p50)
            .kv("p99", st.p99)
            .kv("min", st.min)
            .kv("max", st.max)
            .kv("cpl", cpl)
            .kv("overhead", st.overhead)
            .kv("backend", backend);
        if let Some(i) = extra.imp {
            r.kv("impl", i);
        }
        if let Some(l) = extra.freelist_len {
            r.kv("freelist_len", l);
        }
        if let Some(l) = extra.freelist_target {
            r.kv("freelist_target", l);
        }
        if let Some(b) = extra.batch {
            r.kv("batch", b);
        }
    });
    println!(
        "BENCH {:<28} cpl={} n={:<4} p50={:<8} p99={:<8} min={:<8} max={:<8} overhead={}{}{}",
        id,
        cpl,
        st.n,
        st.p50,
        st.p99,
        st.min,
        st.max,
        st.overhead,
        extra.imp.map_or(alloc::string::String::new(), |i| alloc::format!(" impl={}", i)),
        extra.freelist_len.map_or(alloc::string::String::new(), |l| alloc::format!(" freelist_len={}", l)),
    );
}

/// What `bench=` asked for.
pub struct Selection<'a> {
    words: &'a str,
}

impl<'a> Selection<'a> {
    /// A word that needs CPL3 runs.
    pub fn has_cpl3_name(&self) -> bool {
        self.cpl3_set()
    }
    pub fn has(&self, w: &str) -> bool {
        self.words.split(',').any(|x| x == w)
    }
    fn all(&self) -> bool {
        self.has("all")
    }
    pub fn cpl0_set(&self) -> bool {
        self.all() || self.has("1") || self.has("cpl0")
    }
    pub fn cpl3_set(&self) -> bool {
        self.all() || self.has("cpl3")
    }
    /// Benchmark `name` runs: its set was chosen or it was named.
    pub fn wants(&self, set: bool, name: &str) -> bool {
        set || self.has(name)
    }
}

/// Runs the benchmarks chosen by `bench=<words>`.
pub fn run(words: &str) {
    let sel = Selection { words };
    println!("bench: {} (backend {})", words, Backend::from_raw(boot_info().backend).name());
    cpl0::run(&sel);
    cpl3::run(&sel);
    frag::run(&sel);
    icount::run(&sel);
    if user::runs() > 0 {
        // Every U/S bit set for the ring-3 runs must be gone again.
        let (clean, a) = user::audit_after();
        let (wp, nxe) = crate::memory::audit::control_bits();
        let ok = clean && wp && nxe;
        println!(
            "bench: self-check after {} CPL3 runs {}: {} W+X, {} user leaves, {} U/S entries",
            user::runs(),
            if ok { "ok" } else { "FAILED" },
            a.wx,
            a.user,
            a.user_entries
        );
        report::send(ReportKind::Info, |r| {
            r.kv("phase", "after_cpl3")
                .kv("cpl3_runs", user::runs())
                .kv("wx_ok", ok as u8)
                .kv("wx_violations", a.wx)
                .kv("user_leaves", a.user)
                .kv("user_entries", a.user_entries);
        });
    }
}
