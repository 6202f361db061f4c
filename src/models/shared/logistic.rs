//! L2-penalized logistic regression on binary features, fitted exactly by Newton's method.
//!
//! Each conditional of an AR-k model, p(y = 1 | x) = σ(b + w·x) with x ∈ {0,1}^k, is its own
//! convex problem. Images repeat the same few context patterns (most of a digit's background is
//! blank), so the rows are first collapsed to distinct patterns with counts of y = 0 and y = 1;
//! each Newton step then costs O(U·k²) for U distinct patterns instead of O(n·k²).
//!
//! The objective maximized is Σ_rows log p(y | x) − (l2 / 2)·(|w|² + b²); the penalty on b
//! keeps a pixel that is always 0 (or 1) in the data at a finite logit.

use rustc_hash::FxHashMap;

/// Most features a context may have: patterns are keyed by a u64 bitmask.
pub const MAX_FEATURES: usize = 64;

/// Distinct binary feature patterns with how often each was seen with y = 0 and y = 1.
#[derive(Debug, Clone, Default)]
pub struct Patterns {
    counts: FxHashMap<u64, [u32; 2]>,
}

impl Patterns {
    /// Records one row: feature bitmask `x` and target `y`.
    pub fn add(&mut self, x: u64, y: bool) {
        self.counts.entry(x).or_default()[usize::from(y)] += 1;
    }

    /// Number of distinct patterns.
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    /// True when no row was added.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Patterns sorted by bitmask, so that sums run in the same order on every run.
    fn sorted(&self) -> Vec<(u64, [u32; 2])> {
        let mut v: Vec<_> = self.counts.iter().map(|(k, c)| (*k, *c)).collect();
        v.sort_unstable_by_key(|(k, _)| *k);
        v
    }
}

/// log σ(z), stable for large |z|.
pub fn log_sigmoid(z: f64) -> f64 {
    -((-z).max(0.0) + (-z.abs()).exp().ln_1p())
}

/// σ(z).
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

fn logit(beta: &[f64], x: u64, m: usize) -> f64 {
    let mut z = beta[m];
    let mut bits = x;
    while bits != 0 {
        let j = bits.trailing_zeros() as usize;
        z += beta[j];
        bits &= bits - 1;
    }
    z
}

/// The objective, its gradient and its negated Hessian (upper triangle) at one point.
struct Local {
    value: f64,
    grad: Vec<f64>,
    hess: Vec<f64>,
}

/// One pass over the patterns: objective, gradient and Hessian at `beta` together, sharing one
/// exp and one log1p per pattern. The Hessian is filled on and above the diagonal only.
fn local(patterns: &[(u64, [u32; 2])], beta: &[f64], l2: f64) -> Local {
    let size = beta.len();
    let m = size - 1;
    let mut grad: Vec<f64> = beta.iter().map(|b| -l2 * b).collect();
    let mut hess = vec![0.0; size * size];
    for i in 0..size {
        hess[i * size + i] = l2;
    }
    let mut value = -0.5 * l2 * beta.iter().map(|b| b * b).sum::<f64>();
    let mut on = Vec::with_capacity(size);
    for &(x, [n0, n1]) in patterns {
        let z = logit(beta, x, m);
        let e = (-z.abs()).exp();
        let soft = e.ln_1p();
        let p = if z >= 0.0 {
            1.0 / (1.0 + e)
        } else {
            e / (1.0 + e)
        };
        let (n0, n1) = (f64::from(n0), f64::from(n1));
        value += n1 * (z.min(0.0) - soft) + n0 * ((-z).min(0.0) - soft);
        let g = n1 - (n0 + n1) * p;
        let w = (n0 + n1) * p * (1.0 - p);
        on.clear();
        let mut bits = x;
        while bits != 0 {
            on.push(bits.trailing_zeros() as usize);
            bits &= bits - 1;
        }
        on.push(m);
        for (i, &a) in on.iter().enumerate() {
            grad[a] += g;
            let row = &mut hess[a * size..(a + 1) * size];
            for &b in &on[i..] {
                row[b] += w;
            }
        }
    }
    for i in 0..size {
        for j in 0..i {
            hess[i * size + j] = hess[j * size + i];
        }
    }
    Local { value, grad, hess }
}

