#![no_main]

libfuzzer_sys::fuzz_target!(
    // libfuzzer-sys aborts on any panic, even one the code under test catches on purpose (the
    // Parquet reader's, see `Source::stream`); the default hook lets those be caught, while an
    // uncaught panic still reaches the harness and is reported as a crash.
    init: {
        let _ = std::panic::take_hook();
    },
    |data: &[u8]| anomaly_pipeline::fuzz::pipeline_toml(data)
);
