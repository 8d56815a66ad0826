//! Plain f32 CPU versions of every op the kernels implement. Slow and obvious on purpose: they
//! are the oracle that GPU tests and benchmarks compare against.
