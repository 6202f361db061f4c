#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| anomaly_pipeline::fuzz::png(data));
