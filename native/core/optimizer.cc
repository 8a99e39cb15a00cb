#include "core/optimizer.h"

#include <cmath>
#include <limits>
#include <sstream>

namespace adafisher {
namespace {

[[noreturn]] void Invalid(const std::string& message) { throw BackendError(ErrorCode::kInvalidArgument, message); }

constexpr index_t kMaxElements = index_t{1} << 50;

std::string ShapeString(const std::vector<index_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

// Element count of a shape. The product of the non-zero dims is bounded by 2^50 too, so
// that no partial product of the dims (N * C, ...) can overflow anywhere downstream.
template <typename Name>
index_t Numel(const std::vector<index_t>& shape, const Name& what) {
  index_t n = 1, nonzero = 1;
  for (index_t d : shape) {
    if (d < 0) Invalid("Expected non-negative dimensions for " + what() + " but received " + ShapeString(shape));
    if (d != 0) {
      if (nonzero > kMaxElements / d) Invalid("Expected at most 2^50 elements for " + what() + " but received " + ShapeString(shape));
      nonzero *= d;
    } else {
      n = 0;
    }
  }
  return n == 0 ? 0 : nonzero;
}

// a * b for sizes already known to be in [0, 2^50]; refuses products above 2^50.
index_t CheckedProduct(index_t a, index_t b, const std::string& what) {
  if (a != 0 && b > kMaxElements / a) Invalid("Expected at most 2^50 elements for " + what);
  return a * b;
}

index_t CeilDiv(index_t a, index_t b) { return (a + b - 1) / b; }

// The kernels take these as float32 (lib/validate.ts checkFloat32 is the same rule): a value
// that rounds to +inf there (lr 1e39) or, for damping, to 0 (1e-50) is refused here too, for
// callers of the binding that skip the TypeScript checks.
bool FitsFloat32(double v) { return v >= 0 && std::isfinite(static_cast<float>(v)); }

}  // namespace

void OptimizerCore::SetLearningRate(double lr) {
  if (!FitsFloat32(lr)) Invalid("Expected lr >= 0 and below 2^128 (float32's range)");
  config_.lr = lr;
}

OptimizerCore::OptimizerCore(std::shared_ptr<Backend> backend, OptimizerConfig config, std::vector<LayerSpec> layers,
                             std::vector<TensorSpec> tensors)
    : backend_(std::move(backend)), config_(config), layers_(std::move(layers)), tensors_(std::move(tensors)) {
  if (!FitsFloat32(config_.lr)) Invalid("Expected lr >= 0 and below 2^128 (float32's range)");
  if (!(std::isfinite(config_.beta) && config_.beta >= 0 && config_.beta < 1)) Invalid("Expected 0 <= beta < 1");
  if (!(FitsFloat32(config_.damping) && static_cast<float>(config_.damping) > 0))
    Invalid("Expected damping > 0 in float32 (at least 2^-149) and below 2^128");
  if (!(config_.decay >= 0 && config_.decay <= 1) || !FitsFloat32(config_.mix))
    Invalid("Expected 0 <= decay <= 1 and mix >= 0 (below 2^128)");
  if (!FitsFloat32(config_.weight_decay)) Invalid("Expected weightDecay >= 0 and below 2^128 (float32's range)");
  if (config_.tcov < 1) Invalid("Expected an integer tcov >= 1");

  plans_.resize(layers_.size());
  index_t offset = 0;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const LayerSpec& l = layers_[i];
    const std::string at = LayerName(static_cast<int>(i));
    LayerPlan& p = plans_[i];
    if (l.out_features < 1 || l.out_features > kMaxElements) Invalid("Expected " + at + " to have at least one output feature/channel");
    switch (l.kind) {
      case LayerKind::kLinear:
        if (l.in_features < 1 || l.in_features > kMaxElements) Invalid("Expected " + at + ".inFeatures >= 1");
        p.k = l.in_features;
        p.h_length = p.k + (l.has_bias ? 1 : 0);
        break;
      case LayerKind::kConv2d: {
        if (l.in_features < 1 || l.in_features > kMaxElements) Invalid("Expected " + at + ".inChannels >= 1");
        if (l.groups < 1 || l.in_features % l.groups != 0 || l.out_features % l.groups != 0)
          Invalid("Expected " + at + ".groups to divide inChannels and outChannels");
        if (l.kernel_h < 1 || l.kernel_w < 1 || l.kernel_h > 65536 || l.kernel_w > 65536)
          Invalid("Expected " + at + ".kernelSize >= 1");
        if (l.stride_h < 1 || l.stride_w < 1) Invalid("Expected " + at + ".strides >= 1");
        if (l.pad_top < 0 || l.pad_bottom < 0 || l.pad_left < 0 || l.pad_right < 0)
          Invalid("Expected " + at + ".padding >= 0");
        p.k = CheckedProduct(CheckedProduct(l.in_features / l.groups, l.kernel_h, at + " patch size"), l.kernel_w,
                             at + " patch size");
        p.h_length = p.k + (l.has_bias ? 1 : 0);
        break;
      }
      case LayerKind::kBatchNorm:
      case LayerKind::kLayerNorm:
        p.k = 1;
        p.h_length = 2;
        break;
      default:
        Invalid("Expected " + at + ".kind to be a supported layer kind");
    }
    p.s_length = l.out_features;
    p.h_offset = offset;
    p.s_offset = offset + p.h_length;
    offset += p.h_length + p.s_length;
    if (offset > kMaxElements) Invalid("Expected at most 2^50 factor entries in all (at " + at + ")");
    segments_.push_back({p.h_offset, p.h_length});
    segments_.push_back({p.s_offset, p.s_length});
  }
  factor_total_ = offset;

