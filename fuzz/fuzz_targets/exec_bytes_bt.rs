//! libFuzzer target: arbitrary bytes as guest code on engine `bt` and on the
//! software CPU alone (see `visor_bt::exec_bytes_differential`). A panic, or
//! a difference in how the run ended, the registers or memory (for inputs
//! without a local APIC, whose timer runs on the host clock), is a bug of the
//! translator.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (oracle, bt) = visor_bt::exec_bytes_differential(data);
    if data.first().is_some_and(|f| f & 2 == 0) {
        assert_eq!(oracle, bt, "bt diverges from emu");
    }
});
