/**
 * Steps beside or on the JavaScript thread (src/engine/step-thread.ts): a local build of the
 * mended addon source decodes a step of one sequence on its steady thread
 * (`decodeBatchBegin`/`decodeBatchEnd`, `--step-thread auto`) or on the JavaScript thread
 * (`decodeBatchNow`, `--step-thread js`), samples it with `sampleTokenNow` instead of libuv
 * jobs, and every kind of sampling gives what the jobs give. The prebuilt binaries cannot:
 * there every step stays in jobs.
 *
 * The comparisons need a local build (`npm run engine:build`), which CI does not make:
 * there they are skipped, and the policy and the prebuilt fallback are what run.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Llama } from "node-llama-cpp";
import { Engine } from "../src/engine/engine.js";
import { plainGreedy, RunAheadMarks } from "../src/engine/run-ahead.js";
import { samplesTaken, stepsTaken } from "../src/engine/step-calls.js";
import { canStepOnJsThread, canStepOnSteadyThread, JS_STEP_MAX_TOKENS, loneStepPlace, stepsOnJsThread, stepsRunAhead } from "../src/engine/step-thread.js";
import type { RunningServer } from "../src/server.js";
import { captureLog, openaiClient, startTestServer, waitFor, STORIES, STORIES_GREEDY_PREFIX, TINY_RANDOM } from "./helpers/server.js";

const ROOT = join(import.meta.dirname, "..");

/** Whether this checkout has a local build whose addon can run steps on the calling thread. */
async function localBuildStepsHere(): Promise<boolean> {
  if (!existsSync(join(ROOT, "node_modules", "node-llama-cpp", "llama", "localBuilds"))) return false;
  try {
    const engine = await Engine.create("cpu", "local");
    const can = canStepOnJsThread(engine.llama);
    await engine.dispose();
    return can;
  } catch {
    return false;
  }
}

describe("where a step runs", () => {
  it("one sequence and a few tokens on the JavaScript thread; several sequences or a prompt chunk in jobs", () => {
    expect(stepsOnJsThread(1, 1)).toBe(true);
    expect(stepsOnJsThread(1, JS_STEP_MAX_TOKENS)).toBe(true);
    expect(stepsOnJsThread(1, JS_STEP_MAX_TOKENS + 1)).toBe(false);
    expect(stepsOnJsThread(2, 2)).toBe(false);
    const can = { _bindings: { AddonContext: { prototype: { decodeBatchNow() {}, sampleTokenNow() {} } } } } as unknown as Llama;
    expect(canStepOnJsThread(can)).toBe(true);
    expect(canStepOnJsThread({ _bindings: { AddonContext: { prototype: { sampleTokenNow() {} } } } } as unknown as Llama)).toBe(false);
    const steady = { _bindings: { AddonContext: { prototype: { decodeBatchNow() {}, sampleTokenNow() {}, decodeBatchBegin() {}, decodeBatchEnd() {} } } } } as unknown as Llama;
    expect([canStepOnSteadyThread(can), canStepOnSteadyThread(steady)]).toEqual([false, true]);
    expect(["auto", "steady", "js", "pool"].map((t) => loneStepPlace(steady, t as never))).toEqual(["steady-thread", "steady-thread", "js-thread", "jobs"]);
    expect(["auto", "steady", "js", "pool"].map((t) => loneStepPlace(can, t as never))).toEqual(["js-thread", "js-thread", "js-thread", "jobs"]);
    expect((["auto", "steady", "js", "pool"] as const).map((t) => stepsRunAhead(t, loneStepPlace(steady, t)))).toEqual([true, false, false, false]);
    expect(stepsRunAhead("auto", loneStepPlace(can, "auto"))).toBe(false);
    const none = { _bindings: { AddonContext: { prototype: {} } } } as unknown as Llama;
    expect(loneStepPlace(none, "auto")).toBe("jobs");
  });

  it("a step may run ahead only while every one of its sequences samples plainly greedily and its loop wants the step after", () => {
    const greedy = { temperature: 0, presencePenalty: 0, frequencyPenalty: 0, repeatPenalty: 1 };
    expect(plainGreedy(greedy, {})).toBe(true);
    expect([{ temperature: 0.7 }, { presencePenalty: 0.5 }, { frequencyPenalty: 0.5 }, { repeatPenalty: 1.1 }].map((d) => plainGreedy({ ...greedy, ...d }, {}))).toEqual([false, false, false, false]);
    expect([{ grammar: {} }, { tokenBias: () => undefined }, { probe: {} }].map((e) => plainGreedy(greedy, e))).toEqual([false, false, false]);
    // A step may run ahead only where every one of its sequences wants the step after it.
    const marks = new RunAheadMarks();
    let more = true;
    marks.set(2, () => more);
    marks.set(3, () => true);
    expect([marks.allWanted([0], 1), marks.allWanted([2], 1), marks.allWanted([2, 3], 2), marks.allWanted([0, 2, 3], 3), marks.allWanted([2, 0], 1), marks.allWanted([], 0)]).toEqual([false, true, true, false, true, false]);
    more = false;
    expect(marks.allWanted([2, 3], 2)).toBe(false);
    marks.set(2, undefined);
    more = true;
    expect(marks.allWanted([2], 1)).toBe(false);
  });

  it("the prebuilt binary runs every step in jobs, and the log says so", async () => {
    const { log, lines } = captureLog();
    const server = await startTestServer([STORIES], { engineBuild: "prebuilt" }, { log });
    try {
      expect(lines.find((l) => String(l.msg).startsWith("engine: "))?.msg).toMatch(/prebuilt binary.*every step in libuv jobs$/);
      const before = { ...samplesTaken };
      const r = await openaiClient(server).completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 8, temperature: 0 });
      expect(r.choices[0]!.text.length).toBeGreaterThan(0);
      expect(samplesTaken.jsThread).toBe(before.jsThread);
      expect(samplesTaken.jobs - before.jobs).toBeGreaterThanOrEqual(8);
    } finally {
      await server.close();
    }
  });
});

