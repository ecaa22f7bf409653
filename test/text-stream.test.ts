import { afterAll, beforeAll, describe, expect, it } from "vitest";
import fc from "fast-check";
import { StopMatcher } from "../src/generation/stop-matcher.js";
import { Utf8Detokenizer } from "../src/generation/utf8-detokenizer.js";
import { Engine } from "../src/engine/engine.js";
import type { EngineModel } from "../src/engine/model.js";
import { sharedModel } from "./helpers/server.js";

/** Feeds pieces through a matcher the way the token loop does; returns what a client would see. */
function runMatcher(stops: string[], pieces: string[]): { sent: string[]; stopped: boolean } {
  const m = new StopMatcher(stops);
  const sent: string[] = [];
  for (const p of pieces) {
    const out = m.push(p);
    if (out.text) sent.push(out.text);
    if (out.stopped) return { sent, stopped: true };
  }
  const rest = m.flush();
  if (rest) sent.push(rest);
  return { sent, stopped: false };
}

describe("StopMatcher", () => {
  it("cuts at a stop string that spans pieces and sends no part of it", () => {
    const r = runMatcher(["<END>"], ["Hello <", "EN", "D> tail"]);
    expect(r).toEqual({ sent: ["Hello "], stopped: true });
  });

  it("releases held text that turned out not to be a stop string", () => {
    expect(runMatcher(["<END>"], ["a <E", "ND", "ing"]).sent.join("")).toBe("a <ENDing");
    expect(runMatcher(["abc"], ["xa", "b"]).sent.join("")).toBe("xab");
  });

  it("the stop string that completes first wins", () => {
    expect(runMatcher(["world", "lo w"], ["hello", " world"]).sent.join("")).toBe("hel");
    expect(runMatcher(["cba", "b"], ["cba"]).sent.join("")).toBe("c");
  });

  it("property: the output is the text up to the first stop string, however the text is split", () => {
    fc.assert(
      fc.property(fc.string({ unit: fc.constantFrom("a", "b", "c", "d"), maxLength: 40 }), fc.array(fc.string({ unit: fc.constantFrom("a", "b", "c"), minLength: 1, maxLength: 4 }), { minLength: 1, maxLength: 3 }), fc.array(fc.nat(40)), (text, stops, cuts) => {
        const points = [...new Set(cuts.map((c) => c % (text.length + 1)))].sort((a, b) => a - b);
        const pieces: string[] = [];
        let prev = 0;
        for (const p of points) {
          pieces.push(text.slice(prev, p));
          prev = p;
        }
        pieces.push(text.slice(prev));
        // The reference: scan the text character by character; stop where a stop string first completes.
        let expected = text;
        let first = Infinity;
        for (let end = 1; end <= text.length && first === Infinity; end++) {
          const hits = stops.filter((s) => text.slice(0, end).endsWith(s));
          if (hits.length > 0) {
            first = end - Math.max(...hits.map((h) => h.length));
            expected = text.slice(0, first);
          }
        }
        const r = runMatcher(stops, pieces.filter((p) => p !== ""));
        expect(r.sent.join("")).toBe(expected);
        expect(r.stopped).toBe(first !== Infinity);
      }),
      { numRuns: 2000 },
    );
  });
});

describe("Utf8Detokenizer with a real 32k Llama-2 tokenizer", () => {
  let engine: Engine;
  let model: EngineModel;
  beforeAll(async () => {
    engine = await Engine.create("cpu");
    model = await engine.loadModel({
      id: "t",
      path: sharedModel("llama-2-tiny-random.gguf"),
      ctxSize: 256,
      parallel: 1,
      threads: 1,
      chatTemplate: undefined,
      observer: { expectedItems: () => 0, onStep: () => {} },
    });
  });
  afterAll(async () => {
    await model?.dispose();
    await engine?.dispose();
  });

  it("an emoji made of byte tokens comes out whole, never as U+FFFD pieces", () => {
    const prompt = model.tokenizePrompt("Say:");
    const all = model.tokenizePrompt("Say: Hi 🦙 and ж and 你好!");
    expect(all.slice(0, prompt.length)).toEqual(prompt);
    const tokens = all.slice(prompt.length);
    // The emoji really is split into byte tokens, each of which decodes alone to U+FFFD.
    expect(tokens.some((t) => model.detokenize([t]) === "\uFFFD")).toBe(true);
    const d = new Utf8Detokenizer((t, last) => model.detokenize(t, last), prompt);
    const pieces = tokens.map((t) => d.push(t));
    pieces.push(d.flush());
    // Exactly the text the tokens add after the prompt, leading space included.
    expect(pieces.join("")).toBe(" Hi 🦙 and ж and 你好!");
    expect(pieces.some((p) => p.includes("\uFFFD"))).toBe(false);
    expect(pieces).toContain("🦙");
  });
});
