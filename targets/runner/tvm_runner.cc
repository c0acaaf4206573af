// tvm_runner: run a Relax VM library exported by tvm.compile(...).export_library(...)
// on the CPU of the machine it runs on, using only the tvm-ffi C++ API.
//
// Usage:
//   tvm_runner LIB.so --input DTYPE:D0xD1x...:PATH.bin [--input ...] --out-dir DIR
//              [--repeat N] [--warmup K] [--function NAME]
//
// Inputs are given in the order of the parameters of the model's `main` function (or of the
// Relax function NAME, e.g. a library's kernel-check entry point), as raw
// little-endian C-order bytes. A scalar input has an empty shape ("float32::x.bin").
// Every output tensor (a single tensor, or the leaves of a (nested) tuple, depth first) is
// written to DIR/out_<i>.bin, and one JSON line is printed on stdout:
//   {"outputs":[{"dtype":"float32","shape":[1,10],"file":"out_0.bin"}],"times_ms":[...]}
// times_ms has one entry per timed call of `main` (after the warmup calls).
// Errors: one message on stderr and a non-zero exit code: 2 for usage errors, 3 when the
// inputs do not fit `main` (count, dtype, shape, file size), 1 for anything else.
//
// The library needs the TVM runtime (libtvm_runtime.so, which registers the Relax VM
// executable loader) besides libtvm_ffi.so; build_runner links both (rpath $ORIGIN).
// libtvm_runtime_extra.so (tvm.contrib.sort & co, needed by topk/argsort) is loaded when it
// lies beside the runner.
// Environment: TVM_RUNNER_ALLOCATOR=naive|pooled (default pooled); TVM_RUNNER_NO_EXTRA=1 skips
// libtvm_runtime_extra.so; TVM_RUNNER_BACKTRACE=1 prints TVM's backtrace on errors.

#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <cerrno>
#include <dlfcn.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

constexpr size_t kAlignment = 64;  // what TVM's own CPU allocator guarantees

// A usage or data problem found by the runner itself (not by TVM).
struct RunnerError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// The inputs do not fit the model's `main` (count, dtype or shape).
struct InputMismatch : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitInputMismatch = 3;

struct AlignedCPUAlloc {
  void AllocData(DLTensor* tensor) {
    size_t nbytes = ffi::GetDataSize(*tensor);
    size_t rounded = (nbytes + kAlignment - 1) / kAlignment * kAlignment;
    if (rounded == 0) rounded = kAlignment;
    void* ptr = std::aligned_alloc(kAlignment, rounded);
    if (ptr == nullptr) throw RunnerError("out of memory allocating " + std::to_string(nbytes) + " bytes");
    tensor->data = ptr;
  }
  void FreeData(DLTensor* tensor) {
    std::free(tensor->data);
    tensor->data = nullptr;
  }
};

struct InputSpec {
  std::string dtype_str;
  DLDataType dtype;
  std::vector<int64_t> shape;
  std::string path;
};

struct Options {
  std::string lib;
  std::vector<InputSpec> inputs;
  std::string out_dir;
  int repeat = 1;
  int warmup = 0;
  std::string function = "main";
};

const char* kUsage =
    "usage: tvm_runner LIB.so --input DTYPE:D0xD1x...:PATH.bin [--input ...] --out-dir DIR "
    "[--repeat N] [--warmup K] [--function NAME]";

bool SupportedInputDtype(const DLDataType& t) {
  if (t.lanes != 1) return false;
  switch (t.code) {
    case kDLFloat:
      return t.bits == 16 || t.bits == 32 || t.bits == 64;
    case kDLInt:
    case kDLUInt:
      return t.bits == 8 || t.bits == 16 || t.bits == 32 || t.bits == 64;
    case kDLBool:
      return t.bits == 8;
    default:
      return false;
  }
}

int ParseCount(const std::string& flag, const std::string& value, int min_value) {
  char* end = nullptr;
  errno = 0;
  long v = std::strtol(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || errno != 0 || v < min_value || v > 1000000) {
    throw UsageError(flag + " expects an integer >= " + std::to_string(min_value) + ", got '" +
                     value + "'");
  }
  return static_cast<int>(v);
}

