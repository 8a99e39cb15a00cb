// The taps compute a Dense layer in place of its call(); what that call does besides computing
// the output must still happen. TF.js's Dense.call runs the layer's call hook
// (Layer.setCallHook) on every call: training with AdaFisher must run it as often as training
// with TF.js's own optimizers, with the same inputs.
import * as tf from '@tensorflow/tfjs';
import { beforeAll, describe, expect, it } from 'vitest';

import { adaFisher } from '../lib/tfjs/index.js';

beforeAll(async () => {
  await tf.setBackend('cpu');
});

function build(): tf.Sequential {
  return tf.sequential({
    layers: [
      tf.layers.conv2d({ inputShape: [4, 4, 1], filters: 2, kernelSize: 3, padding: 'same', activation: 'relu' }),
      tf.layers.batchNormalization(),
      tf.layers.flatten(),
      tf.layers.dense({ units: 3, activation: 'relu' }),
      tf.layers.dense({ units: 2 }),
    ],
  });
}

/** Per layer: how many times its call hook ran during a 2-step fit, and the shapes it saw. */
async function hookCalls(optimizer: (m: tf.LayersModel) => tf.Optimizer): Promise<{ calls: number[]; shapes: string[][] }> {
  const model = build();
  const calls = model.layers.map(() => 0);
  const shapes: string[][] = model.layers.map(() => []);
  model.layers.forEach((l, i) =>
    l.setCallHook((inputs) => {
      calls[i]++;
      shapes[i].push(JSON.stringify((Array.isArray(inputs) ? inputs[0] : inputs).shape));
    }),
  );
  const opt = optimizer(model);
  model.compile({ optimizer: opt, loss: 'meanSquaredError' });
  const x = tf.ones([8, 4, 4, 1]);
  const y = tf.ones([8, 2]);
  await model.fit(x, y, { epochs: 1, batchSize: 4, verbose: 0 });
  tf.dispose([x, y]);
  opt.dispose();
  model.dispose();
  return { calls, shapes };
}

describe('a Dense layer with a call hook (Layer.setCallHook)', () => {
  it('runs the hook on every training step, as with tf.train.adam', async () => {
    const adam = await hookCalls(() => tf.train.adam());
    expect(adam.calls[3]).toBe(2); // TF.js's Dense runs it; its Conv2D and BatchNormalization do not
    const fisher = await hookCalls((m) => adaFisher(m, { lr: 1e-4 }));
    expect(fisher).toEqual(adam);
  });
});
