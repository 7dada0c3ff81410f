//! Fuzz target: any bytes, read as a GGUF model the way a load reads one (header, shape,
//! tensors, tokenizer, chat template). An error is fine; a panic, an abort, an overflow or an
//! allocation past libFuzzer's `-malloc_limit_mb` is a finding.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = flatmesh_runtime::check_gguf(data.to_vec());
});
