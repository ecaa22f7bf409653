/**
 * The real engine's decode steps in sequence order: llama.cpp runs a step whose sequence
 * ids are not increasing as several passes over the weights (per-sequence KV), so the
 * batch strategy sorts each step by the sequence id each item carries in its priority.
 * This drives node-llama-cpp itself, so it fails if the library stops passing the tagged
 * priority through to the strategy, or if the sort is removed.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { getLlama, LlamaLogLevel, type Llama, type LlamaContext, type LlamaModel, type Token } from "node-llama-cpp";
import { sequenceOf, StepGate } from "../src/engine/batch-strategy.js";
import { EngineSequence } from "../src/engine/sequence.js";
import { GREEDY_SAMPLING } from "../src/engine/types.js";
import { sharedModel } from "./helpers/server.js";

describe("decode steps through node-llama-cpp", () => {
  let llama: Llama;
  let model: LlamaModel;
  let context: LlamaContext;
  const steps: number[][] = [];
  let running = 0;
  beforeAll(async () => {
    llama = await getLlama({ gpu: false, build: "never", maxThreads: 0, logLevel: LlamaLogLevel.error });
    model = await llama.loadModel({ modelPath: sharedModel("stories260K.gguf") });
    const gate = new StepGate({ expectedItems: () => running, onStep: () => {} }, undefined);
    context = await model.createContext({
      sequences: 4,
      contextSize: 256,
      threads: 1,
      batching: {
        itemPrioritizationStrategy: (arg) => {
          const out = gate.strategy(arg);
          if (out.length > 0) steps.push(out.map((p) => sequenceOf(p.item)));
          return out;
        },
      },
    });
  });
  afterAll(async () => {
    await context?.dispose();
    await model?.dispose();
    await llama?.dispose();
  });

  it("every step holds each running sequence once, in increasing sequence id, whatever order they asked in", async () => {
    // node-llama-cpp hands out sequence ids 0, 1, 2… in order (the engine's model.ts relies on it too).
    const sequences = [0, 1, 2, 3].map((i) => new EngineSequence(i, context.getSequence(), model, 0, 256, i));
    const prompt = model.tokenize("Once upon a time", true) as Token[];
    running = 4;
    // Started last-first, so the library queues their first steps in decreasing id order.
    const runs = [...sequences].reverse().map(async (seq) => {
      let n = 0;
      for await (const _ of seq.generate(prompt, { ...GREEDY_SAMPLING, ignoreEos: true }, [])) {
        if (++n >= 8) break;
      }
    });
    await Promise.all(runs);
    const full = steps.filter((s) => s.length === 4);
    expect(full.length).toBeGreaterThanOrEqual(6);
    for (const step of full) expect(step).toEqual([0, 1, 2, 3]);
  });
});
