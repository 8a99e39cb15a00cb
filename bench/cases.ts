// Benchmark workloads as data. Every layer's input, output-gradient, weight and bias
// shapes are derived here once, so the CPU bench, the GPU bench and the PyTorch baseline
// script (which reads `node dist/bench/gpu.js --dump-cases`) measure the same tensors.

export interface LinearDef {
  kind: 'linear';
  in: number;
  out: number;
  bias: boolean;
}

export interface Conv2dDef {
  kind: 'conv2d';
  inChannels: number;
  outChannels: number;
  kernel: number;
  stride: number;
  padding: number;
  bias: boolean;
}

export type LayerDef = LinearDef | Conv2dDef;

export interface WorkloadDef {
  name: string;
  description: string;
  /** Shape of the network input (NCHW for conv nets, [batch, features] for MLPs). */
  input: number[];
  layers: LayerDef[];
}

/** Figures quoted for the official PyTorch AdaFisher on the 2-core CPU box (not measured by us). */
export interface QuotedReference {
  what: string;
  lowMs: number;
  highMs: number;
  /** Which of our figures it compares with. */
  ours: 'step' | 'factors';
}

const CNN_LAYERS: LayerDef[] = [
  { kind: 'conv2d', inChannels: 3, outChannels: 32, kernel: 3, stride: 1, padding: 1, bias: true },
  { kind: 'conv2d', inChannels: 32, outChannels: 64, kernel: 3, stride: 2, padding: 1, bias: true },
  { kind: 'conv2d', inChannels: 64, outChannels: 128, kernel: 3, stride: 2, padding: 1, bias: true },
  { kind: 'linear', in: 8192, out: 10, bias: true },
];

export const WORKLOADS: Record<string, WorkloadDef> = {
  mlp: {
    name: 'mlp',
    description: 'Linear 784->1024->1024->10 with biases, batch 128',
    input: [128, 784],
    layers: [
      { kind: 'linear', in: 784, out: 1024, bias: true },
      { kind: 'linear', in: 1024, out: 1024, bias: true },
      { kind: 'linear', in: 1024, out: 10, bias: true },
    ],
  },
  cnn: {
    name: 'cnn',
    description: 'Conv 3->32 (3x3,p1), 32->64 (3x3,s2,p1), 64->128 (3x3,s2,p1), Linear 8192->10; NCHW 32x3x32x32',
    input: [32, 3, 32, 32],
    layers: CNN_LAYERS,
  },
  // The cnn layers at batch 512: 224 MB of conv inputs and output gradients, four times the
  // L2 of an H100 or H200. At batch 32 those are 14 MB, which an H200 reads in about 3 us,
  // less than the launch latency of the 9 launches three conv layers need: there the conv
  // factors measure latency, not bandwidth. This case is where the conv bandwidth target
  // is judged (TARGETS.gpu.convFactorsMinBytes).
  cnn512: {
    name: 'cnn512',
    description: 'the cnn layers at batch 512: NCHW 512x3x32x32',
    input: [512, 3, 32, 32],
    layers: CNN_LAYERS,
  },
  big: {
    name: 'big',
    description: '4 x Linear 4096->4096 with biases (~67 M parameters), batch 256',
    input: [256, 4096],
    layers: [
      { kind: 'linear', in: 4096, out: 4096, bias: true },
      { kind: 'linear', in: 4096, out: 4096, bias: true },
      { kind: 'linear', in: 4096, out: 4096, bias: true },
      { kind: 'linear', in: 4096, out: 4096, bias: true },
    ],
  },
  // Not a model: 32 tensors of 4 to 16 floats, whose step and factor calls cost what a
  // call costs apart from its memory traffic (JS, the binding, planning, launches). Known
  // to both benches: the CPU bench runs it when asked (--cases tiny), the GPU bench by
  // default, unjudged.
  tiny: {
    name: 'tiny',
    description: '16 x Linear 4->4 with biases, batch 2 (the fixed cost of a call)',
    input: [2, 4],
    layers: Array.from({ length: 16 }, (): LayerDef => ({ kind: 'linear', in: 4, out: 4, bias: true })),
  },
};

/** Quoted (not measured) timings of the official PyTorch code on the 2-core CPU box. */
export const CPU_QUOTED: Record<string, QuotedReference> = {
  mlp: { what: 'official PyTorch AdaFisher step (quoted)', lowMs: 4.6, highMs: 6.0, ours: 'step' },
  cnn: { what: 'official PyTorch AdaFisher factors (quoted)', lowMs: 80, highMs: 97, ours: 'factors' },
};

/** Which workloads each bench runs, in order. */
export const CPU_CASES = ['mlp', 'cnn'] as const;
// `tiny` last on the GPU: its figures (a call's fixed cost, ours and fused Adam's) are not
// judged, and a run cut short by its time limit has the judged workloads first.
export const GPU_CASES = ['mlp', 'cnn', 'cnn512', 'big', 'tiny'] as const;

