import { afterAll, beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";
import type { RunningServer } from "../src/server.js";
import { assertCompletionChunk, assertSchema } from "./helpers/openapi.js";
import { startTestServer, STORIES, waitFor } from "./helpers/server.js";
import { postSse } from "./helpers/sse.js";

let server: RunningServer;
beforeAll(async () => {
  server = await startTestServer([{ ...STORIES, ctxSize: 4096 }], { parallel: 4, maxBodyBytes: 64 * 1024 });
});
afterAll(async () => server?.close());

interface Frame {
  type: string;
  id: string | null;
  chunk?: any;
  error?: { message: string; type: string; param: string | null; code: string | null };
}

/** A test client: every frame received, in order, and helpers to wait for them. */
class Client {
  readonly frames: Frame[] = [];
  readonly ws: WebSocket;
  closed: { code: number; reason: string } | undefined;
  private waiters: Array<() => void> = [];

  constructor() {
    this.ws = new WebSocket(`${server.url.replace("http", "ws")}/v1/ws`);
    this.ws.on("message", (data) => {
      this.frames.push(JSON.parse(String(data)));
      this.waiters.splice(0).forEach((w) => w());
    });
    this.ws.on("close", (code, reason) => {
      this.closed = { code, reason: String(reason) };
      this.waiters.splice(0).forEach((w) => w());
    });
  }

  opened(): Promise<void> {
    return new Promise((r) => (this.ws.readyState === WebSocket.OPEN ? r() : this.ws.once("open", () => r())));
  }

  send(frame: unknown): void {
    this.ws.send(typeof frame === "string" ? frame : JSON.stringify(frame));
  }

  async until(pred: () => boolean, ms = 10_000): Promise<void> {
    const end = Date.now() + ms;
    while (!pred()) {
      if (Date.now() > end) throw new Error(`timed out; frames: ${JSON.stringify(this.frames.slice(-3))}`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 50);
      });
    }
  }

  of(id: string): Frame[] {
    return this.frames.filter((f) => f.id === id);
  }

  ended(id: string): boolean {
    return this.of(id).some((f) => f.type === "done" || f.type === "error");
  }

  text(id: string): string {
    return this.of(id)
      .filter((f) => f.type === "chunk")
      .map((f) => f.chunk.choices[0]?.delta?.content ?? f.chunk.choices[0]?.text ?? "")
      .join("");
  }
}

const chatBody = (content: string, extra: Record<string, unknown> = {}) => ({
  model: "stories260K",
  messages: [{ role: "user", content }],
  max_tokens: 48,
  temperature: 0,
  ...extra,
});

const scheduler = () => server.registry.resolve("stories260K").scheduler;

