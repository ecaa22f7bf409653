import { spawn, spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import { resolve } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type OpenAI from "openai";
import type { RunningServer } from "../src/server.js";
import { parseMetrics, sum } from "./helpers/prometheus.js";
import { openaiClient, sharedModel, startTestServer, STORIES, waitFor } from "./helpers/server.js";
import { postSse } from "./helpers/sse.js";

const scrape = async (server: RunningServer) => (await fetch(`${server.url}/metrics`)).text();
const post = (server: RunningServer, path: string, body: unknown, headers: Record<string, string> = {}) =>
  fetch(`${server.url}${path}`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify(body) });

describe("Prometheus metrics under real traffic", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer([{ ...STORIES, ctxSize: 4096 }], { parallel: 1, maxQueue: 8 });
  });
  afterAll(async () => server?.close());

  it("count requests, tokens, finish reasons and errors exactly as the responses say", async () => {
    const client = openaiClient(server);
    const usages: OpenAI.CompletionUsage[] = [];
    const a = await client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 10, temperature: 0 });
    usages.push(a.usage!);
    const b = await client.chat.completions.create({ model: "stories260K", messages: [{ role: "user", content: "Hi" }], max_tokens: 12, temperature: 0 });
    usages.push(b.usage!);
    // A stop string: finish_reason "stop".
    const c = await client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 40, temperature: 0, stop: ["Lily"] });
    expect(c.choices[0]!.finish_reason).toBe("stop");
    usages.push(c.usage!);
    const raw = await postSse(`${server.url}/v1/chat/completions`, { model: "stories260K", messages: [{ role: "user", content: "Hi" }], max_tokens: 8, stream: true, stream_options: { include_usage: true } });
    const streamUsage = JSON.parse(raw.events.at(-2)!).usage;
    usages.push(streamUsage);
    // Bad inputs, each of its kind.
    expect((await post(server, "/v1/chat/completions", { model: "stories260K", messages: [] })).status).toBe(400);
    expect((await post(server, "/v1/chat/completions", { model: "stories260K", messages: [{ role: "user", content: "x" }], temperature: 7 })).status).toBe(400);
    expect((await post(server, "/v1/completions", { model: "nope", prompt: "x" })).status).toBe(404);

    const m = parseMetrics(await scrape(server));
    const mv = { model: "stories260K", version: "test" };
    expect(sum(m, "spindle_requests_total", { ...mv, status_class: "2xx" })).toBe(4);
    expect(sum(m, "spindle_requests_total", { endpoint: "completions", ...mv, finish_reason: "stop" })).toBe(1);
    expect(sum(m, "spindle_requests_total", { finish_reason: "length", ...mv })).toBe(3);
    expect(sum(m, "spindle_requests_total", { status_class: "4xx" })).toBe(3);
    expect(sum(m, "spindle_errors_total", { type: "invalid_request" })).toBe(2);
    expect(sum(m, "spindle_errors_total", { type: "not_found", model: "_unknown" })).toBe(1);
    expect(sum(m, "spindle_completion_tokens_total", mv)).toBe(usages.reduce((s, u) => s + u.completion_tokens, 0));
    expect(sum(m, "spindle_prompt_tokens_total", mv)).toBe(usages.reduce((s, u) => s + u.prompt_tokens, 0));
    expect(sum(m, "spindle_cached_prompt_tokens_total", mv)).toBe(usages.reduce((s, u) => s + (u.prompt_tokens_details?.cached_tokens ?? 0), 0));
    // Histograms: one observation per request.
    expect(sum(m, "spindle_request_duration_seconds_count")).toBe(7);
    expect(sum(m, "spindle_time_to_first_token_seconds_count", mv)).toBe(4);
    expect(sum(m, "spindle_queue_wait_seconds_count", mv)).toBe(4);
    expect(sum(m, "spindle_request_completion_tokens_count", mv)).toBe(4);
    expect(sum(m, "spindle_decode_step_sequences_count", mv)).toBeGreaterThan(30);
    expect(sum(m, "spindle_build_info", { backend: "cpu", node_llama_cpp_version: "3.21.1" })).toBe(1);
    // Which binary runs, and which ggml CPU variant it loaded, as this process's own maps say.
    const info = m.find((s) => s.name === "spindle_build_info")!;
    expect(["prebuilt", "local"]).toContain(info.labels.engine_build);
    const maps = readFileSync("/proc/self/maps", "utf8");
    const variant = /libggml-cpu-([\w-]+)\.so/.exec(maps)?.[1];
    if (variant !== undefined) expect(info.labels.cpu_variant).toBe(variant);
    else expect(info.labels.cpu_variant).not.toBe("");
    expect(sum(m, "spindle_model_loads_total", mv)).toBe(1);
    expect(sum(m, "spindle_kv_cache_reserved_bytes", mv)).toBe(640 * 4096);
  });

  it("queue gauges rise while requests wait; promtool accepts a scrape taken under load", async () => {
    const ac = new AbortController();
    const running = await fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "stories260K", prompt: "Once upon a time", max_tokens: 3500, ignore_eos: true, stream: true }),
      signal: ac.signal,
    });
    const reader = running.body!.getReader();
    await reader.read();
    const waiting = [post(server, "/v1/completions", { model: "stories260K", prompt: "The dog", max_tokens: 2 }), post(server, "/v1/completions", { model: "stories260K", prompt: "The cat sat", max_tokens: 2 })];
    const sched = server.registry.resolve("stories260K").scheduler;
    await waitFor(() => sched.waiting === 2);
    const text = await scrape(server);
    const m = parseMetrics(text);
    const mv = { model: "stories260K", version: "test" };
    expect(sum(m, "spindle_requests_waiting", mv)).toBe(2);
    expect(sum(m, "spindle_requests_running", mv)).toBe(1);
    expect(sum(m, "spindle_queued_prompt_tokens", mv)).toBeGreaterThan(2);
    expect(sum(m, "spindle_slots_busy", mv)).toBe(1);
    expect(sum(m, "spindle_kv_cache_used_bytes", mv)).toBeGreaterThan(0);
    const ratio = sum(m, "spindle_kv_cache_usage_ratio", mv);
    expect(ratio).toBeGreaterThan(0);
    expect(ratio).toBeLessThanOrEqual(1);
    // The whole-process series pickers read: here one model, so the same figures.
    expect(sum(m, "spindle_process_kv_cache_usage_ratio")).toBeCloseTo(ratio, 9);
    expect(sum(m, "spindle_process_requests_waiting")).toBe(2);
    expect(sum(m, "spindle_process_requests_running")).toBe(1);
    const promtool = spawnSync("promtool", ["check", "metrics"], { input: text, encoding: "utf8" });
    if (promtool.error) throw new Error("promtool is missing: .ci/run installs Debian's prometheus package");
    expect(promtool.stdout + promtool.stderr).toBe("");
    expect(promtool.status).toBe(0);
    ac.abort();
    await Promise.all(waiting);
    await waitFor(() => sched.busySlots === 0);
    const after = parseMetrics(await scrape(server));
    expect(sum(after, "spindle_requests_waiting", mv)).toBe(0);
    // Idle slots keep their tokens for prefix reuse: held, but not in use by a request.
    expect(sum(after, "spindle_kv_cache_used_bytes", mv)).toBeGreaterThan(0);
    expect(sum(after, "spindle_kv_cache_usage_ratio", mv)).toBe(0);
    expect(sum(after, "spindle_errors_total", { type: "cancelled" })).toBe(1);
  });
});

