/** API keys on every route and method, per-key limits, CORS, and the WebSocket's own authentication. */
import { spawn } from "node:child_process";
import { resolve } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";
import { KeyRing } from "../src/access/keys.js";
import { plainKey } from "../src/config/keys-file.js";
import type { RunningServer } from "../src/server.js";
import { assertSchema } from "./helpers/openapi.js";
import { sharedModel, startTestServer, STORIES, waitFor } from "./helpers/server.js";

const KEY_A = "key-aaaaaaaa-1";
const KEY_B = "key-bbbbbbbb-2";

describe("API keys", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer([STORIES], { apiKeys: [KEY_A, KEY_B], publicAreas: ["health"] });
  });
  afterAll(async () => server?.close());

  const body = JSON.stringify({ model: "stories260K", prompt: "Once", max_tokens: 2 });
  const routes: Array<[string, string]> = [
    ["GET", "/"],
    ["GET", "/app.js"],
    ["GET", "/vendor/marked.js"],
    ["GET", "/v1/models"],
    ["GET", "/v1/models/stories260K"],
    ["POST", "/v1/chat/completions"],
    ["POST", "/v1/completions"],
    ["GET", "/metrics"],
    ["GET", "/no/such/route"],
    ["PUT", "/v1/completions"],
    ["DELETE", "/v1/models/stories260K"],
    ["PATCH", "/v1/chat/completions"],
    ["POST", "/v1/responses"],
    ["GET", "/v1/responses/resp_x"],
    ["DELETE", "/v1/responses/resp_x"],
    ["POST", "/v1/embeddings"],
    ["POST", "/v1/messages"],
    ["POST", "/v1/messages/count_tokens"],
    ["POST", "/chat/completions"],
    ["GET", "/models"],
    ["POST", "/tokenize"],
  ];

  it.each(routes)("%s %s: 401 with the envelope without a key or with a wrong one; through with a right one", async (method, path) => {
    const call = (headers: Record<string, string>) =>
      fetch(`${server.url}${path}`, { method, headers: { "content-type": "application/json", ...headers }, body: method === "GET" || method === "DELETE" ? undefined : body });
    const refused: Array<Record<string, string>> = [{}, { authorization: "Bearer wrong-key-123" }, { "x-api-key": "key-aaaaaaaa-" }, { authorization: `Basic ${KEY_A}` }];
    for (const headers of refused) {
      const res = await call(headers);
      expect(res.status).toBe(401);
      const json = await res.json();
      // Anthropic's routes answer in Anthropic's envelope; the rest in OpenAI's.
      if (path.startsWith("/v1/messages")) expect(json.type).toBe("error");
      else assertSchema("ErrorResponse", json);
      expect(json.error.type).toBe("authentication_error");
    }
    const accepted: Array<Record<string, string>> = [{ authorization: `Bearer ${KEY_A}` }, { "x-api-key": KEY_B }];
    for (const headers of accepted) {
      const res = await call(headers);
      expect(res.status).not.toBe(401);
      await res.arrayBuffer();
    }
  });

  it("/admin: loopback only without an admin key configured", async () => {
    const res = await fetch(`${server.url}/admin/status`);
    expect(res.status).toBe(200);
    expect((await res.json()).models[0]).toMatchObject({ id: "stories260K", state: "ready", scheduler: { busy_slots: 0 } });
    const ring = new KeyRing([], [], { maxConcurrent: 0, tokensPerMinute: 0 });
    expect(() => ring.authorizeAdmin(undefined, "10.1.2.3")).toThrow(/loopback/);
    expect(() => ring.authorizeAdmin(undefined, "::ffff:127.0.0.1")).not.toThrow();
  });

  it("health stays public when configured so", async () => {
    for (const p of ["/livez", "/readyz", "/health"]) expect((await fetch(`${server.url}${p}`)).status).toBe(200);
  });

  it("the WebSocket takes a key on the upgrade or in its first frame, and closes on a wrong one", async () => {
    const wsUrl = `${server.url.replace("http", "ws")}/v1/ws`;
    const run = async (ws: WebSocket, first?: unknown) => {
      await new Promise((r) => ws.once("open", r));
      const frames: Array<{ type: string; error?: { type: string } }> = [];
      let closed: number | undefined;
      ws.on("message", (d) => frames.push(JSON.parse(String(d))));
      ws.on("close", (code) => (closed = code));
      if (first) ws.send(JSON.stringify(first));
      ws.send(JSON.stringify({ type: "completions.create", id: "x", body: { model: "stories260K", prompt: "Once", max_tokens: 3 } }));
      await waitFor(() => frames.some((f) => f.type === "done" || f.type === "error") || closed !== undefined, 5000);
      return { frames, closed: () => closed };
    };
    const withHeader = await run(new WebSocket(wsUrl, { headers: { authorization: `Bearer ${KEY_A}` } }));
    expect(withHeader.frames.at(-1)!.type).toBe("done");
    const withFrame = await run(new WebSocket(wsUrl), { type: "auth", token: KEY_B });
    await waitFor(() => withFrame.frames.some((f) => f.type === "done"), 5000);
    const wrong = await run(new WebSocket(wsUrl), { type: "auth", token: "nope-nope-nope" });
    await waitFor(() => wrong.closed() !== undefined, 5000);
    expect(wrong.frames[0]!.error!.type).toBe("authentication_error");
    expect(wrong.closed()).toBe(1008);
    const rejectedUpgrade = new WebSocket(wsUrl, { headers: { authorization: "Bearer wrong-key-123" } });
    const status = await new Promise<number>((r) => rejectedUpgrade.on("unexpected-response", (_req, res) => r(res.statusCode!)));
    expect(status).toBe(401);
  });

  it("keys are compared by digest: right, wrong, prefix, longer, empty", () => {
    const ring = new KeyRing(["short-key-1", "a-much-longer-key-2"].map(plainKey), [], { maxConcurrent: 0, tokensPerMinute: 0 });
    expect(ring.authenticate("short-key-1").index).toBe(0);
    expect(ring.authenticate("a-much-longer-key-2").index).toBe(1);
    for (const bad of ["short-key-", "short-key-12", "", "A-much-longer-key-2"]) expect(() => ring.authenticate(bad)).toThrow();
  });
});

