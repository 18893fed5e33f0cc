//! Arbitrary bytes as a guest's hypercalls and the memory they point at, on
//! visor's hypercall service (see `visor_hypercalls::fuzz`). A panic, or a
//! result or side effect the ABI does not allow, is a bug in the service.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = visor_hypercalls::fuzz::hypercall_args(data);
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
});