  std::vector<int> weight_seen(layers_.size(), 0), bias_seen(layers_.size(), 0);
  step_tensors_.resize(tensors_.size());
  for (size_t t = 0; t < tensors_.size(); ++t) {
    const TensorSpec& ts = tensors_[t];
    const std::string at = "tensors[" + std::to_string(t) + "]";
    if (ts.numel < 0 || ts.numel > kMaxElements) Invalid("Expected " + at + ".numel >= 0");
    StepTensor& st = step_tensors_[t];
    st.numel = ts.numel;
    if (ts.layer < 0) {
      if (ts.layer != -1) Invalid("Expected " + at + ".layer to be -1 or a layer index");
      st.preconditioned = false;
      continue;
    }
    if (static_cast<size_t>(ts.layer) >= layers_.size())
      Invalid("Expected " + at + ".layer < " + std::to_string(layers_.size()) + " but received " + std::to_string(ts.layer));
    const LayerSpec& l = layers_[ts.layer];
    const LayerPlan& p = plans_[ts.layer];
    const index_t out = l.out_features;
    st.preconditioned = true;
    st.s_offset = p.s_offset;
    const bool norm = l.kind == LayerKind::kBatchNorm || l.kind == LayerKind::kLayerNorm;
    if (ts.role == TensorRole::kWeight) {
      if (weight_seen[ts.layer]++) Invalid("Expected one weight tensor for " + LayerName(ts.layer));
      const index_t expected = CheckedProduct(out, p.k, "the weight of " + LayerName(ts.layer));
      if (ts.numel != expected)
        Invalid("Expected " + at + " (weight of " + LayerName(ts.layer) + ") to have " +
                std::to_string(expected) + " elements but received " + std::to_string(ts.numel));
      st.h_offset = p.h_offset;
      if (norm) {
        st.o_stride = 1, st.o_count = out, st.k_stride = out, st.k_count = 1;
      } else if (l.layout == WeightLayout::kOutMajor) {
        st.o_stride = p.k, st.o_count = out, st.k_stride = 1, st.k_count = p.k;
      } else {
        st.o_stride = 1, st.o_count = out, st.k_stride = out, st.k_count = p.k;
      }
    } else if (ts.role == TensorRole::kBias) {
      if (!l.has_bias) Invalid("Expected no bias tensor for " + LayerName(ts.layer) + " (declared without bias)");
      if (bias_seen[ts.layer]++) Invalid("Expected one bias tensor for " + LayerName(ts.layer));
      if (ts.numel != out)
        Invalid("Expected " + at + " (bias of " + LayerName(ts.layer) + ") to have " + std::to_string(out) +
                " elements but received " + std::to_string(ts.numel));
      st.h_offset = p.h_offset + p.k;  // the bias entry of H (H[1] for norm layers)
      st.o_stride = 1, st.o_count = out, st.k_stride = out, st.k_count = 1;
    } else {
      Invalid("Expected " + at + ".role to be weight or bias");
    }
  }
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (!weight_seen[i]) Invalid("Expected a weight tensor for " + LayerName(static_cast<int>(i)));
    if (layers_[i].has_bias && !bias_seen[i]) Invalid("Expected a bias tensor for " + LayerName(static_cast<int>(i)));
  }

