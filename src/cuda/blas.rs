//! The bf16 GEMM through cuBLASLt, with a row-major API.
//!
//! `linear`: `y[m, n] = x[m, k] · w[n, k]ᵀ (+ bias[n]) (+ y if accumulate)`, the shape of every
//! projection in the model (PyTorch's `Linear` stores `w` as `[out, in]`). bf16 operands, f32
//! compute and f32 scale, bf16 output; `linear_f32` the same into an f32 output.
//!
//! **The bias is in the output's type**: bf16 for `linear`, f32 for `linear_f32`. cuBLASLt's
//! documentation of `CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE` says the bias has the type of D, with
//! exceptions for IMMA and FP8 kernels only; a bf16 bias beside an f32 D (bf16 A/B, COMPUTE_32F)
//! is not a documented combination, so the f32 GEMM takes an f32 bias (the weights prepare the
//! biases of the projections into the f32 residual streams in f32, the bf16 values widened).
//!
//! Row-major to column-major, once: a row-major `[r, c]` matrix is a column-major `[c, r]` one.
//! So `Y = X·Wᵀ` (row-major) is `Yᶜ = Wᶜᵀ·Xᶜ` (column-major, `Yᶜ` is n×m): cuBLAS's A is `w`
//! (k×n, ld k, transposed), B is `x` (k×m, ld k), C is `y` (n×m, ld n). The bias epilogue adds a
//! vector along C's rows, i.e. one value per output feature.
//!
//! **Batch invariance.** Measured on the H200 (`jv4-bench blas-survey`, benches/NOTES.md): every
//! cuBLASLt algorithm without split-K gives the same bits for a row of `y` (whatever its tile,
//! cluster shape or kernel, at any height `m`), while each split-K count gives other bits. So the
//! plans take, at each height, the heuristic's best algorithm **without split-K**: the reduction
//! order over K of an output element then does not depend on `m`, and a request's vectors do not
//! depend on what shares its forward. `JV4_BLAS_INVARIANT=0` lets the heuristic split K (faster for
//! a few small-`m` shapes, not batch-invariant); a problem with no unsplit algorithm takes the
//! heuristic's first and [`Blas::invariance_fallbacks`] counts it.
//!
//! **Under compute-sanitizer initcheck** (`JV4_SANITIZE_MARK_GEMM=1`, set by the sanitize stage
//! only): each non-accumulating GEMM's output region (`m` rows of `n` values, `ldy` apart, nothing
//! else) is cleared by a memset just before the GEMM overwrites it. initcheck does not see the
//! stores of cuBLASLt's Hopper kernels (`probe_gemm_output_read_by_a_kernel`), so without this
//! every read of a GEMM's output would be reported; with it, a read of anything a GEMM was not
//! asked to write is still caught. Off by default: it costs one memset per GEMM.
//!
//! Each distinct problem (m, n, k, bias, accumulate) gets a plan on first use: descriptors and the
//! algorithm, cached. Repeating a shape costs no heuristic query and no allocation.
//! The cache is an LRU of [`DEFAULT_PLAN_CAPACITY`] plans ([`Blas::set_plan_capacity`]): every
//! new token count is a new `m`, so an unbounded cache would grow for as long as a host runs.

use std::cell::RefCell;
use std::ffi::c_void;

use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{sys as dsys, CudaStream};
use half::bf16;

use super::cuda_err;
use super::lru::Lru;
use super::tensor::{DView, DViewMut};
use crate::{Error, Result};

/// Plans kept by default: a forward uses a few dozen shapes per token count, so this holds the
/// plans of the last ~20 distinct token counts.
pub const DEFAULT_PLAN_CAPACITY: usize = 1024;

/// cuBLASLt workspace: NVIDIA's recommendation for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Heuristic candidates looked at per problem for one without split-K.
const CANDIDATES: usize = 16;