/** A real OTLP/HTTP endpoint that decodes what the exporter sends (JSON encoding). */
interface OtlpSpan {
  traceId: string;
  spanId: string;
  parentSpanId?: string;
  name: string;
  attributes: Array<{ key: string; value: Record<string, unknown> }>;
  status?: { code?: number };
}

function attr(span: OtlpSpan, key: string): unknown {
  const v = span.attributes.find((a) => a.key === key)?.value;
  if (!v) return undefined;
  if ("stringValue" in v) return v.stringValue;
  if ("intValue" in v) return Number(v.intValue);
  if ("doubleValue" in v) return v.doubleValue;
  if ("arrayValue" in v) return ((v.arrayValue as { values: Array<{ stringValue: string }> }).values ?? []).map((x) => x.stringValue);
  return v;
}

describe("OpenTelemetry traces", () => {
  let receiver: Server;
  let url: string;
  const spans: OtlpSpan[] = [];
  beforeAll(async () => {
    receiver = createServer((req, res) => {
      let body = "";
      req.on("data", (d) => (body += d));
      req.on("end", () => {
        expect(req.url).toBe("/v1/traces");
        const payload = JSON.parse(body);
        for (const rs of payload.resourceSpans ?? []) for (const ss of rs.scopeSpans ?? []) spans.push(...ss.spans);
        res.writeHead(200, { "content-type": "application/json" }).end("{}");
      });
    });
    await new Promise<void>((r) => receiver.listen(0, "127.0.0.1", r));
    const a = receiver.address();
    url = `http://127.0.0.1:${typeof a === "object" && a ? a.port : 0}`;
  });
  afterAll(() => receiver?.close());

  it("one trace per request, continuing the incoming traceparent, with the queue/prefill/decode tree and GenAI attributes", async () => {
    const server = await startTestServer([STORIES], { parallel: 2, otlpEndpoint: url });
    const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
    const parentId = "00f067aa0ba902b7";
    let returnedTraceId: string | null;
    let otherTraceId: string | null;
    try {
      const res = await post(server, "/v1/chat/completions", { model: "stories260K", messages: [{ role: "user", content: "Hi" }], max_tokens: 6, temperature: 0.5 }, { traceparent: `00-${traceId}-${parentId}-01` });
      expect(res.status).toBe(200);
      returnedTraceId = res.headers.get("x-trace-id");
      const sse = await postSse(`${server.url}/v1/completions`, { model: "stories260K", prompt: "Once", max_tokens: 4, stream: true });
      otherTraceId = sse.headers.get("x-trace-id");
      expect((await post(server, "/v1/completions", { model: "stories260K", prompt: "x", temperature: 9 })).status).toBe(400);
    } finally {
      await server.close();
    }
    expect(returnedTraceId).toBe(traceId);
    expect(otherTraceId).toMatch(/^[0-9a-f]{32}$/);
    expect(otherTraceId).not.toBe(traceId);

    const mine = spans.filter((s) => s.traceId === traceId);
    const root = mine.find((s) => s.parentSpanId === parentId)!;
    expect(root.name).toBe("chat stories260K");
    expect(attr(root, "gen_ai.request.model")).toBe("stories260K");
    expect(attr(root, "gen_ai.response.model")).toBe("stories260K@test");
    expect(attr(root, "gen_ai.usage.output_tokens")).toBe(6);
    expect(attr(root, "gen_ai.usage.input_tokens")).toBeGreaterThan(0);
    expect(attr(root, "gen_ai.request.max_tokens")).toBe(6);
    expect(attr(root, "gen_ai.request.temperature")).toBe(0.5);
    expect(attr(root, "gen_ai.response.finish_reasons")).toEqual(["length"]);
    expect(attr(root, "spindle.model.version")).toBe("test");
    expect(typeof attr(root, "spindle.ttft_ms")).toBe("number");
    const children = mine.filter((s) => s.parentSpanId === root.spanId).map((s) => s.name).sort();
    expect(children).toEqual(["decode", "prefill", "queue"]);
    const prefill = mine.find((s) => s.name === "prefill")!;
    expect(attr(prefill, "spindle.cached_tokens")).toBeTypeOf("number");
    expect(attr(prefill, "spindle.slot")).toBeTypeOf("number");
    // The stream got a trace of its own; the bad request one with its error recorded.
    expect(spans.filter((s) => s.traceId === otherTraceId).length).toBe(4);
    const failed = spans.find((s) => attr(s, "error.type") === "invalid_request")!;
    expect(failed.status?.code).toBe(2);
    // Lifecycle spans.
    expect(spans.some((s) => s.name === "model.load" && attr(s, "gen_ai.request.model") === "stories260K")).toBe(true);
    expect(spans.some((s) => s.name === "model.warmup")).toBe(true);
  });
});

