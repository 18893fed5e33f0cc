//! The demo OS's output, compared across engines and runs.

/// The demo OS's transcript without what depends on timing (ticks, sleeps,
/// timer interrupts) or on the host (the hypervisor signature KVM shows),
/// sorted: process output interleaves by scheduling.
pub fn transcript(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| !l.contains("tick") && !l.contains("hypervisor signature"))
        .map(|l| l.replace("mode=pv-deprivileged", "mode=pv"))
        .filter(|l| !l.contains("pv_ops use hypercalls"))
        .map(|l| match l.find(" timer_irqs=") {
            Some(i) => {
                let rest = &l[i + 1..];
                let end = rest.find(' ').map_or(l.len(), |j| i + 1 + j);
                format!("{}{}", &l[..i], &l[end..])
            }
            None => l,
        })
        .collect();
    v.sort();
    v
}
