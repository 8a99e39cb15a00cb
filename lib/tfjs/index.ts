// adafisher/tfjs: AdaFisher as a drop-in TensorFlow.js optimizer.
// Needs the optional peer dependency @tensorflow/tfjs (>= 4.22); without it, importing this
// module throws code ADAFISHER_TFJS_NOT_FOUND saying how to install it (NOTE: [loading tfjs]).
// No top-level await: require('adafisher/tfjs') works as well as import.
import type * as tf from '@tensorflow/tfjs';

import { AdaFisherOptimizer, type AdaFisherTfjsOptions } from './optimizer.js';

export { AdaFisherOptimizer, type AdaFisherTfjsOptions } from './optimizer.js';
export type { LayerReport, TapKind } from './taps.js';
export type { NamedTensor } from './serialization.js';

/**
 * An AdaFisher optimizer for a TF.js model, ready for model.compile. Dense, Conv2D (NHWC),
 * BatchNormalization and LayerNormalization layers are preconditioned (in Sequential,
 * functional and nested models); other trainable weights get plain momentum (see
 * optimizer.layerReport()). fit, fitDataset and trainOnBatch drive it unchanged; custom loops
 * compute gradients with optimizer.computeGradients (which records the layer statistics), clip
 * or accumulate them, and call optimizer.applyGradients.
 * @param model the tf.LayersModel it will train.
 * @param options hyperparameters as in the core API: lr (1e-3), beta (0.9), damping (1e-3),
 *   gamma (0.8) or decay + mix, tcov (1), weightDecay (0), decoupled (false), backend ('cpu'
 *   unless ADAFISHER_BACKEND says otherwise), nonFiniteGuard (true).
 * @throws {TypeError|RangeError} code ADAFISHER_INVALID_ARGUMENT for a bad option or a model that
 *   is not a tf.LayersModel; code ADAFISHER_BACKEND_UNAVAILABLE when backend 'cuda' cannot run here.
 * @example
 * import * as tf from '@tensorflow/tfjs';
 * import { adaFisher } from 'adafisher/tfjs';
 * model.compile({ optimizer: adaFisher(model, { lr: 1e-3 }), loss: 'categoricalCrossentropy' });
 * await model.fit(xs, ys, { epochs: 5 });
 */
export function adaFisher(model: tf.LayersModel, options: AdaFisherTfjsOptions = {}): AdaFisherOptimizer {
  return new AdaFisherOptimizer(options).attach(model);
}
