//! Fast numeric kernels for the models trained by gradient, each with a naive reference beside
//! it that the tests hold it to.
//!
//! The fast kernels are written once as plain, branch-free f32 loops over fixed-width chunks
//! ([`math::LANES`]) that LLVM vectorizes, and compiled three times: for AVX-512, for AVX2 + FMA,
//! and portable. [`Isa::detect`] picks the widest one the CPU has, once per process; the
//! environment variable `PIPELINE_ISA` (`avx512`, `avx2`, `portable`) narrows the choice for
//! benchmarks and tests. Plain matrix products are not here: they go through ndarray's GEMM.

pub mod math;
pub mod nade;
pub mod rnade;

use std::sync::OnceLock;

/// An instruction set a fast kernel was compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Baseline x86-64 / any architecture: SSE2-width vectors, separate multiply and add.
    Portable,
    /// AVX2 with fused multiply-add (8 f32 lanes).
    Avx2,
    /// AVX-512F (16 f32 lanes).
    Avx512,
}

impl Isa {
    /// Every instruction set this CPU can run, narrowest first.
    pub fn available() -> Vec<Isa> {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                isas.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("fma")
            {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }

    /// The instruction set the kernels use in this process: the widest available, or the one
    /// `PIPELINE_ISA` names when the CPU has it. Decided once.
    pub fn detect() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let available = Isa::available();
            let wanted = std::env::var("PIPELINE_ISA")
                .ok()
                .and_then(|name| available.iter().copied().find(|isa| isa.name() == name));
            let isa = wanted.unwrap_or(*available.last().expect("portable is always available"));
            tracing::debug!(isa = isa.name(), "Kernel instruction set chosen.");
            isa
        })
    }

    /// The name used in logs, benchmarks and `PIPELINE_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// Defines `$name(isa, args…)` that runs the generic body `$body::<Target>(args…)` compiled for
/// `isa`. The body must be `#[inline(always)]` so that each copy is vectorized for its target.
macro_rules! dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty => $body:ident) => {
        $(#[$meta])*
        $vis fn $name(isa: $crate::kernels::Isa, $($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) -> $ret {
                $body::<$crate::kernels::math::Avx2>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,fma")]
            fn avx512($($arg: $ty),*) -> $ret {
                $body::<$crate::kernels::math::Avx512>($($arg),*)
            }
            match isa {
                // SAFETY: `Isa::available` only offers these when the CPU has the features.
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Isa::Avx2 => unsafe { avx2($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Isa::Avx512 => unsafe { avx512($($arg),*) },
                _ => $body::<$crate::kernels::math::Portable>($($arg),*),
            }
        }
    };
}
pub(crate) use dispatch;
