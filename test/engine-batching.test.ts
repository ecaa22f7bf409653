/**
 * The real engine's decode steps in sequence order: llama.cpp runs a step whose sequence
 * ids are not increasing as several passes over the weights (per-sequence KV), so the
 * batch strategy sorts each step by the sequence id each item carries in its priority.
 * This drives node-llama-cpp itself, so it fails if the library stops passing the tagged
 * priority through to the strategy, or if the sort is removed. And where every running
 * sequence has asked, the step is formed without waiting for a turn of the event loop
 * (StepGate.dispatchSchedule).
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { getLlama, LlamaLogLevel, type Llama, type LlamaContext, type LlamaModel, type Token } from "node-llama-cpp";
import { decodingSequencesQueuedIn, sequenceOf, StepGate } from "../src/engine/batch-strategy.js";
import { EngineSequence } from "../src/engine/sequence.js";
import { GREEDY_SAMPLING } from "../src/engine/types.js";
import { sharedModel } from "./helpers/server.js";

describe("decode steps through node-llama-cpp", () => {
  let llama: Llama;
  let model: LlamaModel;
  let context: LlamaContext;
  const steps: number[][] = [];
  let running = 0;
  /** Turns of the event loop so far, while a test counts them; and the turn each step was formed in. */
  let turns = 0;
  const formedInTurn: number[] = [];
  beforeAll(async () => {
    llama = await getLlama({ gpu: false, build: "never", maxThreads: 0, logLevel: LlamaLogLevel.error });
    model = await llama.loadModel({ modelPath: sharedModel("stories260K.gguf") });
    const gate = new StepGate({ expectedItems: () => running, unsettledLoops: () => 0, onStep: () => {} }, undefined);
    context = await model.createContext({
      // Four for the first test, one for the last.
      sequences: 5,
      contextSize: 256,
      threads: 1,
      batching: {
        itemPrioritizationStrategy: (arg) => {
          const out = gate.strategy(arg);
          if (out.length > 0) {
            steps.push(out.map((p) => sequenceOf(p.item)));
            formedInTurn.push(turns);
          }
          return out;
        },
        dispatchSchedule: gate.dispatchSchedule,
      },
    });
    gate.decodingSequencesQueued = decodingSequencesQueuedIn(context);
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

  it("a lone sequence's next step is formed in the turn of the event loop that gave it its token", async () => {
    const seq = new EngineSequence(4, context.getSequence(), model, 0, 256, 4);
    running = 1;
    let counting = true;
    const tick = (): void => {
      turns++;
      if (counting) setImmediate(tick);
    };
    setImmediate(tick);
    const tokenInTurn: number[] = [];
    steps.length = formedInTurn.length = 0;
    try {
      for await (const _ of seq.generate(model.tokenize("Once upon a time", true) as Token[], { ...GREEDY_SAMPLING, ignoreEos: true }, [])) {
        tokenInTurn.push(turns);
        if (tokenInTurn.length >= 12) break;
      }
    } finally {
      counting = false;
      running = 0;
      await seq.truncate(0);
    }
    // Step k + 1 is the one asked for after token k: node-llama-cpp's own schedule forms it a turn later.
    const sameTurn = tokenInTurn.slice(0, -1).filter((turn, k) => formedInTurn[k + 1] === turn).length;
    expect(sameTurn).toBeGreaterThanOrEqual(tokenInTurn.length - 2);
  });
});
