import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type OpenAI from "openai";
import type { RunningServer } from "../src/server.js";
import { assertCompletionChunk, assertSchema } from "./helpers/openapi.js";
import { openaiClient, startTestServer, STORIES, STORIES_CHAT, STORIES_GREEDY_PREFIX, TINY_RANDOM } from "./helpers/server.js";
import { postSse } from "./helpers/sse.js";

let server: RunningServer;
let client: OpenAI;

beforeAll(async () => {
  server = await startTestServer([STORIES, STORIES_CHAT, TINY_RANDOM], { parallel: 8 });
  client = openaiClient(server);
});
afterAll(async () => {
  await server?.close();
});

const user = (content: string) => [{ role: "user" as const, content }];

describe("completions through the OpenAI SDK", () => {
  it("greedy stories260K output matches what llama.cpp produces", async () => {
    const res = await client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 32, temperature: 0 });
    assertSchema("CreateCompletionResponse", res);
    expect(res.object).toBe("text_completion");
    // The resolved, immutable version that served it, as OpenAI names a snapshot.
    expect(res.model).toBe("stories260K@test");
    expect(res.choices[0]!.text.startsWith(STORIES_GREEDY_PREFIX)).toBe(true);
    expect(res.choices[0]!.finish_reason).toBe("length");
    expect(res.usage!.completion_tokens).toBe(32);
    expect(res.usage!.total_tokens).toBe(res.usage!.prompt_tokens + 32);
  });

  it("streams the same text as the non-stream request, every chunk schema-valid", async () => {
    const body = { model: "stories260K", prompt: "Once upon a time", max_tokens: 48, temperature: 0 };
    // A first run puts the prompt's KV in a slot, so both compared runs below reuse it and
    // take the same numeric path (llama.cpp is not batch-invariant).
    await client.completions.create(body);
    const full = await client.completions.create(body);
    const stream = await client.completions.create({ ...body, stream: true, stream_options: { include_usage: true } });
    let text = "";
    const ids = new Set<string>();
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined;
    for await (const chunk of stream) {
      assertCompletionChunk(chunk);
      ids.add(chunk.id);
      if (chunk.choices.length > 0) {
        text += chunk.choices[0]!.text;
        finish = chunk.choices[0]!.finish_reason ?? finish;
      }
      if (chunk.usage) usage = chunk.usage;
    }
    expect(ids.size).toBe(1);
    expect(text).toBe(full.choices[0]!.text);
    expect(finish).toBe("length");
    expect(usage).toMatchObject({ prompt_tokens: full.usage!.prompt_tokens, completion_tokens: 48 });
  });

  it("echo prepends the prompt", async () => {
    const res = await client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 8, temperature: 0, echo: true });
    expect(res.choices[0]!.text.startsWith("Once upon a time, there was")).toBe(true);
  });

  it("accepts a prompt of token ids", async () => {
    const byText = await client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 8, temperature: 0 });
    const byIds = await client.completions.create({ model: "stories260K", prompt: [1, 403, 407, 261, 378], max_tokens: 8, temperature: 0 });
    expect(byIds.choices[0]!.text).toBe(byText.choices[0]!.text);
  });
});

