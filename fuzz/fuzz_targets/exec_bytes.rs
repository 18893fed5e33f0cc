//! Arbitrary bytes as guest code on visor's software CPU, at CPL 3 and CPL 0
//! (the first byte chooses; see `visor_emu::fuzz`). A panic is a bug in the CPU.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    visor_emu::fuzz::exec_bytes(data);
});
