// adafisher/tfjs: AdaFisher as a drop-in TensorFlow.js optimizer.
// Needs the optional peer dependency @tensorflow/tfjs (>= 4.22).
import type * as tf from '@tensorflow/tfjs';

import type { AdaFisherTfjsOptions } from './optimizer.js';

export type { AdaFisherTfjsOptions } from './optimizer.js';
export type { LayerReport, TapKind } from './taps.js';

// The adapter is loaded dynamically so that a missing peer dependency gives an actionable
// message instead of Node's bare ERR_MODULE_NOT_FOUND.
let adapter: typeof import('./optimizer.js');
try {
  adapter = await import('./optimizer.js');
} catch (e) {
  const err = e as Error & { code?: string };
  if (err.code === 'ERR_MODULE_NOT_FOUND' && err.message.includes('@tensorflow/tfjs')) {
    throw new Error(
      "adafisher/tfjs needs the peer dependency '@tensorflow/tfjs' (>= 4.22), which is not installed: " +
        'npm install @tensorflow/tfjs (or @tensorflow/tfjs-node, which includes it).',
      { cause: e },
    );
  }
  throw e;
}

/** The AdaFisher optimizer class (registered with TF.js serialization as 'AdaFisher'). */
export const AdaFisherOptimizer = adapter.AdaFisherOptimizer;
export type AdaFisherOptimizer = import('./optimizer.js').AdaFisherOptimizer;

/**
 * An AdaFisher optimizer for a TF.js model, ready for model.compile. Dense, Conv2D (NHWC),
 * BatchNormalization and LayerNormalization layers are preconditioned (in Sequential,
 * functional and nested models); other trainable weights get plain momentum (see
 * optimizer.layerReport()). fit, fitDataset and trainOnBatch drive it unchanged.
 * @param model the tf.LayersModel it will train.
 * @param options hyperparameters as in the core API: lr (1e-3), beta (0.9), damping (1e-3),
 *   gamma (0.8) or decay + mix, tcov (1), weightDecay (0), decoupled (false), backend ('auto'),
 *   nonFiniteGuard (true).
 * @throws {TypeError|RangeError} for a bad option or a model that is not a tf.LayersModel.
 * @example
 * import * as tf from '@tensorflow/tfjs';
 * import { adaFisher } from 'adafisher/tfjs';
 * model.compile({ optimizer: adaFisher(model, { lr: 1e-3 }), loss: 'categoricalCrossentropy' });
 * await model.fit(xs, ys, { epochs: 5 });
 */
export function adaFisher(model: tf.LayersModel, options: AdaFisherTfjsOptions = {}): AdaFisherOptimizer {
  return new AdaFisherOptimizer(options).attach(model);
}
