// Kernels for the CUDA-graph decode engine (sparsify/engine/graph_decode.py), built on first use
// by sparsify/engine/decode_kernels.py with the local nvcc.
//
// 1. RMSNorm in one kernel. transformers' RMSNorm is eight small kernels (cast, square, mean,
//    add, rsqrt, multiply, cast, scale); at decode those are launch-latency bound, so one kernel
//    per norm shortens every layer of the dense teacher and of the skip model alike.
// 2. The same kernel, optionally, evaluates the skip gate on the normalised row it just wrote
//    (w . y + b > t in fp32), writes a per-row 0/1 mask and sets a CUDA graph conditional handle
//    when any row keeps the sublayer: the gate costs no kernel of its own.
// 3. CUDA graph conditional (IF) nodes for stream capture, for PyTorch builds that do not expose
//    them (torch < 2.12): the node is added where the capture stands, and a second stream captures
//    its body graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// CUDA 13 renamed the edge-data variants (the _v2/_v3 names of 12.x) to the plain names.
#if CUDART_VERSION >= 13000
#define CAPTURE_INFO cudaStreamGetCaptureInfo
#define ADD_NODE cudaGraphAddNode
#define UPDATE_DEPENDENCIES cudaStreamUpdateCaptureDependencies
#else
#define CAPTURE_INFO cudaStreamGetCaptureInfo_v3
#define ADD_NODE cudaGraphAddNode_v2
#define UPDATE_DEPENDENCIES cudaStreamUpdateCaptureDependencies_v2
#endif

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// Sum over the block; every thread gets the total. blockDim.x is a multiple of 32.
__device__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float w = threadIdx.x < (blockDim.x >> 5) ? scratch[threadIdx.x] : 0.f;
    for (int offset = 16; offset > 0; offset >>= 1) w += __shfl_down_sync(0xffffffffu, w, offset);
    if (threadIdx.x == 0) scratch[32] = w;
  }
  __syncthreads();
  float total = scratch[32];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

// One block per row. Numerics follow transformers' RMSNorm: y = x * rsqrt(mean(x^2) + eps) in
// fp32, rounded to T, then weight * y rounded to T. With a gate (gate_w != nullptr): the last
// block to finish sets the IF node's condition to "any row kept" and resets the counters in
// `scratch` (two uints, zero between launches).
template <typename T>
__global__ void rmsnorm_gate(const T* x, const T* norm_w, float eps, T* out, int width, const float* gate_w,
                             const float* gate_b, float t, T* mask, unsigned* scratch, cudaGraphConditionalHandle handle,
                             bool set_condition) {
  __shared__ float partial[33];
  const T* row_in = x + static_cast<size_t>(blockIdx.x) * width;
  T* row_out = out + static_cast<size_t>(blockIdx.x) * width;
  float squares = 0.f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float v = to_float(row_in[i]);
    squares += v * v;
  }
  float scale = rsqrtf(block_sum(squares, partial) / width + eps);
  float dot = 0.f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    T y = from_float<T>(to_float(row_in[i]) * scale);
    T o = from_float<T>(to_float(norm_w[i]) * to_float(y));
    row_out[i] = o;
    if (gate_w != nullptr) dot += to_float(o) * gate_w[i];
  }
  if (gate_w == nullptr) return;
  float logit = block_sum(dot, partial) + *gate_b;
  if (threadIdx.x != 0) return;
  bool keep = logit > t;
  if (mask != nullptr) mask[blockIdx.x] = from_float<T>(keep ? 1.f : 0.f);
  if (!set_condition) return;
  if (keep) atomicOr(&scratch[1], 1u);
  __threadfence();
  if (atomicAdd(&scratch[0], 1u) == gridDim.x - 1) {  // the last row's block decides
    unsigned any = atomicExch(&scratch[1], 0u);
    scratch[0] = 0u;
    cudaGraphSetConditional(handle, any ? 1u : 0u);
  }
}

static int threads_for(int width) {
  int threads = ((width / 4 + 31) / 32) * 32;
  return threads < 64 ? 64 : (threads > 1024 ? 1024 : threads);
}

template <typename T>
static void launch(cudaStream_t stream, const void* x, const void* w, float eps, void* out, int rows, int width,
                   const float* gate_w, const float* gate_b, float t, void* mask, unsigned* scratch,
                   cudaGraphConditionalHandle handle, bool set_condition) {
  rmsnorm_gate<T><<<rows, threads_for(width), 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(w), eps,
                                                           static_cast<T*>(out), width, gate_w, gate_b, t,
                                                           static_cast<T*>(mask), scratch, handle, set_condition);
}

