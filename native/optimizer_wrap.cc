// The native Optimizer: converts JS plans into OptimizerCore structs once, and each
// call's arguments into backend pointers (validated, before anything is written).
#include <napi.h>

#include <algorithm>
#include <functional>
#include <memory>

#include "core/optimizer.h"
#include "glue.h"

namespace adafisher {

// Mirrors of the enums in lib/binding.ts.
static_assert(static_cast<int>(LayerKind::kLinear) == 0 && static_cast<int>(LayerKind::kConv2d) == 1 &&
                  static_cast<int>(LayerKind::kBatchNorm) == 2 && static_cast<int>(LayerKind::kLayerNorm) == 3,
              "LayerKind values are mirrored in lib/binding.ts");
static_assert(static_cast<int>(WeightLayout::kOutMajor) == 0 && static_cast<int>(WeightLayout::kOutMinor) == 1,
              "WeightLayout values are mirrored in lib/binding.ts");
static_assert(static_cast<int>(DataFormat::kNCHW) == 0 && static_cast<int>(DataFormat::kNHWC) == 1,
              "DataFormat values are mirrored in lib/binding.ts");
static_assert(static_cast<int>(PadMode::kExplicit) == 0 && static_cast<int>(PadMode::kSame) == 1,
              "PadMode values are mirrored in lib/binding.ts");
static_assert(static_cast<int>(math::UpdateRule::kAdaFisher) == 0 && static_cast<int>(math::UpdateRule::kAdaFisherW) == 1,
              "UpdateRule values are mirrored in lib/binding.ts");
static_assert(static_cast<int>(TensorRole::kWeight) == 0 && static_cast<int>(TensorRole::kBias) == 1,
              "TensorRole values are mirrored in lib/binding.ts");
static_assert(static_cast<int>(FactorKind::kH) == 0 && static_cast<int>(FactorKind::kS) == 1,
              "FactorWhich values (FactorKind) are mirrored in lib/binding.ts");

namespace {

constexpr int64_t kMaxDim = int64_t{1} << 40;
// The most elements an argument array's vector reserves before they are read (NOTE: [grow as read]).
constexpr uint32_t kReserveLimit = 4096;

class OptimizerWrap : public Napi::ObjectWrap<OptimizerWrap> {
 public:
  static constexpr napi_type_tag kTypeTag = {0x6164616669736865ULL, 0x724f7074696d6901ULL};
  static constexpr const char* kClassName = "NativeOptimizer";

  static Napi::Function Init(Napi::Env env) {
    using C = CheckedClass<OptimizerWrap>;
    Napi::Function ctor = DefineClass(env, kClassName, {});
    C::Method<&OptimizerWrap::RecordInput>(env, ctor, "recordInput");
    C::Method<&OptimizerWrap::RecordOutputGrad>(env, ctor, "recordOutputGrad");
    C::Method<&OptimizerWrap::RecordFactors>(env, ctor, "recordFactors");
    C::Method<&OptimizerWrap::SetFactors>(env, ctor, "setFactors");
    C::Method<&OptimizerWrap::ReuseRunningFactors>(env, ctor, "reuseRunningFactors");
    C::Method<&OptimizerWrap::Step>(env, ctor, "step");
    C::Method<&OptimizerWrap::WillRefresh>(env, ctor, "willRefresh");
    C::Method<&OptimizerWrap::SetLearningRate>(env, ctor, "setLearningRate");
    C::Method<&OptimizerWrap::ExportState>(env, ctor, "exportState");
    C::Method<&OptimizerWrap::ImportState>(env, ctor, "importState");
    C::Method<&OptimizerWrap::FactorLayout>(env, ctor, "factorLayout");
    C::Method<&OptimizerWrap::Dispose>(env, ctor, "dispose");
    C::Getter<&OptimizerWrap::Steps>(env, ctor, "steps");
    C::Getter<&OptimizerWrap::Disposed>(env, ctor, "disposed");
    C::Getter<&OptimizerWrap::BackendName>(env, ctor, "backend");
    return ctor;
  }

