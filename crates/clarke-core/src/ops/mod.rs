//! The op families. Each module holds the forward methods on [`Var`](crate::Var) and the
//! backward rules of one family.

pub mod arith;
pub mod kink;
pub mod linalg;
pub mod loss;
pub mod reduce;
pub mod shape;
pub mod unary;