describe("chat completions through the OpenAI SDK", () => {
  it("non-stream response is schema-valid with usage and finish reason", async () => {
    const res = await client.chat.completions.create({ model: "stories260K-chat", messages: user("Tell me a story"), max_tokens: 16, temperature: 0 });
    assertSchema("CreateChatCompletionResponse", res);
    expect(res.object).toBe("chat.completion");
    expect(res.choices[0]!.message.role).toBe("assistant");
    expect(["stop", "length"]).toContain(res.choices[0]!.finish_reason);
    expect(res.usage!.total_tokens).toBe(res.usage!.prompt_tokens + res.usage!.completion_tokens);
  });

  it("stream and non-stream greedy output are identical; chunks follow the OpenAI stream shape", async () => {
    const body = {
      model: "stories260K-chat",
      messages: [{ role: "system" as const, content: "You tell stories." }, ...user("Once upon a time")],
      max_tokens: 40,
      temperature: 0,
    };
    await client.chat.completions.create(body);
    const full = await client.chat.completions.create(body);
    const raw = await postSse(`${server.url}/v1/chat/completions`, { ...body, stream: true, stream_options: { include_usage: true } });
    expect(raw.status).toBe(200);
    expect(raw.headers.get("content-type")).toMatch(/^text\/event-stream/);
    expect(raw.events.at(-1)).toBe("[DONE]");
    const chunks = raw.events.slice(0, -1).map((e) => JSON.parse(e));
    for (const c of chunks) assertSchema("CreateChatCompletionStreamResponse", c);
    expect(new Set(chunks.map((c) => c.id)).size).toBe(1);
    expect(new Set(chunks.map((c) => c.created)).size).toBe(1);
    expect(chunks[0].choices[0].delta.role).toBe("assistant");
    const usageChunk = chunks.at(-1);
    expect(usageChunk.choices).toEqual([]);
    expect(usageChunk.usage).toMatchObject({
      prompt_tokens: full.usage!.prompt_tokens,
      completion_tokens: full.usage!.completion_tokens,
      total_tokens: full.usage!.total_tokens,
    });
    const finalChunk = chunks.at(-2);
    expect(finalChunk.choices[0].finish_reason).toBe(full.choices[0]!.finish_reason);
    const text = chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("");
    expect(text).toBe(full.choices[0]!.message.content);
    // Without include_usage no usage chunk is sent.
    const plain = await postSse(`${server.url}/v1/chat/completions`, { ...body, stream: true });
    expect(plain.events.slice(0, -1).every((e) => JSON.parse(e).usage === undefined)).toBe(true);
  });

  it("accepts content parts, developer messages and max_completion_tokens (which wins over max_tokens)", async () => {
    const res = await client.chat.completions.create({
      model: "stories260K-chat",
      messages: [
        { role: "developer", content: "Be brief." },
        { role: "user", content: [{ type: "text", text: "Once upon " }, { type: "text", text: "a time" }] },
      ],
      max_tokens: 50,
      max_completion_tokens: 3,
      temperature: 0,
    });
    expect(res.usage!.completion_tokens).toBeLessThanOrEqual(3);
    expect(res.choices[0]!.finish_reason).toBe("length");
  });

  it("renders with the model's own Jinja template", async () => {
    const res = await client.chat.completions.create({ model: "stories260K-chat", messages: user("Hi"), max_tokens: 1, temperature: 0 });
    // BOS + "User: Hi\nAssistant: " in the template's format.
    const expected = server.registry.resolve("stories260K-chat").engine.renderChat({ messages: [{ role: "user", content: "Hi" }] }).tokens.length;
    expect(res.usage!.prompt_tokens).toBe(expected);
  });

  it("the same seed gives the same sampled text", async () => {
    const body = { model: "stories260K", messages: user("Once upon a time"), max_tokens: 24, temperature: 1, seed: 1234 };
    const a = await client.chat.completions.create(body);
    const b = await client.chat.completions.create(body);
    expect(a.choices[0]!.message.content).toBe(b.choices[0]!.message.content);
  });

  it("logit_bias of -100 bans a token", async () => {
    // Find the first greedy token, ban it, and check the output changed.
    const prompt = "Once upon a time";
    const base = await client.completions.create({ model: "stories260K", prompt, max_tokens: 1, temperature: 0 });
    const model = server.registry.resolve("stories260K").engine;
    const firstToken = model.tokenizePrompt(prompt + base.choices[0]!.text).at(-1)!;
    const banned = await client.completions.create({ model: "stories260K", prompt, max_tokens: 1, temperature: 0, logit_bias: { [String(firstToken)]: -100 } });
    expect(banned.choices[0]!.text).not.toBe(base.choices[0]!.text);
  });
});

