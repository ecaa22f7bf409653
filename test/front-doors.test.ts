/**
 * Every front door clients knock on, through the real engine and server with the
 * official SDKs unmodified: OpenAI's Responses (create, stream, previous_response_id,
 * function tools with their outputs, the store), embeddings (float and base64),
 * Anthropic's Messages (create, stream, tool use, countTokens, its error classes), the
 * peers' route names without /v1, and cancellation freeing the slot on each.
 */
import Anthropic from "@anthropic-ai/sdk";
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Ajv2020 } from "ajv/dist/2020.js";
import type { RunningServer } from "../src/server.js";
import { assertAnthropic, assertAnthropicEvent, parseAnthropicSse } from "./helpers/anthropic-schema.js";
import { assertEvent, assertSchema } from "./helpers/openapi.js";
import { openaiClient, startTestServer, STORIES, TINY_RANDOM, waitFor } from "./helpers/server.js";

const KEY_A = "front-door-key-a";
const KEY_B = "front-door-key-b";
// The current Anthropic SDK types leave temperature out (newer Claude models fix it); the API and this server take it.
const GREEDY: object = { temperature: 0 };

let server: RunningServer;
let client: OpenAI;
let anthropic: Anthropic;
beforeAll(async () => {
  server = await startTestServer(
    [
      { ...STORIES, ctxSize: 2048 },
      { id: "chat", file: "stories260K-chat.gguf", ctxSize: 1024 },
      { ...TINY_RANDOM, ctxSize: 512, embeddings: true },
    ],
    { parallel: 2, apiKeys: [KEY_A, KEY_B], keyTokensPerMinute: 0 },
  );
  client = openaiClient(server, { apiKey: KEY_A });
  anthropic = new Anthropic({ baseURL: server.url, apiKey: KEY_A, maxRetries: 0 });
});
afterAll(async () => server?.close());

const sched = () => server.registry.resolve("stories260K").scheduler;

