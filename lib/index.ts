// adafisher: the AdaFisher optimizer with native CPU and CUDA kernels.
export { AdaFisher, stateFromJSON, stateToJSON } from './optimizer.js';
export type {
  AdaFisherHyperparameters,
  AdaFisherOptions,
  AdaFisherState,
  BatchNormLayer,
  Conv2dLayer,
  DataFormatName,
  FactorRecord,
  LayerNormLayer,
  LayerSpec,
  LinearLayer,
  Padding,
  ParamLayer,
  ParameterSlot,
  StepResult,
  Tensor,
  WeightLayoutName,
} from './optimizer.js';
export { backendInfo, createBuffer, createTimingEvent, isDeviceBuffer, liveAllocations, resolveBackend, synchronize } from './backend.js';
export type { BackendName, BackendReport, DeviceBuffer, TimingEvent } from './backend.js';
export type { NativeBackendName } from './binding.js';
export { ErrorCodes, isAdaFisherError, WarningCodes } from './errors.js';
export type { AdaFisherError, ErrorCode } from './errors.js';
export { GoldenFormatError, readGolden, replayGolden, validateGolden } from './replay.js';
export type { ArrayKind, GoldenCase, GoldenLayer, ReplayReport } from './replay.js';