describe("stop strings and max_tokens", () => {
  it("a stop string spanning several tokens ends the text before it, never sent in part", async () => {
    const body = { model: "stories260K", prompt: "Once upon a time", max_tokens: 40, temperature: 0, stop: ["Lily. She"] };
    const model = server.registry.resolve("stories260K").engine;
    // The stop string really spans tokens in this output.
    expect(model.tokenizePrompt("Lily. She").length - 1).toBeGreaterThan(1);
    await client.completions.create(body);
    const full = await client.completions.create(body);
    expect(full.choices[0]!.text).toBe(", there was a little girl named ");
    expect(full.choices[0]!.finish_reason).toBe("stop");
    const raw = await postSse(`${server.url}/v1/completions`, { ...body, stream: true });
    const chunks = raw.events.slice(0, -1).map((e) => JSON.parse(e));
    chunks.forEach(assertCompletionChunk);
    const pieces: string[] = chunks.map((c) => c.choices[0]?.text ?? "");
    expect(pieces.join("")).toBe(", there was a little girl named ");
    expect(pieces.some((p) => p.includes("L"))).toBe(false);
  });

  it("chat streams never leak a stop string either", async () => {
    const body = { model: "stories260K", messages: user("Once upon a time"), max_tokens: 60, temperature: 0 };
    await client.chat.completions.create(body);
    const full = await client.chat.completions.create(body);
    const text = full.choices[0]!.message.content!;
    const stop = text.slice(10, 16);
    const stopped = await client.chat.completions.create({ ...body, stop });
    expect(stopped.choices[0]!.message.content).toBe(text.slice(0, text.indexOf(stop)));
    expect(stopped.choices[0]!.finish_reason).toBe("stop");
    const stream = await client.chat.completions.create({ ...body, stop: [stop, "zzzz"], stream: true });
    let streamed = "";
    for await (const c of stream) streamed += c.choices[0]?.delta?.content ?? "";
    expect(streamed).toBe(stopped.choices[0]!.message.content);
  });

  it("max_tokens ends with finish_reason length and the usage adds up", async () => {
    const res = await client.chat.completions.create({ model: "stories260K", messages: user("Once upon a time"), max_tokens: 7, temperature: 0 });
    expect(res.choices[0]!.finish_reason).toBe("length");
    expect(res.usage!.completion_tokens).toBe(7);
    expect(res.usage!.total_tokens).toBe(res.usage!.prompt_tokens + 7);
  });
});

describe("UTF-8 over streams", () => {
  it("llama-2-tiny-random's multi-byte output streams without split characters", async () => {
    let checked = 0;
    for (const seed of [1, 2, 3]) {
      const body = { model: "llama-2-tiny-random", prompt: "Привет, мир! สวัสดี 你好", max_tokens: 64, temperature: 1, seed };
      await client.completions.create(body);
      const full = await client.completions.create(body);
      const raw = await postSse(`${server.url}/v1/completions`, { ...body, stream: true });
      const pieces: string[] = raw.events.slice(0, -1).map((e) => JSON.parse(e).choices[0]?.text ?? "");
      const fullText = full.choices[0]!.text;
      expect(pieces.join("")).toBe(fullText);
      const fffdInFull = [...fullText].filter((c) => c === "\uFFFD").length;
      const fffdInPieces = pieces.reduce((n, p) => n + [...p].filter((c) => c === "\uFFFD").length, 0);
      expect(fffdInPieces).toBe(fffdInFull);
      // The output really is multi-byte text, or this test proves nothing.
      if (/[^\u0000-\u007f]/.test(fullText)) checked++;
    }
    expect(checked).toBeGreaterThan(0);
  });
});

