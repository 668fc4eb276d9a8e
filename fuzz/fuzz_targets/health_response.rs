//! Fuzz target: see `portshare::fuzz::health_response` for the input and what it promises.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    portshare::fuzz::health_response(data);
});