describe.runIf(await localBuildStepsHere())("steps beside and on the JavaScript thread (local build)", () => {
  let auto: RunningServer;
  let js: RunningServer;
  let pool: RunningServer;

  beforeAll(async () => {
    const models = [{ ...STORIES, parallel: 4, ctxSize: 2048 }, { ...TINY_RANDOM, parallel: 4 }];
    [auto, js, pool] = await Promise.all([
      startTestServer(models, { engineBuild: "local", stepThread: "auto" }),
      startTestServer(models, { engineBuild: "local", stepThread: "js" }),
      startTestServer(models, { engineBuild: "local", stepThread: "pool" }),
    ]);
  }, 60_000);
  afterAll(async () => {
    await Promise.all([auto?.close(), js?.close(), pool?.close()]);
  });

  /** Greedy alone and four at once, with logprobs, seeded temperature, a JSON schema, on a 512- and a 32k-token vocabulary. */
  async function workload(server: RunningServer): Promise<unknown[]> {
    const client = openaiClient(server);
    const out: unknown[] = [];
    out.push((await client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 48, temperature: 0 })).choices[0]!.text);
    const prompts = ["Once upon a time", "The little dog", "One day, Lily", "Tom and Sue"];
    out.push(
      await Promise.all(prompts.map(async (prompt) => (await client.completions.create({ model: "stories260K", prompt, max_tokens: 24, temperature: 0 })).choices[0]!.text)),
    );
    const lp = await client.chat.completions.create({ model: "llama-2-tiny-random", messages: [{ role: "user", content: "hi" }], max_tokens: 8, temperature: 0, logprobs: true, top_logprobs: 3 });
    out.push(lp.choices[0]!.logprobs!.content!.map((t) => [t.token, t.logprob.toFixed(4), t.top_logprobs.map((x) => x.token)]));
    out.push((await client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 24, temperature: 0.9, seed: 7 })).choices[0]!.text);
    const schema = { type: "object", properties: { name: { type: "string", maxLength: 12 } }, required: ["name"], additionalProperties: false };
    out.push(
      (await client.chat.completions.create({ model: "stories260K", messages: [{ role: "user", content: "Name?" }], max_tokens: 40, temperature: 0, response_format: { type: "json_schema", json_schema: { name: "n", schema } } })).choices[0]!.message.content,
    );
    // Greedy loops that end before their step run ahead is taken (a stop string, a client
    // gone), each followed by one that reuses the KV they leave: the step nobody took must
    // be gone from it.
    const greedy = out[0] as string;
    const stop = greedy.slice(30, 36);
    const stopped = (await client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 48, temperature: 0, stop: [stop] })).choices[0]!.text;
    out.push(stopped);
    out.push((await client.completions.create({ model: "stories260K", prompt: "Once upon a time" + stopped, max_tokens: 24, temperature: 0 })).choices[0]!.text);
    const abort = new AbortController();
    const stream = await client.completions.create({ model: "stories260K", prompt: "The little dog", max_tokens: 200, temperature: 0, stream: true }, { signal: abort.signal });
    let chunks = 0;
    try {
      for await (const _ of stream) if (++chunks === 5) abort.abort();
    } catch {
      // the abort
    }
    out.push((await client.completions.create({ model: "stories260K", prompt: "The little dog", max_tokens: 32, temperature: 0 })).choices[0]!.text);
    // The same with steps of three sequences run ahead: one stops on a string while the
    // others go on, and one's client goes.
    const cut = new AbortController();
    const three = await Promise.all([
      client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 48, temperature: 0, stop: [stop] }).then((r) => r.choices[0]!.text),
      client.completions.create({ model: "stories260K", prompt: "One day, Lily", max_tokens: 32, temperature: 0 }).then((r) => r.choices[0]!.text),
      (async () => {
        const s = await client.completions.create({ model: "stories260K", prompt: "Tom and Sue", max_tokens: 200, temperature: 0, stream: true }, { signal: cut.signal });
        let n = 0;
        try {
          for await (const _ of s) if (++n === 8) cut.abort();
        } catch {
          // the abort
        }
        return "";
      })(),
    ]);
    out.push(three);
    out.push((await client.completions.create({ model: "stories260K", prompt: "One day, Lily", max_tokens: 32, temperature: 0 })).choices[0]!.text);
    return out;
  }

  it("gives exactly what steps in jobs give, and really runs the steps of one sequence on the steady thread or the JavaScript thread", async () => {
    const took = () => ({ steps: { ...stepsTaken }, samples: { ...samplesTaken } });
    const before = took();
    const viaJobs = await workload(pool);
    expect(samplesTaken.jsThread).toBe(before.samples.jsThread);
    const mid = took();
    const beside = await workload(auto);
    expect(samplesTaken.jsThread - mid.samples.jsThread).toBeGreaterThan(100);
    expect(stepsTaken.steadyThread - mid.steps.steadyThread).toBeGreaterThan(100);
    // Greedy steps alone were run ahead on the steady thread (run-ahead.ts).
    expect(stepsTaken.ranAhead - mid.steps.ranAhead).toBeGreaterThan(40);
    const last = took();
    const here = await workload(js);
    expect(stepsTaken.jsThread - last.steps.jsThread).toBeGreaterThan(100);
    expect(stepsTaken.steadyThread).toBe(last.steps.steadyThread);
    expect(stepsTaken.ranAhead).toBe(last.steps.ranAhead);
    expect(beside).toEqual(viaJobs);
    expect(here).toEqual(viaJobs);
    expect((here[0] as string).startsWith(STORIES_GREEDY_PREFIX)).toBe(true);
    JSON.parse(here[4] as string);
  }, 60_000);

  it("two lone requests on two models at once share the one steady thread: whichever finds it busy steps on the JavaScript thread, and both give what they give alone", async () => {
    const client = openaiClient(auto);
    const ask = (model: string) => client.completions.create({ model, prompt: "Once upon a time", max_tokens: 64, temperature: 0, ignore_eos: true } as never).then((r) => r.choices[0]!.text);
    const alone = [await ask("stories260K"), await ask("llama-2-tiny-random")];
    const before = { ...stepsTaken };
    expect(await Promise.all([ask("stories260K"), ask("llama-2-tiny-random")])).toEqual(alone);
    expect(stepsTaken.steadyThread - before.steadyThread).toBeGreaterThan(0);
    expect(stepsTaken.jsThread - before.jsThread).toBeGreaterThan(0);
  }, 60_000);

  it("a request alone steps on the steady thread; four greedy at once run ahead there; four sampled at once step in jobs", async () => {
    const client = openaiClient(auto);
    const took = () => ({ steps: { ...stepsTaken }, samples: { ...samplesTaken } });
    let before = took();
    await client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 16, temperature: 0 });
    expect(samplesTaken.jsThread - before.samples.jsThread).toBeGreaterThanOrEqual(16);
    expect(stepsTaken.steadyThread - before.steps.steadyThread).toBeGreaterThanOrEqual(15);
    expect(samplesTaken.jobs).toBe(before.samples.jobs);
    before = took();
    await Promise.all([0, 1, 2, 3].map(() => client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 32, temperature: 0, ignore_eos: true } as never)));
    expect(stepsTaken.steadyThread - before.steps.steadyThread).toBeGreaterThan(16);
    expect(stepsTaken.ranAhead - before.steps.ranAhead).toBeGreaterThan(4);
    expect(samplesTaken.jsThread - before.samples.jsThread).toBeGreaterThan(100);
    before = took();
    await Promise.all([0, 1, 2, 3].map(() => client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 32, temperature: 0.8, seed: 1, ignore_eos: true } as never)));
    expect(stepsTaken.jobs - before.steps.jobs).toBeGreaterThan(16);
    expect(samplesTaken.jobs - before.samples.jobs).toBeGreaterThan(100);
    expect(stepsTaken.ranAhead).toBe(before.steps.ranAhead);
  }, 60_000);

  it("the greedy scan of the logits picks what the whole sampler chain picks (a request with logprobs takes the chain)", async () => {
    const client = openaiClient(pool);
    for (const [model, prompts] of [
      ["stories260K", ["Once upon a time", "The little dog", "One day, Lily"]],
      ["llama-2-tiny-random", ["hi", "Once upon a time", "1 2 3"]],
    ] as const) {
      for (const prompt of prompts) {
        const scanned = await client.completions.create({ model, prompt, max_tokens: 24, temperature: 0, ignore_eos: true } as never);
        const chained = await client.completions.create({ model, prompt, max_tokens: 24, temperature: 0, ignore_eos: true, logprobs: 1 } as never);
        expect(scanned.choices[0]!.text).toBe(chained.choices[0]!.text);
        expect(chained.choices[0]!.logprobs?.tokens?.length).toBe(24);
      }
    }
  }, 60_000);

  it.each(["auto", "js"] as const)("while one generation steps (--step-thread %s), timers fire and the server answers others between its steps", async (stepThread) => {
    // One slot: its steps are never joined by another sequence's.
    const one = await startTestServer([{ ...STORIES, parallel: 1, ctxSize: 2048 }], { engineBuild: "local", stepThread });
    try {
      const before = samplesTaken.jsThread;
      let done = false;
      const long = openaiClient(one)
        .completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 1500, temperature: 0, ignore_eos: true } as never)
        .then((r) => ((done = true), r));
      // waitFor polls on timers: it sees the generation midway only if the loop turns between steps.
      await waitFor(() => samplesTaken.jsThread - before > 50);
      expect(samplesTaken.jsThread - before).toBeLessThan(1000);
      expect((await fetch(`${one.url}/health`)).status).toBe(200);
      expect(samplesTaken.jsThread - before).toBeLessThan(1500);
      expect(done).toBe(false);
      expect((await long).usage?.completion_tokens).toBe(1500);
    } finally {
      await one.close();
    }
  }, 60_000);
});
