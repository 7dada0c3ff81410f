//! The bounded GGUF reader against good files and crafted ones (each crafted file below once
//! crashed the agent or cost it far more memory than its size).

use std::path::Path;

use super::{parse, read, LIMITS};
use crate::llm::{fixture::model_bytes, kernels::QType};

/// A GGUF (version 3) written field by field, so that any field can lie.
#[derive(Default)]
struct Raw {
    kv: Vec<u8>,
    kv_count: u64,
    tensors: Vec<u8>,
    tensor_count: u64,
    data: Vec<u8>,
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Raw {
    /// A key with a value of GGUF type `ty` whose encoding is `value`.
    fn kv(mut self, key: &str, ty: u32, value: &[u8]) -> Self {
        string(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.kv_count += 1;
        self
    }

    fn tensor(mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
        string(&mut self.tensors, name);
        self.tensors.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.tensors.extend(d.to_le_bytes());
        }
        self.tensors.extend(ty.to_le_bytes());
        self.tensors.extend(offset.to_le_bytes());
        self.tensor_count += 1;
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.tensor_count.to_le_bytes());
        out.extend(self.kv_count.to_le_bytes());
        out.extend(&self.kv);
        out.extend(&self.tensors);
        out.resize(out.len().div_ceil(32) * 32, 0);
        out.extend(&self.data);
        out
    }
}

fn refused(bytes: &[u8]) -> String {
    let e = parse(bytes, &LIMITS).expect_err("the file is refused");
    assert!(!e.contains('\n'), "one line, no backtrace: {e}");
    e
}

#[test]
fn reads_what_candle_writes_as_candle_reads_it() {
    for q in [QType::Q4_0, QType::Q8_0, QType::Q6K, QType::F16] {
        let bytes = model_bytes(q, 7, true);
        let ours = read(&bytes, Path::new("<fixture>")).unwrap();
        let theirs =
            candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes))
                .unwrap();
        assert_eq!(ours.tensor_data_offset, theirs.tensor_data_offset);
        assert_eq!(ours.metadata.len(), theirs.metadata.len());
        assert_eq!(ours.tensor_infos.len(), theirs.tensor_infos.len());
        for (name, t) in &theirs.tensor_infos {
            let o = &ours.tensor_infos[name];
            assert_eq!(
                (o.shape.dims(), o.offset),
                (t.shape.dims(), t.offset),
                "{name}"
            );
            assert_eq!(o.ggml_dtype, t.ggml_dtype);
        }
        for (key, v) in &theirs.metadata {
            assert_eq!(
                format!("{:?}", ours.metadata[key]),
                format!("{v:?}"),
                "{key}"
            );
        }
    }
}

#[test]
fn a_file_that_is_not_gguf_is_named_so() {
    assert_eq!(refused(b"\x7fELF\x02\x01\x01\0\0\0\0\0"), "not a GGUF file");
    assert_eq!(refused(b""), "not a GGUF file");
}

/// Finding 1 of the hostile-input campaign: rows × row bytes wrapped, the file loaded, and the
/// first request asked for 2^59 bytes and aborted the process.
#[test]
fn a_tensor_whose_size_overflows_is_refused() {
    let f16 = Raw::default().tensor("token_embd.weight", &[576, 49152 + (1 << 57)], 1, 0);
    let e = refused(&f16.bytes());
    assert!(
        e.contains("token_embd.weight") && e.contains("elements"),
        "{e}"
    );
    let q8 = Raw::default().tensor("token_embd.weight", &[576, 49152 + (1 << 62)], 8, 0);
    assert!(refused(&q8.bytes()).contains("token_embd.weight"));
}

#[test]
fn a_tensor_past_the_end_of_the_file_is_refused() {
    let mut raw = Raw::default().tensor("t", &[32, 4], 0, 0);
    raw.data = vec![0; 32 * 4 * 4 - 1];
    assert!(refused(&raw.bytes()).contains("past the end"));
    raw.data.push(0);
    assert!(parse(&raw.bytes(), &LIMITS).is_ok());
    let far = Raw::default().tensor("t", &[32], 0, u64::MAX - 8);
    assert!(refused(&far.bytes()).contains("past the end"));
}

