/**
 * The output-order guard (src/engine/output-order-guard.ts): after a step whose outputs
 * llama.cpp may return out of order, the first sample (which reorders them, unsafely for
 * concurrent readers) runs alone; otherwise samples run side by side as before. The real
 * race is timing-dependent (test/speculative.test.ts drives the case where it was seen);
 * this pins the mechanism with a stand-in for the addon.
 */
import { describe, expect, it } from "vitest";
import type { LlamaContext } from "node-llama-cpp";
import { guardOutputReorder } from "../src/engine/output-order-guard.js";

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
  const addon = Object.create(proto) as { decodeBatch(): Promise<void>; sampleToken(i: number): Promise<number> };
  return { context: { _ctx: addon } as unknown as LlamaContext, addon, log, maxRunning: () => maxRunning, reset: () => ((maxRunning = 0), (log.length = 0)) };
}

describe("output-order guard", () => {
  it("after a mixed step the first sample runs alone, then the rest side by side", async () => {
    const f = fakeContext();
    let mixed = true;
    guardOutputReorder(f.context, () => mixed);
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
});