  // new NativeOptimizer(backend, config, layers, tensors)
  explicit OptimizerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<OptimizerWrap>(info) {
    Napi::Env env = info.Env();
    Guarded(env, [&]() -> Napi::Value {
      TagObject(env, info.This(), kTypeTag);  // see NOTE: [receiver checks]
      auto backend = GetBackend(env, info[0], "backend");
      const Napi::Object c = ToObject(info[1], "config");
      OptimizerConfig config;
      config.rule = static_cast<math::UpdateRule>(ReadInteger(c, "rule", "config", 0, 1));
      config.lr = ReadNumber(c, "lr", "config");
      config.beta = ReadNumber(c, "beta", "config");
      config.damping = ReadNumber(c, "damping", "config");
      config.decay = ReadNumber(c, "decay", "config");
      config.mix = ReadNumber(c, "mix", "config");
      config.weight_decay = ReadNumber(c, "weightDecay", "config");
      config.tcov = ReadInteger(c, "tcov", "config", 1, int64_t{1} << 40);
      config.guard = ReadBool(c, "guard", "config");

      // NOTE: [read lengths once]
      // An array's length is read once, before its elements: a getter of an element (or of
      // an element's field) may push to or truncate the array, and the loops below write
      // vectors sized by that first length.
      // NOTE: [grow as read]: a vector grows with the elements read, so that a huge length
      // (a sparse array) fails at its first missing element, not in a 2^32-element allocation.
      const Napi::Array ls = ToArray(info[2], "layers");
      const uint32_t layer_count = ls.Length();
      std::vector<LayerSpec> layers;
      layers.reserve(std::min<uint32_t>(layer_count, kReserveLimit));
      for (uint32_t i = 0; i < layer_count; ++i) {
        const std::string at = "layers[" + std::to_string(i) + "]";
        const Napi::Object o = ToObject(ls.Get(i), at);
        LayerSpec& l = layers.emplace_back();
        l.kind = static_cast<LayerKind>(ReadInteger(o, "kind", at, 0, 3));
        l.has_bias = ReadBool(o, "hasBias", at);
        l.in_features = ReadInteger(o, "inFeatures", at, 0, kMaxDim);
        l.out_features = ReadInteger(o, "outFeatures", at, 1, kMaxDim);
        l.layout = static_cast<WeightLayout>(ReadInteger(o, "layout", at, 0, 1));
        l.format = static_cast<DataFormat>(ReadInteger(o, "format", at, 0, 1));
        const Napi::Value label = o.Get("label");
        if (!label.IsUndefined()) l.label = ToInteger(label, at + ".label", 0, kMaxDim);
        if (l.kind == LayerKind::kConv2d) {
          l.kernel_h = ReadInteger(o, "kernelH", at, 1, 65536);
          l.kernel_w = ReadInteger(o, "kernelW", at, 1, 65536);
          l.stride_h = ReadInteger(o, "strideH", at, 1, 65536);
          l.stride_w = ReadInteger(o, "strideW", at, 1, 65536);
          l.groups = ReadInteger(o, "groups", at, 1, kMaxDim);
          l.pad_mode = static_cast<PadMode>(ReadInteger(o, "padMode", at, 0, 1));
          l.pad_top = ReadInteger(o, "padTop", at, 0, 65536);
          l.pad_bottom = ReadInteger(o, "padBottom", at, 0, 65536);
          l.pad_left = ReadInteger(o, "padLeft", at, 0, 65536);
          l.pad_right = ReadInteger(o, "padRight", at, 0, 65536);
        }
      }
      const Napi::Array ts = ToArray(info[3], "tensors");
      const uint32_t tensor_count = ts.Length();
      std::vector<TensorSpec> tensors;
      tensors.reserve(std::min<uint32_t>(tensor_count, kReserveLimit));
      for (uint32_t i = 0; i < tensor_count; ++i) {
        const std::string at = "tensors[" + std::to_string(i) + "]";
        const Napi::Object o = ToObject(ts.Get(i), at);
        TensorSpec& t = tensors.emplace_back();
        t.numel = ReadInteger(o, "numel", at, 0, int64_t{1} << 50);
        t.layer = static_cast<int32_t>(ReadInteger(o, "layer", at, -1, int64_t{1} << 30));
        t.role = static_cast<TensorRole>(ReadInteger(o, "role", at, 0, 1));
      }
      core_ = std::make_unique<OptimizerCore>(backend, config, std::move(layers), std::move(tensors));
      // Momenta plus running and fresh factors (see NOTE: [external memory]).
      int64_t state = 2 * static_cast<int64_t>(core_->FactorTotal());
      for (const TensorSpec& t : core_->tensors()) state += t.numel;
      external_.Add(env, state * static_cast<int64_t>(sizeof(float)));
      return env.Undefined();
    });
  }

