//! NVRTC, loaded at run time: finding `libnvrtc.so.13` (the system's, or the PyPI wheel's),
//! and compiling a kernel source to CUBIN for one GPU architecture.
//!
//! cudarc opens the library by name only, so the dynamic loader's path decides. Before that,
//! the directories in `FLATMESH_CUDA_LIB_DIR` (colon-separated) and then the wheel's
//! `site-packages/nvidia/cu13/lib` of each `python3` path are searched, and the libraries found
//! there are opened by full path first (`libnvrtc-builtins.so.13.0`, which NVRTC itself opens
//! by name, then `libnvrtc.so.13`): the loader then hands those to every later open by name.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::sys;

use super::{Source, HEADERS};

/// What went wrong finding NVRTC or compiling with it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NvrtcError {
    #[error("NVRTC (libnvrtc.so.13) was not found on the library path, in FLATMESH_CUDA_LIB_DIR or in a python3 site-packages/nvidia/cu13/lib (searched: {0})")]
    Missing(String),
    #[error("{file} for sm_{arch} did not compile:\n{log}")]
    Compile {
        file: &'static str,
        arch: u32,
        log: String,
    },
    #[error("NVRTC {call} failed: {code:?}")]
    Call {
        call: &'static str,
        code: sys::nvrtcResult,
    },
}

/// One source compiled for one architecture.
#[derive(Debug, Clone)]
pub struct Cubin {
    pub file: &'static str,
    pub arch: u32,
    pub image: Vec<u8>,
    /// NVRTC's log: warnings, and ptxas's registers and spills per kernel.
    pub log: String,
}

const LIBS: [&str; 2] = ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"];

/// Directories to look for the CUDA libraries in, besides the loader's path.
fn lib_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var("FLATMESH_CUDA_LIB_DIR")
        .map(|v| {
            v.split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    let python = std::process::Command::new("python3")
        .args(["-c", "import sys; print('\\n'.join(sys.path))"])
        .stderr(std::process::Stdio::null())
        .output();
    if let Ok(out) = python {
        for p in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|p| !p.is_empty())
        {
            dirs.push(Path::new(p).join("nvidia/cu13/lib"));
        }
    }
    dirs
}

/// Open `path` for the whole process; whether it opened.
fn open_global(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: dlopen with a NUL-terminated path; the handle is kept open for the process's
    // life (never closed), which is what the later opens by name rely on.
    !unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) }.is_null()
}

/// Load NVRTC once; its version, or why it cannot be used.
pub fn load() -> Result<(i32, i32), NvrtcError> {
    static LOADED: OnceLock<Result<(i32, i32), NvrtcError>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let dirs = lib_dirs();
            let explicit = std::env::var_os("FLATMESH_CUDA_LIB_DIR").is_some();
            // An explicit directory comes first; then the loader's path; then the wheels.
            let on_path = || open_global(Path::new(LIBS[1]));
            let found = (explicit && try_dirs(&dirs)) || on_path() || try_dirs(&dirs);
            // SAFETY: is_culib_present only tries to open the library by its candidate names.
            if !found || !unsafe { sys::is_culib_present() } {
                let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
                return Err(NvrtcError::Missing(searched.join(", ")));
            }
            let (mut major, mut minor): (c_int, c_int) = (0, 0);
            // SAFETY: the library is present (checked above); two valid out-pointers.
            check("nvrtcVersion", unsafe {
                sys::nvrtcVersion(&mut major, &mut minor)
            })?;
            Ok((major, minor))
        })
        .clone()
}

fn try_dirs(dirs: &[PathBuf]) -> bool {
    dirs.iter()
        .any(|d| d.join(LIBS[1]).is_file() && LIBS.iter().all(|l| open_global(&d.join(l))))
}

fn check(call: &'static str, code: sys::nvrtcResult) -> Result<(), NvrtcError> {
    match code {
        sys::nvrtcResult::NVRTC_SUCCESS => Ok(()),
        code => Err(NvrtcError::Call { call, code }),
    }
}