describe("WebSocket protocol", () => {
  it("carries interleaved requests on one connection, each chunk exactly an OpenAI chunk, usage included", async () => {
    const c = new Client();
    await c.opened();
    c.send({ type: "chat.completions.create", id: "a", body: chatBody("Once upon a time", { stream_options: { include_usage: true } }) });
    c.send({ type: "chat.completions.create", id: "b", body: chatBody("The little dog") });
    c.send({ type: "completions.create", id: "c", body: { model: "stories260K", prompt: "Once upon a time", max_tokens: 32, temperature: 0 } });
    await c.until(() => ["a", "b", "c"].every((id) => c.ended(id)));
    for (const id of ["a", "b", "c"]) expect(c.of(id).at(-1)!.type).toBe("done");
    for (const f of c.frames.filter((f) => f.type === "chunk")) {
      if (f.id === "c") assertCompletionChunk(f.chunk);
      else assertSchema("CreateChatCompletionStreamResponse", f.chunk);
    }
    // Interleaved: b's frames are not all after a's.
    const firstB = c.frames.findIndex((f) => f.id === "b");
    const lastA = c.frames.map((f) => f.id).lastIndexOf("a");
    expect(firstB).toBeLessThan(lastA);
    const aChunks = c.of("a").filter((f) => f.type === "chunk");
    expect(aChunks[0]!.chunk.choices[0].delta.role).toBe("assistant");
    expect(aChunks.at(-1)!.chunk.usage.completion_tokens).toBeGreaterThan(0);
    expect(c.of("b").some((f) => f.chunk?.usage)).toBe(false);
    c.ws.close();
  });

  it("concatenated deltas equal the SSE text of the same greedy request", async () => {
    const body = chatBody("Once upon a time", { max_tokens: 64 });
    // Warm the prompt's KV first, so the two compared runs reuse it alike.
    await postSse(`${server.url}/v1/chat/completions`, { ...body, stream: true });
    const sse = await postSse(`${server.url}/v1/chat/completions`, { ...body, stream: true });
    const sseText = sse.events
      .slice(0, -1)
      .map((e) => JSON.parse(e).choices[0]?.delta?.content ?? "")
      .join("");
    const c = new Client();
    await c.opened();
    c.send({ type: "chat.completions.create", id: "x", body });
    await c.until(() => c.ended("x"));
    expect(c.text("x")).toBe(sseText);
    expect(sseText.length).toBeGreaterThan(0);
    c.ws.close();
  });

  it("cancel stops that generation at once and frees its slot; others go on", async () => {
    const c = new Client();
    await c.opened();
    c.send({ type: "chat.completions.create", id: "long", body: chatBody("Hi", { max_tokens: 3000, ignore_eos: true }) });
    c.send({ type: "chat.completions.create", id: "other", body: chatBody("Hello", { max_tokens: 200, ignore_eos: true }) });
    await c.until(() => c.of("long").length > 3);
    c.send({ type: "cancel", id: "long" });
    await c.until(() => c.ended("long"));
    expect(c.of("long").at(-1)).toMatchObject({ type: "error", error: { type: "cancelled" } });
    await c.until(() => c.ended("other"));
    expect(c.of("other").at(-1)!.type).toBe("done");
    await waitFor(() => scheduler().busySlots === 0, 2000);
    c.ws.close();
  });

  it("malformed frames get an error frame and the connection stays usable", async () => {
    const c = new Client();
    await c.opened();
    c.send("this is not json");
    c.send({ type: "teleport", id: "t" });
    c.ws.send(Buffer.from([1, 2, 3]), { binary: true });
    c.send({ type: "chat.completions.create", body: chatBody("x") });
    c.send({ type: "chat.completions.create", id: "bad", body: { model: "stories260K", messages: "nope" } });
    c.send({ type: "chat.completions.create", id: "gone", body: chatBody("x", { model: "no-such-model" }) });
    await c.until(() => c.frames.length >= 6);
    const errors = c.frames.filter((f) => f.type === "error");
    expect(errors).toHaveLength(6);
    for (const e of errors) assertSchema("ErrorResponse", { error: e.error });
    expect(c.frames.find((f) => f.id === "bad")!.error).toMatchObject({ type: "invalid_request_error", param: "messages" });
    expect(c.frames.find((f) => f.id === "gone")!.error).toMatchObject({ code: "model_not_found" });
    c.send({ type: "chat.completions.create", id: "ok", body: chatBody("Once upon a time") });
    await c.until(() => c.ended("ok"));
    expect(c.of("ok").at(-1)!.type).toBe("done");
    expect(c.closed).toBeUndefined();
    c.ws.close();
  });

  it("a duplicate in-flight id gets an error frame; the first request is unharmed", async () => {
    const c = new Client();
    await c.opened();
    c.send({ type: "chat.completions.create", id: "dup", body: chatBody("Once", { max_tokens: 100 }) });
    c.send({ type: "chat.completions.create", id: "dup", body: chatBody("Twice") });
    await c.until(() => c.of("dup").some((f) => f.type === "error"));
    expect(c.of("dup").find((f) => f.type === "error")!.error!.code).toBe("duplicate_id");
    await c.until(() => c.of("dup").some((f) => f.type === "done"));
    c.ws.close();
  });

  it("a closed connection cancels all its generations and frees their slots", async () => {
    const c = new Client();
    await c.opened();
    for (const id of ["p", "q", "r"]) c.send({ type: "chat.completions.create", id, body: chatBody("Hi", { max_tokens: 3000, ignore_eos: true }) });
    await c.until(() => ["p", "q", "r"].every((id) => c.of(id).length > 2));
    expect(scheduler().busySlots).toBe(3);
    c.ws.terminate();
    await waitFor(() => scheduler().busySlots === 0, 2000);
  });

  it("an oversized frame closes the connection with 1009 and frees what it held", async () => {
    const c = new Client();
    await c.opened();
    c.send({ type: "chat.completions.create", id: "held", body: chatBody("Hi", { max_tokens: 3000, ignore_eos: true }) });
    await c.until(() => c.of("held").length > 2);
    c.send({ type: "chat.completions.create", id: "huge", body: chatBody("x".repeat(100 * 1024)) });
    await c.until(() => c.closed !== undefined);
    expect(c.closed!.code).toBe(1009);
    await waitFor(() => scheduler().busySlots === 0, 2000);
  });

  it("a flood of frames closes the connection with 1008 and a reason", async () => {
    const c = new Client();
    await c.opened();
    for (let i = 0; i < 300; i++) c.send({ type: "cancel", id: `n${i}` });
    await c.until(() => c.closed !== undefined);
    expect(c.closed).toEqual({ code: 1008, reason: "too many frames" });
  });

  it("a per-request timeout in the frame ends the generation with a timeout error", async () => {
    const c = new Client();
    await c.opened();
    c.send({ type: "chat.completions.create", id: "slow", timeout: 0.2, body: chatBody("Hi", { max_tokens: 3000, ignore_eos: true }) });
    await c.until(() => c.ended("slow"));
    expect(c.of("slow").at(-1)).toMatchObject({ type: "error", error: { type: "timeout" } });
    c.ws.close();
  });
});

