// Worker thread body for test/reliability-workers.test.ts.
//   { mode: 'train', seed, steps }: trains and posts { done: result }.
//   { mode: 'forever', seed }:      trains step after step, posting { step } after each,
//                                   until the parent terminates the worker.
import { parentPort, workerData } from 'node:worker_threads';

import { liveAllocations, train } from './train.mjs';

const { mode, seed, steps } = workerData;
if (mode === 'train') {
  const result = train(seed, steps);
  parentPort.postMessage({ done: result, live: liveAllocations() });
} else {
  for (let round = 0; ; round++) train(seed + round, 1000, (step) => parentPort.postMessage({ step }));
}
