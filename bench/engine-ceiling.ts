/**
 * The engine ceiling: node-llama-cpp driven directly, no HTTP, no scheduler. N sequences
 * of one context each generate from the same prompt, as fast as the library's own
 * batching allows; every server figure can be stated as a fraction of this.
 */
import { buildOf } from "../src/engine/engine.js";
import { getLlama, LlamaLogLevel, resolveChatWrapper, type BatchItem, type PrioritizedBatchItem, type Token } from "node-llama-cpp";

export interface CeilingResult {
  concurrency: number;
  outputTokens: number;
  durationS: number;
  outputThroughput: number;
  ttftMsMedian: number;
  /** Sequences per decode step ÷ sequences running: how full the library's own steps are. */
  stepFullness: number;
}

/** Which binary the ceiling runs: node-llama-cpp picks a local build (npm run engine:build) over its prebuilt one. */
export async function ceilingBuild(): Promise<string> {
  const b = buildOf(await getLlama({ gpu: false, build: "never", maxThreads: 0, logLevel: LlamaLogLevel.error }));
  return `node-llama-cpp ${b.type} binary, ggml CPU variant ${b.cpuVariant}`;
}

export async function engineCeiling(opts: {
  modelPath: string;
  prompt: string;
  maxTokens: number;
  concurrency: number;
  parallel: number;
  ctxSize: number;
  threads: number;
  rounds: number;
  /** false: the weights are read into memory rather than mapped. */
  mmap?: boolean;
}): Promise<CeilingResult[]> {
  const llama = await getLlama({ gpu: false, build: "never", maxThreads: 0, logLevel: LlamaLogLevel.error });
  const model = await llama.loadModel({ modelPath: opts.modelPath, useMmap: opts.mmap !== false });
  let items = 0;
  let steps = 0;
  let running = 0;
  let expected = 0;
  const context = await model.createContext({
    sequences: opts.parallel,
    contextSize: opts.ctxSize,
    threads: opts.threads,
    batchSize: Math.min(512, opts.ctxSize * opts.parallel),
    batching: {
      // The library's default strategy, only observed: the ceiling is the library as it is.
      itemPrioritizationStrategy: ({ items: batch, size }: { items: readonly BatchItem[]; size: number }): PrioritizedBatchItem[] => {
        steps++;
        items += batch.length;
        expected += Math.max(batch.length, running);
        let left = size;
        return batch.map((item) => {
          const processAmount = Math.min(item.tokens.length, Math.max(1, Math.floor(left / batch.length)));
          left -= processAmount;
          return { item, processAmount };
        });
      },
    },
  });
  const sequences = Array.from({ length: opts.parallel }, () => context.getSequence());
  const wrapper = resolveChatWrapper(model, { type: "general" });
  const tokens = wrapper
    .generateContextState({ chatHistory: [{ type: "user", text: opts.prompt }, { type: "model", response: [] }] })
    .contextText.tokenize(model.tokenizer);
  const results: CeilingResult[] = [];
  try {
    for (let round = 0; round < opts.rounds; round++) {
      items = steps = expected = 0;
      const t0 = performance.now();
      const ttfts: number[] = [];
      let total = 0;
      await Promise.all(
        sequences.slice(0, opts.concurrency).map(async (seq) => {
          await seq.clearHistory();
          running++;
          let n = 0;
          const start = performance.now();
          for await (const _t of seq.evaluate(tokens as Token[], { temperature: 0, yieldEogToken: true })) {
            if (n === 0) ttfts.push(performance.now() - start);
            if (++n >= opts.maxTokens) break;
          }
          running--;
          total += n;
        }),
      );
      const durationS = (performance.now() - t0) / 1000;
      ttfts.sort((a, b) => a - b);
      results.push({
        concurrency: opts.concurrency,
        outputTokens: total,
        durationS,
        outputThroughput: total / durationS,
        ttftMsMedian: ttfts[Math.floor(ttfts.length / 2)] ?? NaN,
        stepFullness: expected > 0 ? items / expected : NaN,
      });
    }
  } finally {
    await context.dispose();
    await model.dispose();
    await llama.dispose();
  }
  return results;
}