/// Finding 2: a tensor of 0 dimensions panicked at start (`index out of bounds`).
#[test]
fn a_tensor_without_dimensions_or_with_a_zero_one_is_refused() {
    let none = Raw::default().tensor("token_embd.weight", &[], 1, 0);
    assert!(refused(&none.bytes()).contains("0 dimensions"));
    let zero = Raw::default().tensor("token_embd.weight", &[576, 0], 1, 0);
    assert!(refused(&zero.bytes()).contains("a dimension is 0"));
    let five = Raw::default().tensor("t", &[1, 1, 1, 1, 1], 0, 0);
    assert!(refused(&five.bytes()).contains("5 dimensions"));
}

#[test]
fn rows_that_do_not_fill_blocks_and_unknown_types_are_refused() {
    let q4 = Raw::default().tensor("t", &[33, 1], 2, 0);
    assert!(refused(&q4.bytes()).contains("blocks"));
    let unknown = Raw::default().tensor("t", &[32], 99, 0);
    assert!(refused(&unknown.bytes()).contains("type 99"));
}

/// Finding 5: huge lengths and counts answered with a backtrace (and cost a symbolization).
#[test]
fn huge_lengths_and_counts_are_refused_before_any_allocation() {
    let mut long_key = Raw::default();
    long_key.kv.extend(u64::MAX.to_le_bytes());
    long_key.kv_count = 1;
    assert!(refused(&long_key.bytes()).contains("limit"));
    let long_value = Raw::default().kv("k", 8, &(1u64 << 23).to_le_bytes());
    assert!(refused(&long_value.bytes()).contains("past the end"));
    let tensors = Raw {
        tensor_count: u64::MAX,
        ..Raw::default()
    };
    assert!(refused(&tensors.bytes()).contains("tensor count"));
    let keys = Raw {
        kv_count: 1 << 40,
        ..Raw::default()
    };
    assert!(refused(&keys.bytes()).contains("metadata key count"));
    let mut array = 4u32.to_le_bytes().to_vec();
    array.extend((1u64 << 50).to_le_bytes());
    assert!(refused(&Raw::default().kv("a", 9, &array).bytes()).contains("array"));
}

#[test]
fn arrays_nest_only_so_deep() {
    // An array of one array of one array of u8.
    let mut v = Vec::new();
    for _ in 0..3 {
        v.extend(9u32.to_le_bytes());
        v.extend(1u64.to_le_bytes());
    }
    v.extend(0u32.to_le_bytes());
    v.extend(1u64.to_le_bytes());
    v.push(7);
    let e = refused(&Raw::default().kv("nested", 9, &v[4..]).bytes());
    assert!(e.contains("nest"), "{e}");
}

/// Finding 6: a 32 MiB file of one u8 array took a gigabyte for two seconds, since each
/// element is a 32-byte value in memory.
#[test]
fn metadata_that_would_take_far_more_memory_than_its_bytes_is_refused() {
    let n: u64 = 3 << 20; // within the element limit
    let mut array = 0u32.to_le_bytes().to_vec();
    array.extend(n.to_le_bytes());
    array.resize(array.len() + n as usize, 1);
    let one = Raw::default().kv("a", 9, &array);
    assert!(
        parse(&one.bytes(), &LIMITS).is_ok(),
        "one such array is fine"
    );
    let many = (0..3).fold(Raw::default(), |r, i| r.kv(&format!("a{i}"), 9, &array));
    let e = refused(&many.bytes());
    assert!(e.contains("MiB of memory"), "{e}");
    let mut over = 0u32.to_le_bytes().to_vec();
    over.extend((32u64 << 20).to_le_bytes());
    over.resize(over.len() + (32 << 20), 1);
    assert!(refused(&Raw::default().kv("a", 9, &over).bytes()).contains("limit"));
}

#[test]
fn alignment_must_be_a_power_of_two() {
    for bad in [0u32, 3, 1 << 20] {
        let raw = Raw::default().kv("general.alignment", 4, &bad.to_le_bytes());
        assert!(refused(&raw.bytes()).contains("alignment"), "{bad}");
    }
}

