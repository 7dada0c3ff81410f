//! Every kernel source compiles with NVRTC to CUBIN for the newest and the oldest architecture.

use super::{nvrtc, OLDEST_ARCH, SOURCES};

/// NVRTC, or the reason this test cannot run. Only FLATMESH_SKIP_NVRTC=1 lets it pass without
/// (for developers without the wheel): CI installs it, and there it must run.
fn nvrtc_or_skip() -> Option<(i32, i32)> {
    match nvrtc::load() {
        Ok(v) => Some(v),
        Err(e) if std::env::var("FLATMESH_SKIP_NVRTC").as_deref() == Ok("1") => {
            eprintln!("SKIPPED (FLATMESH_SKIP_NVRTC=1): {e}");
            None
        }
        Err(e) => panic!(
            "{e}\nInstall it with `python3 -m pip install -r tests/e2e/requirements.txt` (the \
             nvidia-cuda-nvrtc wheel), or set FLATMESH_CUDA_LIB_DIR to the directory holding \
             libnvrtc.so.13; FLATMESH_SKIP_NVRTC=1 skips this test on a developer machine."
        ),
    }
}

/// Whether the ELF symbol string table of `image` names `kernel`.
fn names_symbol(image: &[u8], kernel: &str) -> bool {
    let needle: Vec<u8> = [&[0u8][..], kernel.as_bytes(), &[0u8]].concat();
    image.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn every_kernel_compiles_with_nvrtc_to_cubin_for_sm_90_and_the_oldest_arch() {
    let Some((major, minor)) = nvrtc_or_skip() else {
        return;
    };
    println!("NVRTC {major}.{minor}");
    for arch in [90, OLDEST_ARCH] {
        for src in SOURCES {
            let cubin = nvrtc::compile(src, arch).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                &cubin.image[..4],
                b"\x7fELF",
                "{} sm_{arch}: not a CUBIN",
                src.file
            );
            for k in src.kernels {
                assert!(
                    names_symbol(&cubin.image, k),
                    "{} for sm_{arch} has no kernel {k}",
                    src.file
                );
            }
            let usage = nvrtc::resource_usage(&cubin.log);
            assert!(
                !usage.is_empty(),
                "no register report for {}:\n{}",
                src.file,
                cubin.log
            );
            for (kernel, line) in usage {
                println!("sm_{arch} {kernel}: {line}");
            }
        }
    }
}

#[test]
fn a_kernel_with_an_error_fails_to_compile_with_its_log() {
    if nvrtc_or_skip().is_none() {
        return;
    }
    let broken = super::Source {
        file: "broken.cu",
        text: "#include \"common.cuh\"\nextern \"C\" __global__ void k(float* x) { x[0] = y; }\n",
        kernels: &["k"],
    };
    match nvrtc::compile(&broken, 90) {
        Err(nvrtc::NvrtcError::Compile { log, .. }) => {
            assert!(log.contains("identifier \"y\" is undefined"), "{log}")
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}