InputSpec ParseInput(const std::string& spec) {
  size_t c1 = spec.find(':');
  size_t c2 = c1 == std::string::npos ? std::string::npos : spec.find(':', c1 + 1);
  if (c2 == std::string::npos) {
    throw UsageError("--input expects DTYPE:D0xD1x...:PATH, got '" + spec + "'");
  }
  InputSpec in;
  in.dtype_str = spec.substr(0, c1);
  std::string shape_str = spec.substr(c1 + 1, c2 - c1 - 1);
  in.path = spec.substr(c2 + 1);
  if (in.path.empty()) throw UsageError("--input '" + spec + "' has an empty path");
  try {
    in.dtype = ffi::StringToDLDataType(in.dtype_str);
  } catch (const std::exception&) {
    throw UsageError("--input '" + spec + "': unknown dtype '" + in.dtype_str + "'");
  }
  if (!SupportedInputDtype(in.dtype)) {
    throw UsageError("--input '" + spec + "': unsupported dtype '" + in.dtype_str +
                     "' (float32, float16, int8, uint8, int32, int64, ...)");
  }
  if (!shape_str.empty()) {
    std::stringstream ss(shape_str);
    std::string dim;
    while (std::getline(ss, dim, 'x')) {
      char* end = nullptr;
      long long v = std::strtoll(dim.c_str(), &end, 10);
      if (dim.empty() || *end != '\0' || v < 0) {
        throw UsageError("--input '" + spec + "': bad shape '" + shape_str + "'");
      }
      in.shape.push_back(v);
    }
    if (!shape_str.empty() && shape_str.back() == 'x') {
      throw UsageError("--input '" + spec + "': bad shape '" + shape_str + "'");
    }
  }
  return in;
}

Options ParseArgs(int argc, char** argv) {
  Options opt;
  bool have_out = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const std::string& flag) -> std::string {
      if (i + 1 >= argc) throw UsageError(flag + " needs a value");
      return argv[++i];
    };
    if (a == "--input") {
      opt.inputs.push_back(ParseInput(value(a)));
    } else if (a == "--out-dir") {
      opt.out_dir = value(a);
      have_out = true;
    } else if (a == "--repeat") {
      opt.repeat = ParseCount(a, value(a), 1);
    } else if (a == "--warmup") {
      opt.warmup = ParseCount(a, value(a), 0);
    } else if (a == "--function") {
      opt.function = value(a);
      if (opt.function.empty()) throw UsageError("--function needs a name");
    } else if (a == "-h" || a == "--help") {
      std::cout << kUsage << std::endl;
      std::exit(0);
    } else if (a.size() > 1 && a[0] == '-') {
      throw UsageError("unknown option '" + a + "'");
    } else if (opt.lib.empty()) {
      opt.lib = a;
    } else {
      throw UsageError("unexpected argument '" + a + "'");
    }
  }
  if (opt.lib.empty()) throw UsageError("missing LIB.so");
  if (!have_out || opt.out_dir.empty()) throw UsageError("missing --out-dir DIR");
  return opt;
}

bool FileExists(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return f.good();
}

bool IsDirectory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string AbsolutePath(const std::string& path) {
  char* resolved = ::realpath(path.c_str(), nullptr);
  if (resolved == nullptr) throw RunnerError("cannot resolve path " + path);
  std::string out = resolved;
  std::free(resolved);
  return out;
}