#[test]
fn duplicate_keys_and_tensors_are_refused() {
    let keys = Raw::default().kv("k", 4, &[0; 4]).kv("k", 4, &[0; 4]);
    assert!(refused(&keys.bytes()).contains("twice"));
    let mut tensors = Raw::default()
        .tensor("t", &[1], 0, 0)
        .tensor("t", &[1], 0, 0);
    tensors.data = vec![0; 4];
    assert!(refused(&tensors.bytes()).contains("twice"));
}

/// Any prefix of a good file is refused with a reason, never a panic.
#[test]
fn every_truncation_of_a_good_file_is_an_error() {
    let bytes = model_bytes(QType::Q4_0, 1, false);
    let ct = parse(&bytes, &LIMITS).unwrap();
    let header = ct.tensor_data_offset as usize;
    let end = ct
        .tensor_infos
        .values()
        .map(|t| t.offset + super::tensor_bytes(t))
        .max();
    let end = header + end.unwrap() as usize;
    for cut in (0..end).step_by(7).chain(header - 64..header + 64) {
        assert!(parse(&bytes[..cut], &LIMITS).is_err(), "cut at {cut}");
    }
}

/// The fuzz target's seeds and the inputs that once crashed the agent, read as a load reads
/// them: the good seed loads, every regression input is refused, nothing panics.
#[test]
fn the_fuzz_seeds_and_regression_inputs_are_read_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut regressions = 0;
    for dir in ["corpus/gguf", "regressions/gguf"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let result = crate::llm::check(std::fs::read(&path).unwrap());
            if path.file_name().unwrap() == "tiny-llama.gguf" {
                result.unwrap_or_else(|e| panic!("{path:?}: {e}"));
            } else if dir.starts_with("regressions") {
                assert!(result.is_err(), "{path:?} is refused");
                regressions += 1;
            }
        }
    }
    assert!(regressions >= 8, "{regressions} regression inputs");
}

/// The suite's short fuzzing run (libFuzzer's long one is `fuzz/run`): the seeds and
/// regression inputs, mutated at random (a fixed seed, so a failure repeats) as fuzzers mutate
/// them — bits flipped, bytes and integers set to edge values, cuts, ranges deleted or
/// repeated, mostly in the header and metadata — and loaded as a load reads them. An error is
/// fine; a panic fails the test.
#[test]
fn mutated_seeds_load_or_fail_cleanly() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut seeds = Vec::new();
    for dir in ["corpus/gguf", "regressions/gguf"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            seeds.push(std::fs::read(entry.unwrap().path()).unwrap());
        }
    }
    let mut rng = StdRng::seed_from_u64(0x6767_7566);
    let mut loaded = 0;
    for round in 0..40_000 {
        let mut b = seeds[round % seeds.len()].clone();
        for _ in 0..rng.random_range(1..=4) {
            if b.is_empty() {
                break;
            }
            // Mostly where the structure is (header, metadata, tensor infos), sometimes anywhere.
            let span = if rng.random_bool(0.8) {
                b.len().min(4096)
            } else {
                b.len()
            };
            let at = rng.random_range(0..span);
            match rng.random_range(0..7) {
                0 => b[at] ^= 1 << rng.random_range(0..8),
                1 => b[at] = [0, 1, 0x7f, 0x80, 0xff][rng.random_range(0..5)],
                2 if at + 4 <= b.len() => {
                    let v =
                        [0u32, 1, 2, 33, 0x1_0000, 0x7fff_ffff, u32::MAX][rng.random_range(0..7)];
                    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
                3 if at + 8 <= b.len() => {
                    let v = [0u64, 1, 1 << 32, 1 << 62, u64::MAX][rng.random_range(0..5)];
                    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
                4 => b.truncate(at),
                5 => {
                    let end = (at + rng.random_range(1..=64)).min(b.len());
                    b.drain(at..end);
                }
                _ => {
                    let end = (at + rng.random_range(1..=64)).min(b.len());
                    let copy = b[at..end].to_vec();
                    b.splice(at..at, copy);
                }
            }
        }
        if crate::llm::check(b).is_ok() {
            loaded += 1;
        }
    }
    // Most mutations of the one loadable seed touch only metadata it does not need.
    assert!(
        loaded > 0,
        "no mutated file loaded at all: the mutations never reach a loader"
    );
}
