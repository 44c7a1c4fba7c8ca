#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    miglet_proto::fuzzing::protobuf(data);
});
