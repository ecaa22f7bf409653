import { spawn } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync } from "node:fs";
import { connect, createServer, type AddressInfo, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { getLlama, LlamaLogLevel, readGgufFileInfo, type Token } from "node-llama-cpp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { arrivalGaps } from "../bench/lib/load.js";
import { distribution, percentile, summarize, tpot } from "../bench/lib/stats.js";
import { emptyRecord, sseEvents, streamRequest, type RequestRecord } from "../bench/lib/stream-client.js";
import { parameterCount, PRESETS, toHalf, writeSyntheticGguf } from "../bench/synthetic-gguf.js";
import type { RunningServer } from "../src/server.js";
import { parseMetrics, sum } from "./helpers/prometheus.js";
import { sharedModel, startTestServer, STORIES } from "./helpers/server.js";

const record = (over: Partial<RequestRecord>): RequestRecord => ({ ...emptyRecord(), ok: true, status: 200, usageReported: true, ...over });

describe("metric arithmetic (vLLM definitions) on recorded timelines", () => {
  // Request A: first chunk at 100 ms, then chunks every 10 ms, 5 tokens, done at 140 ms.
  // Request B: first chunk at 200 ms, then 30 ms and 50 ms gaps, 3 tokens, done at 280 ms.
  const a = record({ ttft: 0.1, itl: [0.01, 0.01, 0.01, 0.01], latency: 0.14, promptTokens: 10, outputTokens: 5 });
  const b = record({ ttft: 0.2, itl: [0.03, 0.05], latency: 0.28, promptTokens: 20, outputTokens: 3 });
  const failed = record({ ok: false, status: 429, errorType: "http_429" });

  it("TPOT = (latency − TTFT) / (output tokens − 1)", () => {
    expect(tpot(a)).toBeCloseTo(0.01, 10);
    expect(tpot(b)).toBeCloseTo(0.04, 10);
    expect(tpot(record({ outputTokens: 1, latency: 1, ttft: 1 }))).toBeUndefined();
  });

  it("summarizes throughput, latency distributions, failures and goodput", () => {
    const m = summarize([a, b, failed], 2, { ttftMs: 150 });
    expect(m.completed).toBe(2);
    expect(m.failed).toBe(1);
    expect(m.failedByType).toEqual({ http_429: 1 });
    expect(m.requestThroughput).toBe(1);
    expect(m.outputThroughput).toBe(4);
    expect(m.totalTokenThroughput).toBe(19);
    expect(m.ttftMs.mean).toBeCloseTo(150, 10);
    expect(m.ttftMs.median).toBeCloseTo(150, 10);
    expect(m.tpotMs.mean).toBeCloseTo(25, 10);
    // ITL pools every gap: 10, 10, 10, 10, 30, 50.
    expect(m.itlMs.mean).toBeCloseTo(20, 10);
    expect(m.itlMs.median).toBeCloseTo(10, 10);
    expect(m.e2eMs.p99).toBeCloseTo(140 + 0.99 * 140, 6);
    // Only A meets TTFT ≤ 150 ms.
    expect(m.goodput).toBe(0.5);
  });

  it("percentiles interpolate as numpy does", () => {
    expect(percentile([1, 2, 3, 4], 50)).toBe(2.5);
    expect(percentile([1, 2, 3, 4], 90)).toBeCloseTo(3.7, 10);
    expect(distribution([5]).p99).toBe(5);
  });
});

describe("arrivals", () => {
  const stats = (xs: number[]) => {
    const mean = xs.reduce((s, x) => s + x, 0) / xs.length;
    const v = xs.reduce((s, x) => s + (x - mean) ** 2, 0) / (xs.length - 1);
    return { mean, cv2: v / mean ** 2 };
  };
  it("Poisson: exponential gaps with mean 1/rate and CV² ≈ 1", () => {
    const g = stats(arrivalGaps(20_000, 8, 1, 42));
    expect(g.mean).toBeGreaterThan(0.125 * 0.97);
    expect(g.mean).toBeLessThan(0.125 * 1.03);
    expect(g.cv2).toBeGreaterThan(0.93);
    expect(g.cv2).toBeLessThan(1.07);
  });
  it("gamma with burstiness b: same mean, CV² ≈ 1/b; seeded, so repeatable", () => {
    const g = stats(arrivalGaps(20_000, 8, 0.25, 7));
    expect(g.mean).toBeGreaterThan(0.125 * 0.94);
    expect(g.mean).toBeLessThan(0.125 * 1.06);
    expect(g.cv2).toBeGreaterThan(3.6);
    expect(g.cv2).toBeLessThan(4.4);
    expect(arrivalGaps(5, 2, 1, 3)).toEqual(arrivalGaps(5, 2, 1, 3));
  });
});

describe("the SSE parser", () => {
  const stream = 'data: {"a":1}\n\ndata: {"b":"x\\ny"}\n\n: comment\n\ndata: [DONE]\n\n';
  it("gives the same events however the network splits or joins chunks", () => {
    const expected = ['{"a":1}', '{"b":"x\\ny"}', "[DONE]"];
    for (let size = 1; size <= stream.length; size++) {
      const got: string[] = [];
      const feed = sseEvents((d) => got.push(d));
      for (let i = 0; i < stream.length; i += size) feed(stream.slice(i, i + size));
      expect(got).toEqual(expected);
    }
    const got: string[] = [];
    const feed = sseEvents((d) => got.push(d));
    feed(stream + stream);
    expect(got).toEqual([...expected, ...expected]);
  });
});

describe("an end-to-end bench run against the real server", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer([STORIES], { parallel: 4 });
  });
  afterAll(async () => server?.close());

  it("writes a JSON report whose token counts equal the server's usage, plus Markdown and an SVG chart", async () => {
    const out = mkdtempSync(join(tmpdir(), "spindle-bench-"));
    const before = parseMetrics(await (await fetch(`${server.url}/metrics`)).text());
    // Asynchronously: the server under test runs in this process.
    const r = await new Promise<{ status: number | null; stdout: string }>((done) => {
      const child = spawn(
        process.execPath,
        ["--import", "tsx", "bench/cli.ts", "serve", "--target", `${server.url}=spindle`, "--model", "stories260K", "--concurrency", "1,2", "--requests", "4", "--rounds", "1", "--warmup", "0", "--max-tokens", "16", "--out", out, "--slo", "ttft=5000ms,tpot=1000ms"],
        { cwd: resolve(import.meta.dirname, "..") },
      );
      let stdout = "";
      child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
      child.on("exit", (status) => done({ status, stdout }));
    });
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/\| c +\| target/);
    const files = readdirSync(out);
    const json = JSON.parse(readFileSync(join(out, files.find((f) => f.endsWith(".json"))!), "utf8"));
    expect(readFileSync(join(out, files.find((f) => f.endsWith(".svg"))!), "utf8")).toMatch(/^<svg/);
    expect(files.some((f) => f.endsWith(".md"))).toBe(true);
    expect(json.results).toHaveLength(2);
    for (const run of json.results) {
      expect(run.metrics).toMatchObject({ completed: 4, failed: 0 });
      for (const k of ["ttftMs", "tpotMs", "itlMs", "e2eMs"]) expect(Object.keys(run.metrics[k])).toEqual(["mean", "median", "p90", "p99"]);
      expect(run.metrics.goodput).toBeGreaterThan(0);
      expect(run.server.stepFullness).toBeGreaterThan(0);
    }
    const after = parseMetrics(await (await fetch(`${server.url}/metrics`)).text());
    const served = sum(after, "spindle_completion_tokens_total") - sum(before, "spindle_completion_tokens_total");
    const counted = json.results.reduce((s: number, run: { metrics: { totalOutputTokens: number } }) => s + run.metrics.totalOutputTokens, 0);
    expect(counted).toBe(served);
    expect(counted).toBeGreaterThan(0);
    // The server's own view agrees with the client's, run by run.
    for (const run of json.results) expect(run.server.metrics).toMatchObject({ source: "spindle", generatedTokens: run.metrics.totalOutputTokens, requests: 4 });
  });

  it("a request whose connection is closed under it before any answer is sent again (twice at most) and counted as resent, not failed; a third close fails it", async () => {
    // A proxy in front of the real server that closes the first `drops` connections as
    // their request arrives, as llama-server closes a kept-alive one just as it is reused.
    const target = new URL(server.url);
    const proxyFor = async (drops: number) => {
      let seen = 0;
      const open = new Set<Socket>();
      const proxy = createServer((client) => {
        open.add(client);
        client.on("close", () => open.delete(client));
        if (seen++ < drops) {
          client.once("data", () => client.destroy());
          return;
        }
        const upstream = connect(Number(target.port), target.hostname);
        client.pipe(upstream).pipe(client);
        const close = () => (client.destroy(), upstream.destroy());
        client.on("error", close).on("close", close);
        upstream.on("error", close);
      });
      await new Promise<void>((r) => proxy.listen(0, "127.0.0.1", r));
      const close = () => {
        for (const c of open) c.destroy();
        return new Promise((r) => proxy.close(r));
      };
      return { url: `http://127.0.0.1:${(proxy.address() as AddressInfo).port}`, close };
    };
    const body = { model: "stories260K", prompt: "Once upon a time", max_tokens: 8, temperature: 0 };
    // Twice: the resend can pick another connection that is closed under it.
    const once = await proxyFor(2);
    try {
      const rec = await streamRequest({ baseUrl: once.url, endpoint: "completions", body });
      expect(rec).toMatchObject({ ok: true, resent: true, outputTokens: 8, usageReported: true });
      expect(summarize([rec], 1)).toMatchObject({ completed: 1, failed: 0, resent: 1 });
    } finally {
      await once.close();
    }
    const always = await proxyFor(Infinity);
    try {
      const rec = await streamRequest({ baseUrl: always.url, endpoint: "completions", body });
      expect(rec).toMatchObject({ ok: false, resent: true, errorType: "network", outputTokens: 0 });
    } finally {
      await always.close();
    }
  });

  it("multi-turn conversations resend the conversation; a duration run stops on time", async () => {
    const out = mkdtempSync(join(tmpdir(), "spindle-bench-"));
    const run = (args: string[]) =>
      new Promise<number | null>((done) => {
        const child = spawn(process.execPath, ["--import", "tsx", "bench/cli.ts", "serve", "--target", `${server.url}=s`, "--model", "stories260K", "--rounds", "1", "--warmup", "0", "--max-tokens", "8", "--out", out, ...args], {
          cwd: resolve(import.meta.dirname, ".."),
          stdio: "ignore",
        });
        child.on("exit", done);
      });
    expect(await run(["--concurrency", "2", "--requests", "2", "--turns", "3"])).toBe(0);
    const t0 = Date.now();
    expect(await run(["--concurrency", "2", "--duration", "1"])).toBe(0);
    expect(Date.now() - t0).toBeLessThan(15_000);
    const reports = readdirSync(out).filter((f) => f.endsWith(".json")).sort().map((f) => JSON.parse(readFileSync(join(out, f), "utf8")));
    // 2 conversations × 3 turns; later turns carry the earlier exchange, so their prompts grow.
    expect(reports[0].results[0].metrics.completed).toBe(6);
    expect(reports[0].results[0].metrics.totalInputTokens).toBeGreaterThan(6 * 20);
    expect(reports[1].results[0].metrics.completed).toBeGreaterThan(2);
    expect(reports[1].results[0].metrics.durationS).toBeGreaterThanOrEqual(1);
  });
});