/// The options every compile takes: a real architecture (CUBIN, so the driver need not be as
/// new as NVRTC), and no fused multiply-adds, so the kernels round as the CPU engine does.
pub fn options(arch: u32) -> Vec<String> {
    vec![
        format!("--gpu-architecture=sm_{arch}"),
        "--std=c++17".into(),
        "--fmad=false".into(),
        "--ptxas-options=-v".into(),
    ]
}

/// Compile `src` to CUBIN for `sm_<arch>`.
pub fn compile(src: &Source, arch: u32) -> Result<Cubin, NvrtcError> {
    load()?;
    let cstr = |s: &str| CString::new(s).expect("kernel sources have no NUL bytes");
    let text = cstr(src.text);
    let name = cstr(src.file);
    let headers: Vec<CString> = HEADERS.iter().map(|(_, t)| cstr(t)).collect();
    let names: Vec<CString> = HEADERS.iter().map(|(n, _)| cstr(n)).collect();
    let hp: Vec<*const c_char> = headers.iter().map(|h| h.as_ptr()).collect();
    let np: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let opts: Vec<CString> = options(arch).iter().map(|o| cstr(o)).collect();
    let op: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog = std::ptr::null_mut();
    // SAFETY: NVRTC is loaded; every pointer is a live NUL-terminated string or an array of
    // `HEADERS.len()` of them, valid for the call.
    check("nvrtcCreateProgram", unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            text.as_ptr(),
            name.as_ptr(),
            hp.len() as c_int,
            hp.as_ptr(),
            np.as_ptr(),
        )
    })?;
    // SAFETY: `prog` was created above and is destroyed once, at the end.
    let result = unsafe { compile_program(prog, &op) };
    // SAFETY: as above; destroy takes a pointer to the handle.
    unsafe { sys::nvrtcDestroyProgram(&mut prog) };
    let (ok, log, image) = result?;
    if !ok {
        return Err(NvrtcError::Compile {
            file: src.file,
            arch,
            log,
        });
    }
    Ok(Cubin {
        file: src.file,
        arch,
        image,
        log,
    })
}

/// Compile `prog`; whether it compiled, its log and its CUBIN.
///
/// # Safety
/// `prog` is a live program of the loaded NVRTC.
unsafe fn compile_program(
    prog: sys::nvrtcProgram,
    opts: &[*const c_char],
) -> Result<(bool, String, Vec<u8>), NvrtcError> {
    let code = sys::nvrtcCompileProgram(prog, opts.len() as c_int, opts.as_ptr());
    let mut size = 0usize;
    check(
        "nvrtcGetProgramLogSize",
        sys::nvrtcGetProgramLogSize(prog, &mut size),
    )?;
    let mut log = vec![0u8; size.max(1)];
    check(
        "nvrtcGetProgramLog",
        sys::nvrtcGetProgramLog(prog, log.as_mut_ptr().cast()),
    )?;
    let log = String::from_utf8_lossy(&log)
        .trim_end_matches('\0')
        .to_string();
    if code != sys::nvrtcResult::NVRTC_SUCCESS {
        return Ok((false, log, Vec::new()));
    }
    check("nvrtcGetCUBINSize", sys::nvrtcGetCUBINSize(prog, &mut size))?;
    let mut image = vec![0u8; size];
    check(
        "nvrtcGetCUBIN",
        sys::nvrtcGetCUBIN(prog, image.as_mut_ptr().cast()),
    )?;
    Ok((true, log, image))
}

/// Registers and spill bytes per kernel, from ptxas's lines in a compile log.
pub fn resource_usage(log: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut kernel = None;
    for line in log.lines() {
        if let Some(at) = line.find("Compiling entry function '") {
            let rest = &line[at + 26..];
            kernel = rest.split('\'').next().map(str::to_string);
        } else if let (Some(k), true) = (&kernel, line.contains("bytes spill stores")) {
            let usage = line.trim_start_matches(|c: char| !c.is_ascii_digit());
            out.push((k.clone(), usage.trim().to_string()));
        } else if let (Some(k), Some(at)) = (&kernel, line.find("Used ")) {
            if let Some((_, usage)) = out.iter_mut().rev().find(|(n, _)| n == k) {
                usage.push_str("; ");
                usage.push_str(line[at..].trim());
            }
        }
    }
    out
}