/// Whether the plans keep to unsplit algorithms: unless `$JV4_BLAS_INVARIANT=0`.
fn invariant_from_env() -> bool {
    std::env::var("JV4_BLAS_INVARIANT").map_or(true, |v| v != "0")
}

/// `$JV4_SANITIZE_MARK_GEMM=1`: clear each GEMM's output first (module documentation).
fn mark_outputs_from_env() -> bool {
    std::env::var("JV4_SANITIZE_MARK_GEMM").is_ok_and(|v| v.trim() == "1")
}

fn blas_err(what: &str, e: lt::CublasError) -> Error {
    Error::Blas(format!("{what}: {e:?}"))
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    bias: bool,
    accumulate: bool,
    out_f32: bool,
    /// Row strides (elements) of x and y: k and n unless they are column windows of wider
    /// buffers ([`Blas::linear_cols`]).
    ldx: usize,
    ldy: usize,
}

impl Key {
    /// A dense bf16 problem without bias or accumulation (the research entry points').
    fn plain(m: usize, n: usize, k: usize) -> Key {
        Key { m, n, k, bias: false, accumulate: false, out_f32: false, ldx: k, ldy: n }
    }
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created in Blas::plan and is destroyed once, here.
        unsafe {
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// cuBLASLt handle, workspace and plan cache. Used from one thread (the one that drives the GPU).
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: dsys::CUdeviceptr,
    stream: dsys::CUstream,
    plans: RefCell<Lru<Key, Plan>>,
    /// Plans keep to algorithms without split-K (module documentation).
    invariant: bool,
    invariance_fallbacks: std::cell::Cell<u64>,
    /// Clear each non-accumulating GEMM's output first (sanitize runs; module documentation).
    mark_outputs: bool,
}

impl Blas {
    pub(crate) fn new(stream: &CudaStream) -> Result<Self> {
        // SAFETY: only tries to dlopen libcublasLt.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoGpu(
                "cuBLASLt (libcublasLt.so.13) was not found; install CUDA 13's cuBLAS or add its \
                 lib folder to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let invariant = invariant_from_env();
        let handle = lt::create_handle().map_err(|e| blas_err("create handle", e))?;
        // SAFETY: plain device allocation, freed in Drop.
        let workspace = unsafe { cudarc::driver::result::malloc_sync(WORKSPACE_BYTES) }
            .map_err(|e| cuda_err("allocate the cuBLASLt workspace", e))?;
        Ok(Blas {
            handle,
            workspace,
            stream: stream.cu_stream(),
            plans: RefCell::new(Lru::new(DEFAULT_PLAN_CAPACITY)),
            invariant,
            invariance_fallbacks: std::cell::Cell::new(0),
            mark_outputs: mark_outputs_from_env(),
        })
    }

    /// `y = x·wᵀ (+ bias) (+ y)`; see the module documentation. Shapes: x `[m, k]`, w `[n, k]`,
    /// bias `[n]`, y `[m, n]`.
    pub fn linear(
        &self,
        x: &DView<'_, bf16>,
        w: &DView<'_, bf16>,
        bias: Option<&DView<'_, bf16>>,
        y: &mut DViewMut<'_, bf16>,
        accumulate: bool,
    ) -> Result<()> {
        self.gemm_dense(x, w, bias.map(Bias::of), y.ptr(), y.shape(), false, accumulate)
    }

    /// [`Blas::linear`] with an f32 output and an f32 bias (module documentation): `y [m, n]
    /// (f32) = x·wᵀ (+ bias) (+ y)`. The decoder and the vision tower accumulate their residual
    /// streams this way, so adding a projection rounds nothing to bf16.
    pub fn linear_f32(
        &self,
        x: &DView<'_, bf16>,
        w: &DView<'_, bf16>,
        bias: Option<&DView<'_, f32>>,
        y: &mut DViewMut<'_, f32>,
        accumulate: bool,
    ) -> Result<()> {
        self.gemm_dense(x, w, bias.map(Bias::of), y.ptr(), y.shape(), true, accumulate)
    }

