/**
 * Slot classes (--slots, the models file's `slots`) through the real engine and server:
 * one context per class; a request takes the smallest class it fits, a larger one when
 * that is busy; `context_length_exceeded` is judged against the largest class; memory
 * and KV figures cover every class.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server.js";
import { startTestServer, STORIES, waitFor } from "./helpers/server.js";

let classes: RunningServer;
let single: RunningServer;
beforeAll(async () => {
  [classes, single] = await Promise.all([
    startTestServer([STORIES], { slots: [{ count: 2, ctxSize: 128 }, { count: 1, ctxSize: 1024 }] }),
    startTestServer([{ ...STORIES, ctxSize: 1024, parallel: 1 }]),
  ]);
});
afterAll(async () => Promise.all([classes?.close(), single?.close()]));

const complete = async (s: RunningServer, body: Record<string, unknown>) => {
  const res = await fetch(`${s.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "stories260K", temperature: 0, ...body }) });
  return { status: res.status, json: (await res.json()) as { choices: Array<{ text: string; finish_reason: string }>; usage: { completion_tokens: number; prompt_tokens: number }; error?: { code: string } } };
};
const sched = () => classes.registry.resolve("stories260K").scheduler;

describe("slot classes", () => {
  it("a request too long for the small class runs in the large one, with the same greedy text as one large class", async () => {
    const body = { prompt: "Once upon a time", max_tokens: 600, ignore_eos: true };
    const [a, b] = await Promise.all([complete(classes, body), complete(single, body)]);
    expect(a.status).toBe(200);
    expect(a.json.usage.completion_tokens).toBe(600);
    expect(a.json.choices[0]!.text).toBe(b.json.choices[0]!.text);
    // Longer than the largest class: refused up front, naming it.
    const tooLong = await complete(classes, { prompt: "Once upon a time", max_tokens: 1100 });
    expect(tooLong.status).toBe(400);
    expect(tooLong.json.error!.code).toBe("context_length_exceeded");
  });

  it("a busy class never makes a fitting request fail: short ones use the small slots while the large one works", async () => {
    const ac = new AbortController();
    const long = fetch(`${classes.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "stories260K", prompt: "Once upon a time", max_tokens: 900, ignore_eos: true, stream: true }),
      signal: ac.signal,
    });
    const reader = (await long).body!.getReader();
    await reader.read();
    await waitFor(() => sched().busySlots === 1);
    const shorts = await Promise.all([1, 2, 3, 4].map(() => complete(classes, { prompt: "Once upon a time", max_tokens: 20 })));
    for (const r of shorts) expect(r.json.usage.completion_tokens).toBe(20);
    ac.abort();
    await waitFor(() => sched().busySlots === 0, 5000);
  });

  it("without max_tokens a chat fills the context of the slot it got (the small class)", async () => {
    const res = await fetch(`${classes.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "stories260K", messages: [{ role: "user", content: "Once upon a time" }], temperature: 0, ignore_eos: true }),
    });
    const json = (await res.json()) as { usage: { prompt_tokens: number; completion_tokens: number }; choices: Array<{ finish_reason: string }> };
    expect(json.choices[0]!.finish_reason).toBe("length");
    expect(json.usage.prompt_tokens + json.usage.completion_tokens).toBe(128);
  });

  it("memory, KV metrics and /v1/models cover every class", async () => {
    const v = classes.registry.snapshot().versions[0]!;
    expect(Math.abs(v.actual!.ram / v.estimate!.ram - 1)).toBeLessThan(0.05);
    expect(v.loaded).toMatchObject({ contextLength: 1024, parallel: 3, kvCells: 2 * 128 + 1024 });
    const model = (await (await fetch(`${classes.url}/v1/models/stories260K`)).json()) as { context_length: number; versions: Array<{ slots: unknown }> };
    expect(model.context_length).toBe(1024);
    expect(model.versions[0]!.slots).toEqual([
      { count: 2, context_length: 128 },
      { count: 1, context_length: 1024 },
    ]);
    const metrics = await (await fetch(`${classes.url}/metrics`)).text();
    const reserved = Number(/^spindle_kv_cache_reserved_bytes\{[^}]*\} (\S+)$/m.exec(metrics)![1]);
    expect(reserved).toBe(v.loaded!.kvBytesPerToken * (2 * 128 + 1024));
  });
});
