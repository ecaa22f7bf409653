/**
 * Speculative decoding by prompt lookup (--speculative ngram[:N], the models file's
 * `speculative`) and by a draft model (--model-draft, the models file's
 * `speculative.model`), through the real engine and server: greedy output is the same as
 * without it, and what it predicted and what the model kept is counted.
 */
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { parseModelsFile } from "../src/config/models-file.js";
import { startServer } from "../src/server.js";
import type { RunningServer } from "../src/server.js";
import { Engine } from "../src/engine/engine.js";
import { predictionCheckMended } from "../src/engine/speculation.js";
import { sharedModel, startTestServer, STORIES, STORIES_GREEDY_PREFIX, testServerOptions } from "./helpers/server.js";

let spec: RunningServer;
let plain: RunningServer;
let drafted: RunningServer;
let gated: RunningServer;
// The draft: the same weights and tokenizer under another file (stories260K-chat.gguf),
// asked to guess whatever its confidence, so it agrees with the target but at near-ties.
const DRAFT = { method: "draft" as const, tokens: 4, path: sharedModel("stories260K-chat.gguf"), minConfidence: 0 };
beforeAll(async () => {
  [spec, plain, drafted, gated] = await Promise.all([
    startTestServer([{ ...STORIES, ctxSize: 1024 }], { speculative: { method: "ngram", tokens: 4, minPattern: 1 } }),
    startTestServer([{ ...STORIES, ctxSize: 1024 }]),
    startTestServer([{ ...STORIES, ctxSize: 1024, parallel: 4 }], { speculative: { ...DRAFT, disableByBatchSize: 4 } }),
    // The default: the draft guesses for a lone generation only.
    startTestServer([{ ...STORIES, ctxSize: 1024, parallel: 4 }], { speculative: DRAFT }),
  ]);
});
afterAll(async () => Promise.all([spec?.close(), plain?.close(), drafted?.close(), gated?.close()]));

const complete = async (s: RunningServer, prompt: string, max = 64) =>
  ((await (await fetch(`${s.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "stories260K", prompt, max_tokens: max, temperature: 0, ignore_eos: true }) })).json()) as {
    choices: Array<{ text: string }>;
    usage: { completion_tokens: number };
  });

/**
 * Greedy texts that are equal, or part at a near-tie: llama.cpp is not batch-invariant
 * (checking predicted tokens evaluates several positions in one batch, and the matrix
 * kernels then sum in another order), so where the two best tokens are within float noise
 * of each other either may win. Anywhere else a difference is a bug.
 */
async function expectSameUpToNearTies(prompt: string, withSpec: string, without: string) {
  if (withSpec === without) return;
  let i = 0;
  while (withSpec[i] === without[i]) i++;
  // Back to the start of the word where they part.
  while (i > 0 && withSpec[i - 1] !== " ") i--;
  const at = (await (await fetch(`${plain.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "stories260K", prompt: prompt + without.slice(0, i).trimEnd(), max_tokens: 1, temperature: 0, logprobs: 2 }) })).json()) as {
    choices: Array<{ logprobs: { top_logprobs: Array<Record<string, number>> } }>;
  };
  const [first, second] = Object.values(at.choices[0]!.logprobs.top_logprobs[0]!).sort((x, y) => y - x);
  expect(first! - second!, `texts part after ${JSON.stringify(without.slice(0, i))} where the two best tokens are ${JSON.stringify(at.choices[0]!.logprobs.top_logprobs[0])}`).toBeLessThan(0.01);
}

describe("speculative decoding (prompt lookup)", () => {
  it("gives the same greedy text as without it; where the output repeats the prompt, predictions are accepted and counted", async () => {
    // The prompt holds the story the model is about to tell again.
    const prompt = `Once upon a time${STORIES_GREEDY_PREFIX}\n\nOnce upon a time`;
    for (const p of [prompt, "The dog ran"]) {
      const [a, b] = await Promise.all([complete(spec, p), complete(plain, p)]);
      expect(a.usage.completion_tokens).toBe(64);
      await expectSameUpToNearTies(p, a.choices[0]!.text, b.choices[0]!.text);
    }
    const model = (await (await fetch(`${spec.url}/v1/models/stories260K`)).json()) as { versions: Array<{ speculative: { method: string; accepted: number; rejected: number; acceptance_rate: number } }> };
    const s = model.versions[0]!.speculative;
    expect(s.method).toBe("ngram");
    expect(s.accepted).toBeGreaterThan(10);
    expect(s.acceptance_rate).toBeGreaterThan(0);
    const metrics = await (await fetch(`${spec.url}/metrics`)).text();
    expect(Number(/^spindle_spec_accepted_tokens_total\{[^}]*\} (\S+)$/m.exec(metrics)![1])).toBe(s.accepted);
    expect(Number(/^spindle_spec_draft_tokens_total\{[^}]*\} (\S+)$/m.exec(metrics)![1])).toBe(s.accepted + s.rejected);
    // Without it: no speculation figures.
    expect(((await (await fetch(`${plain.url}/v1/models/stories260K`)).json()) as { versions: Array<{ speculative: unknown }> }).versions[0]!.speculative).toBeNull();
  });
});

