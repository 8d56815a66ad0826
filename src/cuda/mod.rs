//! The device layer: the only code that touches CUDA.