 private:
  OptimizerCore& Core(Napi::Env env) {
    if (!core_) ThrowCoded(env, ErrorCode::kDisposed, "Optimizer already disposed.");
    return *core_;
  }
  // NOTE: [reentrant dispose]
  // A method that reads its arguments' properties runs user JS (getters, Proxy traps) while
  // it holds a reference to the core: a dispose() from there would free it under the method
  // (a use after free). While such a method runs, dispose() throws instead, and nothing of
  // the method's work has been done when its argument reading fails with that error.
  struct InCall {
    explicit InCall(int& depth) : depth_(depth) { ++depth_; }
    ~InCall() { --depth_; }
    InCall(const InCall&) = delete;
    InCall& operator=(const InCall&) = delete;
    int& depth_;
  };
  std::shared_ptr<Backend> SharedBackend(Napi::Env env) {
    // The backend of this optimizer, as held by the instance (shared ownership).
    InstanceData& inst = Instance(env);
    Backend* b = &Core(env).backend();
    if (inst.cpu && inst.cpu.get() == b) return inst.cpu;
    if (inst.cuda && inst.cuda.get() == b) return inst.cuda;
    ThrowCoded(env, ErrorCode::kInternal, "optimizer backend not found");
  }
  int LayerIndex(Napi::Env env, const Napi::Value& v) {
    return static_cast<int>(ToInteger(v, "layer", 0, static_cast<int64_t>(Core(env).layers().size()) - 1));
  }

  // recordInput(layer, data, shape) and recordOutputGrad(layer, data, shape): one factor's data.
  Napi::Value RecordInput(const Napi::CallbackInfo& info) { return RecordOne(info, FactorKind::kH); }
  Napi::Value RecordOutputGrad(const Napi::CallbackInfo& info) { return RecordOne(info, FactorKind::kS); }
  Napi::Value RecordOne(const Napi::CallbackInfo& info, FactorKind which) {
    Napi::Env env = info.Env();
    return Guarded(env, [&]() -> Napi::Value {
      const InCall in_call(in_call_);
      OptimizerCore& core = Core(env);
      if (core.layers().empty()) ThrowRangeError(env, "Expected a layer index but this optimizer has no layers");
      const int layer = LayerIndex(env, info[0]);
      const std::function<std::string()> make = [&core, layer, which] { return core.FactorName(layer, which); };
      const ArgName what(make);
      const auto shape = ToShape(info[2], ArgName::Suffix(what, " shape"));
      const bool input = which == FactorKind::kH;
      const index_t n = input ? core.CheckInputShape(layer, shape) : core.CheckOutputGradShape(layer, shape);
      TensorRef data(env, SharedBackend(env), info[1], n, what, false);
      if (input) {
        core.RecordInput(layer, data.data(), shape);
      } else {
        core.RecordOutputGrad(layer, data.data(), shape);
      }
      return env.Undefined();
    });
  }

