//! Compiles the kernels (`runtime/src/cuda/kernels/*.cu`) for the host, with the emulation of
//! the CUDA built-ins (`include/cuda_emu.h`), into a static library.

fn main() {
    let kernels = "../src/cuda/kernels";
    for path in ["src/emu.cpp", "include/cuda_emu.h", kernels] {
        println!("cargo:rerun-if-changed={path}");
    }
    cc::Build::new()
        .cpp(true)
        .file("src/emu.cpp")
        .include("include")
        .include(kernels)
        .std("c++20")
        .opt_level(2)
        // Round as the device (compiled with --fmad=false) and the CPU engine do: no FMA.
        .flag("-ffp-contract=off")
        // The kernels read ggml blocks through u16 / u32 pointers, as CUDA code does.
        .flag("-fno-strict-aliasing")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("flatmesh_cuda_emu");
}
