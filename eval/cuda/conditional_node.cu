// CUDA graph conditional (IF) nodes for stream capture, for PyTorch builds that do not expose them
// (torch < 2.12). Built on first use by eval/conditional_nodes.py with the local nvcc.
//
// begin: during a capture on `capturing`, add a kernel that copies the device bool `*pred` into a
// new conditional handle, then an IF node depending on everything captured so far; the capture
// continues after that node, and `body` starts capturing into the IF node's body graph.
// end: stops capturing `body`. Work captured on `body` in between runs only when *pred is true.
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

__global__ void sparsify_set_condition(cudaGraphConditionalHandle handle, const bool* pred) {
  cudaGraphSetConditional(handle, *pred ? 1u : 0u);
}

extern "C" int sparsify_begin_if(cudaStream_t capturing, const bool* pred, cudaStream_t body) {
  cudaStreamCaptureStatus status;
  cudaGraph_t graph;
  cudaError_t err = CAPTURE_INFO(capturing, &status, nullptr, &graph, nullptr, nullptr, nullptr);
  if (err != cudaSuccess) return err;
  if (status != cudaStreamCaptureStatusActive) return -1;
  cudaGraphConditionalHandle handle;
  if ((err = cudaGraphConditionalHandleCreate(&handle, graph, 0, 0)) != cudaSuccess) return err;
  sparsify_set_condition<<<1, 1, 0, capturing>>>(handle, pred);
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
