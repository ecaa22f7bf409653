import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type OpenAI from "openai";
import type { RunningServer } from "../src/server.js";
import { openaiClient, startTestServer, STORIES, waitFor } from "./helpers/server.js";

const user = (content: string) => [{ role: "user" as const, content }];

describe("concurrent streams on one context", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer([STORIES], { parallel: 8 });
  });
  afterAll(async () => server?.close());

  it("eight concurrent streams all complete with their full length and usage, batched into shared decode steps", async () => {
    const client = openaiClient(server);
    const prompts = Array.from({ length: 8 }, (_, i) => `Once upon a time there was a ${["cat", "dog", "boy", "girl", "bird", "fish", "tree", "king"][i]}`);
    const before = { ...server.registry.resolve("stories260K").scheduler.snapshot() };
    const streamed = await Promise.all(
      prompts.map(async (p) => {
        const stream = (await client.completions.create({
          model: "stories260K",
          prompt: p,
          max_tokens: 64,
          temperature: 0,
          ignore_eos: true,
          stream: true,
          stream_options: { include_usage: true },
        } as never)) as unknown as AsyncIterable<OpenAI.Completion>;
        let text = "";
        let finish: string | null = null;
        let tokens = 0;
        for await (const c of stream) {
          text += c.choices[0]?.text ?? "";
          finish = c.choices[0]?.finish_reason ?? finish;
          if (c.usage) tokens = c.usage.completion_tokens;
        }
        return { text, finish, tokens };
      }),
    );
    for (const s of streamed) {
      expect(s.finish).toBe("length");
      expect(s.tokens).toBe(64);
      expect(s.text.length).toBeGreaterThan(0);
    }
    // No byte comparison with one-at-a-time runs: llama.cpp is not batch-invariant, and a
    // near-tie resolves differently in another batch. What must hold is that the streams
    // shared decode steps: 8 × 64 tokens in far fewer than 512 steps.
    const after = server.registry.resolve("stories260K").scheduler.snapshot();
    const steps = after.steps - before.steps;
    const items = after.items - before.items;
    expect(items).toBeGreaterThanOrEqual(8 * 64);
    expect(items / steps).toBeGreaterThan(4);
  });
});

describe("client disconnect", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer([STORIES], { parallel: 1, ctxSize: 2048 });
  });
  afterAll(async () => server?.close());

  /** Completion tokens the server generated and cancellations it counted (its own metrics). */
  async function counted() {
    const text = await (await fetch(`${server.url}/metrics`)).text();
    const read = (re: RegExp) => Number(re.exec(text)?.[1] ?? 0);
    return {
      tokens: read(/^spindle_completion_tokens_total\{model="stories260K",version="test"\} (\d+)/m),
      cancelled: read(/^spindle_errors_total\{endpoint="completions",model="stories260K",version="test",type="cancelled"\} (\d+)/m),
    };
  }

  // 2000 tokens with ignore_eos: only a cancel can end these early, so a count far below
  // 2000 proves the cancellation (a natural end or a finished generation would count 2000).
  const long = { model: "stories260K", prompt: "Once upon a time", max_tokens: 2000, temperature: 1, ignore_eos: true };

  it("a disconnected stream is cancelled within a few steps and frees its only slot for the next request", async () => {
    const scheduler = server.registry.resolve("stories260K").scheduler;
    const before = await counted();
    const controller = new AbortController();
    const res = await fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ ...long, stream: true }),
      signal: controller.signal,
    });
    const reader = res.body!.getReader();
    await reader.read();
    expect(scheduler.busySlots).toBe(1);
    controller.abort();
    await waitFor(() => scheduler.busySlots === 0, 10_000, 1);
    const after = await counted();
    expect(after.cancelled - before.cancelled).toBe(1);
    expect(after.tokens - before.tokens).toBeLessThan(500);
    const client = openaiClient(server);
    const next = await client.chat.completions.create({ model: "stories260K", messages: user("Hi"), max_tokens: 8, temperature: 0 });
    expect(next.choices[0]!.finish_reason).toBeDefined();
  });

  it("a non-stream request whose client leaves is cancelled too", async () => {
    const scheduler = server.registry.resolve("stories260K").scheduler;
    const before = await counted();
    const controller = new AbortController();
    const pending = fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(long),
      signal: controller.signal,
    }).catch(() => undefined);
    await waitFor(() => scheduler.busySlots === 1, 2000, 1);
    controller.abort();
    await pending;
    await waitFor(() => scheduler.busySlots === 0, 10_000, 1);
    const after = await counted();
    expect(after.cancelled - before.cancelled).toBe(1);
    expect(after.tokens - before.tokens).toBeLessThan(500);
  });
});
