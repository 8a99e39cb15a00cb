// The optional peer dependency @tensorflow/tfjs, for the rest of the adapter.
import { createRequire } from 'node:module';

import type * as TF from '@tensorflow/tfjs';

import { codedError, ErrorCodes } from '../errors.js';

// NOTE: [loading tfjs]
// The adapter loads '@tensorflow/tfjs' with require() rather than a static import, for two
// reasons: a missing peer dependency gets an actionable message (a static import fails while
// Node links the modules, before any code here can catch it, with a bare ERR_MODULE_NOT_FOUND),
// and the module graph needs no top-level await, so CommonJS code can require('adafisher/tfjs')
// (Node's require(esm) refuses a graph with top-level await: ERR_REQUIRE_ASYNC_MODULE). The
// other adapter modules import only tfjs's types and take its values from here.
// '@tensorflow/tfjs' has no "exports" map: Node resolves both `import` and `require` to its
// CommonJS "main", so this is the very instance an application gets from
// `import * as tf from '@tensorflow/tfjs'` (one engine, one LayersModel class).
function load(): typeof TF {
  const require = createRequire(import.meta.url);
  try {
    return require('@tensorflow/tfjs') as typeof TF;
  } catch (e) {
    const err = e as Error & { code?: string };
    if (err.code === 'MODULE_NOT_FOUND' && err.message.includes("'@tensorflow/tfjs'")) {
      const missing = codedError(
        ErrorCodes.tfjsNotFound,
        "adafisher/tfjs needs the peer dependency '@tensorflow/tfjs' (^4.22, a 4.x from 4.22 on), which is not installed: " +
          'npm install @tensorflow/tfjs (or @tensorflow/tfjs-node, which includes it).',
      );
      missing.cause = e;
      throw missing;
    }
    throw e;
  }
}

/** The @tensorflow/tfjs module. */
export const tfjs: typeof TF = load();
