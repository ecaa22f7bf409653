/**
 * Chat Completions as applications use it, through the real engine, the real server and
 * the official OpenAI SDK: exact templates and the utility routes, grammar-constrained
 * JSON (validated with Ajv), forced tool calls streamed as OpenAI streams them, tool
 * results through the template, logprobs, n and best_of, prompt scoring, the vLLM and
 * llama-server samplers, reasoning sections, and every default or null OpenAI sends.
 */
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Ajv2020 } from "ajv/dist/2020.js";
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { RunningServer } from "../src/server.js";
import { assertCompletionChunk, assertSchema } from "./helpers/openapi.js";
import { openaiClient, startTestServer, STORIES, STORIES_GREEDY_PREFIX, TINY_RANDOM } from "./helpers/server.js";

const thinkingTemplate = join(mkdtempSync(join(tmpdir(), "spindle-think-")), "think.jinja");
writeFileSync(
  thinkingTemplate,
  "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: <think>\n{% endif %}",
);

let server: RunningServer;
let client: OpenAI;
beforeAll(async () => {
  server = await startTestServer(
    [
      { ...STORIES, ctxSize: 1024 },
      { id: "stories260K-chat", file: "stories260K-chat.gguf", ctxSize: 512 },
      { id: "tiny-chat", file: "llama-2-tiny-random-chat.gguf", ctxSize: 1024 },
      { ...TINY_RANDOM, ctxSize: 1024 },
      { id: "thinker", file: "stories260K.gguf", chatTemplate: thinkingTemplate, ctxSize: 512 },
    ],
    { parallel: 4 },
  );
  client = openaiClient(server);
});
afterAll(async () => server?.close());

