//! Quantized CPU compute kernels for ggml block formats, with SIMD levels picked at run time.
//!
//! Weights are rows of ggml blocks (`Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`, `Q4_K`, `Q5_K`,
//! `Q6_K`) or plain `F32` / `F16` rows. A matrix-vector product takes one activation row,
//! quantizes it once to the weight type's activation format ([`QType::act`], the same pairing
//! as llama.cpp's `vec_dot_type`) and then takes [`Kernels::dot`] (or [`Kernels::dot_many`]
//! for several activation rows at once) against every weight row.
//!
//! The integer parts of every dot product are exact and identical across levels; only the
//! order of the final f32 accumulation differs between the scalar, AVX2 and AVX-512 levels.
//! Activation quantization follows llama.cpp's x86 build (`quantize_row_q8_0` / `q8_1` with
//! scale `amax / 127`, multiplier `127 / amax`, round-half-to-even; `quantize_row_q8_K_ref`
//! for `Q8_K`) and is the same on every level.
//!
//! Kernels are chosen once with `is_x86_feature_detected!` ([`Kernels::best`]); nothing here
//! needs `target-cpu=native`. The scalar level works on every architecture.
#![allow(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_act;
#[cfg(target_arch = "x86_64")]
mod avx2_attn;
#[cfg(target_arch = "x86_64")]
mod avx2_math;
#[cfg(target_arch = "x86_64")]
mod avx2_packed;
#[cfg(target_arch = "x86_64")]
mod avx2_rows;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod packed;
pub mod profile;
mod quantize;
mod scalar;
#[cfg(test)]
mod tests;
mod types;

pub use quantize::quantize_weights;
pub use types::{Act, ActScales, QType, QK_K};

use half::f16;
use std::sync::OnceLock;

/// SIMD level of a [`Kernels`] set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Level {
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL + VNNI, on top of the AVX2 level.
    Avx512,
}

/// A set of kernels, chosen once at run time.
#[derive(Debug)]
pub struct Kernels {
    level: Level,
    /// Whether matrices of the [`packed`] types are repacked for this level.
    packs: bool,
}

static SCALAR: Kernels = Kernels {
    level: Level::Scalar,
    packs: false,
};
#[cfg(target_arch = "x86_64")]
static AVX2_ROWS: Kernels = Kernels {
    level: Level::Avx2,
    packs: false,
};
#[cfg(target_arch = "x86_64")]
static AVX2: Kernels = Kernels {
    level: Level::Avx2,
    packs: true,
};
#[cfg(target_arch = "x86_64")]
static AVX512_ROWS: Kernels = Kernels {
    level: Level::Avx512,
    packs: false,
};
#[cfg(target_arch = "x86_64")]
static AVX512: Kernels = Kernels {
    level: Level::Avx512,
    packs: true,
};

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

