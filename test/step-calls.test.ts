/**
 * Where steps and samples run (src/engine/step-calls.ts), pinned with a stand-in for the
 * addon. After a step whose outputs llama.cpp may return out of order, the first sample
 * (which reorders them, unsafely for concurrent readers) runs alone; otherwise samples run
 * side by side. The real race is timing-dependent (test/speculative.test.ts drives the case
 * where it was seen). Steps marked for the calling thread run there. The real engine's side
 * is in test/step-thread.test.ts.
 */
import { describe, expect, it } from "vitest";
import type { LlamaContext } from "node-llama-cpp";
import { routeStepCalls, samplesTaken, stepsTaken } from "../src/engine/step-calls.js";

/** An addon stand-in whose methods are read-only on the prototype, as node-addon-api's are; it records overlapping samples. */
function fakeContext() {
  const log: string[] = [];
  let running = 0;
  let maxRunning = 0;
  const proto = {};
  Object.defineProperty(proto, "decodeBatch", { writable: false, value: async () => void log.push("decode") });
  Object.defineProperty(proto, "sampleToken", {
    writable: false,
    value: async (i: number) => {
      running++;
      maxRunning = Math.max(maxRunning, running);
      log.push(`start ${i}`);
      await new Promise((r) => setTimeout(r, 5));
      log.push(`end ${i}`);
      running--;
      return i;
    },
  });
  // The mended addon's jobs on the calling thread: settled before they return.
  Object.defineProperty(proto, "decodeBatchNow", { writable: false, value: () => (log.push("decode now"), Promise.resolve()) });
  Object.defineProperty(proto, "sampleTokenNow", {
    writable: false,
    value: (i: number) => {
      log.push(`now ${i}`);
      return Promise.resolve(i);
    },
  });
  const addon = Object.create(proto) as { decodeBatch(): Promise<void>; sampleToken(i: number): Promise<number> };
  return { context: { _ctx: addon } as unknown as LlamaContext, addon, log, maxRunning: () => maxRunning, reset: () => ((maxRunning = 0), (log.length = 0)) };
}