    /// [`Blas::linear`] within one row-major buffer `xt [m, ld]`: `xt[:, y_col..y_col + n] =
    /// xt[:, ..k] · w [n, k]ᵀ`, the input columns before the output ones (`y_col ≥ k`), the other
    /// columns untouched. The folded LoRA's shrink writes `t` beside the `x` it reads this way.
    pub fn linear_cols(
        &self,
        xt: &mut DViewMut<'_, bf16>,
        k: usize,
        w: &DView<'_, bf16>,
        y_col: usize,
    ) -> Result<()> {
        let (&[m, ld], &[n, kw]) = (xt.shape(), w.shape()) else {
            return Err(Error::Shape {
                op: "linear_cols",
                msg: format!("xt {:?} and w {:?} must be 2-D", xt.shape(), w.shape()),
            });
        };
        if k != kw || y_col < k || y_col + n > ld {
            return Err(Error::Shape {
                op: "linear_cols",
                msg: format!(
                    "xt {:?}: columns ..{k} · w {:?}ᵀ -> columns {y_col}..{}: expected w [n, k] and k ≤ y_col, y_col + n ≤ {ld}",
                    xt.shape(),
                    w.shape(),
                    y_col + n
                ),
            });
        }
        let y = xt.ptr() + (y_col * std::mem::size_of::<bf16>()) as u64;
        self.gemm(Operands { x: xt.ptr(), w, bias: None, y, m, n, k, ldx: ld, ldy: ld }, false, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm_dense(
        &self,
        x: &DView<'_, bf16>,
        w: &DView<'_, bf16>,
        bias: Option<Bias<'_>>,
        y_ptr: dsys::CUdeviceptr,
        y_shape: &[usize],
        out_f32: bool,
        accumulate: bool,
    ) -> Result<()> {
        let shape_err = |msg: String| Error::Shape { op: "linear", msg };
        let (&[m, k], &[n, k2]) = (x.shape(), w.shape()) else {
            return Err(shape_err(format!("x {:?} and w {:?} must be 2-D", x.shape(), w.shape())));
        };
        if k != k2 || y_shape != [m, n] {
            return Err(shape_err(format!(
                "x {:?} · w {:?}ᵀ -> y {:?}: expected x [m, k], w [n, k], y [m, n]",
                x.shape(),
                w.shape(),
                y_shape
            )));
        }
        self.gemm(Operands { x: x.ptr(), w, bias, y: y_ptr, m, n, k, ldx: k, ldy: n }, out_f32, accumulate)
    }

    fn gemm(&self, o: Operands<'_, '_>, out_f32: bool, accumulate: bool) -> Result<()> {
        let Operands { x, w, bias, y, m, n, k, ldx, ldy } = o;
        if let Some(b) = bias {
            if b.shape != [n] {
                return Err(Error::Shape {
                    op: "linear",
                    msg: format!("bias {:?}, expected [{n}]", b.shape),
                });
            }
        }
        if m == 0 || n == 0 || k == 0 {
            return Err(Error::Shape { op: "linear", msg: format!("empty problem m={m} n={n} k={k}") });
        }
        let key = Key { m, n, k, bias: bias.is_some(), accumulate, out_f32, ldx, ldy };
        let mut plans = self.plans.borrow_mut();
        // An evicted plan's descriptors are destroyed at once: cuBLASLt reads them when a
        // matmul is enqueued, not when it runs.
        let plan = plans.get_or_try_insert(key, || self.plan(key))?;
        if let Some(b) = bias {
            set_desc(
                plan.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &b.ptr,
            )?;
        }
        if self.mark_outputs && !accumulate {
            let elem = if out_f32 { 4 } else { 2 };
            // SAFETY: y holds m rows of n elements, ldy elements apart (the callers checked it):
            // the memset writes exactly the region the GEMM is about to overwrite.
            unsafe { dsys::cuMemsetD2D8Async(y, ldy * elem, 0, n * elem, m, self.stream) }
                .result()
                .map_err(|e| super::cuda_err("clear a GEMM's output (JV4_SANITIZE_MARK_GEMM)", e))?;
        }
        // SAFETY: the callers checked the shapes against the layouts of this plan (x [m, ldx]
        // reading k columns, w [n, k], y n columns of rows ldy apart); all pointers are live
        // device allocations of those sizes.
        unsafe { self.enqueue(plan, w.ptr(), x, y, accumulate) }
            .map_err(|e| blas_err(&format!("matmul m={m} n={n} k={k}"), e))
    }

    /// Enqueues `y = x·wᵀ (+ y when accumulate)` with `plan`'s descriptors and algorithm.
    ///
    /// # Safety
    /// `w`, `x` and `y` must be live device allocations of the sizes `plan`'s layouts describe.
    unsafe fn enqueue(
        &self,
        plan: &Plan,
        w: dsys::CUdeviceptr,
        x: dsys::CUdeviceptr,
        y: dsys::CUdeviceptr,
        accumulate: bool,
    ) -> std::result::Result<(), lt::CublasError> {
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0 };
        let [la, lb, lc] = plan.layouts;
        // SAFETY: the caller guarantees the operands; the descriptors are live (cuBLASLt reads
        // them at enqueue time) and the workspace is ours.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                la,
                x as *const c_void,
                lb,
                y as *const c_void,
                lc,
                y as *mut c_void,
                lc,
                &plan.algo,
                self.workspace as *mut c_void,
                WORKSPACE_BYTES,
                self.stream as sys::cudaStream_t,
            )
        }
    }