  step_counts_.assign(tensors_.size(), 0);
  try {
    running_ = backend_->Allocate(static_cast<size_t>(factor_total_));
    fresh_ = backend_->Allocate(static_cast<size_t>(factor_total_));
    backend_->Fill(running_, 1.0f, static_cast<size_t>(factor_total_));  // running factors start at ones
    momenta_.reserve(tensors_.size());
    for (const TensorSpec& ts : tensors_) momenta_.push_back(backend_->Allocate(static_cast<size_t>(ts.numel)));
  } catch (...) {
    for (float* m : momenta_) backend_->Release(m);
    backend_->Release(running_);
    backend_->Release(fresh_);
    throw;
  }
}

OptimizerCore::~OptimizerCore() {
  for (float* m : momenta_) backend_->Release(m);
  backend_->Release(running_);
  backend_->Release(fresh_);
}

void OptimizerCore::CheckLayerIndex(int layer) const {
  if (layer < 0 || static_cast<size_t>(layer) >= layers_.size())
    Invalid("Expected a layer index in [0, " + std::to_string(layers_.size()) + ") but received " + std::to_string(layer));
}

std::string OptimizerCore::LayerName(int layer) const {
  const int64_t label = layer >= 0 && static_cast<size_t>(layer) < layers_.size() ? layers_[layer].label : -1;
  return "layers[" + std::to_string(label >= 0 ? label : layer) + "]";
}

std::string OptimizerCore::FactorName(int layer, FactorKind which) const {
  return LayerName(layer) + (which == FactorKind::kH ? " input" : " output gradient");
}

index_t OptimizerCore::FactorLength(int layer, FactorKind which) const {
  CheckLayerIndex(layer);
  return which == FactorKind::kH ? plans_[layer].h_length : plans_[layer].s_length;
}

Conv2dShape OptimizerCore::ConvGeometry(int layer, const std::vector<index_t>& shape) const {
  const auto what = [&] { return FactorName(layer, FactorKind::kH); };
  const LayerSpec& l = layers_[layer];
  if (shape.size() != 4)
    Invalid("Expected " + what() + " of rank 4 (" + (l.format == DataFormat::kNCHW ? "NCHW" : "NHWC") + ") but received " +
            ShapeString(shape));
  Conv2dShape s;
  s.format = l.format;
  s.batch = shape[0];
  if (l.format == DataFormat::kNCHW) {
    s.channels = shape[1], s.height = shape[2], s.width = shape[3];
  } else {
    s.height = shape[1], s.width = shape[2], s.channels = shape[3];
  }
  if (s.channels != l.in_features)
    Invalid("Expected " + what() + " to have " + std::to_string(l.in_features) + " channels but received shape " +
            ShapeString(shape));
  s.kernel_h = l.kernel_h, s.kernel_w = l.kernel_w, s.stride_h = l.stride_h, s.stride_w = l.stride_w;
  s.groups = l.groups;
  s.order = l.layout == WeightLayout::kOutMajor ? PatchOrder::kChannelMajor : PatchOrder::kChannelMinor;
  if (l.pad_mode == PadMode::kSame) {
    // TensorFlow 'same': out = ceil(in / stride); the extra padding row/column goes last.
    s.out_h = CeilDiv(s.height, s.stride_h);
    s.out_w = CeilDiv(s.width, s.stride_w);
    const index_t total_h = std::max<index_t>((s.out_h - 1) * s.stride_h + s.kernel_h - s.height, 0);
    const index_t total_w = std::max<index_t>((s.out_w - 1) * s.stride_w + s.kernel_w - s.width, 0);
    s.pad_top = total_h / 2;
    s.pad_left = total_w / 2;
  } else {
    s.pad_top = l.pad_top, s.pad_left = l.pad_left;
    const index_t span_h = s.height + l.pad_top + l.pad_bottom - s.kernel_h;
    const index_t span_w = s.width + l.pad_left + l.pad_right - s.kernel_w;
    if (span_h < 0 || span_w < 0)
      Invalid("Expected " + what() + " " + ShapeString(shape) + " to be at least as large as the kernel after padding");
    s.out_h = span_h / s.stride_h + 1;
    s.out_w = span_w / s.stride_w + 1;
  }
  if (s.height < 1 || s.width < 1) Invalid("Expected " + what() + " to have non-empty spatial dims");
  return s;
}