describe("bad input", () => {
  const post = (path: string, body: string, headers: Record<string, string> = {}) =>
    fetch(`${server.url}${path}`, { method: "POST", headers: { "content-type": "application/json", ...headers }, body });

  const cases: Array<[string, string, number, string | null]> = [
    ["bad JSON", "{nope", 400, null],
    ["not an object", "[1,2]", 400, null],
    ["missing messages", JSON.stringify({ model: "stories260K" }), 400, "messages"],
    ["wrong type", JSON.stringify({ model: "stories260K", messages: user("hi"), temperature: "hot" }), 400, "temperature"],
    ["out of range", JSON.stringify({ model: "stories260K", messages: user("hi"), temperature: 9 }), 400, "temperature"],
    ["negative max_tokens", JSON.stringify({ model: "stories260K", messages: user("hi"), max_tokens: -1 }), 400, "max_tokens"],
    ["bad role", JSON.stringify({ model: "stories260K", messages: [{ role: "wizard", content: "x" }] }), 400, "messages[0].role"],
    ["empty messages", JSON.stringify({ model: "stories260K", messages: [] }), 400, "messages"],
    ["n too large", JSON.stringify({ model: "stories260K", messages: user("hi"), n: 17 }), 400, "n"],
    ["a non-function tool, by its type", JSON.stringify({ model: "stories260K", messages: user("hi"), tools: [{ type: "web_search" }] }), 400, "tools[0].type"],
    ["top_logprobs without logprobs", JSON.stringify({ model: "stories260K", messages: user("hi"), top_logprobs: 3 }), 400, "top_logprobs"],
    ["an image part, by its type", JSON.stringify({ model: "stories260K", messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "x" } }] }] }), 400, "messages[0].content[0].type"],
    ["typical_p", JSON.stringify({ model: "stories260K", messages: user("hi"), typical_p: 0.5 }), 400, "typical_p"],
    ["a schema feature the grammar cannot honour", JSON.stringify({ model: "stories260K", messages: user("hi"), response_format: { type: "json_schema", json_schema: { name: "x", schema: { type: "string", pattern: "^a+$" } } } }), 400, "response_format.json_schema.schema"],
    ["unknown field", JSON.stringify({ model: "stories260K", messages: user("hi"), frobnicate: 1 }), 400, "frobnicate"],
    ["bad logit_bias token", JSON.stringify({ model: "stories260K", messages: user("hi"), logit_bias: { "999999": 1 } }), 400, "logit_bias"],
    ["unknown model", JSON.stringify({ model: "no-such-model", messages: user("hi") }), 404, "model"],
    ["context overflow", JSON.stringify({ model: "stories260K", messages: user("hi"), max_tokens: 100000 }), 400, "max_tokens"],
    ["prototype pollution", '{"model":"stories260K","messages":[{"role":"user","content":"hi"}],"__proto__":{"x":1}}', 400, null],
  ];

  it.each(cases)("%s → %i with the OpenAI envelope", async (_name, body, status, param) => {
    const res = await post("/v1/chat/completions", body);
    expect(res.status).toBe(status);
    const json = await res.json();
    assertSchema("ErrorResponse", json);
    expect(typeof json.error.message).toBe("string");
    expect(json.error.message.length).toBeGreaterThan(0);
    if (param !== null) expect(json.error.param).toBe(param);
  });

  it("a prompt longer than the context is refused, never truncated", async () => {
    const long = "word ".repeat(2000);
    const res = await post("/v1/completions", JSON.stringify({ model: "stories260K", prompt: long }));
    expect(res.status).toBe(400);
    expect((await res.json()).error.code).toBe("context_length_exceeded");
  });

  it("a list of prompts is refused clearly", async () => {
    const res = await post("/v1/completions", JSON.stringify({ model: "stories260K", prompt: ["a", "b"] }));
    expect(res.status).toBe(400);
    expect((await res.json()).error.param).toBe("prompt");
  });

  it("an oversized body gets 413", async () => {
    const res = await post("/v1/chat/completions", JSON.stringify({ model: "stories260K", messages: user("x".repeat(5 * 1024 * 1024)) }));
    expect(res.status).toBe(413);
    assertSchema("ErrorResponse", await res.json());
  });

  it("the SDK raises typed errors", async () => {
    await expect(client.chat.completions.create({ model: "nope", messages: user("hi") })).rejects.toMatchObject({ status: 404 });
    await expect(client.chat.completions.create({ model: "stories260K", messages: user("hi"), temperature: 5 })).rejects.toMatchObject({
      status: 400,
    });
  });

  it("the server still serves after all of that", async () => {
    const res = await client.completions.create({ model: "stories260K", prompt: "Once upon a time", max_tokens: 32, temperature: 0 });
    expect(res.choices[0]!.text.startsWith(STORIES_GREEDY_PREFIX)).toBe(true);
  });
});

describe("models", () => {
  it("lists every model in the OpenAI shape, with extras", async () => {
    const list = await client.models.list();
    assertSchema("ListModelsResponse", { object: "list", data: list.data });
    const ids = list.data.map((m) => m.id);
    // One entry per model id (and alias): what pickers show; versions are listed under their model.
    expect(ids).toEqual(["stories260K", "stories260K-chat", "llama-2-tiny-random"]);
    expect((list.data[0] as unknown as { versions: Array<{ id: string }> }).versions.map((v) => v.id)).toEqual(["stories260K@test"]);
    expect((await client.models.retrieve("stories260K@test")).id).toBe("stories260K@test");
    const one = await client.models.retrieve("stories260K");
    assertSchema("Model", one);
    expect(one).toMatchObject({ id: "stories260K", context_length: 512, parallel: 8, state: "ready" });
    await expect(client.models.retrieve("nope")).rejects.toMatchObject({ status: 404 });
  });

  it("readiness reports loaded and warmed models", async () => {
    const res = await fetch(`${server.url}/readyz`);
    expect(res.status).toBe(200);
    expect((await fetch(`${server.url}/livez`)).status).toBe(200);
  });
});
