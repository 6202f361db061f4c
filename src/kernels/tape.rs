//! Reverse-mode differentiation of f64 code, for the naive references: a reference written
//! once over a [`Scalar`] runs on f64 to give values and on [`Var`]s of a [`Tape`] to give
//! exact gradients, against which a hand-written fast backward pass is held. Slow (one tape
//! node per operation) and only for tests and benchmarks of small images.

use std::cell::RefCell;
use std::ops::{Add, AddAssign, Mul, Neg, Sub};

/// What the references compute with: f64, or a [`Var`] on a tape.
pub trait Scalar:
    Copy
    + std::fmt::Debug
    + From<f64>
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Neg<Output = Self>
    + AddAssign
{
    /// 1 / (1 + e^−x).
    fn sigmoid(self) -> Self;
    /// tanh x.
    fn tanh(self) -> Self;
    /// max(x, 0).
    fn relu(self) -> Self;
    /// log σ(x), computed without overflow.
    fn log_sigmoid(self) -> Self;
    /// e^x.
    fn exp(self) -> Self;
    /// ln x (x > 0).
    fn ln(self) -> Self;
    /// The value.
    fn value(self) -> f64;
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

impl Scalar for f64 {
    fn sigmoid(self) -> f64 {
        sigmoid(self)
    }
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
    fn relu(self) -> f64 {
        self.max(0.0)
    }
    fn log_sigmoid(self) -> f64 {
        log_sigmoid(self)
    }
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    fn value(self) -> f64 {
        self
    }
}

/// The record of every operation on its [`Var`]s: for each node, its parents and the partial
/// derivative of the node with respect to each.
#[derive(Debug, Default)]
pub struct Tape {
    nodes: RefCell<Vec<Vec<(usize, f64)>>>,
}

/// A value on a [`Tape`] (or a constant, on none).
#[derive(Debug, Clone, Copy)]
pub struct Var<'t> {
    tape: Option<&'t Tape>,
    index: usize,
    value: f64,
}

impl Tape {
    /// An empty tape.
    pub fn new() -> Self {
        Self::default()
    }

    /// A leaf: an input to differentiate with respect to.
    pub fn var(&self, value: f64) -> Var<'_> {
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(Vec::new());
        Var {
            tape: Some(self),
            index: nodes.len() - 1,
            value,
        }
    }

    fn push(&self, parents: Vec<(usize, f64)>) -> usize {
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(parents);
        nodes.len() - 1
    }

    /// ∂`output`/∂node for every node of the tape, by one backward sweep.
    pub fn gradient(&self, output: Var<'_>) -> Vec<f64> {
        let nodes = self.nodes.borrow();
        let mut grad = vec![0.0; nodes.len()];
        if output.tape.is_none() {
            return grad;
        }
        grad[output.index] = 1.0;
        for i in (0..nodes.len()).rev() {
            let g = grad[i];
            if g != 0.0 {
                for &(parent, partial) in &nodes[i] {
                    grad[parent] += g * partial;
                }
            }
        }
        grad
    }
}

impl<'t> Var<'t> {
    /// Where the variable is on its tape (for reading its gradient), if it is on one.
    pub fn index(self) -> Option<usize> {
        self.tape.map(|_| self.index)
    }

    /// A result of `value` with `parents` (variable, ∂result/∂variable).
    fn node(value: f64, parents: [(Var<'t>, f64); 2]) -> Self {
        let tape = parents.iter().find_map(|(v, _)| v.tape);
        let Some(tape) = tape else {
            return Var {
                tape: None,
                index: 0,
                value,
            };
        };
        let edges = parents
            .iter()
            .filter(|(v, _)| v.tape.is_some())
            .map(|(v, d)| (v.index, *d))
            .collect();
        Var {
            tape: Some(tape),
            index: tape.push(edges),
            value,
        }
    }

    fn unary(self, value: f64, derivative: f64) -> Self {
        Self::node(value, [(self, derivative), (Self::from(0.0), 0.0)])
    }
}

impl From<f64> for Var<'_> {
    fn from(value: f64) -> Self {
        Var {
            tape: None,
            index: 0,
            value,
        }
    }
}

impl<'t> Add for Var<'t> {
    type Output = Var<'t>;
    fn add(self, o: Self) -> Self {
        Self::node(self.value + o.value, [(self, 1.0), (o, 1.0)])
    }
}

impl<'t> Sub for Var<'t> {
    type Output = Var<'t>;
    fn sub(self, o: Self) -> Self {
        Self::node(self.value - o.value, [(self, 1.0), (o, -1.0)])
    }
}

impl<'t> Mul for Var<'t> {
    type Output = Var<'t>;
    fn mul(self, o: Self) -> Self {
        Self::node(self.value * o.value, [(self, o.value), (o, self.value)])
    }
}

impl<'t> Neg for Var<'t> {
    type Output = Var<'t>;
    fn neg(self) -> Self {
        self.unary(-self.value, -1.0)
    }
}

impl AddAssign for Var<'_> {
    fn add_assign(&mut self, o: Self) {
        *self = *self + o;
    }
}

impl Scalar for Var<'_> {
    fn sigmoid(self) -> Self {
        let s = sigmoid(self.value);
        self.unary(s, s * (1.0 - s))
    }
    fn tanh(self) -> Self {
        let t = self.value.tanh();
        self.unary(t, 1.0 - t * t)
    }
    fn relu(self) -> Self {
        if self.value > 0.0 {
            self.unary(self.value, 1.0)
        } else {
            self.unary(0.0, 0.0)
        }
    }
    fn log_sigmoid(self) -> Self {
        self.unary(log_sigmoid(self.value), sigmoid(-self.value))
    }
    fn exp(self) -> Self {
        let e = self.value.exp();
        self.unary(e, e)
    }
    fn ln(self) -> Self {
        self.unary(self.value.ln(), 1.0 / self.value)
    }
    fn value(self) -> f64 {
        self.value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tape's derivatives of a small expression agree with central differences.
    #[test]
    fn the_tape_differentiates_like_finite_differences() {
        fn f<T: Scalar>(x: &[T]) -> T {
            let a = (x[0] * x[1]).sigmoid() + x[2].tanh() * x[0] - x[1].relu();
            (a * a + -x[2]).log_sigmoid() + (x[0].exp() + x[1] * x[1]).ln()
        }
        let at = [0.3, -0.7, 1.1];
        let tape = Tape::new();
        let vars: Vec<Var<'_>> = at.iter().map(|&v| tape.var(v)).collect();
        let out = f(&vars);
        let grad = tape.gradient(out);
        for i in 0..3 {
            let shifted = |d: f64| {
                let mut p = at;
                p[i] += d;
                f(&p)
            };
            let numeric = (shifted(1e-6) - shifted(-1e-6)) / 2e-6;
            let analytic = grad[vars[i].index().unwrap()];
            assert!(
                (numeric - analytic).abs() < 1e-7,
                "{i}: {numeric} vs {analytic}"
            );
        }
    }
}