ffi::Tensor LoadInput(const InputSpec& in) {
  DLDevice cpu{kDLCPU, 0};
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), ffi::ShapeView(in.shape.data(), in.shape.size()),
                                           in.dtype, cpu);
  size_t nbytes = ffi::GetDataSize(*t.GetDLTensorPtr());
  std::ifstream f(in.path, std::ios::binary | std::ios::ate);
  if (!f) throw RunnerError("cannot open input file " + in.path);
  std::streamoff size = f.tellg();
  if (size != static_cast<std::streamoff>(nbytes)) {
    std::string shape;
    for (size_t i = 0; i < in.shape.size(); ++i) shape += (i ? "x" : "") + std::to_string(in.shape[i]);
    throw InputMismatch("input file " + in.path + " has " + std::to_string(size) + " bytes, " +
                      in.dtype_str + "[" + shape + "] needs " + std::to_string(nbytes));
  }
  f.seekg(0);
  if (nbytes > 0 && !f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes))) {
    throw RunnerError("cannot read input file " + in.path);
  }
  return t;
}

// Collect the tensors of a result: a tensor, or a (nested) tuple of tensors, depth first.
void CollectOutputs(const ffi::Any& value, std::vector<ffi::Tensor>* out, const std::string& where) {
  if (auto t = value.as<ffi::Tensor>()) {
    out->push_back(*t);
    return;
  }
  if (auto arr = value.as<ffi::Array<ffi::Any>>()) {
    for (size_t i = 0; i < arr->size(); ++i) {
      CollectOutputs((*arr)[i], out, where + "[" + std::to_string(i) + "]");
    }
    return;
  }
  throw RunnerError("output " + where + " of the function is a " + value.GetTypeKey() +
                    ", not a tensor or a tuple of tensors");
}

bool IsCompact(const DLTensor& t) {
  if (t.strides == nullptr) return true;
  int64_t expect = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    if (t.shape[i] != 1 && t.strides[i] != expect) return false;
    expect *= t.shape[i];
  }
  return true;
}

void WriteOutput(const ffi::Tensor& t, const std::string& path) {
  const DLTensor& dl = *t.GetDLTensorPtr();
  if (dl.device.device_type != kDLCPU) throw RunnerError("output tensor is not on the CPU");
  if (!IsCompact(dl)) throw RunnerError("output tensor is not compact (strided)");
  size_t nbytes = ffi::GetDataSize(dl);
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw RunnerError("cannot write output file " + path);
  const char* data = static_cast<const char*>(dl.data) + dl.byte_offset;
  if (nbytes > 0) f.write(data, static_cast<std::streamsize>(nbytes));
  if (!f) throw RunnerError("cannot write output file " + path);
}

std::string OneLine(std::string s) {
  // Callers show errors on one line: drop trailing newlines, join the others with spaces.
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r')) s.pop_back();
  for (char& c : s) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  return s;
}