impl Kernels {
    /// The fastest level this CPU supports: AVX-512 (+VNNI) > AVX2 (+FMA, F16C) > scalar.
    ///
    /// `FLATMESH_KERNELS=scalar|avx2-rows|avx2|avx512-vnni-rows|avx512-vnni` picks a lower
    /// level this CPU has instead (comparisons, benchmarks; a `-rows` level reads every matrix
    /// in place, none [`packed`]); an unknown or unavailable name keeps the best.
    pub fn best() -> &'static Kernels {
        static BEST: OnceLock<&'static Kernels> = OnceLock::new();
        BEST.get_or_init(|| {
            let all = Kernels::all();
            let wanted = std::env::var("FLATMESH_KERNELS").ok();
            wanted
                .and_then(|w| all.iter().copied().find(|k| k.name() == w))
                .or_else(|| all.last().copied())
                .unwrap_or(&SCALAR)
        })
    }

    /// The portable reference level.
    pub fn scalar() -> &'static Kernels {
        &SCALAR
    }

    /// Every level this CPU supports, slowest first (for tests and benches).
    pub fn all() -> Vec<&'static Kernels> {
        #[allow(unused_mut)]
        let mut v = vec![&SCALAR];
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                v.extend([&AVX2_ROWS, &AVX2]);
            }
            if has_avx512() {
                v.extend([&AVX512_ROWS, &AVX512]);
            }
        }
        v
    }

    /// "avx512-vnni", "avx512-vnni-rows", "avx2", "avx2-rows" or "scalar".
    pub fn name(&self) -> &'static str {
        match self.level {
            Level::Scalar => "scalar",
            Level::Avx2 if !self.packs => "avx2-rows",
            Level::Avx2 => "avx2",
            Level::Avx512 if !self.packs => "avx512-vnni-rows",
            Level::Avx512 => "avx512-vnni",
        }
    }

    /// Quantize one activation row `x` (length a multiple of the block) into `out`
    /// (length `act.row_bytes(x.len())`).
    pub fn quantize_act(&self, act: Act, x: &[f32], out: &mut [u8]) {
        assert_eq!(
            out.len(),
            act.row_bytes(x.len()),
            "quantize_act: output length"
        );
        #[cfg(target_arch = "x86_64")]
        if self.level != Level::Scalar {
            // SAFETY: this level exists only after `has_avx2()` detected AVX2, FMA and F16C.
            if unsafe { avx2_act::quantize_act(act, x, out) } {
                return;
            }
        }
        scalar::quantize_act(act, x, out);
    }

    /// One weight row (`n` values stored as `qt`) · one activation row quantized as `qt.act()`.
    pub fn dot(&self, qt: QType, w: &[u8], a: &[u8], n: usize) -> f32 {
        let mut out = [0f32; 1];
        self.dot_many(qt, w, a, n, &mut out);
        out[0]
    }

    /// One weight row against `out.len()` activation rows laid out back to back (each
    /// `qt.act().row_bytes(n)` bytes): `out[j] = dot(w, a_j)`. Each weight block is unpacked
    /// once per tile of rows (up to 4 rows on AVX2, 8 on AVX-512).
    pub fn dot_many(&self, qt: QType, w: &[u8], acts: &[u8], n: usize, out: &mut [f32]) {
        let wb = qt.row_bytes(n);
        let ab = qt.act().row_bytes(n);
        assert!(
            w.len() >= wb,
            "dot: weight row has {} bytes, needs {wb}",
            w.len()
        );
        assert!(
            acts.len() >= ab * out.len(),
            "dot: activations have {} bytes, need {}",
            acts.len(),
            ab * out.len()
        );
        let (w, acts) = (&w[..wb], &acts[..ab * out.len()]);
        if out.is_empty() {
            return;
        }
        let done = match self.level {
            // SAFETY: this level exists only after `has_avx512()` detected AVX-512 F/BW/VL/VNNI,
            // AVX2, FMA and F16C (a superset of the AVX2 level); slice lengths were checked above.
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe {
                avx512::dot_many(qt, w, acts, n, out) || avx2::dot_many(qt, w, acts, n, out)
            },
            // SAFETY: this level exists only after `has_avx2()` detected AVX2, FMA and F16C;
            // slice lengths were checked above.
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { avx2::dot_many(qt, w, acts, n, out) },
            _ => false,
        };
        if !done {
            scalar::dot_many(qt, w, acts, n, out);
        }
    }

    /// Consecutive weight rows against `t` activation rows: `w` holds `out.len() / t` rows
    /// of `n` values stored as `qt`, back to back; `out[r * t + j] = w_r · a_j`. Bit-identical
    /// to [`Kernels::dot_many`] row by row; one activation row (a decode step) takes a kernel
    /// that walks several weight rows at once.
    pub fn matmul(&self, qt: QType, w: &[u8], acts: &[u8], n: usize, t: usize, out: &mut [f32]) {
        let scales = match t {
            1 => ActScales::default(),
            _ => ActScales::of(qt.act(), acts, n, t),
        };
        self.matmul_scaled(qt, w, acts, &scales, n, t, out);
    }

    /// [`Kernels::matmul`] with the activations' scales read already (`ActScales::of` the
    /// same rows; empty for one row): a matrix split over the cores reads them once.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_scaled(
        &self,
        qt: QType,
        w: &[u8],
        acts: &[u8],
        scales: &ActScales,
        n: usize,
        t: usize,
        out: &mut [f32],
    ) {
        assert!(
            t > 0 && out.len().is_multiple_of(t),
            "matmul: output length"
        );
        let (wb, ab) = (qt.row_bytes(n), qt.act().row_bytes(n));
        let rows = out.len() / t;
        assert!(
            w.len() >= wb * rows && acts.len() >= ab * t,
            "matmul: {} weight bytes for {rows} rows, {} activation bytes for {t} rows",
            w.len(),
            acts.len()
        );
        let acts = &acts[..ab * t];
        #[cfg(target_arch = "x86_64")]
        if t == 1 {
            let done = match self.level {
                // SAFETY: this level exists only after `has_avx512()` detected AVX-512
                // F/BW/VL/VNNI, AVX2, FMA and F16C; lengths were checked above.
                Level::Avx512 => unsafe { avx512::gemv(qt, w, acts, n, out) },
                // SAFETY: this level exists only after `has_avx2()` detected AVX2, FMA and
                // F16C; lengths were checked above.
                Level::Avx2 => unsafe { avx2_rows::gemv(qt, w, acts, n, out) },
                Level::Scalar => false,
            };
            if done {
                return;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if self.level == Level::Avx2 && t > 1 {
            // SAFETY: this level exists only after `has_avx2()` detected AVX2, FMA and F16C;
            // lengths were checked above.
            if unsafe { avx2::matmul(qt, w, acts, scales, n, t, out) } {
                return;
            }
        }
        for (r, o) in out.chunks_mut(t).enumerate() {
            self.dot_many(qt, &w[r * wb..(r + 1) * wb], acts, n, o);
        }
    }

    /// Whether this level multiplies matrices of `qt` in the [`packed`] layout (with the AVX2
    /// kernels on the AVX-512 level too: measured 1.5–2x the row kernels on AVX2; not yet
    /// measured beside the AVX-512 row kernels, which `avx512-vnni-rows` keeps).
    pub fn packs(&self, qt: QType) -> bool {
        self.packs && packed::packable(qt)
    }

    /// [`Kernels::matmul`] over rows in the [`packed`] layout (`out.len() / t` rows, a
    /// multiple of [`packed::ROWS`]): `out[r * t + j] = w_r · a_j`, each value the same
    /// whatever `t` is.
    pub fn matmul_packed(
        &self,
        qt: QType,
        w: &[u8],
        acts: &[u8],
        n: usize,
        t: usize,
        out: &mut [f32],
    ) {
        assert!(
            packed::packable(qt),
            "matmul_packed: {qt:?} has no packed layout"
        );
        assert!(
            t > 0 && out.len().is_multiple_of(t) && (out.len() / t).is_multiple_of(packed::ROWS),
            "matmul_packed: output length"
        );
        let rows = out.len() / t;
        let (wb, ab) = (qt.row_bytes(n), qt.act().row_bytes(n));
        assert!(
            w.len() >= wb * rows && acts.len() >= ab * t,
            "matmul_packed: {} weight bytes for {rows} rows, {} activation bytes for {t} rows",
            w.len(),
            acts.len()
        );
        #[cfg(target_arch = "x86_64")]
        if self.level != Level::Scalar {
            // SAFETY: these levels exist only after `has_avx2()` detected AVX2, FMA and F16C;
            // lengths were checked above.
            if unsafe { avx2_packed::matmul(qt, w, acts, n, t, out) } {
                return;
            }
        }
        packed::reference(qt, w, acts, n, t, out);
    }

    /// Dequantize one weight row into `out` (its length is the row's value count).
    pub fn dequantize_row(&self, qt: QType, w: &[u8], out: &mut [f32]) {
        let wb = qt.row_bytes(out.len());
        assert!(
            w.len() >= wb,
            "dequantize_row: weight row has {} bytes, needs {wb}",
            w.len()
        );
        scalar::dequantize_row(qt, &w[..wb], out);
    }

    /// `sum_i k[i] * q[i]` over an f16 row.
    pub fn dot_f16(&self, k: &[f16], q: &[f32]) -> f32 {
        assert_eq!(k.len(), q.len(), "dot_f16: lengths differ");
        #[cfg(target_arch = "x86_64")]
        if self.level != Level::Scalar {
            // SAFETY: AVX2, FMA and F16C were detected for this level; lengths are equal.
            return unsafe { avx2::dot_f16(k, q) };
        }
        scalar::dot_f16(k, q)
    }

    /// `y += a * v` over an f16 row.
    pub fn axpy_f16(&self, y: &mut [f32], a: f32, v: &[f16]) {
        assert_eq!(y.len(), v.len(), "axpy_f16: lengths differ");
        #[cfg(target_arch = "x86_64")]
        if self.level != Level::Scalar {
            // SAFETY: AVX2, FMA and F16C were detected for this level; lengths are equal.
            unsafe { avx2::axpy_f16(y, a, v) };
            return;
        }
        scalar::axpy_f16(y, a, v);
    }

    /// `out[j] = rows[j] · q` (each exactly as [`Kernels::dot_f16`]).
    pub fn dot_f16_rows(&self, rows: &[&[f16]], q: &[f32], out: &mut [f32]) {
        assert!(
            rows.len() == out.len() && rows.iter().all(|r| r.len() == q.len()),
            "dot_f16_rows: lengths differ"
        );
        #[cfg(target_arch = "x86_64")]
        if self.level != Level::Scalar {
            // SAFETY: AVX2, FMA and F16C were detected for this level; lengths are equal.
            unsafe { avx2_attn::dot_f16_rows(rows, q, out) };
            return;
        }
        for (o, k) in out.iter_mut().zip(rows) {
            *o = scalar::dot_f16(k, q);
        }
    }

    /// `y += p[j] * rows[j]` for every j in order (each step exactly as [`Kernels::axpy_f16`]).
    pub fn axpy_f16_rows(&self, y: &mut [f32], p: &[f32], rows: &[&[f16]]) {
        assert!(
            rows.len() == p.len() && rows.iter().all(|r| r.len() == y.len()),
            "axpy_f16_rows: lengths differ"
        );
        #[cfg(target_arch = "x86_64")]
        if self.level != Level::Scalar {
            // SAFETY: AVX2, FMA and F16C were detected for this level; lengths are equal.
            unsafe { avx2_attn::axpy_f16_rows(y, p, rows) };
            return;
        }
        for (&a, v) in p.iter().zip(rows) {
            scalar::axpy_f16(y, a, v);
        }
    }

    /// `g = silu(g) · u` (the gated activation), elementwise.
    pub fn silu_mul(&self, g: &mut [f32], u: &[f32]) {
        assert_eq!(g.len(), u.len(), "silu_mul: lengths differ");
        #[cfg(target_arch = "x86_64")]
        if self.level != Level::Scalar {
            // SAFETY: AVX2, FMA and F16C were detected for this level; lengths are equal.
            unsafe { avx2_math::silu_mul(g, u) };
            return;
        }
        for (g, u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    }

    /// `x = e^(x − max)` in place (a softmax's numerators); returns their sum.
    pub fn exp_shifted(&self, xs: &mut [f32], max: f32) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if self.level != Level::Scalar {
            // SAFETY: AVX2, FMA and F16C were detected for this level.
            return unsafe { avx2_math::exp_shifted(xs, max) };
        }
        let mut sum = 0f64;
        for x in xs.iter_mut() {
            *x = (*x - max).exp();
            sum += *x as f64;
        }
        sum
    }

    /// f32 → f16 row (round to nearest even).
    pub fn to_f16(&self, x: &[f32], out: &mut [f16]) {
        assert_eq!(x.len(), out.len(), "to_f16: lengths differ");
        #[cfg(target_arch = "x86_64")]
        if self.level != Level::Scalar {
            // SAFETY: AVX2, FMA and F16C were detected for this level; lengths are equal.
            unsafe { avx2::to_f16(x, out) };
            return;
        }
        scalar::to_f16(x, out);
    }
}
