//! Fast numeric kernels for the models trained by gradient, each with a naive reference beside
//! it that the tests hold it to.
//!
//! The fast kernels are written once as plain, branch-free f32 loops over fixed-width chunks
//! ([`math::LANES`]) that LLVM vectorizes, and compiled three times: for AVX-512, for AVX2 + FMA,
//! and portable. [`Isa::detect`] picks the widest one the CPU has, once per process; the
//! environment variable `PIPELINE_ISA` (`avx512`, `avx2`, `portable`) narrows the choice for
//! benchmarks and tests, and naming one the CPU lacks is an error at start-up. Matrix products go
//! through ndarray's GEMM (matrixmultiply), except the thin ones of the recurrent kernels:
//! [`gemm`] has register tiles of its own for them.

pub mod gemm;
pub mod math;
pub mod nade;
pub mod pixelrnn;
pub mod rnade;
pub mod tape;

use std::sync::OnceLock;

/// An instruction set a fast kernel was compiled for, and which this CPU has.
///
/// Invariant: a value exists only for an instruction set the CPU runs. Its constructors are
/// [`Isa::available`], [`Isa::detect`] and [`Isa::named`], which all ask the CPU, and
/// [`Isa::PORTABLE`], which every CPU runs; so the safe dispatch functions the kernels export
/// can never execute an instruction the CPU lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Isa(Target);

/// The instruction sets, private so that only detection makes an [`Isa`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Target {
    /// Baseline x86-64 / any architecture: SSE2-width vectors, separate multiply and add.
    Portable,
    /// AVX2 with fused multiply-add (8 f32 lanes).
    Avx2,
    /// AVX-512F (16 f32 lanes).
    Avx512,
}

/// Every instruction set a kernel is compiled for, narrowest first.
const ALL: [Target; 3] = [Target::Portable, Target::Avx2, Target::Avx512];

/// The environment variable that narrows the kernels' instruction set.
pub const ISA_VAR: &str = "PIPELINE_ISA";

/// `PIPELINE_ISA` names an instruction set this program does not have, or one this CPU lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{name:?} {}; unset it, or name one this CPU runs: {}",
    if *.known { "is an instruction set this CPU lacks" } else { "is not an instruction set the kernels are built for" },
    Isa::available().iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
)]
pub struct IsaError {
    /// The name asked for.
    pub name: String,
    /// Whether the kernels are built for it (and the CPU lacks it).
    pub known: bool,
}

impl Isa {
    /// The portable kernels, which every CPU runs.
    pub const PORTABLE: Isa = Isa(Target::Portable);

    /// Every instruction set this CPU can run, narrowest first.
    pub fn available() -> Vec<Isa> {
        ALL.into_iter().filter(|&t| has(t)).map(Isa).collect()
    }

    /// The names of the instruction sets the kernels are built for that this CPU lacks.
    pub fn unavailable() -> Vec<&'static str> {
        ALL.into_iter()
            .filter(|&t| !has(t))
            .map(|t| Isa(t).name())
            .collect()
    }

    /// The instruction set called `name`, if this CPU has it.
    pub fn named(name: &str) -> Result<Isa, IsaError> {
        match ALL.into_iter().find(|&t| Isa(t).name() == name) {
            Some(t) if has(t) => Ok(Isa(t)),
            known => Err(IsaError {
                name: name.to_string(),
                known: known.is_some(),
            }),
        }
    }

    /// What `PIPELINE_ISA` asks for: nothing when it is unset or empty, an error when the CPU
    /// lacks what it names. The program checks it once at start-up, before any kernel runs.
    pub fn from_env() -> Result<Option<Isa>, IsaError> {
        match std::env::var(ISA_VAR) {
            Ok(name) if !name.is_empty() => Isa::named(&name).map(Some),
            _ => Ok(None),
        }
    }

    /// The instruction set the kernels use in this process: the one `PIPELINE_ISA` names, or
    /// else the widest available. Decided once. (A `PIPELINE_ISA` the CPU lacks is refused at
    /// start-up; were it not, this falls back to the widest available.)
    pub fn detect() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let widest = *Isa::available()
                .last()
                .expect("portable is always available");
            let isa = Isa::from_env().ok().flatten().unwrap_or(widest);
            tracing::debug!(isa = isa.name(), "Kernel instruction set chosen.");
            isa
        })
    }

    /// The name used in logs, benchmarks and `PIPELINE_ISA`.
    pub fn name(self) -> &'static str {
        match self.0 {
            Target::Portable => "portable",
            Target::Avx2 => "avx2",
            Target::Avx512 => "avx512",
        }
    }

    /// The instruction sets a test runs a kernel on: every one available, after saying on
    /// stderr which ones this CPU lacks and so are not tested here.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Vec<Isa> {
        let missing = Isa::unavailable();
        if !missing.is_empty() {
            eprintln!(
                "skipping kernels for {}: this CPU lacks them",
                missing.join(", ")
            );
        }
        Isa::available()
    }
}

/// Whether the CPU runs `target`.
fn has(target: Target) -> bool {
    match target {
        Target::Portable => true,
        #[cfg(target_arch = "x86_64")]
        Target::Avx2 => {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(target_arch = "x86_64")]
        Target::Avx512 => {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => false,
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
            match isa.target() {
                // SAFETY: an `Isa` exists only for an instruction set the CPU runs (its
                // invariant), so these features are present.
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Target::Avx2 => unsafe { avx2($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::kernels::Target::Avx512 => unsafe { avx512($($arg),*) },
                _ => $body::<$crate::kernels::math::Portable>($($arg),*),
            }
        }
    };
}
pub(crate) use dispatch;

impl Isa {
    /// For [`dispatch`]: which compiled copy to run.
    fn target(self) -> Target {
        self.0
    }
}