index_t OptimizerCore::CheckInputShape(int layer, const std::vector<index_t>& shape) const {
  const auto what = [&] { return FactorName(layer, FactorKind::kH); };
  CheckLayerIndex(layer);
  const index_t n = Numel(shape, what);
  if (n == 0) Invalid("Expected a non-empty " + what() + " but received shape " + ShapeString(shape));
  const LayerSpec& l = layers_[layer];
  switch (l.kind) {
    case LayerKind::kLinear:
      if (shape.empty() || shape.back() != l.in_features)
        Invalid("Expected " + what() + " with last dim " + std::to_string(l.in_features) + " but received " + ShapeString(shape));
      break;
    case LayerKind::kConv2d:
      ConvGeometry(layer, shape);
      break;
    case LayerKind::kBatchNorm: {
      const index_t c = shape.size() == 2 ? shape[1]
                        : shape.size() == 4 ? (l.format == DataFormat::kNCHW ? shape[1] : shape[3])
                                            : -1;
      if (c != l.out_features)
        Invalid("Expected " + what() + " of rank 2 or 4 with " + std::to_string(l.out_features) +
                " channels but received " + ShapeString(shape));
      break;
    }
    case LayerKind::kLayerNorm:
      if (shape.size() < 2 || shape.back() != l.out_features || shape[1] < 1)
        Invalid("Expected " + what() + " of rank >= 2 with last dim " + std::to_string(l.out_features) + " but received " +
                ShapeString(shape));
      break;
  }
  if (shape[0] < 1 && l.kind != LayerKind::kLinear) Invalid("Expected " + what() + " to have a batch of at least 1");
  return n;
}

index_t OptimizerCore::CheckOutputGradShape(int layer, const std::vector<index_t>& shape) const {
  const auto what = [&] { return FactorName(layer, FactorKind::kS); };
  CheckLayerIndex(layer);
  const index_t n = Numel(shape, what);
  if (n == 0) Invalid("Expected a non-empty " + what() + " but received shape " + ShapeString(shape));
  const LayerSpec& l = layers_[layer];
  index_t c = -1;
  switch (l.kind) {
    case LayerKind::kLinear:
    case LayerKind::kLayerNorm:
      c = shape.empty() ? -1 : shape.back();
      if (l.kind == LayerKind::kLayerNorm && shape.size() < 2) c = -1;
      break;
    case LayerKind::kConv2d:
      c = shape.size() == 4 ? (l.format == DataFormat::kNCHW ? shape[1] : shape[3]) : -1;
      break;
    case LayerKind::kBatchNorm:
      c = shape.size() == 2 ? shape[1] : shape.size() == 4 ? (l.format == DataFormat::kNCHW ? shape[1] : shape[3]) : -1;
      break;
  }
  if (c != l.out_features)
    Invalid("Expected " + what() + " with " + std::to_string(l.out_features) + " output features/channels but received " +
            ShapeString(shape));
  if (l.kind != LayerKind::kLinear && shape[0] < 1) Invalid("Expected " + what() + " to have a batch of at least 1");
  return n;
}

FactorJob OptimizerCore::InputJob(int layer, const float* x, const std::vector<index_t>& shape) const {
  const index_t n = CheckInputShape(layer, shape);
  const LayerSpec& l = layers_[layer];
  FactorJob job;
  job.x = x;
  job.out = fresh_ + plans_[layer].h_offset;
  switch (l.kind) {
    case LayerKind::kLinear: {
      const index_t rows = n / l.in_features;
      job.op = FactorOp::kMeanSquare;
      job.outer = rows, job.kept = l.in_features, job.inner = 1;
      job.divisor = static_cast<double>(rows);
      job.has_appended = l.has_bias, job.appended = 1.0f;
      break;
    }
    case LayerKind::kConv2d:
      job.op = FactorOp::kConv2dPatch;
      job.conv = ConvGeometry(layer, shape);
      job.has_appended = l.has_bias;
      break;
    case LayerKind::kBatchNorm: {
      const index_t N = shape[0], C = l.out_features;
      const index_t P = shape.size() == 4 ? n / (N * C) : 1;
      const bool planes = shape.size() == 4 && l.format == DataFormat::kNCHW;
      const double pd = static_cast<double>(P);
      job.op = FactorOp::kNormInput;
      job.outer = planes ? N : N * P, job.kept = C, job.inner = planes ? P : 1;
      job.divisor = pd * pd, job.batch = static_cast<double>(N);
      break;
    }
    case LayerKind::kLayerNorm: {
      const index_t N = shape[0], T = shape[1];
      const index_t R = n / (N * T);
      const double rd = static_cast<double>(R);
      job.op = FactorOp::kNormInput;
      job.outer = N, job.kept = T, job.inner = R;
      job.divisor = rd * rd, job.batch = static_cast<double>(N);
      break;
    }
  }
  return job;
}