type ModelView = { versions: Array<{ speculative: { method: string; tokens: number; accepted: number; rejected: number; acceptance_rate: number }; memory: { estimated_bytes: { ram: number }; allocated_bytes: { ram: number } } }> };

describe("speculative decoding (draft model)", () => {
  it("gives the same greedy text as without it in every slot at once; the draft's guesses are counted and its memory is the version's", async () => {
    const prompts = ["Once upon a time", "The dog ran", "Lily and Ben", "One day, a little bird"];
    const [withDraft, without] = await Promise.all([Promise.all(prompts.map((p) => complete(drafted, p))), Promise.all(prompts.map((p) => complete(plain, p)))]);
    for (const [i, p] of prompts.entries()) {
      expect(withDraft[i]!.usage.completion_tokens).toBe(64);
      await expectSameUpToNearTies(p, withDraft[i]!.choices[0]!.text, without[i]!.choices[0]!.text);
    }
    const view = (await (await fetch(`${drafted.url}/v1/models/stories260K`)).json()) as ModelView;
    const s = view.versions[0]!.speculative;
    expect(s.method).toBe("draft");
    expect(s.tokens).toBe(4);
    // The draft is the target's own weights: it is refuted only where float noise flips a near-tie.
    expect(s.accepted).toBeGreaterThan(4 * 64 * 0.5);
    expect(s.acceptance_rate).toBeGreaterThan(0.9);
    const metrics = await (await fetch(`${drafted.url}/metrics`)).text();
    expect(Number(/^spindle_spec_accepted_tokens_total\{[^}]*\} (\S+)$/m.exec(metrics)![1])).toBe(s.accepted);
    // The draft's weights and its contexts are counted in the version's estimate and allocation.
    const plainView = (await (await fetch(`${plain.url}/v1/models/stories260K`)).json()) as ModelView;
    const [m, p] = [view.versions[0]!.memory, plainView.versions[0]!.memory];
    expect(m.estimated_bytes.ram - p.estimated_bytes.ram).toBeGreaterThan(1_000_000);
    expect(m.allocated_bytes.ram - p.allocated_bytes.ram).toBeGreaterThan(1_000_000);
  });

  it("keeps every agreed guess of a step (node-llama-cpp's check of predictions, mended at install): 64 tokens take well under 32 steps", async () => {
    expect(predictionCheckMended()).toBe(true);
    const steps = async () => Number(/^spindle_decode_step_tokens_count(?:\{[^}]*\})? (\S+)$/m.exec(await (await fetch(`${drafted.url}/metrics`)).text())![1]);
    const before = await steps();
    const r = await complete(drafted, "Once upon a time");
    expect(r.usage.completion_tokens).toBe(64);
    // Up to 4 guesses and the model's own token per step: about 64 / 5 steps. Keeping only the
    // first guess of a step (the unmended check) takes at least 32.
    expect((await steps()) - before).toBeLessThan(24);
  });

  it("by default guesses for a lone generation only: with four running, the draft stays idle", async () => {
    const guesses = async () => {
      const s = ((await (await fetch(`${gated.url}/v1/models/stories260K`)).json()) as ModelView).versions[0]!.speculative;
      return s.accepted + s.rejected;
    };
    const alone = await guesses();
    await complete(gated, "Once upon a time");
    const afterOne = await guesses();
    expect(afterOne - alone).toBeGreaterThan(32);
    await Promise.all(["Once upon a time", "The dog ran", "Lily and Ben", "One day, a little bird"].map((p) => complete(gated, p)));
    // Only while the four start and end apart does one run alone: a few steps' guesses, not 4 × 64 × 0.8.
    expect((await guesses()) - afterOne).toBeLessThan(48);
  });

  it("a generation stopped mid-stream, then a new one (its prefix reused; its first steps shared with the stopped one's last): the same greedy text", async () => {
    const ac = new AbortController();
    const res = await fetch(`${gated.url}/v1/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "stories260K", prompt: "Once upon a time", max_tokens: 200, temperature: 0, ignore_eos: true, stream: true }),
      signal: ac.signal,
    });
    const reader = res.body!.getReader();
    let seen = "";
    while (!seen.includes("\n\ndata:") || seen.split("\n\ndata:").length < 8) seen += new TextDecoder().decode((await reader.read()).value);
    ac.abort();
    await reader.cancel().catch(() => {});
    const [a, b] = await Promise.all([complete(gated, "Once upon a time, there was"), complete(plain, "Once upon a time, there was")]);
    await expectSameUpToNearTies("Once upon a time, there was", a.choices[0]!.text, b.choices[0]!.text);
  });

  it("from the models file: a draft pinned by its hash serves (relative to the file, with its settings); a wrong hash fails that version only, naming the draft, never to clients", async () => {
    const dir = mkdtempSync(join(tmpdir(), "spindle-draft-"));
    const file = join(dir, "models.yaml");
    const yaml = `models:
  - id: drafted
    file: ${sharedModel("stories260K.gguf")}
    ctx_size: 512
    speculative: { model: ${relative(dir, sharedModel("stories260K-chat.gguf"))}, sha256: 98234cb2bfd666ea2460cb4418428b56f59313b5610130f3d43fd92b487b7da0, num_speculative_tokens: 3, draft_p_min: 0 }
  - id: mispinned
    file: ${sharedModel("stories260K.gguf")}
    ctx_size: 512
    speculative: { model: ${sharedModel("stories260K-chat.gguf")}, sha256: "${"0".repeat(64)}" }
`;
    writeFileSync(file, yaml);
    // The command line's batch-size limit applies to the file's speculation too.
    const server = await startServer(testServerOptions({ loadOnDemand: "any", speculativeDisableByBatchSize: 4 }), parseModelsFile(yaml, file));
    try {
      const post = (model: string) =>
        fetch(`${server.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model, prompt: "Once upon a time", max_tokens: 32, temperature: 0 }) });
      const [a, b] = await Promise.all([post("drafted").then((r) => r.json()), complete(plain, "Once upon a time", 32)]);
      await expectSameUpToNearTies("Once upon a time", (a as { choices: Array<{ text: string }> }).choices[0]!.text, b.choices[0]!.text);
      const view = (await (await fetch(`${server.url}/v1/models/drafted`)).json()) as ModelView;
      expect(view.versions[0]!.speculative).toMatchObject({ method: "draft", tokens: 3 });
      expect(view.versions[0]!.speculative.accepted).toBeGreaterThan(0);
      const guesses = (v: ModelView) => v.versions[0]!.speculative.accepted + v.versions[0]!.speculative.rejected;
      await Promise.all(Array.from({ length: 4 }, () => post("drafted").then((r) => r.json())));
      // Four at once still guess (the default limit, 1, would leave them a few steps' worth: under 48).
      expect(guesses((await (await fetch(`${server.url}/v1/models/drafted`)).json()) as ModelView) - guesses(view)).toBeGreaterThan(48);
      const refused = await post("mispinned");
      expect(refused.status).toBe(503);
      expect(await refused.text()).not.toContain("shared/models");
      const status = (await (await fetch(`${server.url}/admin/status`)).json()) as { versions: Array<{ id: string; error?: string }> };
      expect(status.versions.find((v) => v.id.startsWith("mispinned@"))!.error).toMatch(/\(draft\)": sha256 mismatch/);
    } finally {
      await server.close();
    }
  });

  it("refuses at load a draft whose tokenizer is not the target's, naming it", async () => {
    const engine = await Engine.create("cpu");
    try {
      const load = engine.loadModel({
        id: "stories260K",
        path: sharedModel("stories260K.gguf"),
        ctxSize: 256,
        parallel: 2,
        threads: 1,
        chatTemplate: "general",
        speculative: { ...DRAFT, path: sharedModel("llama-2-tiny-random.gguf") },
        observer: { expectedItems: () => 0, onStep: () => {} },
      });
      await expect(load).rejects.toThrow(/^model "stories260K": the draft model cannot draft for it: .*vocabulary/);
    } finally {
      await engine.dispose();
    }
  });
});