static int dispatch(cudaStream_t stream, int dtype, const void* x, const void* w, float eps, void* out, int rows, int width,
                    const float* gate_w, const float* gate_b, float t, void* mask, unsigned* scratch,
                    cudaGraphConditionalHandle handle, bool set_condition) {
  if (dtype == 0) launch<float>(stream, x, w, eps, out, rows, width, gate_w, gate_b, t, mask, scratch, handle, set_condition);
  else if (dtype == 1) launch<__nv_bfloat16>(stream, x, w, eps, out, rows, width, gate_w, gate_b, t, mask, scratch, handle, set_condition);
  else if (dtype == 2) launch<__half>(stream, x, w, eps, out, rows, width, gate_w, gate_b, t, mask, scratch, handle, set_condition);
  else return -2;
  return cudaGetLastError();
}

// dtype: 0 float32, 1 bfloat16, 2 float16 (of x, the norm weight, out and mask; gate w and b are float32).
extern "C" int sparsify_rmsnorm(cudaStream_t stream, int dtype, const void* x, const void* w, float eps, void* out, int rows,
                                int width) {
  return dispatch(stream, dtype, x, w, eps, out, rows, width, nullptr, nullptr, 0.f, nullptr, nullptr, 0, false);
}

// Eagerly (no capture): the norm plus the per-row mask (mask != nullptr), no condition.
extern "C" int sparsify_rmsnorm_gate_mask(cudaStream_t stream, int dtype, const void* x, const void* w, float eps, void* out,
                                          int rows, int width, const float* gate_w, const float* gate_b, float t, void* mask) {
  return dispatch(stream, dtype, x, w, eps, out, rows, width, gate_w, gate_b, t, mask, nullptr, 0, false);
}

// During a capture on `capturing`: create a conditional handle in the graph being captured and add
// the kernel that sets it; *handle_out receives it for sparsify_begin_if.
extern "C" int sparsify_rmsnorm_gate_capture(cudaStream_t capturing, int dtype, const void* x, const void* w, float eps,
                                             void* out, int rows, int width, const float* gate_w, const float* gate_b, float t,
                                             void* mask, unsigned* scratch, unsigned long long* handle_out) {
  cudaStreamCaptureStatus status;
  cudaGraph_t graph;
  cudaError_t err = CAPTURE_INFO(capturing, &status, nullptr, &graph, nullptr, nullptr, nullptr);
  if (err != cudaSuccess) return err;
  if (status != cudaStreamCaptureStatusActive) return -1;
  cudaGraphConditionalHandle handle;
  if ((err = cudaGraphConditionalHandleCreate(&handle, graph, 0, 0)) != cudaSuccess) return err;
  *handle_out = handle;
  return dispatch(capturing, dtype, x, w, eps, out, rows, width, gate_w, gate_b, t, mask, scratch, handle, true);
}

// Add an IF node on `handle` after everything captured on `capturing` so far; the capture goes on
// after the node, and `body` captures the node's body graph until sparsify_end_if.
extern "C" int sparsify_begin_if(cudaStream_t capturing, unsigned long long handle, cudaStream_t body) {
  cudaStreamCaptureStatus status;
  cudaGraph_t graph;
  const cudaGraphNode_t* deps = nullptr;
  const cudaGraphEdgeData* edges = nullptr;
  size_t count = 0;
  cudaError_t err = CAPTURE_INFO(capturing, &status, nullptr, &graph, &deps, &edges, &count);
  if (err != cudaSuccess) return err;
  if (status != cudaStreamCaptureStatusActive) return -1;
  cudaGraphNodeParams params = {};
  params.type = cudaGraphNodeTypeConditional;
  params.conditional.handle = handle;
  params.conditional.type = cudaGraphCondTypeIf;
  params.conditional.size = 1;
  cudaGraphNode_t node;
  if ((err = ADD_NODE(&node, graph, deps, edges, count, &params)) != cudaSuccess) return err;
  if ((err = UPDATE_DEPENDENCIES(capturing, &node, nullptr, 1, cudaStreamSetCaptureDependencies)) != cudaSuccess) return err;
  return cudaStreamBeginCaptureToGraph(body, params.conditional.phGraph_out[0], nullptr, nullptr, 0, cudaStreamCaptureModeRelaxed);
}

extern "C" int sparsify_end_if(cudaStream_t body) {
  cudaGraph_t graph;
  return cudaStreamEndCapture(body, &graph);
}