describe("request logs", () => {
  it("one parseable JSON line per request with its figures, and never the prompt", async () => {
    const child = spawn(process.execPath, ["dist/launch.cjs", "--model", `${sharedModel("stories260K.gguf")}=tiny`, "--port", "0", "--log-level", "info"], {
      cwd: resolve(import.meta.dirname, ".."),
    });
    let out = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    try {
      await waitFor(() => /listening on (http:\/\/\S+)/.test(out), 30_000, 20);
      const url = /listening on (http:\/\/\S+)/.exec(out)![1]!;
      const secret = "zebra unicorn secret";
      for (const stream of [false, true]) {
        const res = await fetch(`${url}/v1/completions`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ model: "tiny", prompt: secret, max_tokens: 5, stream }),
        });
        await res.text();
      }
      await waitFor(() => out.split("\n").filter((l) => l.includes('"msg":"request"')).length === 2, 5000, 20);
      const lines = out.split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l));
      const requests = lines.filter((l) => l.msg === "request");
      expect(requests).toHaveLength(2);
      for (const r of requests) {
        expect(r).toMatchObject({ model: "tiny@unversioned", status: 200, finish_reason: "length", completion_tokens: 5, endpoint: "completions" });
        expect(typeof r.reqId).toBe("string");
        for (const k of ["prompt_tokens", "queue_ms", "kv_trim_ms", "ttft_ms", "total_ms"]) expect(typeof r[k]).toBe("number");
      }
      expect(requests.map((r) => r.transport).sort()).toEqual(["http", "sse"]);
      expect(out).not.toContain("zebra");
    } finally {
      child.kill("SIGTERM");
    }
  });
});