    /// Whether cuBLASLt's check accepts `algo` for `plan`'s problem within the workspace.
    fn accepts(
        &self,
        plan: &Plan,
        algo: &sys::cublasLtMatmulAlgo_t,
    ) -> std::result::Result<(), sys::cublasStatus_t> {
        let [a, b, c] = plan.layouts;
        // SAFETY: plain data the check fills.
        let mut res: sys::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
        // SAFETY: all handles are live; `res` is a valid output location.
        let st = unsafe { sys::cublasLtMatmulAlgoCheck(self.handle, plan.desc, a, b, c, c, algo, &mut res) };
        match st {
            sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS if res.workspaceSize <= WORKSPACE_BYTES => Ok(()),
            sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS => {
                Err(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)
            }
            e => Err(e),
        }
    }

    /// Number of cached plans (distinct recent problem shapes, at most the capacity).
    pub fn plan_count(&self) -> usize {
        self.plans.borrow().len()
    }

    /// Changes how many plans are kept (at least one); the least recently used go first.
    pub fn set_plan_capacity(&self, plans: usize) {
        self.plans.borrow_mut().set_capacity(plans);
    }

    /// Whether the plans keep to algorithms without split-K (batch-invariant GEMMs; module
    /// documentation).
    pub fn invariant(&self) -> bool {
        self.invariant
    }

    /// Problems that found no algorithm without split-K among the heuristic's candidates (each
    /// runs a split one: not batch-invariant).
    pub fn invariance_fallbacks(&self) -> u64 {
        self.invariance_fallbacks.get()
    }

    /// Plans dropped so far to stay within the capacity.
    pub fn plan_evictions(&self) -> u64 {
        self.plans.borrow().evictions()
    }