describe("admin key", () => {
  let server: RunningServer;
  const ADMIN = "admin-key-000001";
  beforeAll(async () => {
    server = await startTestServer([STORIES], { apiKeys: [KEY_A], adminKeys: [ADMIN] });
  });
  afterAll(async () => server?.close());

  it("admin routes need the admin key: none or a wrong one 401, a plain API key 403, on every method", async () => {
    for (const method of ["GET", "POST", "DELETE"]) {
      const call = (headers: Record<string, string>) => fetch(`${server.url}/admin/status`, { method, headers });
      expect((await call({})).status).toBe(401);
      expect((await call({ authorization: "Bearer not-a-key-at-all" })).status).toBe(401);
      const plain = await call({ authorization: `Bearer ${KEY_A}` });
      expect(plain.status).toBe(403);
      expect((await plain.json()).error.type).toBe("permission_error");
      const admin = await call({ authorization: `Bearer ${ADMIN}` });
      expect(admin.status).toBe(method === "GET" ? 200 : 404);
    }
  });
});

describe("per-key limits", () => {
  let server: RunningServer;
  beforeAll(async () => {
    server = await startTestServer([{ ...STORIES, ctxSize: 4096 }], { apiKeys: [KEY_A, KEY_B], keyMaxConcurrent: 1, keyTokensPerMinute: 200, parallel: 4 });
  });
  afterAll(async () => server?.close());

  const post = (key: string, body: Record<string, unknown>, signal?: AbortSignal) =>
    fetch(`${server.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${key}` }, body: JSON.stringify({ model: "stories260K", prompt: "Once", ...body }), signal });

  it("concurrency per key: a second request of the same key gets 429 with x-ratelimit headers; another key is served", async () => {
    const ac = new AbortController();
    const long = await post(KEY_A, { max_tokens: 3500, ignore_eos: true, stream: true }, ac.signal);
    expect(long.headers.get("x-ratelimit-limit-requests")).toBe("1");
    const reader = long.body!.getReader();
    await reader.read();
    const second = await post(KEY_A, { max_tokens: 2 });
    expect(second.status).toBe(429);
    expect(second.headers.get("retry-after")).toBe("1");
    expect(second.headers.get("x-ratelimit-remaining-requests")).toBe("0");
    expect((await second.json()).error).toMatchObject({ type: "rate_limit_error", code: "rate_limit_exceeded" });
    expect((await post(KEY_B, { max_tokens: 2 })).status).toBe(200);
    ac.abort();
  });

  it("tokens per minute per key: once spent, 429 with the remaining tokens at 0 and a reset time", async () => {
    await waitFor(() => server.registry.resolve("stories260K").scheduler.busySlots === 0);
    let res: Response;
    let n = 0;
    do {
      res = await post(KEY_B, { max_tokens: 60, ignore_eos: true });
      n++;
    } while (res.status === 200 && n < 10);
    expect(res.status).toBe(429);
    expect(n).toBeGreaterThan(1);
    expect(res.headers.get("x-ratelimit-limit-tokens")).toBe("200");
    expect(res.headers.get("x-ratelimit-remaining-tokens")).toBe("0");
    expect(Number(res.headers.get("retry-after"))).toBeGreaterThan(0);
    expect(res.headers.get("x-ratelimit-reset-tokens")).toMatch(/^\d+s$/);
  });
});

