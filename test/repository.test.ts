/**
 * Model repository and residency through the real engine and the real server: versions,
 * aliases, promotion and rollback under traffic, canary and shadow, the memory budget
 * with LRU eviction, pinning, busy versions, bad artifacts, immutability, readiness
 * after warm-up, on-demand download.
 */
import { createServer as createNetServer } from "node:net";
import { serveModel } from "./helpers/model-http.js";
import { existsSync, mkdtempSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { parseModelsFile, type RepositoryConfig } from "../src/config/models-file.js";
import { Engine } from "../src/engine/engine.js";
import type { EngineFaults } from "../src/engine/types.js";
import { startServer, type RunningServer } from "../src/server.js";
import { openaiClient, sharedModel, startTestServer, testServerOptions, waitFor, type TestServerOptions } from "./helpers/server.js";
import { postSse } from "./helpers/sse.js";
import { parseMetrics, sum } from "./helpers/prometheus.js";

const metricValue = (text: string, name: string, labels: Record<string, string>) => sum(parseMetrics(text), name, labels);

const SHA = {
  stories: "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d",
  storiesChat: "98234cb2bfd666ea2460cb4418428b56f59313b5610130f3d43fd92b487b7da0",
  tiny: "81f226c62d28ed4a1a9b9fa080fcd9f0cc40e0f9d5680036583ff98fbcd035cb",
  ggufV1: "c14806920629b6c217445c69d7ac61bd0e4047289f8ab824c3f0b4f827a5d1cb",
};
/** Every version in these tests runs with this shape, so the estimates below apply. */
const SHAPE = "ctx_size: 256\n        parallel: 2";

const est = { stories: 0, tiny: 0 };
beforeAll(async () => {
  const engine = await Engine.create("cpu");
  est.stories = (await engine.estimate({ id: "s", path: sharedModel("stories260K.gguf"), ctxSize: 256, parallel: 2 })).ram;
  est.tiny = (await engine.estimate({ id: "t", path: sharedModel("llama-2-tiny-random.gguf"), ctxSize: 256, parallel: 2 })).ram;
  await engine.dispose();
  // The tests below rely on one model being much larger than the other.
  expect(est.tiny).toBeGreaterThan(2 * est.stories);
});

let server: RunningServer | undefined;
afterEach(async () => {
  await server?.close();
  server = undefined;
});

const tmp = () => mkdtempSync(join(tmpdir(), "spindle-repo-"));

function version(name: string, file: string, sha: string, extra = ""): string {
  return `      - name: ${name}\n        file: ${sharedModel(file)}\n        sha256: ${sha}\n        chat_template: general\n        ${SHAPE}\n${extra}`;
}

function writeConfig(dir: string, yaml: string): RepositoryConfig {
  const file = join(dir, "models.yaml");
  writeFileSync(file, yaml);
  return parseModelsFile(yaml, file);
}

async function start(config: RepositoryConfig, opts: TestServerOptions = {}, io: Parameters<typeof startServer>[2] = {}): Promise<RunningServer> {
  server = await startServer(testServerOptions({ threads: 1, ...opts }), config, io);
  return server;
}

/** stories (small) and tiny (large), each one version. */
const twoModels = `models:
  - id: stories
    versions:
${version("v1", "stories260K.gguf", SHA.stories)}  - id: tiny
    versions:
${version("v1", "llama-2-tiny-random.gguf", SHA.tiny)}`;

/** One id, two versions with different tokenizers (so a response shows which served it). */
const twoVersions = (extra = "") => `models:
  - id: story
    default_version: v1
${extra}    versions:
${version("v1", "stories260K.gguf", SHA.stories)}${version("v2", "llama-2-tiny-random.gguf", SHA.tiny)}`;

const complete = (s: RunningServer, model: string, extra: Record<string, unknown> = {}) =>
  openaiClient(s).completions.create({ model, prompt: "Once upon a time", max_tokens: 4, temperature: 0, ...extra } as never) as unknown as Promise<{
    model: string;
    choices: Array<{ text: string; finish_reason: string }>;
    usage: { prompt_tokens: number; completion_tokens: number };
  }>;

async function admin(s: RunningServer, path: string, body?: unknown): Promise<{ status: number; json: Record<string, unknown> }> {
  const res = await fetch(`${s.url}${path}`, { method: body === undefined ? "GET" : "POST", headers: { "content-type": "application/json" }, body: body === undefined ? undefined : JSON.stringify(body) });
  return { status: res.status, json: (await res.json()) as Record<string, unknown> };
}

async function models(s: RunningServer): Promise<Array<Record<string, unknown>>> {
  return ((await (await fetch(`${s.url}/v1/models`)).json()) as { data: Array<Record<string, unknown>> }).data;
}

const versionInfo = async (s: RunningServer, key: string) => (await (await fetch(`${s.url}/v1/models/${encodeURIComponent(key)}`)).json()) as Record<string, unknown>;
/** A version as operators see it (/admin/status): with the reason it failed, which clients never see. */
const operatorInfo = async (s: RunningServer, key: string) => ((await admin(s, "/admin/status")).json.versions as Array<Record<string, unknown>>).find((m) => m.id === key)!;

async function metrics(s: RunningServer): Promise<string> {
  return (await fetch(`${s.url}/metrics`)).text();
}

describe("versions and residency", () => {
  it("two models are resident together within a budget that holds both; responses name id@version", async () => {
    const s = await start(writeConfig(tmp(), twoModels), { memoryBudget: est.stories + est.tiny + 1 });
    const [a, b] = await Promise.all([complete(s, "stories"), complete(s, "tiny")]);
    expect(a.model).toBe("stories@v1");
    expect(b.model).toBe("tiny@v1");
    const list = await models(s);
    // Versions are listed under their model.
    const versions = list.flatMap((m) => (m.versions as Array<Record<string, unknown>>) ?? []);
    for (const key of ["stories@v1", "tiny@v1"]) {
      const v = versions.find((m) => m.id === key)!;
      expect(v.state).toBe("ready");
      expect(v.evictions).toBe(0);
      // The estimate made before loading is what llama.cpp then allocated.
      const mem = v.memory as { estimated_bytes: { ram: number }; allocated_bytes: { ram: number } };
      expect(Math.abs(mem.allocated_bytes.ram / mem.estimated_bytes.ram - 1)).toBeLessThan(0.05);
    }
    expect(list.find((m) => m.id === "stories")).toMatchObject({ kind: "model", resolves_to: "stories@v1", state: "ready" });
    expect(metricValue(await metrics(s), "spindle_memory_resident_estimated_bytes", { memory: "ram" })).toBe(est.stories + est.tiny);
  });

  it("a budget that fits one model: alternating requests all succeed by LRU eviction, and the swap count is what LRU predicts", async () => {
    const s = await start(writeConfig(tmp(), twoModels), { memoryBudget: est.tiny + Math.floor(est.stories / 2) });
    const order = ["stories", "tiny", "stories", "tiny", "stories", "tiny"];
    for (const m of order) {
      const r = await complete(s, m);
      expect(r.model).toBe(`${m}@v1`);
      expect(r.usage.completion_tokens).toBeGreaterThan(0);
    }
    // At start stories loaded (tiny did not fit beside it): each later switch is one eviction and one load.
    const swaps = order.slice(1).filter((m, i) => m !== order[i]).length;
    const text = await metrics(s);
    const evictions = metricValue(text, "spindle_model_evictions_total", { model: "stories", version: "v1", reason: "lru" }) + metricValue(text, "spindle_model_evictions_total", { model: "tiny", version: "v1", reason: "lru" });
    expect(evictions).toBe(swaps);
    expect(((await versionInfo(s, "stories@v1")).loads as number) + ((await versionInfo(s, "tiny@v1")).loads as number)).toBe(swaps + 1);
    // Never both at once.
    expect(metricValue(text, "spindle_memory_resident_estimated_bytes", { memory: "ram" })).toBeLessThanOrEqual(est.tiny + est.stories / 2);
    // The default (first) model was evicted but stays servable: the server is ready.
    expect((await fetch(`${s.url}/readyz`)).status).toBe(200);
  });

  it("a pinned model is never evicted: a model that fits only in its place gets 503 insufficient_memory, and the pinned one keeps serving", async () => {
    const yaml = twoModels.replace("  - id: stories\n", "  - id: stories\n    pinned: true\n");
    const s = await start(writeConfig(tmp(), yaml), { memoryBudget: est.tiny + Math.floor(est.stories / 2) }, { roomWaitMs: 200 });
    const res = await fetch(`${s.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "tiny", prompt: "Hi", max_tokens: 2 }) });
    expect(res.status).toBe(503);
    expect(res.headers.get("retry-after")).not.toBeNull();
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("insufficient_memory");
    expect((await complete(s, "stories")).model).toBe("stories@v1");
    expect(await versionInfo(s, "stories@v1")).toMatchObject({ state: "ready", pinned: true, evictions: 0, loads: 1 });
    const unload = await admin(s, "/admin/models/stories/versions/v1/unload", {});
    expect(unload.status).toBe(409);
  });

  it("a busy model is not evicted mid-request: the other model's load waits for it to finish", async () => {
    const faults: EngineFaults = { failNextSteps: 0, slowStepMs: 0, failNextLoads: 0 };
    const s = await start(writeConfig(tmp(), twoModels), { memoryBudget: est.tiny + Math.floor(est.stories / 2) }, { faults });
    faults.slowStepMs = 15;
    const events: string[] = [];
    const long = complete(s, "stories", { max_tokens: 60, ignore_eos: true }).then((r) => {
      events.push("stories done");
      return r;
    });
    await waitFor(() => s.registry.resolve("stories").scheduler.busySlots === 1);
    const other = complete(s, "tiny").then((r) => {
      events.push("tiny done");
      return r;
    });
    const [a, b] = await Promise.all([long, other]);
    faults.slowStepMs = 0;
    expect(a.usage.completion_tokens).toBe(60);
    expect(a.choices[0]!.finish_reason).toBe("length");
    expect(b.model).toBe("tiny@v1");
    expect(events).toEqual(["stories done", "tiny done"]);
  });
});

describe("models given as files (--model)", () => {
  const files = [
    { id: "stories260K", file: "stories260K.gguf", ctxSize: 256, parallel: 2, chatTemplate: "general" },
    { id: "llama-2-tiny-random", file: "llama-2-tiny-random.gguf", ctxSize: 256, parallel: 2 },
  ];

  it("obey the budget like any other: alternating requests all succeed by eviction and reload", async () => {
    server = await startTestServer(files, { threads: 1, memoryBudget: est.tiny + Math.floor(est.stories / 2) });
    for (const id of ["stories260K", "llama-2-tiny-random", "stories260K", "llama-2-tiny-random"]) {
      expect((await complete(server, id)).model).toBe(`${id}@test`);
    }
    expect(metricValue(await metrics(server), "spindle_model_evictions_total", {})).toBe(3);
  });

  it("--max-loaded-models caps the resident versions whatever the budget", async () => {
    server = await startTestServer(files, { threads: 1, maxLoadedModels: 1 });
    expect(server.registry.residentKeys()).toEqual(["stories260K@test"]);
    expect((await complete(server, "llama-2-tiny-random")).model).toBe("llama-2-tiny-random@test");
    expect(server.registry.residentKeys()).toEqual(["llama-2-tiny-random@test"]);
  });

  it("a request whose deadline passes while its model loads gets 503 model_loading with Retry-After; the load completes for the next", async () => {
    const faults: EngineFaults = { failNextSteps: 0, slowStepMs: 0, failNextLoads: 0 };
    server = await startTestServer(files, { threads: 1, maxLoadedModels: 1 }, { faults });
    faults.slowStepMs = 100;
    const res = await fetch(`${server.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-request-timeout": "0.2" },
      body: JSON.stringify({ model: "llama-2-tiny-random", prompt: "Hi", max_tokens: 2 }),
    });
    expect(res.status).toBe(503);
    expect(res.headers.get("retry-after")).not.toBeNull();
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("model_loading");
    await waitFor(() => server!.registry.version({ id: "llama-2-tiny-random", version: "test" }).state === "ready", 10_000);
    faults.slowStepMs = 0;
    expect((await complete(server, "llama-2-tiny-random")).model).toBe("llama-2-tiny-random@test");
  });
});

describe("promotion, rollback, canary, shadow", () => {
  it("promotion and rollback under concurrent traffic lose no request and never mix versions within one", async () => {
    const dir = tmp();
    const stateFile = join(dir, "models.state.json");
    const s = await start(writeConfig(dir, twoVersions()), { stateFile });
    const prompt = "Zebras quietly juggle xylophones";
    let stop = false;
    const seen: Array<{ model: string; promptTokens: number; started: number }> = [];
    const failures: unknown[] = [];
    const worker = async () => {
      while (!stop) {
        const started = performance.now();
        try {
          // Streams: every chunk must name the same version.
          const res = await postSse(`${s.url}/v1/completions`, { model: "story", prompt, max_tokens: 8, temperature: 0, stream: true, stream_options: { include_usage: true } });
          expect(res.status).toBe(200);
          const chunks = res.events.filter((e) => e !== "[DONE]").map((e) => JSON.parse(e) as { model: string; usage?: { prompt_tokens: number } });
          const names = new Set(chunks.map((c) => c.model));
          expect(names.size).toBe(1);
          seen.push({ model: chunks[0]!.model, promptTokens: chunks.at(-1)!.usage!.prompt_tokens, started });
        } catch (err) {
          failures.push(err);
        }
      }
    };
    const workers = Array.from({ length: 4 }, worker);
    await waitFor(() => seen.length >= 5, 10_000);
    const promoted = await admin(s, "/admin/models/story/promote", { version: "v2" });
    expect(promoted).toMatchObject({ status: 200, json: { from: "story@v1", to: "story@v2" } });
    const tPromoted = performance.now();
    await waitFor(() => seen.filter((x) => x.started > tPromoted).length >= 5, 10_000);
    const tRollback = performance.now();
    const rolled = await admin(s, "/admin/models/story/rollback", {});
    expect(rolled).toMatchObject({ status: 200, json: { from: "story@v2", to: "story@v1" } });
    const tRolled = performance.now();
    await waitFor(() => seen.filter((x) => x.started > tRolled).length >= 5, 10_000);
    stop = true;
    await Promise.all(workers);
    expect(failures).toEqual([]);
    // Each version tokenizes the prompt differently: a response's usage shows which tokenizer (version) ran it.
    const tokens = {
      "story@v1": s.registry.loaded({ id: "story", version: "v1" })!.engine.tokenizePrompt(prompt).length,
      "story@v2": s.registry.loaded({ id: "story", version: "v2" })!.engine.tokenizePrompt(prompt).length,
    };
    expect(tokens["story@v1"]).not.toBe(tokens["story@v2"]);
    for (const x of seen) expect(x.promptTokens).toBe(tokens[x.model as keyof typeof tokens]);
    const models = new Set(seen.map((x) => x.model));
    expect(models).toEqual(new Set(["story@v1", "story@v2"]));
    // Every request that started after a change was answered took the change's target.
    const between = (t0: number, t1: number) => new Set(seen.filter((x) => x.started > t0 && x.started < t1).map((x) => x.model));
    expect(between(tPromoted, tRollback)).toEqual(new Set(["story@v2"]));
    expect(between(tRolled, Infinity)).toEqual(new Set(["story@v1"]));
    // After the rollback there is nothing further to roll back to.
    expect(await admin(s, "/admin/models/story/rollback", {})).toMatchObject({ status: 409, json: { error: { code: "no_history" } } });
    // A promotion and its history survive a restart: the id serves v2 (not the file's
    // default v1), and a rollback after the restart goes back to v1.
    expect((await admin(s, "/admin/models/story/promote", { version: "v2" })).status).toBe(200);
    await s.close();
    server = undefined;
    const again = await start(parseModelsFile(readFileSync(join(dir, "models.yaml"), "utf8"), join(dir, "models.yaml")), { stateFile });
    expect((await complete(again, "story")).model).toBe("story@v2");
    expect((await admin(again, "/admin/models/story/rollback", {})).json).toMatchObject({ from: "story@v2", to: "story@v1" });
    expect((await complete(again, "story")).model).toBe("story@v1");
  });

  it("an alias moves atomically, only once its new target is ready, and a promotion survives a restart", async () => {
    const dir = tmp();
    const stateFile = join(dir, "models.state.json");
    const faults: EngineFaults = { failNextSteps: 0, slowStepMs: 0, failNextLoads: 0 };
    const yaml = `${twoVersions()}aliases:\n  stable: story@v1\n`;
    const s = await start(writeConfig(dir, yaml), { stateFile }, { faults });
    expect((await complete(s, "stable")).model).toBe("story@v1");
    expect((await complete(s, "story@v1")).model).toBe("story@v1");
    // v2 loads and warms slowly; while it does, "stable" still serves v1.
    faults.slowStepMs = 40;
    const moving = admin(s, "/admin/models/stable/promote", { version: "story@v2" });
    await waitFor(() => s.registry.version({ id: "story", version: "v2" }).state === "loading", 5000, 1);
    expect((await fetch(`${s.url}/v2/models/story/versions/v2/ready`)).status).toBe(503);
    faults.slowStepMs = 0;
    const during = await complete(s, "stable", { max_tokens: 1 });
    expect(during.model).toBe("story@v1");
    expect((await moving).json).toMatchObject({ from: "story@v1", to: "story@v2" });
    expect((await complete(s, "stable")).model).toBe("story@v2");
    expect((await fetch(`${s.url}/v2/models/story/versions/v2/ready`)).status).toBe(200);
    expect(await versionInfo(s, "stable")).toMatchObject({ kind: "alias", resolves_to: "story@v2" });
    const saved = JSON.parse(readFileSync(stateFile, "utf8")) as { pointers: Record<string, { target: { version: string } }> };
    expect(saved.pointers.stable!.target.version).toBe("v2");
    await s.close();
    server = undefined;
    const again = await start(parseModelsFile(yaml, join(dir, "models.yaml")), { stateFile });
    expect((await complete(again, "stable")).model).toBe("story@v2");
  });

  it("a canary weight splits a model's requests within statistical bounds, sticky per user", async () => {
    const s = await start(writeConfig(tmp(), twoVersions()));
    expect((await admin(s, "/admin/models/story/canary", { version: "v2", weight: 0.3 })).status).toBe(200);
    const N = 200;
    const results: string[] = [];
    for (let i = 0; i < N; i += 10) {
      const batch = await Promise.all(Array.from({ length: 10 }, () => complete(s, "story", { max_tokens: 1 })));
      results.push(...batch.map((r) => r.model));
    }
    const canary = results.filter((m) => m === "story@v2").length;
    // Binomial(200, 0.3): mean 60, sd 6.5; four sd either side.
    expect(canary).toBeGreaterThan(60 - 26);
    expect(canary).toBeLessThan(60 + 26);
    // The same user always lands on the same side.
    for (const user of ["alice", "bob", "carol", "dave"]) {
      const sides = new Set<string>();
      for (let i = 0; i < 5; i++) sides.add((await complete(s, "story", { max_tokens: 1, user })).model);
      expect(sides.size).toBe(1);
    }
    // Exact names bypass the canary.
    expect((await complete(s, "story@v1", { max_tokens: 1 })).model).toBe("story@v1");
    expect((await admin(s, "/admin/models/story/canary", { version: "v2", weight: 0 })).json).toMatchObject({ canary: null });
    const off = await Promise.all(Array.from({ length: 20 }, () => complete(s, "story", { max_tokens: 1 })));
    expect(new Set(off.map((r) => r.model))).toEqual(new Set(["story@v1"]));
  });

  it("shadow traffic runs on the other version but never reaches the client or its usage", async () => {
    const s = await start(writeConfig(tmp(), twoVersions("    shadow: { version: v2, weight: 1 }\n")));
    // The shadow version must be resident for mirroring: load it.
    expect((await admin(s, "/admin/models/story/versions/v2/load", {})).status).toBe(200);
    const v1Tokens = s.registry.loaded({ id: "story", version: "v1" })!.engine.tokenizePrompt("Once upon a time").length;
    for (let i = 0; i < 6; i++) {
      const r = await complete(s, "story", { max_tokens: 8 });
      expect(r.model).toBe("story@v1");
      expect(r.usage.prompt_tokens).toBe(v1Tokens);
      // v2's output is multi-byte gibberish; v1's is English.
      expect(r.choices[0]!.text).toMatch(/^[\x20-\x7e\n]*$/);
    }
    const res = await postSse(`${s.url}/v1/completions`, { model: "story", prompt: "Once upon a time", max_tokens: 8, temperature: 0, stream: true });
    const chunks = res.events.filter((e) => e !== "[DONE]").map((e) => JSON.parse(e) as { model: string });
    expect(new Set(chunks.map((c) => c.model))).toEqual(new Set(["story@v1"]));
    await waitFor(() => s.registry.version({ id: "story", version: "v2" }).active === 0, 5000);
    const text = await metrics(s);
    expect(metricValue(text, "spindle_shadow_requests_total", { model: "story", version: "v2", outcome: "completed" })).toBe(7);
    // Shadows are not client requests: none is counted for v2.
    expect(metricValue(text, "spindle_requests_total", { model: "story", version: "v2" })).toBe(0);
    expect(metricValue(text, "spindle_requests_total", { model: "story", version: "v1" })).toBe(7);
  });
});

describe("bad artifacts, immutability, readiness, download", () => {
  it("a hash mismatch and a GGUF v1 file mark their versions failed with the reason; the other model keeps serving", async () => {
    const yaml = `models:
  - id: good
    versions:
${version("v1", "stories260K.gguf", SHA.stories)}  - id: broken
    default_version: v1
    versions:
${version("v1", "stories260K.gguf", SHA.tiny)}${version("old", "stories260K-ggufv1-unsupported.gguf", SHA.ggufV1)}`;
    // Requests may load exact versions here (the default policy, ids, would refuse "broken@old" before trying).
    const s = await start(writeConfig(tmp(), yaml), { loadOnDemand: "any" });
    const mismatch = await versionInfo(s, "broken@v1");
    expect(mismatch.state).toBe("failed");
    // Clients get a code; operators get the reason.
    expect(mismatch.error).toBe("model_failed");
    expect(String((await operatorInfo(s, "broken@v1")).error)).toMatch(/sha256 mismatch/);
    const res = await fetch(`${s.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "broken@old", prompt: "Hi", max_tokens: 2 }) });
    expect(res.status).toBe(503);
    const body = (await res.json()) as { error: { code: string; message: string } };
    expect(body.error.code).toBe("model_failed");
    // Neither the file's path nor what the loader said about its bytes.
    expect(body.error.message).not.toMatch(/\.gguf|GGUF version|shared\/models/);
    expect(String((await operatorInfo(s, "broken@old")).error)).toMatch(/GGUF version 1 is not supported/);
    expect(await versionInfo(s, "broken@old")).toMatchObject({ state: "failed" });
    expect((await fetch(`${s.url}/v2/models/broken/versions/old/ready`)).status).toBe(503);
    expect((await complete(s, "good")).model).toBe("good@v1");
    expect((await fetch(`${s.url}/readyz`)).status).toBe(200);
  });

  it("a version whose artifact changes under the same name is refused; a new name is accepted", async () => {
    const dir = tmp();
    const stateFile = join(dir, "models.state.json");
    const first = writeConfig(dir, `models:\n  - id: m\n    versions:\n${version("v1", "stories260K.gguf", SHA.stories)}`);
    await start(first, { stateFile });
    await server!.close();
    server = undefined;
    const changed = `models:\n  - id: m\n    default_version: v2\n    versions:\n${version("v1", "stories260K-chat.gguf", SHA.storiesChat)}${version("v2", "stories260K-chat.gguf", SHA.storiesChat)}`;
    const s = await start(writeConfig(dir, changed), { stateFile });
    const v1 = await versionInfo(s, "m@v1");
    expect(v1.state).toBe("failed");
    expect(String((await operatorInfo(s, "m@v1")).error)).toMatch(/immutable/);
    expect((await admin(s, "/admin/models/m/versions/v1/load", {})).status).toBe(409);
    expect((await complete(s, "m@v2")).model).toBe("m@v2");
  });

  it("readiness flips only after warm-up: /readyz and the /v2 routes answer 503 while the model loads and warms", async () => {
    const port = await freePort();
    const faults: EngineFaults = { failNextSteps: 0, slowStepMs: 60, failNextLoads: 0 };
    const config = writeConfig(tmp(), `models:\n  - id: m\n    warmup: { prompt: "Once upon a time", max_tokens: 6 }\n    versions:\n${version("v1", "stories260K.gguf", SHA.stories)}`);
    const starting = startServer(testServerOptions({ threads: 1, port }), config, { faults });
    const statuses: number[] = [];
    let done = false;
    void starting.then(() => (done = true), () => (done = true));
    while (!done) {
      try {
        statuses.push((await fetch(`http://127.0.0.1:${port}/readyz`)).status);
      } catch {
        /* not listening yet */
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    server = await starting;
    expect(statuses).toContain(503);
    expect((await fetch(`${server.url}/readyz`)).status).toBe(200);
    expect((await fetch(`${server.url}/v2/health/ready`)).status).toBe(200);
    expect((await fetch(`${server.url}/v2/health/live`)).status).toBe(200);
    expect((await fetch(`${server.url}/v2/models/m/versions/v1/ready`)).status).toBe(200);
    expect(await (await fetch(`${server.url}/v2/models/m`)).json()).toMatchObject({ name: "m", versions: ["v1"] });
    const info = await versionInfo(server, "m@v1");
    // The warm-up of 6 slowed steps took its time, and was recorded.
    expect(info.warmup_seconds as number).toBeGreaterThan(0.2);
    faults.slowStepMs = 0;
  });

  it("a version not on disk is downloaded on its first request, resuming an interrupted transfer, hash-checked", async () => {
    const bytes = readFileSync(sharedModel("stories260K.gguf"));
    const http = await serveModel(bytes);
    try {
      const dir = tmp();
      const yaml = `models:
  - id: local
    versions:
${version("v1", "stories260K.gguf", SHA.stories)}  - id: remote
    versions:
      - name: v1
        file: cache/remote.gguf
        sha256: ${SHA.stories}
        sources: ["${http.base}/flaky.gguf"]
        ${SHAPE}
`;
      // The remote model is second and does not fit beside the first. Its fetch at start is
      // cut short: the version stays unloaded (not failed) and the partial file is kept.
      const s = await start(writeConfig(dir, yaml), { memoryBudget: est.stories + Math.floor(est.stories / 2) });
      expect(existsSync(join(dir, "cache/remote.gguf"))).toBe(false);
      expect(existsSync(join(dir, "cache/remote.gguf.partial"))).toBe(true);
      const before = await versionInfo(s, "remote@v1");
      expect(before.state).toBe("unloaded");
      expect(String((await operatorInfo(s, "remote@v1")).error)).toMatch(/could not fetch/);
      // The first request resumes the transfer, checks the hash, evicts the other model, loads and answers.
      const kept = statSync(join(dir, "cache/remote.gguf.partial")).size;
      expect(kept).toBeLessThan(bytes.length);
      const second = await complete(s, "remote");
      expect(second.model).toBe("remote@v1");
      expect(http.hits.map((h) => h.range)).toEqual([undefined, `bytes=${kept}-`]);
      expect(readFileSync(join(dir, "cache/remote.gguf")).equals(bytes)).toBe(true);
      expect((await complete(s, "local")).model).toBe("local@v1");
    } finally {
      http.close();
    }
  });
});

async function freePort(): Promise<number> {
  const srv = createNetServer();
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  const port = (srv.address() as { port: number }).port;
  await new Promise((r) => srv.close(r));
  return port;
}

afterAll(async () => {
  await server?.close();
});