int Run(const Options& opt) {
  if (!FileExists(opt.lib)) throw RunnerError("library file " + opt.lib + " not found");
  if (!IsDirectory(opt.out_dir)) throw RunnerError("output directory " + opt.out_dir + " does not exist");
  // dlopen searches the library path for names without a slash: always pass an absolute path.
  std::string lib_path = AbsolutePath(opt.lib);
  std::vector<ffi::Tensor> inputs;
  inputs.reserve(opt.inputs.size());
  for (const InputSpec& in : opt.inputs) inputs.push_back(LoadInput(in));

  // Optional: libtvm_runtime_extra.so (tvm.contrib.sort for topk/argsort/NMS, random, ...), found
  // through the runner's rpath ($ORIGIN) or LD_LIBRARY_PATH when shipped beside the runner.
  if (const char* no_extra = std::getenv("TVM_RUNNER_NO_EXTRA"); no_extra == nullptr || !*no_extra) {
    ::dlopen("libtvm_runtime_extra.so", RTLD_NOW | RTLD_GLOBAL);
  }
  ffi::Module lib = ffi::Module::LoadFromFile(lib_path);
  ffi::Optional<ffi::Function> load_exec = lib->GetFunction("vm_load_executable");
  if (!load_exec.has_value()) {
    throw RunnerError(opt.lib + " has no vm_load_executable: not a Relax VM library "
                      "(export it with tvm.compile(...).export_library)");
  }
  ffi::Module vm = (*load_exec)().cast<ffi::Module>();

  int alloc_kind = 2;  // pooled
  if (const char* env = std::getenv("TVM_RUNNER_ALLOCATOR")) {
    std::string a = env;
    if (a == "naive") {
      alloc_kind = 1;
    } else if (a != "pooled" && !a.empty()) {
      throw UsageError("TVM_RUNNER_ALLOCATOR must be naive or pooled, got '" + a + "'");
    }
  }
  ffi::Optional<ffi::Function> init = vm->GetFunction("vm_initialization");
  if (!init.has_value()) throw RunnerError("the VM has no vm_initialization function");
  // device (CPU 0) and host (CPU 0)
  (*init)(static_cast<int>(kDLCPU), 0, alloc_kind, static_cast<int>(kDLCPU), 0, alloc_kind);

  ffi::Optional<ffi::Function> main_opt = vm->GetFunction(opt.function);
  if (!main_opt.has_value()) throw RunnerError(opt.lib + " has no Relax function '" + opt.function + "'");
  ffi::Function main_fn = *main_opt;

  std::vector<ffi::AnyView> args;
  args.reserve(inputs.size());
  for (const ffi::Tensor& t : inputs) args.emplace_back(t);

  ffi::Any result;
  auto call_main = [&]() {
    try {
      main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    } catch (const ffi::Error& e) {
      // The VM checks the arguments against main's signature before running anything;
      // those errors name the parameter ("loc=param[i]") or the argument count.
      std::string msg = e.message();
      if (msg.find("loc=param[") != std::string::npos ||
          msg.find("arguments were provided") != std::string::npos) {
        throw InputMismatch("inputs do not fit " + opt.function + ": " + OneLine(msg));
      }
      throw;
    }
  };
  for (int i = 0; i < opt.warmup; ++i) call_main();
  std::vector<double> times_ms;
  times_ms.reserve(opt.repeat);
  for (int i = 0; i < opt.repeat; ++i) {
    result = ffi::Any();
    auto t0 = std::chrono::steady_clock::now();
    call_main();
    auto t1 = std::chrono::steady_clock::now();
    times_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }

  std::vector<ffi::Tensor> outputs;
  CollectOutputs(result, &outputs, "result");

  std::ostringstream js;
  js << "{\"outputs\":[";
  for (size_t i = 0; i < outputs.size(); ++i) {
    const DLTensor& dl = *outputs[i].GetDLTensorPtr();
    std::string name = "out_" + std::to_string(i) + ".bin";
    std::string path = opt.out_dir;
    if (!path.empty() && path.back() != '/') path += '/';
    WriteOutput(outputs[i], path + name);
    js << (i ? "," : "") << "{\"dtype\":\"" << std::string(ffi::DLDataTypeToString(dl.dtype))
       << "\",\"shape\":[";
    for (int d = 0; d < dl.ndim; ++d) js << (d ? "," : "") << dl.shape[d];
    js << "],\"file\":\"" << name << "\"}";
  }
  js << "],\"times_ms\":[";
  char buf[64];
  for (size_t i = 0; i < times_ms.size(); ++i) {
    std::snprintf(buf, sizeof(buf), "%.6f", times_ms[i]);
    js << (i ? "," : "") << buf;
  }
  js << "]}";
  std::cout << js.str() << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options opt;
  try {
    opt = ParseArgs(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "tvm_runner: " << e.what() << "\n" << kUsage << std::endl;
    return kExitUsage;
  }
  try {
    return Run(opt);
  } catch (const InputMismatch& e) {
    std::cerr << "tvm_runner: " << e.what() << std::endl;
    return kExitInputMismatch;
  } catch (const ffi::Error& e) {
    std::cerr << "tvm_runner: " << e.kind() << ": " << OneLine(e.message()) << std::endl;
    if (std::getenv("TVM_RUNNER_BACKTRACE")) std::cerr << e.FullMessage() << std::endl;
    return kExitError;
  } catch (const UsageError& e) {
    std::cerr << "tvm_runner: " << e.what() << std::endl;
    return kExitUsage;
  } catch (const std::exception& e) {
    std::cerr << "tvm_runner: " << OneLine(e.what()) << std::endl;
    return kExitError;
  }
}
