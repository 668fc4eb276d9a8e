//! Fuzz target: see `portshare::fuzz::grpc_timeout` for the input and what it promises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    portshare::fuzz::grpc_timeout(data);
});
