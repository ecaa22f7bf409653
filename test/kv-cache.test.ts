/**
 * KV cache types (--cache-type-k/-v, the models file's cache_type_k/_v) through the real
 * engine and server: what llama.cpp allocates changes as the estimate says, the KV metrics
 * and /v1/models follow the type, and a quantized cache generates. The model is written
 * here (a synthetic GGUF whose head size, 32, is a whole number of quantized blocks; the
 * shared tiny models' heads are 8 and 16 wide).
 */
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { writeSyntheticGguf } from "../bench/synthetic-gguf.js";
import type { RunningServer } from "../src/server.js";
import { sharedModel, startTestServer } from "./helpers/server.js";

const SHAPE = { layers: 2, hidden: 128, heads: 4, kvHeads: 2, ffn: 256, contextLength: 2048 };
const CTX = 1024;
const PARALLEL = 4;
let file: string;
const servers: RunningServer[] = [];

beforeAll(async () => {
  file = join(mkdtempSync(join(tmpdir(), "spindle-kv-")), "kv32.gguf");
  await writeSyntheticGguf(file, { shape: SHAPE, weights: "f16", seed: 5, tokenizerFrom: sharedModel("llama-2-tiny-random-chat.gguf") });
});
afterAll(async () => {
  await Promise.all(servers.map((s) => s.close()));
});

async function serve(opts: Parameters<typeof startTestServer>[1]) {
  const s = await startTestServer([{ id: "kv", file, ctxSize: CTX, parallel: PARALLEL }], opts);
  servers.push(s);
  const v = s.registry.snapshot().versions[0]!;
  return { server: s, estimate: v.estimate!.ram, allocated: v.actual!.ram, loaded: v.loaded! };
}

const scrape = async (s: RunningServer, name: string) => Number(new RegExp(`^${name}\\{[^}]*\\} (\\S+)$`, "m").exec(await (await fetch(`${s.url}/metrics`)).text())![1]);

describe("KV cache types", () => {
  it("q8_0 keys: llama.cpp allocates what the estimate predicts less, and the KV figures follow", async () => {
    const f16 = await serve({});
    const q8 = await serve({ cacheTypeK: "q8_0" });
    // Keys shrink from 2 bytes an element to 34/32: per token, over both layers' two KV heads of 32.
    const cells = CTX * PARALLEL;
    const saved = cells * SHAPE.layers * SHAPE.kvHeads * 32 * (2 - 34 / 32);
    expect((f16.allocated - q8.allocated) / saved).toBeGreaterThan(0.95);
    expect((f16.allocated - q8.allocated) / saved).toBeLessThan(1.05);
    expect((f16.estimate - q8.estimate) / saved).toBeGreaterThan(0.95);
    expect((f16.estimate - q8.estimate) / saved).toBeLessThan(1.05);
    expect(q8.loaded.kvBytesPerToken / f16.loaded.kvBytesPerToken).toBeCloseTo((34 + 64) / 128, 9);
    expect(await scrape(q8.server, "spindle_kv_cache_reserved_bytes")).toBe(q8.loaded.kvBytesPerToken * cells);
    const model = await (await fetch(`${q8.server.url}/v1/models/kv`)).json();
    expect(model.versions[0].kv_cache_type).toEqual({ k: "q8_0", v: "f16" });
  });

  it("a quantized V cache turns flash attention on (llama.cpp needs it) and generates the same greedy text twice", async () => {
    const q = await serve({ cacheTypeK: "q8_0", cacheTypeV: "q8_0" });
    const ask = async () =>
      (await (await fetch(`${q.server.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "kv", prompt: "Hello there", max_tokens: 12, temperature: 0, ignore_eos: true }) })).json()) as {
        choices: Array<{ text: string }>;
        usage: { completion_tokens: number };
      };
    const a = await ask();
    expect(a.usage.completion_tokens).toBe(12);
    expect((await ask()).choices[0]!.text).toBe(a.choices[0]!.text);
    // And refused clearly where flash attention is forced off.
    await expect(startTestServer([{ id: "kv", file, ctxSize: CTX }], { cacheTypeV: "q4_0", flashAttention: "off" })).rejects.toThrow(/q4_0 V cache needs flash attention/);
  });
});
