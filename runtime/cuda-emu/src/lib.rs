//! The CUDA kernels compiled for the host and launched under an emulation of grids, blocks,
//! shared memory, barriers and warp shuffles (see `include/cuda_emu.h`): a test harness that
//! checks the kernels' logic against the CPU engine without a GPU. Not a product path.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void, CStr, CString};

extern "C" {
    fn fm_emu_kernel_count() -> usize;
    fn fm_emu_kernel_name(i: usize) -> *const c_char;
    fn fm_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        params: *const *mut c_void,
        nparams: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// The names of the kernels the emulation has.
pub fn kernels() -> Vec<String> {
    // SAFETY: the count and the names are static data of the library; a name is a
    // NUL-terminated string for every index below the count.
    unsafe {
        (0..fm_emu_kernel_count())
            .map(|i| {
                CStr::from_ptr(fm_emu_kernel_name(i))
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }
}

/// Run kernel `name` over `grid` blocks of `block` threads, with its parameters given as
/// cuLaunchKernel takes them: a pointer to each argument's value, in order.
///
/// # Safety
/// Each pointer in `params` points at a value of the kernel's parameter type at that
/// position, and every pointer argument points at host memory as large as the kernel reads
/// or writes for this launch.
pub unsafe fn launch(
    name: &str,
    grid: [u32; 3],
    block: [u32; 3],
    params: &[*mut c_void],
) -> Result<(), String> {
    let cname = CString::new(name).map_err(|_| format!("bad kernel name {name:?}"))?;
    let mut err = vec![0u8; 512];
    let rc = fm_emu_launch(
        cname.as_ptr(),
        grid.as_ptr(),
        block.as_ptr(),
        params.as_ptr(),
        params.len(),
        err.as_mut_ptr().cast(),
        err.len(),
    );
    if rc == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
    Err(String::from_utf8_lossy(&err[..end]).into_owned())
}

/// Pointers to each of the given places, as [`launch`] takes its parameters.
#[macro_export]
macro_rules! params {
    ($($arg:expr),* $(,)?) => {
        [$((&mut $arg) as *mut _ as *mut ::std::ffi::c_void),*]
    };
}