/** Performance targets, as data (see bench/README.md). */
export const TARGETS = {
  cpu: {
    /** step time <= this x (20 B/param / measured copy bandwidth). */
    stepOverFloor: 1.5,
    /** conv factor time <= this x (bytes of the conv activations / copy bandwidth). */
    convFactorsOverFloor: 3,
    /** eager PyTorch AdaFisher time / our whole optimizer time (both warm), same machine and threads. */
    wholeSpeedupOverEager: 1,
  },
  gpu: {
    /** step bandwidth (20 B/param) >= this fraction of D2D copy bandwidth, on 'big'. */
    stepFractionOfCopy: 0.85,
    /** fused Adam step time / our step time >= this, on 'big'. */
    stepSpeedupOverFusedAdam: 1.3,
    /** conv factor bandwidth (activations read once) >= this fraction of copy bandwidth, */
    convFactorsFractionOfCopy: 0.6,
    /** judged where the conv inputs and output gradients exceed this (any GPU's L2 several times). */
    convFactorsMinBytes: 128 * 1024 * 1024,
    /** eager PyTorch AdaFisher time / our whole optimizer time >= this, every workload. */
    wholeSpeedupOverEager: 5,
  },
} as const;

export interface LayerShapes {
  def: LayerDef;
  inputShape: number[];
  outputShape: number[];
  weightShape: number[];
  biasShape: number[] | null;
  weightNumel: number;
  biasNumel: number;
}

export interface DerivedWorkload extends WorkloadDef {
  shapes: LayerShapes[];
  parameters: number;
  /** float32 elements of all layer inputs (what recordInput reads). */
  inputElements: number;
  /** float32 elements of all output gradients (what recordOutputGrad reads). */
  outputGradElements: number;
  /** Same two sums restricted to conv layers. */
  convInputElements: number;
  convOutputGradElements: number;
  /** Entries of all H and S factor vectors (min-max + EMA work). */
  factorEntries: number;
}

const prod = (s: readonly number[]) => s.reduce((a, b) => a * b, 1);

/** Walks the layer list from the input shape; throws when the shapes do not chain. */
export function deriveWorkload(w: WorkloadDef): DerivedWorkload {
  let shape = [...w.input];
  const shapes: LayerShapes[] = [];
  for (const [i, def] of w.layers.entries()) {
    if (def.kind === 'linear') {
      // A linear layer after a conv flattens [N, C, H, W] to [N, C*H*W].
      const input = shape.length === 2 ? shape : [shape[0], prod(shape.slice(1))];
      if (input[1] !== def.in) throw new Error(`${w.name}.layers[${i}]: input ${input} does not match in=${def.in}`);
      const output = [input[0], def.out];
      shapes.push({
        def,
        inputShape: input,
        outputShape: output,
        weightShape: [def.out, def.in],
        biasShape: def.bias ? [def.out] : null,
        weightNumel: def.out * def.in,
        biasNumel: def.bias ? def.out : 0,
      });
      shape = output;
    } else {
      if (shape.length !== 4 || shape[1] !== def.inChannels) {
        throw new Error(`${w.name}.layers[${i}]: input ${shape} does not match inChannels=${def.inChannels}`);
      }
      const [n, , h, wd] = shape;
      const oh = Math.floor((h + 2 * def.padding - def.kernel) / def.stride) + 1;
      const ow = Math.floor((wd + 2 * def.padding - def.kernel) / def.stride) + 1;
      const output = [n, def.outChannels, oh, ow];
      shapes.push({
        def,
        inputShape: shape,
        outputShape: output,
        weightShape: [def.outChannels, def.inChannels, def.kernel, def.kernel],
        biasShape: def.bias ? [def.outChannels] : null,
        weightNumel: def.outChannels * def.inChannels * def.kernel * def.kernel,
        biasNumel: def.bias ? def.outChannels : 0,
      });
      shape = output;
    }
  }
  const sum = (f: (s: LayerShapes) => number, only?: LayerDef['kind']) =>
    shapes.filter((s) => only === undefined || s.def.kind === only).reduce((a, s) => a + f(s), 0);
  return {
    ...w,
    shapes,
    parameters: sum((s) => s.weightNumel + s.biasNumel),
    inputElements: sum((s) => prod(s.inputShape)),
    outputGradElements: sum((s) => prod(s.outputShape)),
    convInputElements: sum((s) => prod(s.inputShape), 'conv2d'),
    convOutputGradElements: sum((s) => prod(s.outputShape), 'conv2d'),
    factorEntries: sum((s) => {
      const k = s.def.kind === 'linear' ? s.def.in : s.def.inChannels * s.def.kernel * s.def.kernel;
      return k + (s.def.bias ? 1 : 0) + s.outputShape[1];
    }),
  };
}
