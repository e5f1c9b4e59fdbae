// Kernel timeline of any CUDA program, for a GPU host without Nsight Systems: LD_PRELOAD this
// library and every kernel the program runs (CUDA graph nodes included) is recorded by CUPTI's
// activity API with its start and end on the GPU's clock, written at exit as CSV to
// $NIBBLE_KERNEL_TRACE (tests/gpu/kernel_timeline.py reads it). Under programmatic dependent
// launch a kernel's start is its early launch, so what a step's chain costs is read from the
// ends: each kernel's end minus the latest end before it (kernel_timeline.py).
//   g++ -O2 -shared -fPIC -I$CUDA/include tests/gpu/kernel_trace.cc -o kernel_trace.so
//       -L$(dirname $(find $CUDA -name 'libcupti.so*' | head -1)) -lcupti   (one line)
//   NIBBLE_KERNEL_TRACE=trace.csv LD_PRELOAD=$PWD/kernel_trace.so PROGRAM ARGS
// NIBBLE_KERNEL_TRACE_SKIP=N drops the first N kernels' records (warm-up, weight making).
// A tool, not part of nibble: tests/gpu/run.sh does not build it; a GPU host builds it in a
// second (CUPTI comes with the CUDA toolkit).
#include <cupti.h>
#include <cxxabi.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct KernelRecord {
  uint64_t start, end;
  uint32_t correlation, graph;
  uint64_t node;
  int grid[3], block[3], cluster[3];
  std::string name;
};

std::mutex records_mutex;
std::vector<KernelRecord> records;
std::atomic<uint64_t> seen{0};
uint64_t skip = 0;
constexpr size_t kBufferBytes = 8 << 20;

void Check(CUptiResult result, const char* what) {
  if (result == CUPTI_SUCCESS) return;
  const char* message = nullptr;
  cuptiGetResultString(result, &message);
  std::fprintf(stderr, "kernel_trace: %s: %s\n", what, message != nullptr ? message : "?");
}

std::string Demangled(const char* name) {
  int status = 0;
  char* out = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string s = status == 0 && out != nullptr ? out : name;
  std::free(out);
  return s;
}

void CUPTIAPI BufferRequested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBufferBytes));
  *size = *buffer != nullptr ? kBufferBytes : 0;
  *max_records = 0;
}

void CUPTIAPI BufferCompleted(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* record = nullptr;
  std::lock_guard<std::mutex> lock(records_mutex);
  while (cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL &&
        record->kind != CUPTI_ACTIVITY_KIND_KERNEL) {
      continue;
    }
    if (seen.fetch_add(1) < skip) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
    records.push_back(KernelRecord{k->start,
                                   k->end,
                                   k->correlationId,
                                   k->graphId,
                                   k->graphNodeId,
                                   {k->gridX, k->gridY, k->gridZ},
                                   {k->blockX, k->blockY, k->blockZ},
                                   {static_cast<int>(k->clusterX), static_cast<int>(k->clusterY),
                                    static_cast<int>(k->clusterZ)},
                                   Demangled(k->name)});
  }
  size_t dropped = 0;
  cuptiActivityGetNumDroppedRecords(nullptr, 0, &dropped);
  if (dropped > 0) std::fprintf(stderr, "kernel_trace: %zu records dropped\n", dropped);
  std::free(buffer);
}

// The CSV's name column: without the return type, namespaces and parameter list, commas
// replaced (template arguments keep their values).
std::string ShortName(const std::string& full) {
  std::string s = full;
  if (s.rfind("void ", 0) == 0) s = s.substr(5);
  // The namespaces first: "(anonymous namespace)" would otherwise read as the parameter list.
  for (const char* ns : {"nibble::kernels::cuda::", "(anonymous namespace)::"}) {
    for (size_t at; (at = s.find(ns)) != std::string::npos;) s.erase(at, std::strlen(ns));
  }
  // Cut the parameter list: the first '(' at template depth 0.
  int depth = 0;
  size_t cut = std::string::npos;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '<') ++depth;
    if (s[i] == '>') --depth;
    if (s[i] == '(' && depth == 0) {
      cut = i;
      break;
    }
  }
  if (cut != std::string::npos) s = s.substr(0, cut);
  for (char& c : s) {
    if (c == ',') c = ';';
  }
  return s;
}

void Write() {
  Check(cuptiActivityFlushAll(1), "cuptiActivityFlushAll");
  const char* path = std::getenv("NIBBLE_KERNEL_TRACE");
  FILE* f = std::fopen(path, "w");
  if (f == nullptr) {
    std::fprintf(stderr, "kernel_trace: cannot write %s\n", path);
    return;
  }
  std::lock_guard<std::mutex> lock(records_mutex);
  std::fprintf(f, "start_ns,end_ns,correlation,graph,node,grid,block,cluster,name\n");
  for (const KernelRecord& r : records) {
    std::fprintf(f, "%llu,%llu,%u,%u,%llu,%dx%dx%d,%dx%dx%d,%dx%dx%d,%s\n",
                 static_cast<unsigned long long>(r.start), static_cast<unsigned long long>(r.end),
                 r.correlation, r.graph, static_cast<unsigned long long>(r.node), r.grid[0],
                 r.grid[1], r.grid[2], r.block[0], r.block[1], r.block[2], r.cluster[0],
                 r.cluster[1], r.cluster[2], ShortName(r.name).c_str());
  }
  std::fclose(f);
  std::fprintf(stderr, "kernel_trace: %zu kernels to %s\n", records.size(), path);
}

__attribute__((constructor)) void Start() {
  if (std::getenv("NIBBLE_KERNEL_TRACE") == nullptr) return;
  if (const char* s = std::getenv("NIBBLE_KERNEL_TRACE_SKIP")) skip = std::strtoull(s, nullptr, 10);
  Check(cuptiActivityRegisterCallbacks(BufferRequested, BufferCompleted),
        "cuptiActivityRegisterCallbacks");
  // CONCURRENT_KERNEL: kernels are not serialized for the tracing (KERNEL would).
  Check(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "cuptiActivityEnable");
  std::atexit(Write);
}

}  // namespace