FactorJob OptimizerCore::OutputGradJob(int layer, const float* g, const std::vector<index_t>& shape) const {
  const index_t n = CheckOutputGradShape(layer, shape);
  const LayerSpec& l = layers_[layer];
  const index_t C = l.out_features;
  FactorJob job;
  job.x = g;
  job.out = fresh_ + plans_[layer].s_offset;
  switch (l.kind) {
    case LayerKind::kLinear: {
      const index_t rows = n / C;
      job.op = FactorOp::kMeanSquare;
      job.outer = rows, job.kept = C, job.inner = 1;
      job.divisor = static_cast<double>(rows);
      break;
    }
    case LayerKind::kConv2d: {
      const index_t N = shape[0], spatial = n / (N * C);
      const bool planes = l.format == DataFormat::kNCHW;
      job.op = FactorOp::kMeanSquare;
      job.outer = planes ? N : N * spatial, job.kept = C, job.inner = planes ? spatial : 1;
      job.divisor = static_cast<double>(N) * static_cast<double>(spatial);
      break;
    }
    case LayerKind::kBatchNorm: {
      const index_t N = shape[0], P = shape.size() == 4 ? n / (N * C) : 1;
      const bool planes = shape.size() == 4 && l.format == DataFormat::kNCHW;
      job.op = FactorOp::kNormGrad;
      job.outer = planes ? N : N * P, job.kept = C, job.inner = planes ? P : 1;
      job.divisor = static_cast<double>(N);
      break;
    }
    case LayerKind::kLayerNorm:
      job.op = FactorOp::kNormGrad;
      job.outer = n / C, job.kept = C, job.inner = 1;
      job.divisor = static_cast<double>(shape[0]);
      break;
  }
  return job;
}

void OptimizerCore::RecordInput(int layer, const float* x, const std::vector<index_t>& shape) {
  backend_->RunFactorJob(InputJob(layer, x, shape));
  plans_[layer].has_h = true;
}

void OptimizerCore::RecordOutputGrad(int layer, const float* g, const std::vector<index_t>& shape) {
  backend_->RunFactorJob(OutputGradJob(layer, g, shape));
  plans_[layer].has_s = true;
}

void OptimizerCore::RecordFactors(const std::vector<FactorRecord>& records) {
  // Every record is checked before any runs. A later record of the same factor replaces an
  // earlier one, as with one call each: only the last runs (the jobs' outputs must not overlap).
  std::vector<FactorJob> jobs;
  jobs.reserve(records.size());
  std::vector<int> slot(2 * plans_.size(), -1);  // (layer, which) -> index in jobs
  for (const FactorRecord& r : records) {
    FactorJob job = r.which == FactorKind::kH ? InputJob(r.layer, r.data, r.shape) : OutputGradJob(r.layer, r.data, r.shape);
    int& at = slot[2 * static_cast<size_t>(r.layer) + (r.which == FactorKind::kH ? 0 : 1)];
    if (at >= 0) {
      jobs[static_cast<size_t>(at)] = job;
    } else {
      at = static_cast<int>(jobs.size());
      jobs.push_back(job);
    }
  }
  backend_->FactorJobs(jobs.data(), jobs.size());
  for (const FactorRecord& r : records) (r.which == FactorKind::kH ? plans_[r.layer].has_h : plans_[r.layer].has_s) = true;
}

void OptimizerCore::SetFactor(int layer, FactorKind which, const float* values) {
  CheckLayerIndex(layer);
  LayerPlan& p = plans_[layer];
  if (which == FactorKind::kH) {
    backend_->Copy(fresh_ + p.h_offset, values, static_cast<size_t>(p.h_length));
    p.has_h = true;
  } else {
    backend_->Copy(fresh_ + p.s_offset, values, static_cast<size_t>(p.s_length));
    p.has_s = true;
  }
}

void OptimizerCore::ReuseRunningFactors(const std::vector<int>& layers) {
  for (int layer : layers) CheckLayerIndex(layer);
  for (int layer : layers) {
    const LayerPlan& p = plans_[layer];
    SetFactor(layer, FactorKind::kH, running_ + p.h_offset);
    SetFactor(layer, FactorKind::kS, running_ + p.s_offset);
  }
}