describe("CORS", () => {
  let server: RunningServer;
  let plain: RunningServer;
  beforeAll(async () => {
    server = await startTestServer([STORIES], { corsOrigins: ["https://app.example"], apiKeys: [KEY_A] });
    plain = await startTestServer([STORIES]);
  });
  afterAll(async () => {
    await server?.close();
    await plain?.close();
  });

  const preflight = (url: string, origin: string) =>
    fetch(`${url}/v1/chat/completions`, { method: "OPTIONS", headers: { origin, "access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type" } });

  it("answers the preflight of an allowed origin (without a key), and not of others", async () => {
    const ok = await preflight(server.url, "https://app.example");
    expect(ok.status).toBe(204);
    expect(ok.headers.get("access-control-allow-origin")).toBe("https://app.example");
    expect(ok.headers.get("access-control-allow-headers")).toContain("authorization");
    const other = await preflight(server.url, "https://evil.example");
    expect(other.headers.get("access-control-allow-origin")).toBeNull();
    const res = await fetch(`${server.url}/v1/models`, { headers: { origin: "https://app.example", authorization: `Bearer ${KEY_A}` } });
    expect(res.headers.get("access-control-allow-origin")).toBe("https://app.example");
  });

  it("is off by default", async () => {
    const res = await preflight(plain.url, "https://app.example");
    expect(res.headers.get("access-control-allow-origin")).toBeNull();
  });
});

describe("binding beyond loopback without a key", () => {
  it("prints a warning at start", async () => {
    const child = spawn(process.execPath, ["dist/launch.cjs", "--model", sharedModel("stories260K.gguf"), "--host", "0.0.0.0", "--port", "0", "--log-level", "silent"], {
      cwd: resolve(import.meta.dirname, ".."),
    });
    let err = "";
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    try {
      await waitFor(() => err.includes("warning"), 30_000, 20);
      expect(err).toMatch(/warning: listening on 0\.0\.0\.0 with no API key/);
    } finally {
      child.kill("SIGTERM");
    }
  });
});
