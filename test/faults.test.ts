/** Faults, shutdown and hostile clients, through the real server and engine. */
import { spawn } from "node:child_process";
import { connect } from "node:net";
import { resolve } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import type { EngineFaults } from "../src/engine/types.js";
import type { RunningServer } from "../src/server.js";
import WebSocket from "ws";
import { captureLog, sharedModel, startTestServer, STORIES, waitFor, type TestServerOptions } from "./helpers/server.js";
import { postSse } from "./helpers/sse.js";

let server: RunningServer | undefined;
afterEach(async () => {
  await server?.close().catch(() => undefined);
  server = undefined;
});

const faults = (): EngineFaults => ({ failNextSteps: 0, slowStepMs: 0, failNextLoads: 0 });
const long = { model: "stories260K", prompt: "Once upon a time", max_tokens: 3500, ignore_eos: true, stream: true };
const short = { model: "stories260K", prompt: "Once upon a time", max_tokens: 8, temperature: 0 };

async function start(opts: TestServerOptions, f?: EngineFaults, log?: ReturnType<typeof captureLog>["log"]) {
  server = await startTestServer([{ ...STORIES, ctxSize: 4096 }], opts, { faults: f, log });
  return server;
}
const sched = () => server!.registry.resolve("stories260K").scheduler;
const post = (body: unknown, headers: Record<string, string> = {}) =>
  fetch(`${server!.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify(body) });

describe("an engine failure during a decode step", () => {
  it("fails the requests of that batch with model_error, leaves the queued one and later ones unharmed", async () => {
    const f = faults();
    await start({ parallel: 2, maxQueue: 4 }, f);
    const streams = [postSse(`${server!.url}/v1/completions`, long), postSse(`${server!.url}/v1/completions`, long)];
    await waitFor(() => sched().busySlots === 2);
    const queued = post(short);
    await waitFor(() => sched().waiting === 1);
    f.failNextSteps = 1;
    for (const s of await Promise.all(streams)) {
      const last = JSON.parse(s.events.at(-1)!);
      expect(last.error).toMatchObject({ type: "model_error" });
      expect(s.events).not.toContain("[DONE]");
    }
    // The queued request was not in that batch: it runs on a cleaned slot and succeeds.
    const q = await queued;
    expect(q.status).toBe(200);
    expect((await q.json()).usage.completion_tokens).toBe(8);
    const next = await post(short);
    expect(next.status).toBe(200);
    const m = await (await fetch(`${server!.url}/metrics`)).text();
    expect(m).toMatch(/spindle_errors_total\{endpoint="completions",model="stories260K",version="test",type="model_error"\} 2/);
  });

  it("a mid-stream failure is the same request outcome over SSE and over WebSocket: status, error type, metrics, log line", async () => {
    const f = faults();
    const captured = captureLog();
    await start({ parallel: 1 }, f, captured.log);
    const failedCount = async () => {
      const m = await (await fetch(`${server!.url}/metrics`)).text();
      const read = (re: RegExp) => Number(re.exec(m)?.[1] ?? 0);
      return {
        requests5xx: read(/^spindle_requests_total\{endpoint="completions",model="stories260K",version="test",status_class="5xx",finish_reason="none"\} (\d+)/m),
        modelErrors: read(/^spindle_errors_total\{endpoint="completions",model="stories260K",version="test",type="model_error"\} (\d+)/m),
      };
    };
    const requestLines = () => captured.lines.filter((l) => l.msg === "request");

    // SSE: the failure arrives as an error event after the stream began with 200.
    const before = await failedCount();
    const sse = postSse(`${server!.url}/v1/completions`, long);
    await waitFor(() => sched().busySlots === 1);
    f.failNextSteps = 1;
    const sseStream = await sse;
    expect(sseStream.status).toBe(200);
    const sseError = JSON.parse(sseStream.events.at(-1)!).error;
    const afterSse = await failedCount();

    // WebSocket: the same failure as an error frame.
    const ws = new WebSocket(`${server!.url.replace("http", "ws")}/v1/ws`);
    await new Promise((r) => ws.once("open", r));
    const frames: Array<{ type: string; error?: unknown }> = [];
    ws.on("message", (d) => frames.push(JSON.parse(String(d))));
    ws.send(JSON.stringify({ type: "completions.create", id: "w", body: long }));
    await waitFor(() => sched().busySlots === 1);
    f.failNextSteps = 1;
    await waitFor(() => frames.some((x) => x.type === "error"), 10_000);
    ws.close();
    const wsError = frames.find((x) => x.type === "error")!.error;
    await waitFor(() => requestLines().length === 2);
    const afterWs = await failedCount();

    expect(wsError).toEqual(sseError);
    expect(sseError).toMatchObject({ type: "model_error" });
    expect(afterSse.requests5xx - before.requests5xx).toBe(1);
    expect(afterWs.requests5xx - afterSse.requests5xx).toBe(1);
    expect(afterSse.modelErrors - before.modelErrors).toBe(1);
    expect(afterWs.modelErrors - afterSse.modelErrors).toBe(1);
    const [sseLine, wsLine] = requestLines();
    const same = (l: Record<string, unknown>) => ({ status: l.status, error_type: l.error_type, error_code: l.error_code, endpoint: l.endpoint, model: l.model, finish_reason: l.finish_reason });
    expect(same(sseLine!)).toEqual(same(wsLine!));
    expect(sseLine).toMatchObject({ transport: "sse", status: 500, error_type: "model_error" });
    expect(wsLine).toMatchObject({ transport: "ws", status: 500, error_type: "model_error" });
  });

  it("a non-stream request in a failed batch gets 500 model_error, not a hang", async () => {
    const f = faults();
    await start({ parallel: 1 }, f);
    f.slowStepMs = 5;
    const pending = post({ ...short, max_tokens: 200, ignore_eos: true });
    await waitFor(() => sched().busySlots === 1);
    f.failNextSteps = 1;
    const res = await pending;
    expect(res.status).toBe(500);
    expect((await res.json()).error.type).toBe("model_error");
    f.slowStepMs = 0;
    expect((await post(short)).status).toBe(200);
  });

  it("slow steps still honour deadlines", async () => {
    const f = faults();
    await start({ parallel: 1 }, f);
    f.slowStepMs = 30;
    const t0 = performance.now();
    const res = await post({ ...short, max_tokens: 200 }, { "X-Request-Timeout": "0.3" });
    expect(res.status).toBe(504);
    expect(performance.now() - t0).toBeLessThan(1500);
  });

  it("a failed load is a clear error and nothing is left running", async () => {
    const f = faults();
    f.failNextLoads = 1;
    await expect(startTestServer([STORIES], {}, { faults: f })).rejects.toThrow(/injected load failure/);
  });
});

describe("graceful shutdown", () => {
  it("readiness turns false at once, new requests get 503 + Retry-After, running ones end with a clear error after the grace", async () => {
    await start({ parallel: 2 });
    const streams = [postSse(`${server!.url}/v1/completions`, long), postSse(`${server!.url}/v1/completions`, long)];
    await waitFor(() => sched().busySlots === 2);
    const t0 = performance.now();
    const done = server!.shutdown(0.5);
    const ready = await fetch(`${server!.url}/readyz`);
    expect(ready.status).toBe(503);
    expect((await ready.json()).status).toBe("shutting_down");
    const refused = await post(short);
    expect(refused.status).toBe(503);
    expect(refused.headers.get("retry-after")).toBe("5");
    for (const s of await Promise.all(streams)) expect(JSON.parse(s.events.at(-1)!).error).toMatchObject({ type: "unavailable_error", code: "shutting_down" });
    expect(performance.now() - t0).toBeGreaterThanOrEqual(450);
    await done;
    server = undefined;
  });

  it("generations that finish within the grace period complete normally", async () => {
    await start({ parallel: 2 });
    const s = postSse(`${server!.url}/v1/completions`, { ...long, max_tokens: 300 });
    await waitFor(() => sched().busySlots === 1);
    await server!.shutdown(20);
    server = undefined;
    expect((await s).events.at(-1)).toBe("[DONE]");
  });

  it("the process: SIGTERM under load exits 0 after the streams end; a second signal exits at once", async () => {
    const root = resolve(import.meta.dirname, "..");
    const launch = (grace: string) => {
      const child = spawn(process.execPath, ["dist/launch.cjs", "--model", sharedModel("stories260K.gguf"), "--port", "0", "--ctx-size", "4096", "--log-level", "silent", "--shutdown-grace", grace], { cwd: root });
      let out = "";
      child.stdout.on("data", (d: Buffer) => (out += d.toString()));
      const exit = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
      return { child, exit, url: async () => (await waitFor(() => /listening on/.test(out), 30_000, 20), /listening on (\S+)/.exec(out)![1]!) };
    };
    const a = launch("1");
    const url = await a.url();
    const stream = postSse(`${url}/v1/completions`, long);
    await new Promise((r) => setTimeout(r, 200));
    a.child.kill("SIGTERM");
    const events = (await stream).events;
    expect(JSON.parse(events.at(-1)!).error.code).toBe("shutting_down");
    expect(await a.exit).toBe(0);

    const b = launch("60");
    const url2 = await b.url();
    const stream2 = postSse(`${url2}/v1/completions`, long).catch(() => undefined);
    await new Promise((r) => setTimeout(r, 200));
    const t0 = Date.now();
    b.child.kill("SIGTERM");
    await new Promise((r) => setTimeout(r, 100));
    b.child.kill("SIGTERM");
    expect(await b.exit).toBe(1);
    expect(Date.now() - t0).toBeLessThan(5000);
    await stream2;
  });
});

describe("hostile clients", () => {
  it("a load storm of 500 connections: every request is answered in full or refused with 429/503 + Retry-After, memory stays bounded", async () => {
    await start({ parallel: 4, maxQueue: 16 });
    const rss0 = process.memoryUsage().rss;
    const t0 = performance.now();
    const results = await Promise.all(
      Array.from({ length: 500 }, () =>
        post({ ...short, max_tokens: 16 }, { "X-Request-Timeout": "30" }).then(async (r) => ({ status: r.status, retry: r.headers.get("retry-after"), body: await r.json() })),
      ),
    );
    const ok = results.filter((r) => r.status === 200);
    const refused = results.filter((r) => r.status === 429 || r.status === 503);
    expect(ok.length + refused.length).toBe(500);
    expect(ok.length).toBeGreaterThanOrEqual(20);
    for (const r of ok) expect(r.body.usage.completion_tokens).toBeGreaterThan(0);
    for (const r of refused) expect(Number(r.retry)).toBeGreaterThanOrEqual(1);
    expect(performance.now() - t0).toBeLessThan(30_000);
    const grown = (process.memoryUsage().rss - rss0) / 2 ** 20;
    console.log(`load storm: ${ok.length} served, ${refused.length} refused, RSS +${grown.toFixed(1)} MiB`);
    expect(grown).toBeLessThan(200);
    expect(sched().waiting).toBe(0);
    expect((await post(short)).status).toBe(200);
  });

  it("slowloris: a client that sends its request slowly is dropped at the read timeout, holding no slot", async () => {
    await start({ parallel: 1, readTimeoutSeconds: 1 });
    const { port } = new URL(server!.url);
    const sock = connect(Number(port), "127.0.0.1");
    let answer = "";
    sock.on("data", (d) => (answer += d.toString()));
    const closed = new Promise<void>((r) => sock.on("close", () => r()));
    sock.write("POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{");
    const drip = setInterval(() => sock.writable && sock.write(" "), 200);
    const t0 = performance.now();
    // Meanwhile the server serves others on its only slot: the half-sent request holds none.
    expect((await post(short)).status).toBe(200);
    await closed;
    clearInterval(drip);
    // Cut at the read timeout (1 s), though it kept sending: neither earlier nor never.
    expect(performance.now() - t0).toBeGreaterThan(900);
    expect(answer).toMatch(/^HTTP\/1\.1 408/);
  });

  it("a reader that never reads an SSE stream has its generation cancelled, not buffered without bound", async () => {
    const { SseTransport } = await import("../src/http/sse.js");
    const { ApiError } = await import("../src/errors.js");
    let abortedWith: InstanceType<typeof ApiError> | undefined;
    const written: string[] = [];
    // Bytes the client left unread: this one stopped reading.
    const raw = { writableLength: 0, destroyed: false, writeHead() {}, setHeader() {}, write(s: string) { this.writableLength += s.length; written.push(s); }, end(s: string) { written.push(s); } };
    const reply = { raw, getHeaders: () => ({}), hijack() {} };
    const t = new SseTransport(reply as never, 1000, (e) => (abortedWith ??= e));
    t.open({});
    for (let i = 0; i < 100; i++) t.send(`{"i":${i},"pad":"${"x".repeat(50)}"}`);
    expect(abortedWith?.code).toBe("slow_consumer");
    expect(written.length).toBeLessThan(30);
    // The scheduler ends the generation with the abort's reason, which the stream carries.
    t.fail(abortedWith!, { json: JSON.stringify(abortedWith!.toEnvelope()) });
    expect(written.at(-1)).toContain("slow_consumer");
  });
});

describe("request size limits", () => {
  it("an oversized header block gets 431; too many messages and too many stop strings get 400 naming them", async () => {
    await start({});
    const big = await fetch(`${server!.url}/v1/models`, { headers: { "x-junk": "x".repeat(32 * 1024) } }).catch((e) => e);
    expect(big instanceof Error ? "closed" : big.status).toSatisfy((s: unknown) => s === 431 || s === "closed");
    const many = await post({ model: "stories260K", prompt: "x", stop: Array.from({ length: 17 }, (_, i) => `s${i}`) });
    expect(many.status).toBe(400);
    expect((await many.json()).error.param).toBe("stop");
    const chat = await fetch(`${server!.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "stories260K", messages: Array.from({ length: 5000 }, () => ({ role: "user", content: "x" })) }),
    });
    expect(chat.status).toBe(400);
    expect((await chat.json()).error.param).toBe("messages");
  });
});