    fn plan(&self, key: Key) -> Result<Plan> {
        let Key { m, n, k, .. } = key;
        let mut plan = self.descriptors(key)?;
        let count = if self.invariant { CANDIDATES } else { 1 };
        let found = self.heuristics(&plan, count).map_err(|e| {
            let out = if key.out_f32 { "f32" } else { "bf16" };
            Error::Blas(format!("{e} for m={m} n={n} k={k} ({out} output, bias {})", key.bias))
        })?;
        // The heuristic's best unsplit algorithm; else (small m, long k: all its candidates split
        // K) the first candidate that runs with its split-K count forced to 1.
        let unsplit = found
            .iter()
            .find(|a| algo_config(a)[3] <= 1)
            .copied()
            .or_else(|| found.iter().find_map(|a| self.unsplit(&plan, a)));
        plan.algo = match (unsplit.as_ref(), found.first()) {
            (Some(a), _) if self.invariant => *a,
            (_, Some(a)) => {
                if self.invariant {
                    self.invariance_fallbacks.set(self.invariance_fallbacks.get() + 1);
                }
                *a
            }
            (_, None) => {
                let (out, bias) = (if key.out_f32 { "f32" } else { "bf16" }, key.bias);
                return Err(Error::Blas(format!(
                    "no algorithm for m={m} n={n} k={k} ({out} output, bias {bias}, accumulate {})",
                    key.accumulate
                )));
            }
        };
        Ok(plan)
    }

    /// `algo` with split-K off (count 1, no reduction), if cuBLASLt's check accepts it for `plan`.
    fn unsplit(&self, plan: &Plan, algo: &sys::cublasLtMatmulAlgo_t) -> Option<sys::cublasLtMatmulAlgo_t> {
        use sys::cublasLtMatmulAlgoConfigAttributes_t as C;
        let mut a = *algo;
        let (one, none) = (1i32, 0u32);
        // SAFETY: `a` is plain data owned here; each attribute is passed by address with its size.
        let set = unsafe {
            sys::cublasLtMatmulAlgoConfigSetAttribute(
                &mut a,
                C::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
                &one as *const i32 as *const c_void,
                4,
            ) == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && sys::cublasLtMatmulAlgoConfigSetAttribute(
                    &mut a,
                    C::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
                    &none as *const u32 as *const c_void,
                    4,
                ) == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
        };
        let ok = set && self.accepts(plan, &a).is_ok();
        ok.then_some(a)
    }