describe("OpenAI Responses", () => {
  it("responses.create: a Response in OpenAI's shape, usage with cached tokens, stored and read back by its own key only", async () => {
    const r = await client.responses.create({ model: "stories260K", input: "Once upon a time", max_output_tokens: 16, temperature: 0, instructions: "Tell a story." });
    assertSchema("Response", r);
    expect(r.status).toBe("incomplete");
    expect(r.incomplete_details?.reason).toBe("max_output_tokens");
    expect(r.output_text.length).toBeGreaterThan(0);
    expect(r.usage!.output_tokens).toBe(16);
    const back = await client.responses.retrieve(r.id);
    expect(back.output_text).toBe(r.output_text);
    const items = await client.responses.inputItems.list(r.id);
    expect(items.data[0]).toMatchObject({ type: "message", role: "user" });
    // Another key: as if it did not exist.
    const other = openaiClient(server, { apiKey: KEY_B });
    await expect(other.responses.retrieve(r.id)).rejects.toMatchObject({ status: 404 });
    await expect(other.responses.create({ model: "stories260K", input: "x", previous_response_id: r.id, max_output_tokens: 2 })).rejects.toMatchObject({ status: 404 });
    await client.responses.delete(r.id);
    await expect(client.responses.retrieve(r.id)).rejects.toMatchObject({ status: 404 });
    const unstored = await client.responses.create({ model: "stories260K", input: "Hi", max_output_tokens: 2, store: false });
    await expect(client.responses.retrieve(unstored.id)).rejects.toMatchObject({ status: 404 });
  });

  it("previous_response_id continues the conversation and reuses its KV", async () => {
    const first = await client.responses.create({ model: "chat", input: "Once upon a time", max_output_tokens: 12, ...GREEDY });
    const second = await client.responses.create({ model: "chat", input: "And then?", previous_response_id: first.id, max_output_tokens: 8, ...GREEDY });
    expect(second.previous_response_id).toBe(first.id);
    expect(second.usage!.input_tokens).toBeGreaterThan(first.usage!.input_tokens + first.usage!.output_tokens);
    // The earlier turn's prompt is a prefix of this one: its KV is reused.
    expect(second.usage!.input_tokens_details.cached_tokens).toBeGreaterThanOrEqual(first.usage!.input_tokens - 1);
    const counted = await client.responses.inputTokens.count({ model: "chat", input: "And then?", previous_response_id: first.id });
    expect(counted.input_tokens).toBe(second.usage!.input_tokens);
  });

  it("responses.stream: the typed events, in order, each valid; deltas add up to the final text", async () => {
    const stream = client.responses.stream({ model: "stories260K", input: "Once upon a time", max_output_tokens: 12, ...GREEDY });
    const types: string[] = [];
    let text = "";
    let seq = -1;
    for await (const event of stream) {
      assertEvent("ResponseStreamEvent", event);
      expect(event.sequence_number).toBe(seq + 1);
      seq = event.sequence_number;
      types.push(event.type);
      if (event.type === "response.output_text.delta") text += event.delta;
    }
    const final = await stream.finalResponse();
    expect(final.output_text).toBe(text);
    expect(types.slice(0, 4)).toEqual(["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]);
    expect(types.slice(-4)).toEqual(["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"]);
  });

  it("function tools: a forced call, then its function_call_output in the next turn", async () => {
    const tools = [{ type: "function" as const, name: "get_weather", description: "Weather", strict: true, parameters: { type: "object", properties: { city: { type: "string", enum: ["Paris", "Oslo"] } }, required: ["city"], additionalProperties: false } }];
    const r = await client.responses.create({ model: "llama-2-tiny-random", input: "Weather?", tools, tool_choice: "required", max_output_tokens: 120, ...GREEDY });
    assertSchema("Response", r);
    const call = r.output.find((o) => o.type === "function_call");
    if (!call || call.type !== "function_call") throw new Error("no function call");
    expect(call.name).toBe("get_weather");
    expect(new Ajv2020().validate(tools[0]!.parameters, JSON.parse(call.arguments))).toBe(true);
    const next = await client.responses.create({
      model: "llama-2-tiny-random",
      previous_response_id: r.id,
      input: [{ type: "function_call_output", call_id: call.call_id, output: '{"temp": 21}' }],
      tools,
      max_output_tokens: 4,
    });
    expect(next.status).not.toBe("failed");
    // Streamed: the call's item, its argument deltas, their done event.
    const types: string[] = [];
    const args = new Map<string, string>();
    for await (const e of client.responses.stream({ model: "llama-2-tiny-random", input: "Weather?", tools, tool_choice: "required", max_output_tokens: 120, ...GREEDY })) {
      assertEvent("ResponseStreamEvent", e);
      types.push(e.type);
      if (e.type === "response.function_call_arguments.delta") args.set(e.item_id, (args.get(e.item_id) ?? "") + e.delta);
      if (e.type === "response.function_call_arguments.done") expect(e.arguments).toBe(args.get(e.item_id));
    }
    expect(types).toContain("response.function_call_arguments.done");
    expect(JSON.parse([...args.values()][0]!)).toEqual(JSON.parse(call.arguments));
  });

  it("text.format json_schema constrains the output; other tool types are refused by name", async () => {
    const schema = { type: "object", properties: { n: { type: "integer", minimum: 1, maximum: 9 } }, required: ["n"], additionalProperties: false };
    const r = await client.responses.create({ model: "llama-2-tiny-random", input: "A number", text: { format: { type: "json_schema", name: "n", schema, strict: true } }, max_output_tokens: 60, ...GREEDY });
    expect(new Ajv2020().validate(schema, JSON.parse(r.output_text))).toBe(true);
    await expect(client.responses.create({ model: "stories260K", input: "x", tools: [{ type: "web_search" } as never] })).rejects.toMatchObject({ status: 400, param: "tools[0].type" });
  });
});

describe("embeddings", () => {
  it("float and base64 (the SDK's default) agree; deterministic; a batch equals its singles; L2-normalised; usage counted", async () => {
    const texts = ["the cat sat", "a dog ran far", "hello"];
    const floats = await client.embeddings.create({ model: "llama-2-tiny-random", input: texts, encoding_format: "float" });
    assertSchema("CreateEmbeddingResponse", floats);
    const b64 = await client.embeddings.create({ model: "llama-2-tiny-random", input: texts });
    const raw = await (await fetch(`${server.url}/v1/embeddings`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${KEY_A}` }, body: JSON.stringify({ model: "llama-2-tiny-random", input: "hello", encoding_format: "base64" }) })).json();
    expect(typeof raw.data[0].embedding).toBe("string");
    for (let i = 0; i < texts.length; i++) {
      const f = floats.data[i]!.embedding;
      expect(Math.hypot(...f)).toBeCloseTo(1, 5);
      b64.data[i]!.embedding.forEach((x, k) => expect(x).toBeCloseTo(f[k]!, 5));
      const single = await client.embeddings.create({ model: "llama-2-tiny-random", input: texts[i]!, encoding_format: "float" });
      expect(single.data[0]!.embedding).toEqual(f);
    }
    expect(floats.usage.prompt_tokens).toBeGreaterThan(6);
    const ids = await client.embeddings.create({ model: "llama-2-tiny-random", input: [[1, 450, 6635]], encoding_format: "float" });
    expect(ids.data[0]!.embedding).toHaveLength(8);
  });

  it("refuses clearly: a model that does not embed, unsupported dimensions, an input longer than the context (unless truncation is asked for)", async () => {
    await expect(client.embeddings.create({ model: "stories260K", input: "x" })).rejects.toMatchObject({ status: 400, code: "model_not_embedding" });
    await expect(client.embeddings.create({ model: "llama-2-tiny-random", input: "x", dimensions: 4 })).rejects.toMatchObject({ status: 400, param: "dimensions" });
    const long = "word ".repeat(800);
    await expect(client.embeddings.create({ model: "llama-2-tiny-random", input: ["ok", long] })).rejects.toMatchObject({ status: 400, param: "input[1]" });
    const cut = await client.embeddings.create({ model: "llama-2-tiny-random", input: ["ok", long], truncate_prompt_tokens: 64, encoding_format: "float" } as never);
    expect(cut.data).toHaveLength(2);
    const m = await (await fetch(`${server.url}/metrics`, { headers: { authorization: `Bearer ${KEY_A}` } })).text();
    expect(m).toMatch(/spindle_requests_total\{endpoint="embeddings",model="llama-2-tiny-random",version="test",status_class="2xx"/);
  });
});

describe("Anthropic Messages", () => {
  it("messages.create: a Message with usage; stop_sequence when one of the request's ended it", async () => {
    const m = await anthropic.messages.create({ model: "stories260K", max_tokens: 16, messages: [{ role: "user", content: "Once upon a time" }], ...GREEDY });
    assertAnthropic("Message", m);
    expect(m).toMatchObject({ type: "message", role: "assistant", stop_reason: "max_tokens", stop_sequence: null });
    expect(m.content[0]!.type).toBe("text");
    expect(m.usage.output_tokens).toBe(16);
    const stopped = await anthropic.messages.create({ model: "stories260K", max_tokens: 40, messages: [{ role: "user", content: "Once upon a time" }], ...GREEDY, stop_sequences: ["Lily"] });
    if (stopped.stop_reason === "stop_sequence") expect(stopped.stop_sequence).toBe("Lily");
    else expect(stopped.stop_reason).toBe("max_tokens");
  });

  it("messages.stream: message_start, content blocks, message_delta, message_stop; the final message equals the text", async () => {
    const stream = anthropic.messages.stream({ model: "stories260K", max_tokens: 12, messages: [{ role: "user", content: "Once upon a time" }], ...GREEDY });
    const types: string[] = [];
    let text = "";
    for await (const e of stream) {
      assertAnthropicEvent(e);
      types.push(e.type);
      if (e.type === "content_block_delta" && e.delta.type === "text_delta") text += e.delta.text;
    }
    const final = await stream.finalMessage();
    // The streamed message's usage is the non-streamed one's.
    const same = await anthropic.messages.create({ model: "stories260K", max_tokens: 12, messages: [{ role: "user", content: "Once upon a time" }], ...GREEDY });
    assertAnthropic("Message", same);
    expect(final.usage.input_tokens + (final.usage.cache_read_input_tokens ?? 0)).toBe(same.usage.input_tokens + (same.usage.cache_read_input_tokens ?? 0));
    expect(final.content).toEqual(same.content);
    expect(final.content[0]).toMatchObject({ type: "text", text });
    expect(types[0]).toBe("message_start");
    expect(types.slice(-2)).toEqual(["message_delta", "message_stop"]);
    expect(final.stop_reason).toBe("max_tokens");
    // The SDK drops pings; on the wire one follows message_start, as Anthropic sends it.
    const wire = await fetch(`${server.url}/v1/messages`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-api-key": KEY_A },
      body: JSON.stringify({ model: "stories260K", max_tokens: 3, stream: true, messages: [{ role: "user", content: "Once" }] }),
    });
    expect(wire.headers.get("content-type")).toMatch(/^text\/event-stream/);
    const events = parseAnthropicSse(await wire.text());
    events.forEach(assertAnthropicEvent);
    expect(events.slice(0, 3).map((e) => e.type)).toEqual(["message_start", "ping", "content_block_start"]);
  });

  it("tool use: tool_choice any gives a tool_use block with valid input; its tool_result goes back through the template", async () => {
    const tools = [{ name: "get_weather", description: "Weather", input_schema: { type: "object" as const, properties: { city: { type: "string", enum: ["Paris", "Rome"] } }, required: ["city"] } }];
    const m = await anthropic.messages.create({ model: "llama-2-tiny-random", max_tokens: 150, messages: [{ role: "user", content: "Weather?" }], tools, tool_choice: { type: "any" }, ...GREEDY });
    assertAnthropic("Message", m);
    expect(m.stop_reason).toBe("tool_use");
    const use = m.content.find((b) => b.type === "tool_use");
    if (!use || use.type !== "tool_use") throw new Error("no tool_use block");
    expect(["Paris", "Rome"]).toContain((use.input as { city: string }).city);
    expect(use.id).toMatch(/^toolu_/);
    const next = await anthropic.messages.create({
      model: "llama-2-tiny-random",
      max_tokens: 4,
      tools,
      messages: [
        { role: "user", content: "Weather?" },
        { role: "assistant", content: m.content },
        { role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: "21 degrees" }] },
      ],
    });
    expect(next.type).toBe("message");
    let json = "";
    for await (const e of anthropic.messages.stream({ model: "llama-2-tiny-random", max_tokens: 150, messages: [{ role: "user", content: "Weather?" }], tools, tool_choice: { type: "tool", name: "get_weather", disable_parallel_tool_use: true }, ...GREEDY })) {
      assertAnthropicEvent(e);
      if (e.type === "content_block_delta" && e.delta.type === "input_json_delta") json += e.delta.partial_json;
    }
    expect(JSON.parse(json)).toEqual(use.input);
  });

  it("output_config.format json_schema constrains the text to the schema", async () => {
    const schema = { type: "object", properties: { n: { type: "integer", minimum: 1, maximum: 9 } }, required: ["n"], additionalProperties: false };
    const m = await anthropic.messages.create({ model: "llama-2-tiny-random", max_tokens: 60, messages: [{ role: "user", content: "A number" }], output_config: { format: { type: "json_schema", schema } }, ...GREEDY });
    const text = m.content.find((b) => b.type === "text");
    if (!text || text.type !== "text") throw new Error("no text block");
    expect(new Ajv2020().validate(schema, JSON.parse(text.text))).toBe(true);
  });

  it("countTokens counts the prompt as the model reads it", async () => {
    const c = await anthropic.messages.countTokens({ model: "chat", messages: [{ role: "user", content: "Once upon a time" }] });
    const m = await anthropic.messages.create({ model: "chat", max_tokens: 1, messages: [{ role: "user", content: "Once upon a time" }] });
    expect(c.input_tokens).toBe(m.usage.input_tokens + (m.usage.cache_read_input_tokens ?? 0));
  });

  it("errors in Anthropic's shape and classes: 400, 401, 404, 429/529", async () => {
    await expect(anthropic.messages.create({ model: "stories260K", max_tokens: 0, messages: [{ role: "user", content: "x" }] })).rejects.toBeInstanceOf(Anthropic.BadRequestError);
    await expect(new Anthropic({ baseURL: server.url, apiKey: "wrong-key-00000", maxRetries: 0 }).messages.create({ model: "stories260K", max_tokens: 4, messages: [{ role: "user", content: "x" }] })).rejects.toBeInstanceOf(
      Anthropic.AuthenticationError,
    );
    await expect(anthropic.messages.create({ model: "nope", max_tokens: 4, messages: [{ role: "user", content: "x" }] })).rejects.toBeInstanceOf(Anthropic.NotFoundError);
    const raw = await fetch(`${server.url}/v1/messages`, { method: "POST", headers: { "content-type": "application/json", "x-api-key": KEY_A }, body: JSON.stringify({ model: "stories260K", messages: [] }) });
    expect(raw.status).toBe(400);
    expect(await raw.json()).toMatchObject({ type: "error", error: { type: "invalid_request_error" } });
    const image = await fetch(`${server.url}/v1/messages`, {
      method: "POST",
      headers: { "content-type": "application/json", "x-api-key": KEY_A },
      body: JSON.stringify({ model: "stories260K", max_tokens: 4, messages: [{ role: "user", content: [{ type: "image", source: { type: "base64", media_type: "image/png", data: "" } }] }] }),
    });
    expect((await image.json()).error.message).toMatch(/image input/);
  });
});

describe("Anthropic overload", () => {
  it("a full queue is 529 overloaded_error (RateLimitError-free: the SDK's InternalServerError family), per-key limits 429 RateLimitError", async () => {
    const s = await startTestServer([{ ...STORIES, ctxSize: 2048 }], { parallel: 1, maxQueue: 0, apiKeys: [KEY_A], keyMaxConcurrent: 1 });
    try {
      const a = new Anthropic({ baseURL: s.url, apiKey: KEY_A, maxRetries: 0 });
      const busy = fetch(`${s.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${KEY_A}` }, body: JSON.stringify({ model: "stories260K", prompt: "Once", max_tokens: 1500, ignore_eos: true }) });
      await waitFor(() => s.registry.resolve("stories260K").scheduler.busySlots === 1);
      await expect(a.messages.create({ model: "stories260K", max_tokens: 4, messages: [{ role: "user", content: "x" }] })).rejects.toBeInstanceOf(Anthropic.RateLimitError);
      await (await busy).arrayBuffer();
    } finally {
      await s.close();
    }
    const q = await startTestServer([{ ...STORIES, ctxSize: 2048 }], { parallel: 1, maxQueue: 0 });
    try {
      const a = new Anthropic({ baseURL: q.url, apiKey: "unused", maxRetries: 0 });
      const busy = fetch(`${q.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "stories260K", prompt: "Once", max_tokens: 1500, ignore_eos: true }) });
      await waitFor(() => q.registry.resolve("stories260K").scheduler.busySlots === 1);
      const err = await a.messages.create({ model: "stories260K", max_tokens: 4, messages: [{ role: "user", content: "x" }] }).catch((e: unknown) => e);
      expect((err as { status: number }).status).toBe(529);
      expect((err as { error: { error: { type: string } } }).error.error.type).toBe("overloaded_error");
      await (await busy).arrayBuffer();
    } finally {
      await q.close();
    }
  });
});

describe("the peers' routes and cancellation", () => {
  it("names without /v1 lead to the same routes; /health answers llama-server's body", async () => {
    const auth = { "content-type": "application/json", authorization: `Bearer ${KEY_A}` };
    for (const [path, body] of [
      ["/chat/completions", { model: "stories260K", messages: [{ role: "user", content: "Hi" }], max_tokens: 2 }],
      ["/completions", { model: "stories260K", prompt: "Hi", max_tokens: 2 }],
      ["/responses", { model: "stories260K", input: "Hi", max_output_tokens: 2 }],
      ["/embeddings", { model: "llama-2-tiny-random", input: "Hi" }],
    ] as const) {
      expect((await fetch(`${server.url}${path}`, { method: "POST", headers: auth, body: JSON.stringify(body) })).status, path).toBe(200);
    }
    expect((await (await fetch(`${server.url}/models`, { headers: auth })).json()).data.length).toBe(3);
    expect(await (await fetch(`${server.url}/health`)).json()).toEqual({ status: "ok" });
  });

  it("a deadline that passes mid-stream: Messages ends with an error event in Anthropic's envelope, Responses with response.incomplete", async () => {
    const headers = { "content-type": "application/json", authorization: `Bearer ${KEY_A}`, "x-request-timeout": "0.25" };
    const m = await fetch(`${server.url}/v1/messages`, { method: "POST", headers, body: JSON.stringify({ model: "stories260K", max_tokens: 1900, stream: true, messages: [{ role: "user", content: "Once upon a time" }] }) });
    expect(m.status).toBe(200);
    const events = parseAnthropicSse(await m.text());
    events.forEach(assertAnthropicEvent);
    expect(events[0]!.type).toBe("message_start");
    expect(events.at(-1)).toMatchObject({ type: "error", error: { type: "timeout_error" } });
    const r = await fetch(`${server.url}/v1/responses`, { method: "POST", headers, body: JSON.stringify({ model: "stories260K", input: "Once upon a time", max_output_tokens: 1900, stream: true }) });
    const last = (await r.text()).trim().split("\n\n").at(-1)!;
    const data = JSON.parse(/^data: (.*)$/m.exec(last)![1]!);
    assertEvent("ResponseStreamEvent", data);
    expect(data.type).toBe("response.incomplete");
  });

  it("a client that leaves a Responses or Messages stream frees its slot within a few steps", async () => {
    for (const [path, body] of [
      ["/v1/responses", { model: "stories260K", input: "Once upon a time", max_output_tokens: 1800, stream: true }],
      ["/v1/messages", { model: "stories260K", max_tokens: 1800, stream: true, messages: [{ role: "user", content: "Once upon a time" }] }],
    ] as const) {
      const controller = new AbortController();
      const res = await fetch(`${server.url}${path}`, { method: "POST", headers: { "content-type": "application/json", authorization: `Bearer ${KEY_A}` }, body: JSON.stringify(body), signal: controller.signal });
      await res.body!.getReader().read();
      await waitFor(() => sched().busySlots === 1);
      controller.abort();
      await waitFor(() => sched().busySlots === 0, 5000);
    }
  });
});