describe("synthetic GGUF", () => {
  it("half-float conversion rounds like IEEE 754", () => {
    expect(toHalf(1)).toBe(0x3c00);
    expect(toHalf(-2)).toBe(0xc000);
    expect(toHalf(65504)).toBe(0x7bff);
    expect(toHalf(1e6)).toBe(0x7c00);
    expect(toHalf(5.960464477539063e-8)).toBe(0x0001);
    expect(toHalf(0)).toBe(0);
  });

  it.each(["f16", "q8_0", "q4_0"] as const)("a %s file loads, has the requested shape and parameter count, and generates tokens", async (weights) => {
    const path = join(mkdtempSync(join(tmpdir(), "spindle-synth-")), "m.gguf");
    const shape = PRESETS.tiny!;
    const r = await writeSyntheticGguf(path, { shape, weights, seed: 3, tokenizerFrom: sharedModel("llama-2-tiny-random-chat.gguf") });
    expect(r.vocab).toBe(32000);
    expect(r.parameters).toBe(parameterCount(shape, 32000));
    const info = await readGgufFileInfo(path);
    const meta = info.metadata as unknown as { llama: Record<string, unknown>; tokenizer: { chat_template: string } };
    expect(meta.llama).toMatchObject({ block_count: 2, embedding_length: 64, feed_forward_length: 128, attention: { head_count: 4, head_count_kv: 2 } });
    expect(meta.tokenizer.chat_template).toContain("[INST]");
    const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
    const model = await llama.loadModel({ modelPath: path });
    try {
      expect(model.fileInsights.totalParameters).toBe(r.parameters);
      const ctx = await model.createContext({ contextSize: 256, threads: 1 });
      const seq = ctx.getSequence();
      let n = 0;
      for await (const _ of seq.evaluate([1, ...model.tokenize("Hello")] as Token[], { temperature: 0, yieldEogToken: true })) if (++n >= 8) break;
      expect(n).toBe(8);
      await ctx.dispose();
    } finally {
      await model.dispose();
      await llama.dispose();
    }
  });
});