    /// The heuristic's first `count` algorithms for a planned problem, best first.
    fn heuristics(&self, plan: &Plan, count: usize) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        let [a, b, c] = plan.layouts;
        let pref = self.preference().map_err(|e| blas_err("create preference", e))?;
        // SAFETY: plain data the heuristic fills.
        let mut res: Vec<sys::cublasLtMatmulHeuristicResult_t> = vec![unsafe { std::mem::zeroed() }; count];
        let mut found = 0i32;
        // SAFETY: all handles are live; `res` has room for `count` results.
        let st = unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                plan.desc,
                a,
                b,
                c,
                c,
                pref,
                count as i32,
                res.as_mut_ptr(),
                &mut found,
            )
        };
        // SAFETY: created by `preference`, not used again.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        if st != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(Error::Blas(format!("algorithm heuristic: {st:?}")));
        }
        Ok(res[..found.max(0) as usize]
            .iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect())
    }

    /// The descriptor and layouts of a problem (its algorithm still to choose).
    fn descriptors(&self, key: Key) -> Result<Plan> {
        let Key { m, n, k, bias, out_f32, ldx, ldy, .. } = key;
        let bf = sys::cudaDataType_t::CUDA_R_16BF;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| blas_err("create matmul desc", e))?;
        let a = lt::create_matrix_layout(bf, k as u64, n as u64, k as i64);
        let b = lt::create_matrix_layout(bf, k as u64, m as u64, ldx as i64);
        let out_type = if out_f32 { sys::cudaDataType_t::CUDA_R_32F } else { bf };
        let c = lt::create_matrix_layout(out_type, n as u64, m as u64, ldy as i64);
        let (a, b, c) = match (a, b, c) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            (a, b, c) => {
                let e = [a, b, c].into_iter().find_map(|r| r.err()).unwrap();
                return Err(blas_err("create matrix layout", e));
            }
        };
        let plan = Plan { desc, layouts: [a, b, c], algo: unsafe_zeroed_algo() };
        use sys::cublasLtMatmulDescAttributes_t as A;
        // cublasOperation_t values: 0 = N, 1 = T (an int32 attribute).
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSC, &0i32)?;
        let epilogue = if bias {
            // The bias in the output's type (module documentation).
            set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &out_type)?;
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS
        } else {
            sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT
        };
        set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        Ok(plan)
    }

    /// The search preference every problem uses: the workspace size, and split-K reductions in
    /// f32 only. The caller destroys it.
    fn preference(&self) -> std::result::Result<sys::cublasLtMatmulPreference_t, lt::CublasError> {
        let pref = lt::create_matmul_pref()?;
        let ws = WORKSPACE_BYTES as u64;
        // SAFETY: pref is live; the attribute is a u64 passed by address.
        let r = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
        };
        // Split-K partial sums only in f32 (the compute type, in the workspace): the in-place and
        // output-type reductions add them up in the bf16 output, one rounding per partial. (The
        // linear test's accumulating case of the vision down projection, m 129, k 3420, was off
        // by ~2 bf16 ulps of the old y under the default mask.)
        // `JV4_BLAS_REDUCTION=any` lifts the restriction (a research switch, to measure its cost).
        let reduction = if std::env::var("JV4_BLAS_REDUCTION").is_ok_and(|v| v == "any") {
            sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_MASK as u32
        } else {
            sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32
        };
        // SAFETY: pref is live; the attribute is a u32 passed by address.
        let r = r.and_then(|_| unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                &reduction as *const u32 as *const c_void,
                std::mem::size_of::<u32>(),
            )
        });
        if let Err(e) = r {
            // SAFETY: created above, not used again.
            unsafe {
                let _ = lt::destroy_matmul_pref(pref);
            }
            return Err(e);
        }
        Ok(pref)
    }
}

/// A bias vector on the device: its address and shape (its type is the output's).
#[derive(Clone, Copy)]
struct Bias<'s> {
    ptr: dsys::CUdeviceptr,
    shape: &'s [usize],
}

impl<'s> Bias<'s> {
    fn of<T>(b: &'s DView<'_, T>) -> Bias<'s> {
        Bias { ptr: b.ptr(), shape: b.shape() }
    }
}

/// The operands of one GEMM: x `[m, k]` read with rows `ldx` apart, w `[n, k]`, y `[m, n]`
/// written with rows `ldy` apart, the bias (if any) in y's type.
struct Operands<'w, 'a> {
    x: dsys::CUdeviceptr,
    w: &'w DView<'a, bf16>,
    bias: Option<Bias<'w>>,
    y: dsys::CUdeviceptr,
    m: usize,
    n: usize,
    k: usize,
    ldx: usize,
    ldy: usize,
}

/// A cuBLASLt algorithm with its configuration, for research ([`Blas::survey`]).
#[derive(Clone, Copy)]
pub struct Algo {
    raw: sys::cublasLtMatmulAlgo_t,
    /// (id, tile, stages, split-K, reduction scheme, swizzle, custom option, inner shape,
    /// cluster shape): the configuration attributes.
    pub config: [u64; 9],
}

impl std::fmt::Display for Algo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.config;
        write!(
            f,
            "id{} tile{} st{} sk{} red{} sw{} cu{} in{} cl{}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]
        )
    }
}

impl Blas {
    /// Research: the heuristic's first `count` algorithms for `y [m, n] (bf16) = x·wᵀ`.
    pub fn survey(&self, m: usize, n: usize, k: usize, count: usize) -> Result<Vec<Algo>> {
        let plan = self.descriptors(Key::plain(m, n, k))?;
        Ok(self
            .heuristics(&plan, count)?
            .into_iter()
            .map(|raw| Algo { raw, config: algo_config(&raw) })
            .collect())
    }

