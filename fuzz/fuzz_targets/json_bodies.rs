#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    miglet_proto::fuzzing::json_body(data);
});
