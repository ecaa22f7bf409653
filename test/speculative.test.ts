/**
 * Speculative decoding by prompt lookup (--speculative ngram[:N], the models file's
 * `speculative`), through the real engine and server: greedy output is the same as
 * without it, and what it predicted and what the model kept is counted.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server.js";
import { startTestServer, STORIES, STORIES_GREEDY_PREFIX } from "./helpers/server.js";

let spec: RunningServer;
let plain: RunningServer;
beforeAll(async () => {
  [spec, plain] = await Promise.all([startTestServer([{ ...STORIES, ctxSize: 1024 }], { speculative: { method: "ngram", tokens: 4, minPattern: 1 } }), startTestServer([{ ...STORIES, ctxSize: 1024 }])]);
});
afterAll(async () => Promise.all([spec?.close(), plain?.close()]));

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