    /// Research: `y = x·wᵀ` (bf16, no bias) with algorithm `algo`; an error when cuBLASLt's
    /// check refuses it for this problem.
    pub fn linear_with(
        &self,
        algo: &Algo,
        x: &DView<'_, bf16>,
        w: &DView<'_, bf16>,
        y: &mut DViewMut<'_, bf16>,
    ) -> Result<()> {
        let shapes = format!("x {:?} · w {:?}ᵀ -> y {:?}", x.shape(), w.shape(), y.shape());
        let (&[m, k], &[n, k2]) = (x.shape(), w.shape()) else {
            return Err(Error::Shape { op: "linear_with", msg: shapes });
        };
        if k != k2 || y.shape() != [m, n] {
            return Err(Error::Shape { op: "linear_with", msg: shapes });
        }
        let mut plan = self.descriptors(Key::plain(m, n, k))?;
        if let Err(st) = self.accepts(&plan, &algo.raw) {
            return Err(Error::Blas(format!("{algo} refused for m={m} n={n} k={k}: {st:?}")));
        }
        plan.algo = algo.raw;
        // SAFETY: x [m, k], w [n, k] and y [m, n] (checked) are the live allocations the layouts
        // describe.
        unsafe { self.enqueue(&plan, w.ptr(), x.ptr(), y.ptr(), false) }.map_err(|e| blas_err("matmul", e))
    }
}

/// An algorithm's configuration attributes: (id, tile, stages, split-K, reduction scheme,
/// swizzle, custom option, inner shape, cluster shape); an unreadable one reads 0.
fn algo_config(algo: &sys::cublasLtMatmulAlgo_t) -> [u64; 9] {
    use sys::cublasLtMatmulAlgoConfigAttributes_t as C;
    // (attribute, its size in bytes: cuBLASLt refuses any other size).
    let attrs = [
        (C::CUBLASLT_ALGO_CONFIG_ID, 4),
        (C::CUBLASLT_ALGO_CONFIG_TILE_ID, 4),
        (C::CUBLASLT_ALGO_CONFIG_STAGES_ID, 4),
        (C::CUBLASLT_ALGO_CONFIG_SPLITK_NUM, 4),
        (C::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, 4),
        (C::CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, 4),
        (C::CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, 4),
        (C::CUBLASLT_ALGO_CONFIG_INNER_SHAPE_ID, 2),
        (C::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, 2),
    ];
    let mut config = [0u64; 9];
    for (v, (attr, size)) in config.iter_mut().zip(attrs) {
        let mut buf = [0u8; 8];
        let mut written = 0usize;
        // SAFETY: the algo is plain data; the attribute (`size` ≤ 8 bytes) is written to buf.
        let _ = unsafe {
            sys::cublasLtMatmulAlgoConfigGetAttribute(
                algo,
                attr,
                buf.as_mut_ptr() as *mut c_void,
                size,
                &mut written,
            )
        };
        *v = u64::from_le_bytes(buf);
    }
    config
}

/// Sets one matmul-descriptor attribute from a plain value (passed by address and size).
fn set_desc<T: Copy>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    // SAFETY: desc is live; value points to size_of::<T>() readable bytes, the attribute's size.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            attr,
            value as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
    .map_err(|e| blas_err("set matmul attribute", e))
}

fn unsafe_zeroed_algo() -> sys::cublasLtMatmulAlgo_t {
    // SAFETY: cublasLtMatmulAlgo_t is plain data (an array of u64); zero is a placeholder that
    // `plan` overwrites before the plan is used.
    unsafe { std::mem::zeroed() }
}

impl Drop for Blas {
    fn drop(&mut self) {
        self.plans.borrow_mut().clear();
        // SAFETY: handle and workspace were created in new() and are released once, here.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
            let _ = cudarc::driver::result::free_sync(self.workspace);
        }
    }
}