  // recordFactors(records: { layer, which: 0 = input (H) | 1 = output gradient (S), data, shape }[])
  Napi::Value RecordFactors(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Guarded(env, [&]() -> Napi::Value {
      const InCall in_call(in_call_);
      OptimizerCore& core = Core(env);
      const Napi::Array rs = ToArray(info[0], "records");
      const size_t n = rs.Length();
      if (n > 0 && core.layers().empty()) ThrowRangeError(env, "Expected a layer index but this optimizer has no layers");
      // Read every field first (getters may run JS), then resolve them, which runs no JS
      // (as in Step); every record is checked and resolved before any is reduced.
      // Each record's name ("layers[2] input"), made only for an error (NOTE: [names on failure]);
      // the vectors grow as the records are read (NOTE: [grow as read]). An ArgName made from
      // what[i] is used only while `what` no longer grows.
      std::vector<OptimizerCore::FactorRecord> records;
      std::vector<Napi::Value> data;
      std::vector<std::function<std::string()>> what;
      records.reserve(std::min<size_t>(n, kReserveLimit));
      data.reserve(std::min<size_t>(n, kReserveLimit));
      what.reserve(std::min<size_t>(n, kReserveLimit));
      const Napi::Value k_layer = PropertyKey(env, "layer"), k_which = PropertyKey(env, "which"),
                        k_shape = PropertyKey(env, "shape"), k_data = PropertyKey(env, "data");
      for (size_t i = 0; i < n; ++i) {
        const ArgName at("records", i);
        const Napi::Object o = ToObject(rs.Get(i), at);
        OptimizerCore::FactorRecord& r = records.emplace_back();
        const int64_t last_layer = static_cast<int64_t>(core.layers().size()) - 1;
        r.layer = static_cast<int>(ToInteger(o.Get(k_layer), ArgName::Key(at, "layer"), 0, last_layer));
        r.which = static_cast<FactorKind>(ToInteger(o.Get(k_which), ArgName::Key(at, "which"), 0, 1));
        what.emplace_back([&core, layer = r.layer, which = r.which] { return core.FactorName(layer, which); });
        const ArgName name(what.back());
        r.shape = ToShape(o.Get(k_shape), ArgName::Suffix(name, " shape"));
        data.push_back(o.Get(k_data));
      }
      std::vector<index_t> numel(n);
      for (size_t i = 0; i < n; ++i) {
        const OptimizerCore::FactorRecord& r = records[i];
        numel[i] = r.which == FactorKind::kH ? core.CheckInputShape(r.layer, r.shape) : core.CheckOutputGradShape(r.layer, r.shape);
      }
      auto backend = SharedBackend(env);
      std::vector<TensorRef> refs;
      refs.reserve(n);
      for (size_t i = 0; i < n; ++i) {
        refs.emplace_back(env, backend, data[i], numel[i], ArgName(what[i]), false);
        records[i].data = refs.back().data();
      }
      core.RecordFactors(records);
      return env.Undefined();
    });
  }

  // setFactors(layer, H: Tensor | null | undefined, S: Tensor | null | undefined): already-reduced
  // statistics. Both are resolved (types, backend, lengths) before either is written, so a
  // call that throws leaves the layer's recorded statistics as they were.
  Napi::Value SetFactors(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Guarded(env, [&]() -> Napi::Value {
      const InCall in_call(in_call_);
      OptimizerCore& core = Core(env);
      if (core.layers().empty()) ThrowRangeError(env, "Expected a layer index but this optimizer has no layers");
      const int layer = LayerIndex(env, info[0]);
      const bool has_h = !info[1].IsNull() && !info[1].IsUndefined();
      const bool has_s = !info[2].IsNull() && !info[2].IsUndefined();
      if (!has_h && !has_s) ThrowTypeError(env, "Expected H or S (a Float32Array or DeviceBuffer) but received neither");
      auto backend = SharedBackend(env);
      TensorRef h, s;
      if (has_h) h = TensorRef(env, backend, info[1], core.FactorLength(layer, FactorKind::kH), core.LayerName(layer) + ".H", false);
      if (has_s) s = TensorRef(env, backend, info[2], core.FactorLength(layer, FactorKind::kS), core.LayerName(layer) + ".S", false);
      if (has_h) core.SetFactor(layer, FactorKind::kH, h.data());
      if (has_s) core.SetFactor(layer, FactorKind::kS, s.data());
      return env.Undefined();
    });
  }

  // reuseRunningFactors(layers: number[]): each layer's running factors as the statistics of
  // the next step (a layer that did not run this step).
  Napi::Value ReuseRunningFactors(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Guarded(env, [&]() -> Napi::Value {
      const InCall in_call(in_call_);
      OptimizerCore& core = Core(env);
      const Napi::Array ls = ToArray(info[0], "layers");
      const uint32_t n = ls.Length();  // read once: NOTE: [read lengths once]
      std::vector<int> layers;
      layers.reserve(std::min<uint32_t>(n, kReserveLimit));  // NOTE: [grow as read]
      for (uint32_t i = 0; i < n; ++i) {
        layers.push_back(static_cast<int>(
            ToInteger(ls.Get(i), ArgName("layers", i), 0, static_cast<int64_t>(core.layers().size()) - 1)));
      }
      core.ReuseRunningFactors(layers);
      return env.Undefined();
    });
  }

