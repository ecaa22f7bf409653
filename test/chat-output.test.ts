/**
 * The chat output parser: reasoning, content and tool calls split out of raw text in
 * each template family's syntax — the same result however the text was split into
 * pieces (every split point is tried), and no part of a marker ever sent as content.
 */
import { describe, expect, it } from "vitest";
import { ChatOutputParser, type OutputSpec, type ToolCallDelta } from "../src/service/chat-output.js";

function run(spec: OutputSpec, pieces: string[]) {
  const out = { content: "", reasoning: "", calls: [] as Array<{ id: string; name: string; arguments: string }> };
  const p = new ChatOutputParser(spec, {
    content: (t) => (out.content += t),
    reasoning: (t) => (out.reasoning += t),
    toolCall: (d: ToolCallDelta) => {
      if (d.id !== undefined) out.calls[d.index] = { id: d.id, name: d.name!, arguments: "" };
      out.calls[d.index]!.arguments += d.arguments;
    },
  });
  for (const x of pieces) p.push(x);
  p.finish();
  return { ...out, calls: out.calls.map((c) => ({ name: c.name, arguments: JSON.parse(c.arguments) as unknown, idOk: /^call_[0-9a-f]{24}$/.test(c.id) })), toolCalls: p.toolCalls };
}

/** The text cut at every position into two pieces, and one character at a time. */
function splits(text: string): string[][] {
  const out: string[][] = [[text], [...text]];
  for (let i = 1; i < text.length; i++) out.push([text.slice(0, i), text.slice(i)]);
  return out;
}

const cases: Array<[string, OutputSpec, string, { content: string; reasoning: string; calls: Array<{ name: string; arguments: unknown }> }]> = [
  ["plain content", {}, "Hello <tool world", { content: "Hello <tool world", reasoning: "", calls: [] }],
  [
    "Hermes/Qwen blocks among content",
    { tools: { family: "hermes" } },
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>{"name":"t","arguments":{}}</tool_call>',
    { content: "Let me check.\n\n", reasoning: "", calls: [{ name: "get_weather", arguments: { city: "Paris" } }, { name: "t", arguments: {} }] },
  ],
  ["Mistral [TOOL_CALLS]", { tools: { family: "mistral" } }, '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]', { content: "", reasoning: "", calls: [{ name: "f", arguments: { a: 1 } }] }],
  ["Llama 3.x bare JSON with parameters", { tools: { family: "llama3" } }, ' {"name": "f", "parameters": {"q": "x"}}', { content: "", reasoning: "", calls: [{ name: "f", arguments: { q: "x" } }] }],
  ["Llama 3.x content is content", { tools: { family: "llama3" } }, "It is sunny.", { content: "It is sunny.", reasoning: "", calls: [] }],
  ["a block that is not a call stays content", { tools: { family: "hermes" } }, "<tool_call>oops</tool_call> then text", { content: "<tool_call>oops</tool_call> then text", reasoning: "", calls: [] }],
  ["forced, one call", { tools: { family: "forced" } }, '{"name": "f", "arguments": {"x": [1, {"y": "}"}]}}', { content: "", reasoning: "", calls: [{ name: "f", arguments: { x: [1, { y: "}" }] } }] }],
  ["forced, a list", { tools: { family: "forced", list: true } }, '[{"name":"f","arguments":{"a":1}}, {"name":"g","arguments":{}}]', { content: "", reasoning: "", calls: [{ name: "f", arguments: { a: 1 } }, { name: "g", arguments: {} }] }],
  ["reasoning opened by the prompt", { reasoning: { start: "<think>", end: "</think>", open: true } }, "hmm, let me see</think>\n\nThe answer.", { content: "The answer.", reasoning: "hmm, let me see", calls: [] }],
  ["reasoning opened by the model", { reasoning: { start: "<think>", end: "</think>", open: false } }, "<think>plan</think>Done.", { content: "Done.", reasoning: "plan", calls: [] }],
  ["no reasoning section", { reasoning: { start: "<think>", end: "</think>", open: false } }, "Just text <think> inside.", { content: "Just text <think> inside.", reasoning: "", calls: [] }],
  [
    "reasoning, then a Hermes call",
    { reasoning: { start: "<think>", end: "</think>", open: true }, tools: { family: "hermes" } },
    'I should call it.</think><tool_call>{"name":"f","arguments":{"n":2}}</tool_call>',
    { content: "", reasoning: "I should call it.", calls: [{ name: "f", arguments: { n: 2 } }] },
  ],
];

describe("ChatOutputParser", () => {
  it.each(cases)("%s: the same result at every split", (_name, spec, text, want) => {
    for (const pieces of splits(text)) {
      const got = run(spec, pieces);
      expect({ content: got.content, reasoning: got.reasoning, calls: got.calls.map(({ name, arguments: a }) => ({ name, arguments: a })) }, JSON.stringify(pieces)).toEqual(want);
      expect(got.calls.every((c) => c.idOk)).toBe(true);
      expect(got.toolCalls).toBe(want.calls.length);
    }
  });

  it("forced calls stream: the id and name first, then argument fragments that concatenate to the arguments", () => {
    const deltas: ToolCallDelta[] = [];
    const p = new ChatOutputParser({ tools: { family: "forced" } }, { content: () => {}, reasoning: () => {}, toolCall: (d) => deltas.push(d) });
    for (const c of '{"name": "f", "arguments": {"k": "v"}}') p.push(c);
    p.finish();
    expect(deltas[0]).toMatchObject({ index: 0, name: "f", arguments: "" });
    expect(deltas.length).toBeGreaterThan(3);
    expect(JSON.parse(deltas.map((d) => d.arguments).join(""))).toEqual({ k: "v" });
  });
});