describe("step calls", () => {
  it("after a mixed step the first sample runs alone, then the rest side by side", async () => {
    const f = fakeContext();
    let mixed = true;
    routeStepCalls(f.context, { mayReorder: () => mixed });
    await f.addon.decodeBatch();
    expect(await Promise.all([0, 1, 2].map((i) => f.addon.sampleToken(i)))).toEqual([0, 1, 2]);
    expect(f.log.slice(0, 4)).toEqual(["decode", "start 0", "end 0", "start 1"]);
    expect(f.maxRunning()).toBe(2);
    // A step of one token per sequence: nothing waits.
    f.reset();
    mixed = false;
    await f.addon.decodeBatch();
    await Promise.all([0, 1, 2].map((i) => f.addon.sampleToken(i)));
    expect(f.maxRunning()).toBe(3);
  });

  it("without the guard, the first samples of a step overlap (what the guard exists to stop)", async () => {
    const f = fakeContext();
    await f.addon.decodeBatch();
    await Promise.all([0, 1].map((i) => f.addon.sampleToken(i)));
    expect(f.log.slice(0, 3)).toEqual(["decode", "start 0", "start 1"]);
  });

  it("a step marked for the JavaScript thread decodes and samples there, one after another; the next step decides afresh", async () => {
    const f = fakeContext();
    let here = true;
    routeStepCalls(f.context, { mayReorder: () => true, stepHere: () => here });
    const before = { steps: { ...stepsTaken }, samples: { ...samplesTaken } };
    await f.addon.decodeBatch();
    expect(await Promise.all([0, 1, 2].map((i) => f.addon.sampleToken(i)))).toEqual([0, 1, 2]);
    expect(f.log).toEqual(["decode now", "now 0", "now 1", "now 2"]);
    expect([stepsTaken.jsThread - before.steps.jsThread, samplesTaken.jsThread - before.samples.jsThread]).toEqual([1, 3]);
    // Read as the step is decoded, not as it is sampled.
    f.reset();
    here = false;
    await f.addon.decodeBatch();
    here = true;
    await Promise.all([0, 1].map((i) => f.addon.sampleToken(i)));
    expect(f.log.slice(0, 3)).toEqual(["decode", "start 0", "end 0"]);
  });

  it("a step marked for the steady thread is handed over, taken after the caller's microtasks and a turn of the event loop, and sampled here; a busy steady thread leaves it here", async () => {
    const f = fakeContext();
    let free = true;
    Object.defineProperty(f.addon, "decodeBatchBegin", { value: () => (f.log.push("begin"), free ? 1 : 0) });
    Object.defineProperty(f.addon, "decodeBatchEnd", { value: () => (f.log.push("end"), Promise.resolve()) });
    routeStepCalls(f.context, { mayReorder: () => true, stepHere: () => true, steadyThread: true });
    const before = { steps: { ...stepsTaken }, samples: { ...samplesTaken } };
    // I/O waiting for this turn of the event loop, then the token loops' frames once the step is formed: both before its result is taken.
    setImmediate(() => f.log.push("turn"));
    const step = f.addon.decodeBatch();
    queueMicrotask(() => f.log.push("frames"));
    await step;
    expect(await Promise.all([0, 1].map((i) => f.addon.sampleToken(i)))).toEqual([0, 1]);
    expect(f.log).toEqual(["begin", "frames", "turn", "end", "now 0", "now 1"]);
    expect([stepsTaken.steadyThread - before.steps.steadyThread, stepsTaken.jsThread - before.steps.jsThread, samplesTaken.jsThread - before.samples.jsThread]).toEqual([1, 0, 2]);
    f.reset();
    free = false;
    await f.addon.decodeBatch();
    await f.addon.sampleToken(0);
    expect(f.log).toEqual(["begin", "decode now", "now 0"]);
    expect(stepsTaken.jsThread - before.steps.jsThread).toBe(1);
  });

  it("a step handed to the steady thread carries whether it may run ahead, and one it ran ahead already is counted", async () => {
    const f = fakeContext();
    const asked: unknown[] = [];
    let answer = 1;
    Object.defineProperty(f.addon, "decodeBatchBegin", { value: (runAhead: unknown) => (asked.push(runAhead), answer) });
    Object.defineProperty(f.addon, "decodeBatchEnd", { value: () => Promise.resolve() });
    let ahead = true;
    routeStepCalls(f.context, { mayReorder: () => true, stepHere: () => true, steadyThread: true, runAhead: () => ahead });
    const before = { ...stepsTaken };
    await f.addon.decodeBatch();
    answer = 2;
    await f.addon.decodeBatch();
    ahead = false;
    await f.addon.decodeBatch();
    expect(asked).toEqual([true, true, false]);
    expect([stepsTaken.steadyThread - before.steadyThread, stepsTaken.ranAhead - before.ranAhead]).toEqual([3, 2]);
  });

  it("a step of several sequences goes to the steady thread only to run ahead, and to jobs where that thread is busy", async () => {
    const f = fakeContext();
    let answer = 1;
    Object.defineProperty(f.addon, "decodeBatchBegin", { value: (runAhead: unknown) => (f.log.push(`begin ${runAhead}`), answer) });
    Object.defineProperty(f.addon, "decodeBatchEnd", { value: () => (f.log.push("end"), Promise.resolve()) });
    let ahead = true;
    routeStepCalls(f.context, { mayReorder: () => false, stepHere: () => false, steadyThread: true, runAhead: () => ahead });
    await f.addon.decodeBatch();
    await Promise.all([0, 1].map((i) => f.addon.sampleToken(i)));
    expect(f.log).toEqual(["begin true", "end", "now 0", "now 1"]);
    f.reset();
    answer = 0;
    await f.addon.decodeBatch();
    expect(f.log).toEqual(["begin true", "decode"]);
    f.reset();
    ahead = false;
    await f.addon.decodeBatch();
    expect(f.log).toEqual(["decode"]);
  });

  it("without steadyThread the steady thread is never asked", async () => {
    const f = fakeContext();
    Object.defineProperty(f.addon, "decodeBatchBegin", { value: () => (f.log.push("begin"), 1) });
    routeStepCalls(f.context, { mayReorder: () => true, stepHere: () => true });
    await f.addon.decodeBatch();
    expect(f.log).toEqual(["decode now"]);
  });

  it("an addon without decodeBatchNow and sampleTokenNow (the prebuilt binaries) steps in jobs whatever is asked", async () => {
    const f = fakeContext();
    Object.defineProperty(f.addon, "decodeBatchNow", { value: undefined });
    Object.defineProperty(f.addon, "sampleTokenNow", { value: undefined });
    routeStepCalls(f.context, { mayReorder: () => false, stepHere: () => true });
    await f.addon.decodeBatch();
    await Promise.all([0, 1].map((i) => f.addon.sampleToken(i)));
    expect(f.log.slice(0, 3)).toEqual(["decode", "start 0", "start 1"]);
  });
});
