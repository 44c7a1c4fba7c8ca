#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mig_controller::fuzzing::credentials(data);
});
