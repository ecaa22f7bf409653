/**
 * The attacks of the outside review, each as a class, through the real server: the admin
 * guard under every spelling of a path, frames and bodies built to crash or stall, idle
 * unauthenticated sockets, secrets in errors, racing operators, hostile names, timers,
 * content types; and tenants: scoped keys and fair sharing.
 */
import { mkdtempSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import WebSocket from "ws";
import { parseModelsFile } from "../src/config/models-file.js";
import type { RunningServer } from "../src/server.js";
import { serveModel } from "./helpers/model-http.js";
import { captureLog, sharedModel, startTestServer, STORIES, testServerOptions, TINY_RANDOM, waitFor } from "./helpers/server.js";
import { startServer } from "../src/server.js";
import { postSse } from "./helpers/sse.js";

let server: RunningServer | undefined;
afterEach(async () => {
  await server?.close().catch(() => undefined);
  server = undefined;
});

const KEY = "plain-key-0001";
const ADMIN = "admin-key-0001";
const tmp = () => mkdtempSync(join(tmpdir(), "spindle-hardening-"));

/** Sends raw bytes (a request line exactly as written, no client normalising it) and returns the status. */
function raw(url: string, text: string): Promise<number> {
  const { port } = new URL(url);
  return new Promise((resolve, reject) => {
    const sock = connect(Number(port), "127.0.0.1");
    let answer = "";
    sock.on("data", (d) => {
      answer += d.toString("latin1");
      const m = /^HTTP\/1\.1 (\d{3})/.exec(answer);
      if (m) {
        sock.destroy();
        resolve(Number(m[1]));
      }
    });
    sock.on("error", reject);
    sock.on("close", () => resolve(Number(/^HTTP\/1\.1 (\d{3})/.exec(answer)?.[1] ?? 0)));
    sock.write(text);
  });
}

describe("the admin guard is decided by the route that matched", () => {
  const ADMIN_ROUTES: Array<[string, string]> = [
    ["GET", "/admin/status"],
    ["POST", "/admin/models/stories260K/promote"],
    ["POST", "/admin/models/stories260K/rollback"],
    ["POST", "/admin/models/stories260K/canary"],
    ["POST", "/admin/models/stories260K/shadow"],
    ["POST", "/admin/models/stories260K/versions/test/load"],
    ["POST", "/admin/models/stories260K/versions/test/unload"],
  ];
  /** Spellings of one path that a router may take for it. */
  const spellings = (path: string, host: string): string[] => [
    path,
    path.replace("/admin", "/%61dmin"),
    path.replace("/admin", "/%61%64%6d%69%6e"),
    path.replace("/admin/", "/admin%2F"),
    path.replace("/admin", "//admin"),
    path.replace("/admin/", "/admin/./"),
    path.replace("/admin", "/x/../admin"),
    path.replace("/admin", "/%2e/admin"),
    `${path}?x=1`,
    `${path}/`,
    `${path};x`,
    `http://${host}${path}`,
    `http://${host}${path.replace("/admin", "/%61dmin")}`,
  ];

  it("every admin route, method and spelling: nothing without the admin key, 403 for a plain key, through only with the admin key", async () => {
    server = await startTestServer([STORIES], { apiKeys: [KEY], adminKeys: [ADMIN] });
    const host = new URL(server.url).host;
    let tried = 0;
    for (const [method, path] of ADMIN_ROUTES) {
      for (const target of spellings(path, host)) {
        for (const auth of ["", `authorization: Bearer ${KEY}\r\n`, "authorization: Bearer wrong-key-000\r\n"]) {
          const status = await raw(server.url, `${method} ${target} HTTP/1.1\r\nhost: ${host}\r\n${auth}content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}`);
          tried++;
          // Refused (401/403), unknown (404) or malformed (400): never served.
          expect([400, 401, 403, 404], `${method} ${target} with ${auth.trim() || "no key"}`).toContain(status);
        }
      }
    }
    expect(tried).toBeGreaterThan(250);
    // And with the admin key the route is reached (by the plainest spelling and an encoded one).
    for (const target of ["/admin/status", "/%61dmin/status"]) {
      expect(await raw(server.url, `GET ${target} HTTP/1.1\r\nhost: ${host}\r\nauthorization: Bearer ${ADMIN}\r\nconnection: close\r\n\r\n`)).toBe(200);
    }
  });

  it("every route declares its area: a plain API key reaches the API, never admin; unmatched admin paths ask for the admin key", async () => {
    server = await startTestServer([STORIES], { apiKeys: [KEY], adminKeys: [ADMIN] });
    const routes = server.app.printRoutes({ commonPrefix: false });
    expect(routes).toContain("admin/status");
    const host = new URL(server.url).host;
    expect(await raw(server.url, `GET /admin/no-such HTTP/1.1\r\nhost: ${host}\r\nconnection: close\r\n\r\n`)).toBe(401);
    expect(await raw(server.url, `GET /%61dmin/no-such HTTP/1.1\r\nhost: ${host}\r\nauthorization: Bearer ${KEY}\r\nconnection: close\r\n\r\n`)).toBe(403);
    expect(await raw(server.url, `GET /v1/models HTTP/1.1\r\nhost: ${host}\r\nauthorization: Bearer ${KEY}\r\nconnection: close\r\n\r\n`)).toBe(200);
  });
});

describe("WebSocket frames and connections", () => {
  async function socket(url: string, headers: Record<string, string> = {}) {
    const ws = new WebSocket(`${url.replace("http", "ws")}/v1/ws`, { headers });
    const frames: Array<{ type: string; id: string | null; error?: { type: string; code: string; param: string | null } }> = [];
    let closed: number | undefined;
    ws.on("message", (d) => frames.push(JSON.parse(String(d))));
    ws.on("close", (code) => (closed = code));
    await new Promise((r, j) => {
      ws.once("open", r);
      ws.once("error", j);
    });
    return { ws, frames, closed: () => closed };
  }

  it("a frame built to crash the process (a type nested 5,000 deep, nested timeout or priority) is that client's error only", async () => {
    server = await startTestServer([STORIES], {}, { app: { maxFrameBytes: 1 << 20 } });
    const c = await socket(server.url);
    const deep = "[".repeat(5000) + "]".repeat(5000);
    c.ws.send(`{"type":${deep},"id":"a"}`);
    c.ws.send(`{"type":"completions.create","id":"b","timeout":${deep}}`);
    c.ws.send(JSON.stringify({ type: "completions.create", id: "c", timeout: [[1]], body: { model: "stories260K", prompt: "Hi", max_tokens: 2 } }));
    c.ws.send(JSON.stringify({ type: "completions.create", id: "d", priority: [["high"]], body: { model: "stories260K", prompt: "Hi", max_tokens: 2 } }));
    c.ws.send(JSON.stringify({ type: ["x"], id: "e" }));
    await waitFor(() => c.frames.length === 5, 5000);
    for (const f of c.frames) expect(f).toMatchObject({ type: "error", error: { type: "invalid_request_error" } });
    expect(c.frames.find((f) => f.id === "c")!.error!.param).toBe("timeout");
    expect(c.frames.find((f) => f.id === "d")!.error!.param).toBe("priority");
    // The same connection, and the server, still serve.
    c.ws.send(JSON.stringify({ type: "completions.create", id: "ok", body: { model: "stories260K", prompt: "Once", max_tokens: 3 } }));
    await waitFor(() => c.frames.some((f) => f.id === "ok" && f.type === "done"), 5000);
    c.ws.close();
  });

  it("a connection that never authenticates is closed at the auth timeout; connections are capped per client address and in all", async () => {
    server = await startTestServer([STORIES], { apiKeys: [KEY], wsMaxConnections: 3, wsMaxConnectionsPerClient: 2 }, { app: { socketLimits: { authTimeoutSeconds: 1 } } });
    const idle = await socket(server.url);
    await waitFor(() => idle.closed() !== undefined, 5000);
    expect(idle.closed()).toBe(1008);
    expect(idle.frames[0]!.error).toMatchObject({ type: "authentication_error", code: "auth_timeout" });
    // Two keyed connections from this address: the third is refused before it upgrades.
    const a = await socket(server.url, { authorization: `Bearer ${KEY}` });
    const b = await socket(server.url, { authorization: `Bearer ${KEY}` });
    const refused = new WebSocket(`${server.url.replace("http", "ws")}/v1/ws`, { headers: { authorization: `Bearer ${KEY}` } });
    const status = await new Promise<number>((r) => refused.on("unexpected-response", (_req, res) => r(res.statusCode!)));
    expect(status).toBe(429);
    a.ws.close();
    await waitFor(() => a.closed() !== undefined);
    // A slot freed: a new one is accepted again.
    const c = await socket(server.url, { authorization: `Bearer ${KEY}` });
    b.ws.close();
    c.ws.close();
  });
});

describe("oversized work is refused before it is done", () => {
  it("a 3.9 MB chat body and half a million token ids are refused by size against the context, before any tokenizing, while a stream runs on", async () => {
    server = await startTestServer([{ ...STORIES, ctxSize: 2048 }], { parallel: 2 });
    const stream = postSse(`${server.url}/v1/completions`, { model: "stories260K", prompt: "Once upon a time", max_tokens: 1500, ignore_eos: true, stream: true });
    await waitFor(() => server!.registry.resolve("stories260K").scheduler.busySlots === 1);
    const big = "Once upon a time there was a little girl. ".repeat(95_000);
    const res = await fetch(`${server.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "stories260K", messages: [{ role: "user", content: big }] }),
    });
    expect(res.status).toBe(400);
    const err = (await res.json()).error;
    // "at least": counted from characters, not from tokenizing 3.9 MB on the event loop.
    expect(err).toMatchObject({ code: "context_length_exceeded", param: "messages" });
    expect(err.message).toMatch(/at least \d+ tokens/);
    const ids = await fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "stories260K", prompt: Array.from({ length: 500_000 }, (_, i) => i % 500) }),
    });
    expect(ids.status).toBe(400);
    expect((await ids.json()).error).toMatchObject({ code: "context_length_exceeded", param: "prompt" });
    const s = await stream;
    expect(s.events.at(-1)).toBe("[DONE]");
  });

  it("a body nested deeper than a request needs is refused before it is parsed; one sent as text/plain gets 415 naming its type", async () => {
    server = await startTestServer([STORIES]);
    const deep = await fetch(`${server.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: `{"model":"stories260K","prompt":${"[".repeat(200)}${"]".repeat(200)}}` });
    expect(deep.status).toBe(400);
    expect((await deep.json()).error.message).toMatch(/nests deeper/);
    const plain = await fetch(`${server.url}/v1/completions`, { method: "POST", body: JSON.stringify({ model: "stories260K", prompt: "Hi" }) });
    expect(plain.status).toBe(415);
    expect((await plain.json()).error.message).toMatch(/application\/json.*text\/plain/);
  });
});

describe("what clients may read and trigger", () => {
  it("no path, URL, credential or file byte reaches a client; operators see redacted sources; exact versions load only when the policy allows", async () => {
    const dir = tmp();
    const secret = "user:s3cret-pass";
    const http = await serveModel(Buffer.from("not a model"));
    try {
      const yaml = `models:
  - id: stories
    versions:
      - name: v1
        file: ${sharedModel("stories260K.gguf")}
        sha256: 270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d
        ctx_size: 256
      - name: remote
        file: ${join(dir, "remote.gguf")}
        sha256: "${"0".repeat(64)}"
        sources: ["${http.base.replace("http://", `http://${secret}@`)}/missing.gguf?X-Amz-Signature=deadbeef"]
        ctx_size: 256
    default_version: v1
  - id: garbage
    file: ${sharedModel("stories260K-ggufv1-unsupported.gguf")}
`;
      const file = join(dir, "models.yaml");
      writeFileSync(file, yaml);
      server = await startServer(testServerOptions({ loadOnDemand: "ids" }), parseModelsFile(yaml, file));
      const leaks = (text: string) => [secret, "deadbeef", "X-Amz", dir, "shared/models", "GGUF version"].filter((x) => text.includes(x));
      const client = async (model: string) => {
        const res = await fetch(`${server!.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model, prompt: "Hi", max_tokens: 2 }) });
        return { status: res.status, text: await res.text() };
      };
      // Policy "ids": an exact version that is not loaded is not loaded for a client.
      const exact = await client("stories@remote");
      expect(exact.status).toBe(503);
      expect(JSON.parse(exact.text).error.code).toBe("model_not_loaded");
      expect(http.hits).toHaveLength(0);
      const failed = await client("garbage");
      expect(failed.status).toBe(503);
      for (const text of [exact.text, failed.text, await (await fetch(`${server.url}/v1/models`)).text(), await (await fetch(`${server.url}/readyz`)).text()]) {
        expect(leaks(text)).toEqual([]);
      }
      // The operator loads it: the fetch fails, and the reason names the source without its secrets.
      const load = await fetch(`${server.url}/admin/models/stories/versions/remote/load`, { method: "POST" });
      expect(load.status).toBe(503);
      expect(leaks(await load.text())).toEqual([]);
      const status = await (await fetch(`${server.url}/admin/status`)).json();
      const remote = status.versions.find((v: { id: string }) => v.id === "stories@remote");
      expect(remote.error).toMatch(/could not fetch/);
      expect(remote.error).toContain(`${new URL(http.base).host}/missing.gguf?…`);
      expect(remote.error).not.toContain(secret);
      expect(remote.error).not.toContain("deadbeef");
    } finally {
      http.close();
    }
  });

  it("two rollbacks at once never point an id at a version that is not loaded", async () => {
    const dir = tmp();
    const v = (n: string) => `      - { name: ${n}, file: ${sharedModel("stories260K.gguf")}, sha256: 270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d, ctx_size: 256, parallel: 1 }\n`;
    const yaml = `models:\n  - id: s\n    default_version: v1\n    versions:\n${v("v1")}${v("v2")}${v("v3")}`;
    const file = join(dir, "models.yaml");
    writeFileSync(file, yaml);
    server = await startServer(testServerOptions({ stateFile: join(dir, "state.json") }), parseModelsFile(yaml, file));
    const admin = (path: string, body: unknown = {}) => fetch(`${server!.url}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    expect((await admin("/admin/models/s/promote", { version: "v2" })).status).toBe(200);
    expect((await admin("/admin/models/s/promote", { version: "v3" })).status).toBe(200);
    await admin("/admin/models/s/versions/v1/unload");
    const [a, b] = await Promise.all([admin("/admin/models/s/rollback"), admin("/admin/models/s/rollback")]);
    expect([a.status, b.status].sort()).toEqual([200, 200]);
    const s = (await (await fetch(`${server.url}/v1/models/s`)).json()) as { resolves_to: string; state: string };
    expect(s).toMatchObject({ resolves_to: "s@v1", state: "ready" });
    // A third has no history left: a clear 409, nothing moved.
    expect((await admin("/admin/models/s/rollback")).status).toBe(409);
  });

  it("alias names from the admin API obey the models file's rules; a huge request timeout does not overflow into an instant one", async () => {
    server = await startTestServer([STORIES]);
    for (const name of ["stories260K@test2", "__proto__", "a%0Ab", "evil%E2%80%AEtxt"]) {
      const res = await fetch(`${server.url}/admin/models/${name}/promote`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ version: "stories260K@test" }) });
      expect(res.status, name).toBe(400);
      expect((await res.json()).error.code).toBe("invalid_name");
    }
    const res = await fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-request-timeout": "3000000" },
      body: JSON.stringify({ model: "stories260K", prompt: "Once", max_tokens: 4 }),
    });
    expect(res.status).toBe(200);
  });
});

describe("tenants", () => {
  function keysFile(text: string): string {
    const file = join(tmp(), "keys");
    writeFileSync(file, text);
    return file;
  }

  it("a key's scope: only its models, listed and served; others are 403 and absent from its model list", async () => {
    const file = keysFile("key-team-a-000001 name=team-a models=stories260K\nkey-team-b-000001 name=team-b\n");
    server = await startTestServer([STORIES, TINY_RANDOM], { apiKeysFile: file });
    const call = (key: string, model: string) =>
      fetch(`${server!.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${key}` }, body: JSON.stringify({ model, prompt: "Hi", max_tokens: 2 }) });
    expect((await call("key-team-a-000001", "stories260K")).status).toBe(200);
    expect((await call("key-team-a-000001", "stories260K@test")).status).toBe(200);
    const refused = await call("key-team-a-000001", "llama-2-tiny-random");
    expect(refused.status).toBe(403);
    expect((await refused.json()).error.code).toBe("model_not_allowed");
    expect((await call("key-team-b-000001", "llama-2-tiny-random")).status).toBe(200);
    const listed = await (await fetch(`${server.url}/v1/models`, { headers: { authorization: "Bearer key-team-a-000001" } })).json();
    expect(listed.data.map((m: { id: string }) => m.id)).not.toContain("llama-2-tiny-random");
    expect((await fetch(`${server.url}/v1/models/llama-2-tiny-random`, { headers: { authorization: "Bearer key-team-a-000001" } })).status).toBe(404);
  });

  it("waiting requests share a model's slots between keys by weight: one key's 8 queued requests do not make another's wait for all of them", async () => {
    const file = keysFile("key-flood-000001 name=flood\nkey-polite-00001 name=polite\n");
    const captured = captureLog();
    server = await startTestServer([{ ...STORIES, ctxSize: 2048 }], { apiKeysFile: file, parallel: 1, maxQueue: 32 }, { log: captured.log });
    const finished: string[] = [];
    const call = (key: string, tag: string, maxTokens: number) =>
      fetch(`${server!.url}/v1/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${key}` },
        body: JSON.stringify({ model: "stories260K", prompt: "Once upon a time", max_tokens: maxTokens, ignore_eos: true }),
      }).then(async (r) => {
        expect(r.status).toBe(200);
        await r.json();
        finished.push(tag);
      });
    const sched = () => server!.registry.resolve("stories260K").scheduler;
    const pending = [call("key-flood-000001", "flood-0", 300)];
    await waitFor(() => sched().busySlots === 1);
    for (let i = 1; i <= 8; i++) pending.push(call("key-flood-000001", `flood-${i}`, 20));
    await waitFor(() => sched().waiting === 8);
    pending.push(call("key-polite-00001", "polite", 20));
    await waitFor(() => sched().waiting === 9);
    await Promise.all(pending);
    // Served right after the running one, not after the 8 queued before it.
    expect(finished.indexOf("polite")).toBeLessThanOrEqual(2);
    const m = await (await fetch(`${server.url}/metrics`, { headers: { authorization: "Bearer key-polite-00001" } })).text();
    expect(m).toMatch(/spindle_key_requests_total\{key="polite",status_class="2xx"\} 1/);
    expect(m).toMatch(/spindle_key_requests_total\{key="flood",status_class="2xx"\} 9/);
    expect(m).not.toContain("key-polite-00001");
    const lines = captured.lines.filter((l) => l.msg === "request");
    expect(lines.filter((l) => l.key === "polite")).toHaveLength(1);
    expect(JSON.stringify(lines)).not.toContain("key-flood-000001");
  });

  it("a key's priority class is its default, and it may ask for lower, never higher", async () => {
    const file = keysFile("key-batch-000001 name=batch priority=low\nkey-inter-000001 name=interactive priority=high\n");
    server = await startTestServer([{ ...STORIES, ctxSize: 2048 }], { apiKeysFile: file, parallel: 1, maxQueue: 8 });
    const order: string[] = [];
    const call = (key: string, tag: string, headers: Record<string, string> = {}, maxTokens = 10) =>
      fetch(`${server!.url}/v1/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${key}`, ...headers },
        body: JSON.stringify({ model: "stories260K", prompt: "Once", max_tokens: maxTokens, ignore_eos: true }),
      }).then(async (r) => {
        await r.json();
        order.push(tag);
      });
    const sched = () => server!.registry.resolve("stories260K").scheduler;
    const blocker = call("key-inter-000001", "blocker", {}, 300);
    await waitFor(() => sched().busySlots === 1);
    const a = call("key-batch-000001", "batch-asks-high", { "x-priority": "high" });
    await waitFor(() => sched().waiting === 1);
    const b = call("key-inter-000001", "interactive-asks-low", { "x-priority": "low" });
    await waitFor(() => sched().waiting === 2);
    const c = call("key-inter-000001", "interactive");
    await waitFor(() => sched().waiting === 3);
    await Promise.all([blocker, a, b, c]);
    // batch stays low even when it asks for high; interactive may step down to low.
    expect(order).toEqual(["blocker", "interactive", "batch-asks-high", "interactive-asks-low"]);
  });
});
