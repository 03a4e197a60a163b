// CUDA graph conditional (IF) nodes for stream capture, for PyTorch builds that do not expose them
// (torch < 2.12). Built on first use by eval/conditional_nodes.py with the local nvcc.
//
// begin: during a capture on `capturing`, add a kernel that evaluates a skip gate on `x` and sets a
// new conditional handle, then an IF node depending on everything captured so far; the capture
// continues after that node, and `body` starts capturing into the IF node's body graph.
// end: stops capturing `body`. Work captured on `body` in between runs only when the gate keeps
// a token.
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

// The skip gate's decision, fused into the kernel that sets the IF node's condition: true when any
// of `rows` tokens has w . x + b > t (fp32 dot product, as the gate computes it). One kernel per
// gated sublayer instead of five (cast, matrix-vector product, comparison, any, set).
template <typename T>
__global__ void sparsify_gate_condition(cudaGraphConditionalHandle handle, const T* x, const float* w, const float* b,
                                        float t, int rows, int width) {
  __shared__ float partial[32];
  __shared__ bool keep;
  if (threadIdx.x == 0) keep = false;
  for (int row = 0; row < rows; ++row) {
    float sum = 0.f;
    for (int i = threadIdx.x; i < width; i += blockDim.x) sum += to_float(x[row * width + i]) * w[i];
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.f;
      for (int k = 0; k < (blockDim.x >> 5); ++k) total += partial[k];
      if (total + *b > t) keep = true;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) cudaGraphSetConditional(handle, keep ? 1u : 0u);
}

// dtype: 0 float32, 1 bfloat16, 2 float16 (of x; w and b are float32).
extern "C" int sparsify_begin_if_gate(cudaStream_t capturing, const void* x, int dtype, const float* w, const float* b, float t,
                                      int rows, int width, cudaStream_t body) {
  cudaStreamCaptureStatus status;
  cudaGraph_t graph;
  cudaError_t err = CAPTURE_INFO(capturing, &status, nullptr, &graph, nullptr, nullptr, nullptr);
  if (err != cudaSuccess) return err;
  if (status != cudaStreamCaptureStatusActive) return -1;
  cudaGraphConditionalHandle handle;
  if ((err = cudaGraphConditionalHandleCreate(&handle, graph, 0, 0)) != cudaSuccess) return err;
  if (dtype == 0) {
    sparsify_gate_condition<<<1, 256, 0, capturing>>>(handle, static_cast<const float*>(x), w, b, t, rows, width);
  } else if (dtype == 1) {
    sparsify_gate_condition<<<1, 256, 0, capturing>>>(handle, static_cast<const __nv_bfloat16*>(x), w, b, t, rows, width);
  } else if (dtype == 2) {
    sparsify_gate_condition<<<1, 256, 0, capturing>>>(handle, static_cast<const __half*>(x), w, b, t, rows, width);
  } else {
    return -2;
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const cudaGraphNode_t* deps = nullptr;
  const cudaGraphEdgeData* edges = nullptr;
  size_t count = 0;
  if ((err = CAPTURE_INFO(capturing, &status, nullptr, &graph, &deps, &edges, &count)) != cudaSuccess) return err;
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
