//! Typed, validated launches of the kernels: one file per `kernels/*.cu`.