  // step(params: Tensor[], grads: (Tensor | null)[]) -> { applied, refreshed }
  Napi::Value Step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Guarded(env, [&]() -> Napi::Value {
      const InCall in_call(in_call_);
      OptimizerCore& core = Core(env);
      const Napi::Array ps = ToArray(info[0], "params");
      const Napi::Array gs = ToArray(info[1], "grads");
      const size_t n = core.tensors().size();
      if (ps.Length() != n) ThrowRangeError(env, "Expected " + std::to_string(n) + " params but received " + std::to_string(ps.Length()));
      if (gs.Length() != n) ThrowRangeError(env, "Expected " + std::to_string(n) + " grads but received " + std::to_string(gs.Length()));
      auto backend = SharedBackend(env);
      // Read every element first (array getters may run JS), then resolve them, which runs
      // no JS: no pointer taken below can be invalidated before the step (use after free).
      std::vector<Napi::Value> pv(n), gv(n);
      for (size_t t = 0; t < n; ++t) pv[t] = ps.Get(t);
      for (size_t t = 0; t < n; ++t) gv[t] = gs.Get(t);
      // Every argument is resolved and checked before anything is written.
      std::vector<TensorRef> params, grads;
      params.reserve(n);
      grads.reserve(n);
      std::vector<float*> p(n);
      std::vector<const float*> g(n, nullptr);
      std::vector<uint8_t> has_grad(n, 0);
      for (size_t t = 0; t < n; ++t) {
        const int64_t numel = core.tensors()[t].numel;
        params.emplace_back(env, backend, pv[t], numel, ArgName("params", t), true);
        p[t] = params.back().data();
        if (gv[t].IsNull() || gv[t].IsUndefined()) {
          grads.emplace_back();
        } else {
          grads.emplace_back(env, backend, gv[t], numel, ArgName("grads", t), false);
          g[t] = grads.back().data();
          has_grad[t] = 1;
        }
      }
      // Parameters are written in place: none may share memory with another tensor of the
      // step (the backends would disagree on the result: sequential on cpu, racing on cuda).
      std::vector<const TensorRef*> refs;
      std::vector<ArgName> names;
      std::vector<bool> writable;
      refs.reserve(2 * n), names.reserve(2 * n), writable.reserve(2 * n);
      for (size_t t = 0; t < n; ++t) {
        refs.push_back(&params[t]), names.emplace_back("params", t), writable.push_back(true);
        refs.push_back(&grads[t]), names.emplace_back("grads", t), writable.push_back(false);
      }
      CheckNoAliasing(env, refs, names, writable);
      const StepOutcome outcome = core.Step(p, g, has_grad);
      if (outcome.applied) {
        for (TensorRef& r : params) r.Finish();
      }
      Napi::Object out = Napi::Object::New(env);
      out.Set("applied", outcome.applied);
      out.Set("refreshed", outcome.applied && outcome.refreshed);
      return out;
    });
  }

  Napi::Value WillRefresh(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Guarded(env, [&]() -> Napi::Value { return Napi::Boolean::New(env, Core(env).WillRefresh()); });
  }

  // setLearningRate(lr: number)
  Napi::Value SetLearningRate(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Guarded(env, [&]() -> Napi::Value {
      OptimizerCore& core = Core(env);
      core.SetLearningRate(ToNumber(info[0], "lr"));
      return env.Undefined();
    });
  }

  Napi::Value Steps(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Guarded(env, [&]() -> Napi::Value { return Napi::Number::New(env, double(Core(env).steps())); });
  }

