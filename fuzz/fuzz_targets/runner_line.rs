#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    miglet::fuzzing::runner_line(data);
});