StepOutcome OptimizerCore::Step(const std::vector<float*>& params, const std::vector<const float*>& grads,
                                const std::vector<uint8_t>& has_grad) {
  if (params.size() != tensors_.size() || grads.size() != tensors_.size() || has_grad.size() != tensors_.size())
    Invalid("Expected " + std::to_string(tensors_.size()) + " parameters and gradients");
  StepOutcome outcome;
  outcome.refreshed = WillRefresh();
  if (outcome.refreshed) {
    for (size_t i = 0; i < plans_.size(); ++i) {
      if (!plans_[i].has_h || !plans_[i].has_s) {
        throw BackendError(ErrorCode::kMissingStatistics,
                           LayerName(static_cast<int>(i)) + ": no " + (!plans_[i].has_h ? "input (H)" : "output-gradient (S)") +
                               " statistics were recorded before this step, which refreshes the factors (step " +
                               std::to_string(steps_) + ", tcov " + std::to_string(config_.tcov) + ")");
      }
    }
  }
  // Per-tensor scalars from the per-tensor step counters (see NOTE: [float32 order of operations]).
  std::vector<StepTensor> active;
  active.reserve(tensors_.size());
  for (size_t t = 0; t < tensors_.size(); ++t) {
    if (!has_grad[t]) continue;
    StepTensor st = step_tensors_[t];
    st.param = params[t];
    st.grad = grads[t];
    st.momentum = momenta_[t];
    st.scalars = math::step_scalars(config_.lr, config_.beta, config_.weight_decay, step_counts_[t] + 1);
    active.push_back(st);
  }
  StepRequest req;
  req.rule = config_.rule;
  req.damping = static_cast<float>(config_.damping);
  req.tensors = active.data();
  req.tensor_count = active.size();
  req.refresh = outcome.refreshed && !segments_.empty();
  req.segments = segments_.data();
  req.segment_count = segments_.size();
  req.fresh = fresh_;
  req.running = running_;
  req.decay = static_cast<float>(config_.decay);
  req.mix = static_cast<float>(config_.mix);
  req.guard = config_.guard;
  outcome.applied = backend_->Step(req);
  for (LayerPlan& p : plans_) p.has_h = p.has_s = false;
  if (outcome.applied) {
    for (size_t t = 0; t < tensors_.size(); ++t) {
      if (has_grad[t]) ++step_counts_[t];
    }
    ++steps_;
  }
  return outcome;
}

OptimizerCore::State OptimizerCore::ExportState() const {
  State s;
  s.steps = steps_;
  s.step_counts = step_counts_;
  s.momenta.resize(tensors_.size());
  for (size_t t = 0; t < tensors_.size(); ++t) {
    s.momenta[t].resize(static_cast<size_t>(tensors_[t].numel));
    backend_->Download(s.momenta[t].data(), momenta_[t], s.momenta[t].size());
  }
  s.factors.resize(static_cast<size_t>(factor_total_));
  backend_->Download(s.factors.data(), running_, s.factors.size());
  return s;
}

void OptimizerCore::ImportState(const State& s) {
  auto bad = [](const std::string& m) { throw BackendError(ErrorCode::kBadCheckpoint, m); };
  if (s.steps < 0) bad("checkpoint steps must be >= 0");
  if (s.step_counts.size() != tensors_.size() || s.momenta.size() != tensors_.size())
    bad("checkpoint has " + std::to_string(s.momenta.size()) + " tensors, this optimizer has " +
        std::to_string(tensors_.size()));
  for (size_t t = 0; t < tensors_.size(); ++t) {
    if (s.momenta[t].size() != static_cast<size_t>(tensors_[t].numel))
      bad("checkpoint momenta[" + std::to_string(t) + "] has " + std::to_string(s.momenta[t].size()) +
          " elements, expected " + std::to_string(tensors_[t].numel));
    if (s.step_counts[t] < 0) bad("checkpoint stepCounts[" + std::to_string(t) + "] must be >= 0");
  }
  if (s.factors.size() != static_cast<size_t>(factor_total_))
    bad("checkpoint factors have " + std::to_string(s.factors.size()) + " elements, expected " +
        std::to_string(factor_total_));
  // All checks passed: now write.
  for (size_t t = 0; t < tensors_.size(); ++t) backend_->Upload(momenta_[t], s.momenta[t].data(), s.momenta[t].size());
  backend_->Upload(running_, s.factors.data(), s.factors.size());
  step_counts_ = s.step_counts;
  steps_ = s.steps;
  for (LayerPlan& p : plans_) p.has_h = p.has_s = false;
}

}  // namespace adafisher