const post = async (path: string, body: unknown) => {
  const res = await fetch(`${server.url}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  return { status: res.status, headers: res.headers, json: (await res.json()) as any };
};

describe("prompts exactly as the model's template renders them", () => {
  it("renders as llama-server does: no stray spaces, BOS once (12 tokens for the Llama-2 template)", async () => {
    const llama2 = await post("/apply-template", { model: "tiny-chat", messages: [{ role: "user", content: "Once upon a time" }] });
    expect(llama2.json.prompt).toBe("[INST] Once upon a time [/INST]");
    const stories = await post("/apply-template", { model: "stories260K-chat", messages: [{ role: "user", content: "Once upon a time" }] });
    expect(stories.json.prompt).toBe("User: Once upon a time\nAssistant:");
    const tok = await post("/tokenize", { model: "tiny-chat", content: llama2.json.prompt });
    expect(tok.json.count).toBe(12);
    const res = await client.chat.completions.create({ model: "tiny-chat", messages: [{ role: "user", content: "Once upon a time" }], max_tokens: 1 });
    expect(res.usage!.prompt_tokens).toBe(12);
  });

  it("tokenize and detokenize in llama-server's and vLLM's shapes, with pieces", async () => {
    const a = await post("/tokenize", { model: "stories260K", prompt: "Once upon a time", add_special_tokens: false });
    const b = await post("/tokenize", { model: "stories260K", content: "Once upon a time", with_pieces: true });
    expect(b.json.tokens.length).toBe(a.json.tokens.length + 1);
    expect(b.json.tokens.map((t: { piece: string }) => t.piece).join("")).toContain("Once upon a time");
    expect(a.json.max_model_len).toBe(1024);
    const d = await post("/detokenize", { model: "stories260K", tokens: a.json.tokens });
    expect(d.json.content).toBe("Once upon a time");
    expect(d.json.prompt).toBe("Once upon a time");
    const chat = await post("/tokenize", { model: "tiny-chat", messages: [{ role: "user", content: "Hi" }] });
    expect(chat.json.count).toBeGreaterThan(4);
    expect((await post("/detokenize", { model: "stories260K", tokens: [999999] })).status).toBe(400);
  });

  it("a tool call and its result round-trip through a template that has no tool syntax of its own", async () => {
    const tools = [{ type: "function" as const, function: { name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } } }];
    const messages = [
      { role: "user" as const, content: "Weather in Paris?" },
      { role: "assistant" as const, content: null, tool_calls: [{ id: "call_1", type: "function" as const, function: { name: "get_weather", arguments: '{"city":"Paris"}' } }] },
      { role: "tool" as const, tool_call_id: "call_1", content: '{"temperature":21}' },
    ];
    const rendered = (await post("/apply-template", { model: "tiny-chat", messages, tools })).json.prompt as string;
    expect(rendered).toContain('{"name":"get_weather","description":""');
    expect(rendered).toContain('<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>');
    expect(rendered).toContain('<tool_response>\n{"temperature":21}\n</tool_response>');
    const res = await client.chat.completions.create({ model: "tiny-chat", messages, tools, max_tokens: 4, temperature: 0 });
    assertSchema("CreateChatCompletionResponse", res);
  });
});

/** Schemas the random 32k-vocabulary model must follow: nested objects, arrays, enums, required, bounds. */
const SCHEMAS: Array<Record<string, unknown>> = [
  { type: "object", properties: { name: { type: "string", maxLength: 12 }, age: { type: "integer", minimum: 0, maximum: 120 } }, required: ["name", "age"], additionalProperties: false },
  { type: "object", properties: { tags: { type: "array", items: { type: "string", enum: ["a", "b", "c"] }, minItems: 1, maxItems: 3 }, score: { type: "number", minimum: -1, maximum: 1 } }, required: ["tags", "score"] },
  {
    type: "object",
    properties: { user: { type: "object", properties: { id: { type: "integer", exclusiveMinimum: 10, maximum: 99 }, ok: { type: "boolean" } }, required: ["id", "ok"] }, note: { type: ["string", "null"], maxLength: 20 } },
    required: ["user"],
  },
];

describe("structured outputs", () => {
  const ajv = new Ajv2020({ strict: false });

  it.each(SCHEMAS.map((s, i) => [i, s] as const))("json_schema %i: the random model's output parses and validates (SDK parse())", async (_i, schema) => {
    for (const seed of [1, 2, 3]) {
      const res = await client.chat.completions.parse({
        model: "llama-2-tiny-random",
        messages: [{ role: "user", content: "Describe it as JSON." }],
        max_tokens: 400,
        temperature: 1,
        seed,
        response_format: { type: "json_schema", json_schema: { name: "out", schema, strict: true } },
      });
      const parsed = res.choices[0]!.message.parsed;
      expect(res.choices[0]!.finish_reason).toBe("stop");
      expect(ajv.validate(schema, parsed), `${JSON.stringify(parsed)} ${JSON.stringify(ajv.errors)}`).toBe(true);
    }
  });

  it("json_object, llama-server's json_schema and grammar, vLLM's choice: each constrains the output", async () => {
    const base = { model: "llama-2-tiny-random", messages: [{ role: "user", content: "Go." }], max_tokens: 200, temperature: 1, seed: 7 };
    const obj = await post("/v1/chat/completions", { ...base, response_format: { type: "json_object" } });
    expect(typeof JSON.parse(obj.json.choices[0].message.content)).toBe("object");
    const ls = await post("/v1/chat/completions", { ...base, json_schema: { type: "array", items: { type: "integer", minimum: 1, maximum: 3 }, minItems: 2, maxItems: 2 } });
    const arr = JSON.parse(ls.json.choices[0].message.content);
    expect(arr).toHaveLength(2);
    for (const x of arr) expect([1, 2, 3]).toContain(x);
    const g = await post("/v1/chat/completions", { ...base, grammar: 'root ::= "yes" | "no"' });
    expect(["yes", "no"]).toContain(g.json.choices[0].message.content);
    const choice = await post("/v1/chat/completions", { ...base, structured_outputs: { choice: ["red", "green", "blue"] } });
    expect(["red", "green", "blue"]).toContain(choice.json.choices[0].message.content);
    const bad = await post("/v1/chat/completions", { ...base, grammar: "root ::= (" });
    expect(bad.status).toBe(400);
    expect(bad.json.error.code).toBe("invalid_grammar");
  });
});

describe("tools", () => {
  const tools = [
    {
      type: "function" as const,
      function: {
        name: "get_weather",
        description: "Weather for a city",
        parameters: { type: "object", properties: { city: { type: "string", enum: ["Paris", "Rome", "Oslo"] }, days: { type: "integer", minimum: 1, maximum: 7 } }, required: ["city", "days"] },
      },
    },
    { type: "function" as const, function: { name: "get_time", parameters: { type: "object", properties: { zone: { type: "string", maxLength: 8 } }, required: ["zone"] } } },
  ];
  const ajv = new Ajv2020({ strict: false });

  it("tool_choice required: every call names a tool and its arguments validate; the stream's deltas add up to the same calls", async () => {
    const body = { model: "llama-2-tiny-random", messages: [{ role: "user" as const, content: "Weather?" }], tools, tool_choice: "required" as const, max_tokens: 300, temperature: 0 };
    const res = await client.chat.completions.create(body);
    assertSchema("CreateChatCompletionResponse", res);
    const choice = res.choices[0]!;
    expect(choice.finish_reason).toBe("tool_calls");
    expect(choice.message.content).toBeNull();
    const calls = choice.message.tool_calls!;
    expect(calls.length).toBeGreaterThan(0);
    for (const c of calls) {
      if (c.type !== "function") throw new Error("not a function call");
      const tool = tools.find((t) => t.function.name === c.function.name)!;
      expect(tool).toBeDefined();
      expect(ajv.validate(tool.function.parameters, JSON.parse(c.function.arguments)), c.function.arguments).toBe(true);
      expect(c.id).toMatch(/^call_/);
    }
    // Streamed: index, id and name first, then argument fragments; concatenated, the same calls.
    const stream = await client.chat.completions.create({ ...body, stream: true });
    const streamed: Array<{ name: string; arguments: string }> = [];
    let finish: string | null = null;
    for await (const chunk of stream) {
      assertSchema("CreateChatCompletionStreamResponse", chunk);
      for (const d of chunk.choices[0]?.delta.tool_calls ?? []) {
        if (d.id) {
          expect(d.function?.name).toBeTruthy();
          streamed[d.index] = { name: d.function!.name!, arguments: d.function?.arguments ?? "" };
        } else streamed[d.index]!.arguments += d.function?.arguments ?? "";
      }
      finish = chunk.choices[0]?.finish_reason ?? finish;
    }
    expect(finish).toBe("tool_calls");
    expect(streamed.map((c) => ({ name: c.name, args: JSON.parse(c.arguments) }))).toEqual(calls.map((c) => c.type === "function" && { name: c.function.name, args: JSON.parse(c.function.arguments) }));
  });

  it("a named function is called, once, with valid arguments; parallel_tool_calls false gives one call", async () => {
    for (const extra of [{ tool_choice: { type: "function" as const, function: { name: "get_time" } } }, { tool_choice: "required" as const, parallel_tool_calls: false }]) {
      const res = await client.chat.completions.create({ model: "llama-2-tiny-random", messages: [{ role: "user", content: "Now?" }], tools, max_tokens: 200, temperature: 1, seed: 3, ...extra });
      const calls = res.choices[0]!.message.tool_calls!;
      expect(calls).toHaveLength(1);
      const c = calls[0]!;
      if (c.type !== "function") throw new Error("not a function call");
      if (typeof extra.tool_choice === "object") expect(c.function.name).toBe("get_time");
      const tool = tools.find((t) => t.function.name === c.function.name)!;
      expect(ajv.validate(tool.function.parameters, JSON.parse(c.function.arguments))).toBe(true);
    }
  });

  it("tool_choice none and auto answer in text when the model writes no call; unknown names and missing tools are 400s", async () => {
    const none = await client.chat.completions.create({ model: "stories260K", messages: [{ role: "user", content: "Once upon a time" }], tools, tool_choice: "none", max_tokens: 8, temperature: 0 });
    expect(none.choices[0]!.finish_reason).toBe("length");
    expect(none.choices[0]!.message.tool_calls).toBeUndefined();
    const auto = await client.chat.completions.create({ model: "stories260K", messages: [{ role: "user", content: "Once upon a time" }], tools, max_tokens: 8, temperature: 0 });
    expect(auto.choices[0]!.message.content!.length).toBeGreaterThan(0);
    const unknown = await post("/v1/chat/completions", { model: "stories260K", messages: [{ role: "user", content: "x" }], tools, tool_choice: { type: "function", function: { name: "nope" } } });
    expect(unknown.status).toBe(400);
    expect(unknown.json.error.param).toBe("tool_choice");
    const noTools = await post("/v1/chat/completions", { model: "stories260K", messages: [{ role: "user", content: "x" }], tool_choice: "required" });
    expect(noTools.status).toBe(400);
  });
});

describe("log probabilities and choices", () => {
  it("chat logprobs: the greedy token is the top one, probabilities sum to at most 1, top_logprobs as asked", async () => {
    const res = await client.chat.completions.create({ model: "llama-2-tiny-random", messages: [{ role: "user", content: "Hello" }], max_tokens: 12, temperature: 0, logprobs: true, top_logprobs: 5 });
    assertSchema("CreateChatCompletionResponse", res);
    const content = res.choices[0]!.logprobs!.content!;
    expect(content).toHaveLength(12);
    for (const e of content) {
      expect(e.top_logprobs).toHaveLength(5);
      expect(e.top_logprobs[0]!.logprob).toBeCloseTo(e.logprob, 9);
      expect(e.top_logprobs[0]!.token).toBe(e.token);
      for (let i = 1; i < 5; i++) expect(e.top_logprobs[i]!.logprob).toBeLessThanOrEqual(e.top_logprobs[i - 1]!.logprob);
      expect(e.top_logprobs.reduce((s, t) => s + Math.exp(t.logprob), 0)).toBeLessThanOrEqual(1 + 1e-9);
      expect(e.logprob).toBeLessThanOrEqual(0);
    }
    // Each token's text and bytes add up to the message (a multi-byte character may span tokens).
    expect(Buffer.from(content.flatMap((e) => e.bytes!)).toString("utf8")).toBe(res.choices[0]!.message.content);
    const stream = await client.chat.completions.create({ model: "llama-2-tiny-random", messages: [{ role: "user", content: "Hello" }], max_tokens: 12, temperature: 0, logprobs: true, top_logprobs: 5, stream: true });
    const streamed: number[] = [];
    for await (const chunk of stream) for (const e of chunk.choices[0]?.logprobs?.content ?? []) streamed.push(e.logprob);
    expect(streamed).toEqual(content.map((e) => e.logprob));
  });

  it("completions logprobs with echo and max_tokens 0 score the prompt, as evaluation harnesses ask", async () => {
    const res = await post("/v1/completions", { model: "stories260K", prompt: "Once upon a time, there was", max_tokens: 0, echo: true, logprobs: 1 });
    const c = res.json.choices[0];
    // The first prompt token has no log probability (nothing precedes it): null, as OpenAI's
    // API answers and harnesses expect, though the published schema has no null there.
    const { tokens, token_logprobs, top_logprobs, text_offset } = c.logprobs;
    assertSchema("CreateCompletionResponse", { ...res.json, choices: [{ ...c, logprobs: { tokens: tokens.slice(1), token_logprobs: token_logprobs.slice(1), top_logprobs: top_logprobs.slice(1), text_offset: text_offset.slice(1) } }] });
    expect(c.text).toBe("Once upon a time, there was");
    expect(c.logprobs.token_logprobs[0]).toBeNull();
    expect(c.logprobs.token_logprobs.slice(1).every((x: number) => x < 0)).toBe(true);
    expect(res.json.usage.completion_tokens).toBe(0);
    // The greedy continuation's first token is the most likely one after the prompt.
    const next = await post("/v1/completions", { model: "stories260K", prompt: "Once upon a time", max_tokens: 1, temperature: 0, logprobs: 3 });
    const lp = next.json.choices[0].logprobs;
    expect(Object.values(lp.top_logprobs[0]).sort((a, b) => (b as number) - (a as number))[0]).toBeCloseTo(lp.token_logprobs[0], 9);
  });

  it("n: 3 with a seed is reproducible, usage counts every choice once; best_of picks n of more", async () => {
    const body = { model: "stories260K", messages: [{ role: "user" as const, content: "Once upon a time" }], max_tokens: 16, temperature: 1, seed: 42, n: 3 };
    const a = await client.chat.completions.create(body);
    const b = await client.chat.completions.create(body);
    expect(a.choices.map((c) => c.message.content)).toEqual(b.choices.map((c) => c.message.content));
    expect(a.choices.map((c) => c.index)).toEqual([0, 1, 2]);
    expect(a.usage!.completion_tokens).toBe(48);
    const p = (await post("/apply-template", { model: "stories260K", messages: body.messages })).json.prompt;
    expect(p.length).toBeGreaterThan(0);
    // Streams interleave choices by index.
    const stream = await client.chat.completions.create({ ...body, stream: true });
    const texts = ["", "", ""];
    for await (const chunk of stream) for (const c of chunk.choices) texts[c.index] += c.delta.content ?? "";
    expect(texts).toEqual(a.choices.map((c) => c.message.content));
    const best = await post("/v1/completions", { model: "stories260K", prompt: "Once upon a time", max_tokens: 8, temperature: 1, seed: 9, n: 2, best_of: 4 });
    expect(best.json.choices).toHaveLength(2);
    expect(best.json.usage.completion_tokens).toBe(32);
    expect((await post("/v1/completions", { model: "stories260K", prompt: "x", n: 3, best_of: 2 })).status).toBe(400);
  });
});

describe("samplers and lenient input", () => {
  it("stop_token_ids end generation; min_tokens holds them (and the end) back; include_stop_str_in_output keeps the stop string", async () => {
    // " there" is the greedy continuation's second token: as a stop token it ends the text after ",".
    const there = (await post("/tokenize", { model: "stories260K", content: "Once upon a time, there", add_special: false })).json.tokens.at(-1);
    const stopped = await post("/v1/completions", { model: "stories260K", prompt: "Once upon a time", max_tokens: 20, temperature: 0, stop_token_ids: [there] });
    expect(stopped.json.choices[0].text).toBe(",");
    expect(stopped.json.choices[0].finish_reason).toBe("stop");
    expect(stopped.json.usage.completion_tokens).toBe(1);
    // Not before 6 tokens: the sampler may not pick it (nor an end-of-generation token) until then.
    const held = await post("/v1/completions", { model: "stories260K", prompt: "Once upon a time", max_tokens: 20, temperature: 0, stop_token_ids: [there], min_tokens: 6 });
    expect(held.json.usage.completion_tokens).toBeGreaterThanOrEqual(6);
    expect(held.json.choices[0].text).not.toContain(" there");
    const kept = await post("/v1/completions", { model: "stories260K", prompt: "Once upon a time", max_tokens: 30, temperature: 0, stop: ["girl"], include_stop_str_in_output: true });
    expect(kept.json.choices[0].text).toBe(`${STORIES_GREEDY_PREFIX.split("girl")[0]}girl`);
  });

  it("vLLM's and llama-server's samplers are accepted and change sampling: min_p, repetition_penalty / repeat_penalty, top_k -1", async () => {
    const base = { model: "stories260K", prompt: "Once upon a time", max_tokens: 40, temperature: 0 };
    const plain = (await post("/v1/completions", base)).json.choices[0].text;
    const penalized = (await post("/v1/completions", { ...base, repetition_penalty: 1.8 })).json.choices[0].text;
    expect(penalized).not.toBe(plain);
    expect((await post("/v1/completions", { ...base, repeat_penalty: 1.8, repeat_last_n: 64 })).json.choices[0].text).toBe(penalized);
    for (const extra of [{ min_p: 0.05, temperature: 1, seed: 1 }, { top_k: -1, temperature: 1, seed: 1 }]) expect((await post("/v1/completions", { ...base, ...extra })).status).toBe(200);
    const both = await post("/v1/completions", { ...base, repeat_penalty: 1.1, repetition_penalty: 1.2 });
    expect(both.status).toBe(400);
  });

  it("every optional field null, and OpenAI's own defaults, are accepted; the answer names its request", async () => {
    const res = await fetch(`${server.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model: "stories260K",
        messages: [{ role: "user", content: "Hi", name: "ann" }],
        max_tokens: 4,
        temperature: null,
        top_p: null,
        n: null,
        stop: null,
        seed: null,
        logprobs: false,
        top_logprobs: 0,
        response_format: { type: "text" },
        modalities: ["text"],
        service_tier: "auto",
        parallel_tool_calls: true,
        metadata: {},
        store: false,
        stream: false,
        stream_options: null,
        tools: null,
        tool_choice: null,
        user: null,
        presence_penalty: null,
        frequency_penalty: null,
        logit_bias: null,
        max_completion_tokens: null,
        reasoning_effort: null,
      }),
    });
    expect(res.status).toBe(200);
    expect(res.headers.get("x-request-id")).toMatch(/^[0-9a-f]{16}$/);
    const body = await res.json();
    assertSchema("CreateChatCompletionResponse", body);
    expect(body.system_fingerprint).toMatch(/^fp_/);
    const sdk = await client.chat.completions.create({ model: "stories260K", messages: [{ role: "user", content: "Hi" }], max_tokens: 2 }).withResponse();
    expect(sdk.request_id).toMatch(/^[0-9a-f]{16}$/);
  });

  it("include_usage: every chunk has usage null until the usage chunk", async () => {
    const chunks: any[] = [];
    const stream = await client.chat.completions.create({ model: "stories260K", messages: [{ role: "user", content: "Hi" }], max_tokens: 4, stream: true, stream_options: { include_usage: true } });
    for await (const c of stream) chunks.push(c);
    expect(chunks.slice(0, -1).every((c) => c.usage === null)).toBe(true);
    expect(chunks.at(-1).usage.completion_tokens).toBe(4);
    for (const c of chunks) assertSchema("CreateChatCompletionStreamResponse", c);
    const text: any[] = [];
    for await (const c of await client.completions.create({ model: "stories260K", prompt: "Hi", max_tokens: 3, stream: true, stream_options: { include_usage: true } })) text.push(c);
    for (const c of text.slice(0, -1)) assertCompletionChunk(c);
  });
});

describe("reasoning models", () => {
  it("a template that opens a thinking section: the thoughts come as reasoning_content, apart from content", async () => {
    const res = await client.chat.completions.create({ model: "thinker", messages: [{ role: "user", content: "Once upon a time" }], max_tokens: 16, temperature: 0 });
    const m = res.choices[0]!.message as { content: string | null; reasoning_content?: string };
    expect(m.reasoning_content!.length).toBeGreaterThan(0);
    expect(m.content).toBe("");
    let reasoning = "";
    for await (const c of await client.chat.completions.create({ model: "thinker", messages: [{ role: "user", content: "Once upon a time" }], max_tokens: 16, temperature: 0, stream: true })) {
      reasoning += (c.choices[0]?.delta as { reasoning_content?: string } | undefined)?.reasoning_content ?? "";
      expect(c.choices[0]?.delta.content ?? "").toBe("");
    }
    expect(reasoning).toBe(m.reasoning_content);
  });
});