  Napi::Value Disposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !core_); }

  Napi::Value BackendName(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Guarded(env, [&]() -> Napi::Value { return Napi::String::New(env, Core(env).backend().name()); });
  }

  // factorLayout(): [{ hOffset, hLength, sOffset, sLength }] into the exported `factors`.
  Napi::Value FactorLayout(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Guarded(env, [&]() -> Napi::Value {
      OptimizerCore& core = Core(env);
      Napi::Array out = Napi::Array::New(env, core.layers().size());
      index_t offset = 0;
      for (size_t i = 0; i < core.layers().size(); ++i) {
        const index_t h = core.FactorLength(static_cast<int>(i), FactorKind::kH);
        const index_t s = core.FactorLength(static_cast<int>(i), FactorKind::kS);
        Napi::Object o = Napi::Object::New(env);
        o.Set("hOffset", double(offset));
        o.Set("hLength", double(h));
        o.Set("sOffset", double(offset + h));
        o.Set("sLength", double(s));
        out.Set(static_cast<uint32_t>(i), o);
        offset += h + s;
      }
      return out;
    });
  }

  // exportState(): { steps, stepCounts: number[], momenta: Float32Array[], factors: Float32Array }
  Napi::Value ExportState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Guarded(env, [&]() -> Napi::Value {
      const OptimizerCore::State s = Core(env).ExportState();
      Napi::Object out = Napi::Object::New(env);
      out.Set("steps", double(s.steps));
      Napi::Array counts = Napi::Array::New(env, s.step_counts.size());
      Napi::Array momenta = Napi::Array::New(env, s.momenta.size());
      for (size_t t = 0; t < s.momenta.size(); ++t) {
        counts.Set(static_cast<uint32_t>(t), double(s.step_counts[t]));
        Napi::Float32Array m = Napi::Float32Array::New(env, s.momenta[t].size());
        std::copy(s.momenta[t].begin(), s.momenta[t].end(), m.Data());
        momenta.Set(static_cast<uint32_t>(t), m);
      }
      Napi::Float32Array f = Napi::Float32Array::New(env, s.factors.size());
      std::copy(s.factors.begin(), s.factors.end(), f.Data());
      out.Set("stepCounts", counts);
      out.Set("momenta", momenta);
      out.Set("factors", f);
      return out;
    });
  }

  // importState(state) — same shape as exportState(); all-or-nothing.
  Napi::Value ImportState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Guarded(env, [&]() -> Napi::Value {
      const InCall in_call(in_call_);
      OptimizerCore& core = Core(env);
      const Napi::Object o = ToObject(info[0], "state");
      OptimizerCore::State s;
      s.steps = ToInteger(o.Get("steps"), "state.steps", 0, int64_t{1} << 52);
      const Napi::Array counts = ToArray(o.Get("stepCounts"), "state.stepCounts");
      const Napi::Array momenta = ToArray(o.Get("momenta"), "state.momenta");
      const size_t n = core.tensors().size();
      if (counts.Length() != n || momenta.Length() != n)
        ThrowCoded(env, ErrorCode::kBadCheckpoint,
                   "Expected state for " + std::to_string(n) + " tensors but received " + std::to_string(momenta.Length()) +
                       " momenta and " + std::to_string(counts.Length()) + " step counts");
      for (size_t t = 0; t < n; ++t) {
        const std::string at = "state.momenta[" + std::to_string(t) + "]";
        s.step_counts.push_back(ToInteger(counts.Get(t), "state.stepCounts[" + std::to_string(t) + "]", 0, int64_t{1} << 52));
        const Napi::Value mv = momenta.Get(t);
        if (!mv.IsTypedArray() || mv.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
          ThrowTypeError(env, "Expected a Float32Array for " + at + " but received " + Describe(mv));
        const auto m = mv.As<Napi::Float32Array>();
        s.momenta.emplace_back(m.Data(), m.Data() + m.ElementLength());
      }
      const Napi::Value fv = o.Get("factors");
      if (!fv.IsTypedArray() || fv.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
        ThrowTypeError(env, "Expected a Float32Array for state.factors but received " + Describe(fv));
      const auto f = fv.As<Napi::Float32Array>();
      s.factors.assign(f.Data(), f.Data() + f.ElementLength());
      core.ImportState(s);
      return env.Undefined();
    });
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return Guarded(env, [&]() -> Napi::Value {
      if (in_call_ > 0) {
        ThrowCoded(env, ErrorCode::kInvalidArgument,
                   "Cannot dispose the optimizer while one of its own calls is reading its arguments (a getter or "
                   "Proxy trap called dispose()); dispose it after the call returns.");
      }
      core_.reset();
      external_.Clear(env);
      return env.Undefined();
    });
  }

 public:
  ~OptimizerWrap() override {
    core_.reset();
    external_.Clear(Env());
  }

 private:
  std::unique_ptr<OptimizerCore> core_;
  ExternalMemory external_;
  int in_call_ = 0;  // methods of this optimizer in progress (NOTE: [reentrant dispose])
};

}  // namespace

Napi::Function InitOptimizer(Napi::Env env) { return OptimizerWrap::Init(env); }

}  // namespace adafisher
