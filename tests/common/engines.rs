//! Whether a test may run on an engine here.

use visor::Engine;

/// True if `engine` can run here. If not, the test is skipped with a
/// `SKIPPED` line, unless `VISOR_REQUIRE_ENGINES` is set (as `./test.sh` does
/// where /dev/kvm is usable): then an engine that stopped working fails.
pub fn available(engine: Engine) -> bool {
    let Some(why) = engine.unavailable_reason() else {
        return true;
    };
    if std::env::var_os("VISOR_REQUIRE_ENGINES").is_some() {
        panic!("engine {engine} is required (VISOR_REQUIRE_ENGINES) but unavailable: {why}");
    }
    eprintln!("SKIPPED: engine {engine} unavailable: {why}");
    false
}