/// Fits weights for `m` features (≤ 64) and a bias; returns `[w_0, …, w_{m-1}, b]`.
///
/// Newton steps with step halving until the largest change is below 1e-10 (or 100 steps).
/// `l2` must be positive: it makes the problem strictly concave, so the answer is unique.
pub fn fit(patterns: &Patterns, m: usize, l2: f64) -> Vec<f64> {
    assert!(m <= MAX_FEATURES && l2 > 0.0);
    let rows = patterns.sorted();
    let mut beta = vec![0.0; m + 1];
    let mut here = local(&rows, &beta, l2);
    for _ in 0..100 {
        let step = cholesky_solve(&here.hess, &here.grad, m + 1);
        let mut t = 1.0;
        let mut next = beta.clone();
        let mut there = None;
        for _ in 0..40 {
            for i in 0..=m {
                next[i] = beta[i] + t * step[i];
            }
            let candidate = local(&rows, &next, l2);
            if candidate.value >= here.value - 1e-12 * here.value.abs() {
                there = Some(candidate);
                break;
            }
            t *= 0.5;
        }
        let Some(there) = there else { break };
        let change = step.iter().map(|s| (t * s).abs()).fold(0.0, f64::max);
        beta = next;
        here = there;
        if change < 1e-10 {
            break;
        }
    }
    beta
}

/// Solves A·x = b for a symmetric positive-definite `n`×`n` matrix A (row-major).
pub fn cholesky_solve(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    // A = L·Lᵀ, then forward and back substitution.
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            if i == j {
                l[i * n + i] = s.max(f64::MIN_POSITIVE).sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    let mut y = vec![0.0; n];
    for i in 0..n {
        let s: f64 = (0..i).map(|k| l[i * n + k] * y[k]).sum();
        y[i] = (b[i] - s) / l[i * n + i];
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[k * n + i] * x[k]).sum();
        x[i] = (y[i] - s) / l[i * n + i];
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn cholesky_solves_an_spd_system() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 7;
        let m: Vec<f64> = (0..n * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        // A = MᵀM + I is symmetric positive definite.
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| m[k * n + i] * m[k * n + j]).sum::<f64>()
                    + if i == j { 1.0 } else { 0.0 };
            }
        }
        let b: Vec<f64> = (0..n).map(|i| i as f64 - 3.0).collect();
        let x = cholesky_solve(&a, &b, n);
        for i in 0..n {
            let r: f64 = (0..n).map(|j| a[i * n + j] * x[j]).sum::<f64>() - b[i];
            assert!(r.abs() < 1e-10, "residual {r}");
        }
    }

    /// The gradient of the penalized objective, summed naively row by row (no patterns).
    fn naive_gradient(rows: &[(Vec<bool>, bool)], beta: &[f64], l2: f64) -> Vec<f64> {
        let m = beta.len() - 1;
        let mut g: Vec<f64> = beta.iter().map(|b| -l2 * b).collect();
        for (x, y) in rows {
            let z = beta[m] + (0..m).filter(|&j| x[j]).map(|j| beta[j]).sum::<f64>();
            let r = f64::from(u8::from(*y)) - sigmoid(z);
            for j in 0..m {
                if x[j] {
                    g[j] += r;
                }
            }
            g[m] += r;
        }
        g
    }

    #[test]
    fn the_fit_is_the_penalized_optimum() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let m = 5;
        let truth = [1.5, -2.0, 0.5, 0.0, 3.0, -1.0];
        let rows: Vec<(Vec<bool>, bool)> = (0..3000)
            .map(|_| {
                let x: Vec<bool> = (0..m).map(|_| rng.random_bool(0.4)).collect();
                let z = truth[m] + (0..m).filter(|&j| x[j]).map(|j| truth[j]).sum::<f64>();
                (x, rng.random_bool(sigmoid(z)))
            })
            .collect();
        let mut p = Patterns::default();
        for (x, y) in &rows {
            let key = x
                .iter()
                .enumerate()
                .fold(0u64, |k, (j, &b)| k | (u64::from(b) << j));
            p.add(key, *y);
        }
        assert!(p.len() <= 32);
        let beta = fit(&p, m, 0.5);
        let g = naive_gradient(&rows, &beta, 0.5);
        assert!(
            g.iter().all(|v| v.abs() < 1e-6),
            "gradient at the fit: {g:?}"
        );
        for (b, t) in beta.iter().zip(truth) {
            assert!((b - t).abs() < 0.3, "{beta:?} vs {truth:?}");
        }
    }

    #[test]
    fn separable_data_stays_finite() {
        let mut p = Patterns::default();
        for _ in 0..100 {
            p.add(0b1, true);
            p.add(0b0, false);
        }
        let beta = fit(&p, 1, 1e-3);
        assert!(beta.iter().all(|b| b.is_finite()), "{beta:?}");
        assert!(beta[0] > 5.0);
    }

    #[test]
    fn log_sigmoid_is_stable() {
        assert!((log_sigmoid(0.0) + std::f64::consts::LN_2).abs() < 1e-15);
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert!(log_sigmoid(800.0).abs() < 1e-300);
    }
}
