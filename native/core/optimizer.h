// The optimizer's plan and state, in plain C++ (no N-API): layer geometry, where each
// layer's factors live, the per-tensor step counters and momenta, and the one Step() that
// hands the whole model to the backend. The N-API glue (native/optimizer_wrap.cc) only
// converts JS values into these structs and back.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/backend.h"

namespace adafisher {

// Mirrored in lib/binding.ts; pinned by static_asserts in native/optimizer_wrap.cc.
enum class LayerKind : int32_t { kLinear = 0, kConv2d = 1, kBatchNorm = 2, kLayerNorm = 3 };
enum class WeightLayout : int32_t { kOutMajor = 0 /* PyTorch [out, K] */, kOutMinor = 1 /* TF.js [K, out] */ };
enum class PadMode : int32_t { kExplicit = 0, kSame = 1 /* TensorFlow 'same' */ };
enum class TensorRole : int32_t { kWeight = 0, kBias = 1 };
enum class FactorKind : int32_t { kH = 0, kS = 1 };

struct LayerSpec {
  LayerKind kind = LayerKind::kLinear;
  bool has_bias = false;
  index_t in_features = 0;   // Linear in, Conv2d in_channels, norm: unused
  index_t out_features = 0;  // Linear out, Conv2d out_channels, norm: channels / features
  WeightLayout layout = WeightLayout::kOutMajor;
  DataFormat format = DataFormat::kNCHW;
  // Conv2d only.
  index_t kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1, groups = 1;
  PadMode pad_mode = PadMode::kExplicit;
  index_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;
  // The index the user knows the layer by, for messages ("layers[label]"); -1: its index
  // here. They differ when the user's list holds layers that are not native (lib/: 'param').
  int64_t label = -1;
};

struct TensorSpec {
  index_t numel = 0;
  int32_t layer = -1;  // -1: belongs to no supported layer (plain momentum)
  TensorRole role = TensorRole::kWeight;
};

struct OptimizerConfig {
  math::UpdateRule rule = math::UpdateRule::kAdaFisher;
  double lr = 1e-3, beta = 0.9, damping = 1e-3, decay = 0.08, mix = 0.008, weight_decay = 0.0;
  int64_t tcov = 1;
  bool guard = true;
};

struct StepOutcome {
  bool applied = false;    // false: the non-finite guard skipped the step
  bool refreshed = false;  // the factors were refreshed by this step
};

class OptimizerCore {
 public:
  // Validates everything; throws BackendError(kInvalidArgument) naming the bad field.
  OptimizerCore(std::shared_ptr<Backend> backend, OptimizerConfig config, std::vector<LayerSpec> layers,
                std::vector<TensorSpec> tensors);
  ~OptimizerCore();
  OptimizerCore(const OptimizerCore&) = delete;
  OptimizerCore& operator=(const OptimizerCore&) = delete;

  Backend& backend() const { return *backend_; }
  const std::vector<LayerSpec>& layers() const { return layers_; }
  const std::vector<TensorSpec>& tensors() const { return tensors_; }
  const OptimizerConfig& config() const { return config_; }
  index_t FactorLength(int layer, FactorKind which) const;
  // "layers[i]" with the user's index of layer `layer` (LayerSpec::label).
  std::string LayerName(int layer) const;

  // "layers[2] input", "layers[2] output gradient": a factor's data in error messages.
  std::string FactorName(int layer, FactorKind which) const;

  // Number of elements a layer input / output gradient of `shape` must have, after
  // checking the shape against the layer; throws kInvalidArgument naming FactorName(layer, ...)
  // (made only then: NOTE: [names on failure] in native/glue.h).
  index_t CheckInputShape(int layer, const std::vector<index_t>& shape) const;
  index_t CheckOutputGradShape(int layer, const std::vector<index_t>& shape) const;

  // x / g are backend memory holding CheckInputShape/CheckOutputGradShape elements.
  void RecordInput(int layer, const float* x, const std::vector<index_t>& shape);
  void RecordOutputGrad(int layer, const float* g, const std::vector<index_t>& shape);
  // Several layers' statistics in one call: records[i] is the input (kH) or output
  // gradient (kS) of records[i].layer, as for RecordInput / RecordOutputGrad. All are
  // checked before any is reduced; the backend may reduce several in one launch.
  struct FactorRecord {
    int layer = 0;
    FactorKind which = FactorKind::kH;
    const float* data = nullptr;
    std::vector<index_t> shape;
  };
  void RecordFactors(const std::vector<FactorRecord>& records);
  // Already-reduced statistics (backend memory, FactorLength(layer, which) elements).
  void SetFactor(int layer, FactorKind which, const float* values);
  // For layers that did not run this step: their running factors become the statistics of
  // the next step (copied on the backend; no host round trip). All indices are checked first.
  void ReuseRunningFactors(const std::vector<int>& layers);

  bool WillRefresh() const { return steps_ % config_.tcov == 0; }
  // The learning rate of the next steps; nothing else changes (statistics recorded for the
  // next step included). Throws kInvalidArgument unless lr is finite and >= 0.
  void SetLearningRate(double lr);
  int64_t steps() const { return steps_; }

  // params/grads: one entry per tensor, backend memory of numel elements; a tensor whose
  // has_grad is 0 is left untouched, step counter included (its pointers may be null, and
  // so may those of an empty tensor that has a gradient). Throws kMissingStatistics before
  // writing anything when a refreshing step lacks some layer's statistics.
  StepOutcome Step(const std::vector<float*>& params, const std::vector<const float*>& grads,
                   const std::vector<uint8_t>& has_grad);

  // Checkpoint state. Host copies.
  struct State {
    int64_t steps = 0;
    std::vector<int64_t> step_counts;        // per tensor
    std::vector<std::vector<float>> momenta;  // per tensor
    std::vector<float> factors;               // running factors, all layers: [H | S] per layer
  };
  State ExportState() const;
  void ImportState(const State& state);  // throws kBadCheckpoint on any mismatch
  index_t FactorTotal() const { return factor_total_; }

 private:
  struct LayerPlan {
    index_t k = 0;  // columns of the weight viewed as [out, K]
    index_t h_offset = 0, h_length = 0, s_offset = 0, s_length = 0;
    bool has_h = false, has_s = false;  // statistics recorded since the last step
  };
  // The backend work of RecordInput / RecordOutputGrad, after checking the shape.
  FactorJob InputJob(int layer, const float* x, const std::vector<index_t>& shape) const;
  FactorJob OutputGradJob(int layer, const float* g, const std::vector<index_t>& shape) const;
  Conv2dShape ConvGeometry(int layer, const std::vector<index_t>& shape) const;
  void CheckLayerIndex(int layer) const;

  std::shared_ptr<Backend> backend_;
  OptimizerConfig config_;
  std::vector<LayerSpec> layers_;
  std::vector<TensorSpec> tensors_;
  std::vector<LayerPlan> plans_;
  std::vector<StepTensor> step_tensors_;  // index mapping filled once; pointers per step
  std::vector<FactorSegment> segments_;
  std::vector<int64_t> step_counts_;
  std::vector<float*> momenta_;
  float* running_ = nullptr;
  float* fresh_ = nullptr;
  index_t factor_total_ = 0;
  int64_t steps_ = 0;
};

}  // namespace adafisher