describe("WebSocket backpressure", () => {
  // Loopback TCP buffers hold megabytes, more than a test should generate, before a
  // paused reader shows up as bytes buffered in the server. So the session runs here on
  // a socket whose buffered bytes never drain (a reader that stopped), over the real
  // registry, scheduler and engine.
  it("a reader that stops reading has its generations cancelled with slow_consumer, and the slots freed", async () => {
    const { EventEmitter } = await import("node:events");
    const { SocketSession } = await import("../src/ws/socket-session.js");
    const sent: Frame[] = [];
    const socket = Object.assign(new EventEmitter(), {
      OPEN: 1,
      readyState: 1,
      bufferedAmount: 0,
      send(data: string) {
        this.bufferedAmount += data.length;
        sent.push(JSON.parse(data));
      },
      close() {},
      ping() {},
      terminate() {},
    });
    new SocketSession(socket as never, {
      generation: server.generation,
      keys: server.keys,
      principal: undefined,
      limits: { maxInFlight: 8, framesPerSecond: 50, frameBurst: 100, maxBufferedBytes: 64 * 1024, pingIntervalSeconds: 60, authTimeoutSeconds: 10 },
      headers: {},
    });
    for (const id of ["s1", "s2", "s3"]) {
      socket.emit("message", Buffer.from(JSON.stringify({ type: "chat.completions.create", id, body: chatBody("Hi", { max_tokens: 3500, ignore_eos: true }) })), false);
    }
    await waitFor(() => sent.filter((f) => f.type === "error").length === 3, 10_000, 5);
    for (const f of sent.filter((f) => f.type === "error")) expect(f.error).toMatchObject({ type: "cancelled", code: "slow_consumer" });
    expect(sent.some((f) => f.type === "done")).toBe(false);
    // Cancelled soon after the limit: far fewer than 3 × 3,500 chunks were produced.
    expect(sent.filter((f) => f.type === "chunk").length).toBeLessThan(1500);
    await waitFor(() => scheduler().busySlots === 0, 2000);
    socket.emit("close");
  });
});

describe("WebSocket refusals", () => {
  it("a refusal that HTTP answers with Retry-After carries retry_after in its error frame", async () => {
    const s = await startTestServer([{ ...STORIES, ctxSize: 2048 }], { parallel: 1, maxQueue: 0 });
    try {
      const ws = new WebSocket(`${s.url.replace("http", "ws")}/v1/ws`);
      const frames: Array<{ type: string; id: string; error?: { code: string }; retry_after?: number }> = [];
      ws.on("message", (d) => frames.push(JSON.parse(String(d))));
      await new Promise((r) => ws.once("open", r));
      ws.send(JSON.stringify({ type: "completions.create", id: "long", body: { model: "stories260K", prompt: "Once", max_tokens: 1800, ignore_eos: true } }));
      await waitFor(() => s.registry.resolve("stories260K").scheduler.busySlots === 1);
      ws.send(JSON.stringify({ type: "completions.create", id: "refused", body: { model: "stories260K", prompt: "Once", max_tokens: 2 } }));
      await waitFor(() => frames.some((f) => f.id === "refused"));
      const refusal = frames.find((f) => f.id === "refused")!;
      expect(refusal).toMatchObject({ type: "error", error: { code: "queue_full" } });
      expect(refusal.retry_after).toBeGreaterThanOrEqual(1);
      ws.close();
    } finally {
      await s.close();
    }
  });
});
