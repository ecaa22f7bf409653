/**
 * Property-based attacks (fast-check) on every endpoint, through the real server and
 * engine: whatever the body, the answer is a well-formed response or a 4xx envelope,
 * never a 5xx, never a crash, and a normal request is served afterwards.
 */
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import WebSocket from "ws";
import type { RunningServer } from "../src/server.js";
import { schemaValidator } from "./helpers/openapi.js";
import { startTestServer, STORIES, STORIES_CHAT, TINY_RANDOM } from "./helpers/server.js";

let server: RunningServer;
let cases = 0;
const statuses = new Map<number, number>();
beforeAll(async () => {
  server = await startTestServer([STORIES, STORIES_CHAT, { ...TINY_RANDOM, embeddings: true }], { parallel: 4, maxBodyBytes: 256 * 1024 });
});
afterAll(async () => {
  console.log(`fuzz: ${cases} cases run; HTTP statuses ${JSON.stringify(Object.fromEntries(statuses))}`);
  // Enough of the generated bodies were valid to exercise the engine, not only the validator.
  expect(statuses.get(200) ?? 0).toBeGreaterThan(20);
  await server?.close();
});

const hostileString = fc.oneof(
  fc.string(),
  fc.string({ unit: "grapheme", maxLength: 50 }),
  fc.constantFrom("", "\u0000", "\ud800", "\udfff\ud800", "</s>", "<s>", "[INST]", "{{ raise_exception('x') }}", "%s%n", "\u202e", "a".repeat(70_000)),
);
const hostileNumber = fc.oneof(fc.integer(), fc.double(), fc.constantFrom(0, -0, 1e308, -1e308, 2 ** 53, 2 ** 64, -1, 0.5, 3));
const anything = fc.oneof(hostileString, hostileNumber, fc.boolean(), fc.constant(null), fc.array(fc.anything(), { maxLength: 3 }), fc.object({ maxDepth: 2 }));
const message = fc.record(
  {
    role: fc.oneof(fc.constantFrom("system", "user", "assistant", "developer", "tool", "function", ""), anything),
    content: fc.oneof(hostileString, fc.array(fc.record({ type: fc.oneof(fc.constant("text"), fc.constant("image_url"), anything), text: fc.oneof(hostileString, anything) }), { maxLength: 3 }), anything),
    name: fc.oneof(fc.string(), anything),
  },
  { requiredKeys: [] },
);
const common = {
  model: fc.oneof(fc.constantFrom("stories260K", "stories260K-chat", "nope", ""), anything),
  max_tokens: fc.oneof(fc.integer({ min: -2, max: 6 }), hostileNumber, anything),
  temperature: fc.oneof(fc.double({ min: -1, max: 3 }), anything),
  top_p: fc.oneof(fc.double({ min: -1, max: 2 }), anything),
  top_k: fc.oneof(fc.integer({ min: -1, max: 100 }), anything),
  seed: fc.oneof(hostileNumber, anything),
  stop: fc.oneof(hostileString, fc.array(hostileString, { maxLength: 20 }), anything),
  presence_penalty: fc.oneof(fc.double({ min: -3, max: 3 }), anything),
  frequency_penalty: fc.oneof(fc.double({ min: -3, max: 3 }), anything),
  logit_bias: fc.oneof(fc.dictionary(fc.oneof(fc.nat(600).map(String), fc.string()), fc.oneof(fc.double({ min: -120, max: 120 }), anything), { maxKeys: 5 }), anything),
  stream: fc.oneof(fc.boolean(), anything),
  stream_options: fc.oneof(fc.record({ include_usage: fc.oneof(fc.boolean(), anything) }), anything),
  n: fc.oneof(fc.integer({ min: 0, max: 3 }), anything),
  user: fc.oneof(fc.string(), anything),
  ignore_eos: fc.oneof(fc.boolean(), anything),
};
const hostileChatBody = fc.record({ ...common, messages: fc.oneof(fc.array(message, { maxLength: 4 }), anything), max_completion_tokens: fc.oneof(fc.integer({ min: 0, max: 6 }), anything) }, { requiredKeys: [] });
const hostileCompletionBody = fc.record({ ...common, prompt: fc.oneof(hostileString, fc.array(hostileString, { maxLength: 3 }), fc.array(fc.integer({ min: -5, max: 600 }), { maxLength: 8 }), anything), echo: fc.oneof(fc.boolean(), anything) }, { requiredKeys: [] });
/** A valid body with at most one field replaced by something hostile: most are served, some are refused. */
const validCommon = {
  max_tokens: fc.integer({ min: 1, max: 6 }),
  temperature: fc.double({ min: 0, max: 2, noNaN: true }),
  top_p: fc.double({ min: 0.01, max: 1, noNaN: true }),
  seed: fc.integer(),
  stop: fc.array(fc.string({ minLength: 1, maxLength: 5 }), { maxLength: 3 }),
  stream: fc.boolean(),
  stream_options: fc.record({ include_usage: fc.boolean() }),
  presence_penalty: fc.double({ min: -2, max: 2, noNaN: true }),
  logit_bias: fc.dictionary(fc.nat(511).map(String), fc.double({ min: -100, max: 100, noNaN: true }), { maxKeys: 3 }),
};
const nearValid = (base: fc.Arbitrary<Record<string, unknown>>) =>
  fc.tuple(base, fc.option(fc.tuple(fc.constantFrom(...Object.keys(common), "messages", "prompt"), anything), { freq: 3 })).map(([b, mutation]) => {
    if (mutation) b[mutation[0]] = mutation[1];
    return b;
  });
const chatBody = fc.oneof(
  hostileChatBody,
  nearValid(
    fc.record(
      { model: fc.constantFrom("stories260K", "stories260K-chat"), messages: fc.array(fc.record({ role: fc.constantFrom("system", "user", "assistant", "developer"), content: fc.string({ unit: "grapheme", maxLength: 40 }) }), { minLength: 1, maxLength: 4 }), ...validCommon },
      { requiredKeys: ["model", "messages"] },
    ),
  ),
);
const completionBody = fc.oneof(
  hostileCompletionBody,
  nearValid(fc.record({ model: fc.constant("stories260K"), prompt: fc.string({ unit: "grapheme", maxLength: 40 }), echo: fc.boolean(), ...validCommon }, { requiredKeys: ["model", "prompt"] })),
);
const schemaLike = fc.oneof(fc.constant({ type: "object", properties: { a: { type: "integer" } }, required: ["a"] }), fc.object({ maxDepth: 3 }), anything);
const responsesItem = fc.oneof(
  fc.record({ type: fc.oneof(fc.constant("message"), anything), role: fc.oneof(fc.constantFrom("user", "assistant", "system", "developer"), anything), content: fc.oneof(hostileString, fc.array(fc.record({ type: fc.oneof(fc.constantFrom("input_text", "output_text", "input_image"), anything), text: fc.oneof(hostileString, anything) }), { maxLength: 2 }), anything) }, { requiredKeys: [] }),
  fc.record({ type: fc.oneof(fc.constantFrom("function_call_output", "function_call", "reasoning"), anything), call_id: fc.oneof(fc.string(), anything), output: fc.oneof(hostileString, anything), name: fc.oneof(fc.string(), anything), arguments: fc.oneof(fc.string(), anything) }, { requiredKeys: [] }),
  anything,
);
const hostileTools = fc.oneof(fc.array(fc.record({ type: fc.oneof(fc.constantFrom("function", "web_search"), anything), name: fc.oneof(fc.constantFrom("f", "get_weather"), fc.string()), parameters: schemaLike, input_schema: schemaLike }, { requiredKeys: [] }), { maxLength: 2 }), anything);
const responsesBody = fc.oneof(
  fc.record(
    {
      model: common.model,
      input: fc.oneof(hostileString, fc.array(responsesItem, { maxLength: 4 }), anything),
      instructions: fc.oneof(hostileString, anything),
      tools: hostileTools,
      tool_choice: fc.oneof(fc.constantFrom("auto", "none", "required"), fc.record({ type: fc.constant("function"), name: fc.string() }), anything),
      text: fc.oneof(fc.record({ format: fc.oneof(fc.record({ type: fc.constantFrom("text", "json_object", "json_schema"), name: fc.string(), schema: schemaLike }), anything) }), anything),
      max_output_tokens: fc.oneof(fc.integer({ min: -1, max: 6 }), anything),
      temperature: common.temperature,
      stream: common.stream,
      store: fc.oneof(fc.boolean(), anything),
      previous_response_id: fc.oneof(fc.string(), anything),
      reasoning: fc.oneof(fc.record({ effort: fc.oneof(fc.constantFrom("low", "high"), anything) }), anything),
    },
    { requiredKeys: [] },
  ),
  nearValid(fc.record({ model: fc.constantFrom("stories260K", "stories260K-chat"), input: fc.string({ unit: "grapheme", maxLength: 40 }), max_output_tokens: fc.integer({ min: 1, max: 6 }), stream: fc.boolean(), temperature: fc.double({ min: 0, max: 2, noNaN: true }) }, { requiredKeys: ["model", "input"] })),
);
const anthropicBlock = fc.record(
  {
    type: fc.oneof(fc.constantFrom("text", "tool_use", "tool_result", "thinking", "image"), anything),
    text: fc.oneof(hostileString, anything),
    id: fc.oneof(fc.string(), anything),
    name: fc.oneof(fc.string(), anything),
    input: fc.oneof(fc.object({ maxDepth: 2 }), anything),
    tool_use_id: fc.oneof(fc.string(), anything),
    content: fc.oneof(hostileString, anything),
  },
  { requiredKeys: [] },
);
const messagesBody = fc.oneof(
  fc.record(
    {
      model: common.model,
      max_tokens: common.max_tokens,
      messages: fc.oneof(fc.array(fc.record({ role: fc.oneof(fc.constantFrom("user", "assistant"), anything), content: fc.oneof(hostileString, fc.array(anthropicBlock, { maxLength: 3 }), anything) }, { requiredKeys: [] }), { maxLength: 4 }), anything),
      system: fc.oneof(hostileString, fc.array(anthropicBlock, { maxLength: 2 }), anything),
      tools: hostileTools,
      tool_choice: fc.oneof(fc.record({ type: fc.constantFrom("auto", "any", "tool", "none"), name: fc.string() }, { requiredKeys: ["type"] }), anything),
      stop_sequences: fc.oneof(fc.array(hostileString, { maxLength: 3 }), anything),
      stream: common.stream,
      thinking: fc.oneof(fc.record({ type: fc.constantFrom("enabled", "disabled"), budget_tokens: fc.integer() }, { requiredKeys: ["type"] }), anything),
      temperature: common.temperature,
    },
    { requiredKeys: [] },
  ),
  nearValid(
    fc.record(
      { model: fc.constantFrom("stories260K", "stories260K-chat"), max_tokens: fc.integer({ min: 1, max: 6 }), messages: fc.array(fc.record({ role: fc.constantFrom("user", "assistant"), content: fc.string({ unit: "grapheme", maxLength: 40 }) }), { minLength: 1, maxLength: 3 }), stream: fc.boolean() },
      { requiredKeys: ["model", "max_tokens", "messages"] },
    ),
  ),
);
const embeddingsBody = fc.record(
  {
    model: fc.oneof(fc.constantFrom("llama-2-tiny-random", "stories260K"), anything),
    input: fc.oneof(hostileString, fc.array(hostileString, { maxLength: 4 }), fc.array(fc.integer({ min: -5, max: 40_000 }), { maxLength: 8 }), fc.array(fc.array(fc.integer({ min: -5, max: 600 }), { maxLength: 4 }), { maxLength: 3 }), anything),
    encoding_format: fc.oneof(fc.constantFrom("float", "base64"), anything),
    dimensions: fc.oneof(fc.integer({ min: -1, max: 100 }), anything),
    truncate_prompt_tokens: fc.oneof(fc.integer({ min: -2, max: 1000 }), anything),
  },
  { requiredKeys: [] },
);
// Near-valid bodies plus keys that should never reach an object's prototype.
const withExtras = (arb: fc.Arbitrary<Record<string, unknown>>) =>
  fc.tuple(arb, fc.dictionary(fc.oneof(fc.string(), fc.constantFrom("__proto__", "constructor", "prototype", "tools", "logprobs")), anything, { maxKeys: 2 }), fc.boolean()).map(([b, extra, addExtra]) => {
    const body: Record<string, unknown> = { ...b };
    // Keep generation short: the property is about answers, not long outputs.
    if (typeof body.max_tokens !== "number" || body.max_tokens > 6) body.max_tokens = 4;
    if (typeof body.max_output_tokens === "number" && body.max_output_tokens > 6) body.max_output_tokens = 4;
    if ("input" in body && !("max_output_tokens" in body) && !("encoding_format" in body)) body.max_output_tokens = 4;
    // A replacer function, not a string: generated text may contain "$&" or "$'", which a
    // replacement string would expand (and so turn the body into invalid JSON).
    return addExtra ? JSON.stringify(body).replace(/^\{/, () => `{${Object.entries(extra).map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v) ?? "null"},`).join("")}`) : JSON.stringify(body);
  });

async function check(path: string, body: string | Buffer, contentType = "application/json"): Promise<void> {
  cases++;
  const res = await fetch(`${server.url}${path}`, { method: "POST", headers: { "content-type": contentType }, body: typeof body === "string" ? body : new Uint8Array(body) });
  statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
  const text = await res.text();
  const anthropic = path.startsWith("/v1/messages");
  // Anthropic's overload status is 529, by its contract; everything else must stay under 500.
  expect(res.status === 529 && anthropic ? 429 : res.status, text.slice(0, 300)).toBeLessThan(500);
  if (res.status >= 400) {
    const json = JSON.parse(text);
    if (anthropic) expect(json.type === "error" && typeof json.error?.type === "string" && typeof json.error?.message === "string", text.slice(0, 300)).toBe(true);
    else expect(schemaValidator("ErrorResponse")(json), text.slice(0, 300)).toBe(true);
  } else if ((res.headers.get("content-type") ?? "").startsWith("text/event-stream")) {
    // A stream: every event is JSON (or [DONE]), and it ends as its API ends one — or with an error event.
    const events = text.split("\n\n").map((e) => /^data: (.*)$/m.exec(e)?.[1]).filter((e): e is string => e !== undefined);
    for (const e of events) if (e !== "[DONE]") JSON.parse(e);
    const last = events.at(-1)!;
    const end = last === "[DONE]" ? "[DONE]" : (JSON.parse(last) as { type?: string; error?: unknown });
    const ended =
      end === "[DONE]" ||
      end.error !== undefined ||
      ["message_stop", "response.completed", "response.incomplete", "response.failed", "error"].includes(end.type ?? "");
    expect(ended, last.slice(0, 300)).toBe(true);
  } else {
    const json = JSON.parse(text);
    if (path.endsWith("/completions")) {
      // One choice per `n` (a served request had a valid one, or none: 1); lists of prompts are refused.
      const n = typeof body === "string" ? (JSON.parse(body) as { n?: unknown }).n : undefined;
      expect(json.choices, text.slice(0, 300)).toHaveLength(typeof n === "number" && n >= 1 ? n : 1);
    }
    else if (path === "/v1/responses") expect(json.object).toBe("response");
    else if (path === "/v1/messages") expect(json.type).toBe("message");
    else if (path === "/v1/embeddings") expect(json.object).toBe("list");
  }
}

const POST_ROUTES = [
  "/v1/completions",
  "/v1/chat/completions",
  "/v1/responses",
  "/v1/responses/input_tokens",
  "/v1/messages",
  "/v1/messages/count_tokens",
  "/v1/embeddings",
  "/tokenize",
  "/detokenize",
  "/apply-template",
] as const;

describe("fuzzing the HTTP endpoints", () => {
  it("POST /v1/chat/completions", async () => {
    await fc.assert(fc.asyncProperty(withExtras(chatBody), (b) => check("/v1/chat/completions", b)), { numRuns: 300 });
  });

  it("POST /v1/completions", async () => {
    await fc.assert(fc.asyncProperty(withExtras(completionBody), (b) => check("/v1/completions", b)), { numRuns: 300 });
  });

  it("POST /v1/responses", async () => {
    await fc.assert(fc.asyncProperty(withExtras(responsesBody), (b) => check("/v1/responses", b)), { numRuns: 200 });
  });

  it("POST /v1/messages", async () => {
    await fc.assert(fc.asyncProperty(withExtras(messagesBody), (b) => check("/v1/messages", b)), { numRuns: 200 });
  });

  it("POST /v1/embeddings, and the counting and template routes with any of these bodies", async () => {
    await fc.assert(fc.asyncProperty(withExtras(embeddingsBody), (b) => check("/v1/embeddings", b)), { numRuns: 100 });
    await fc.assert(
      fc.asyncProperty(fc.oneof(withExtras(responsesBody), withExtras(messagesBody), withExtras(chatBody)), fc.constantFrom("/v1/responses/input_tokens", "/v1/messages/count_tokens", "/tokenize", "/detokenize", "/apply-template"), (b, path) => check(path, b)),
      { numRuns: 150 },
    );
  });

  it("hostile raw bodies: broken JSON, deep nesting, invalid UTF-8, prototype keys, huge and oversized strings", async () => {
    const raw: fc.Arbitrary<string | Buffer> = fc.oneof(
      fc.string() as fc.Arbitrary<string | Buffer>,
      fc.nat(20_000).map((n) => "[".repeat(n) + "]".repeat(n)),
      fc.nat(5_000).map((n) => `{"model":"stories260K","messages":${"[".repeat(n)}${"]".repeat(n)}}`),
      fc.uint8Array({ maxLength: 200 }).map((a): string | Buffer => Buffer.concat([Buffer.from('{"model":"stories260K","prompt":"'), Buffer.from(a), Buffer.from('","max_tokens":2}')])),
      fc.constantFrom(
        '{"__proto__":{"polluted":1},"model":"stories260K","prompt":"x","max_tokens":1}',
        '{"constructor":{"prototype":{"polluted":1}},"model":"stories260K","prompt":"x"}',
        '{"model":"stories260K","prompt":"x","max_tokens":1e999}',
        '{"model":"stories260K","prompt":"x","temperature":-0}',
        `{"model":"stories260K","prompt":"${"y".repeat(300 * 1024)}"}`,
        `{"model":"stories260K","prompt":"${"word ".repeat(10_000)}"}`,
      ),
    );
    await fc.assert(
      fc.asyncProperty(raw, fc.constantFrom(...POST_ROUTES), (body, path) => check(path, body)),
      { numRuns: 300 },
    );
    expect(({} as Record<string, unknown>).polluted).toBeUndefined();
  });

  it("WebSocket frames", async () => {
    const ws = new WebSocket(`${server.url.replace("http", "ws")}/v1/ws`);
    await new Promise((r) => ws.once("open", r));
    const frames: Array<{ type: string; id: string | null; error?: unknown }> = [];
    ws.on("message", (d) => frames.push(JSON.parse(String(d))));
    let n = 0;
    await fc.assert(
      fc.asyncProperty(fc.oneof(withExtras(chatBody), withExtras(completionBody)), fc.constantFrom("chat.completions.create", "completions.create", "cancel", "bogus"), async (body, type) => {
        cases++;
        const id = `f${n++}`;
        // Paced under the connection's frame limit (50/s): this is about bodies, not floods.
        await new Promise((r) => setTimeout(r, 25));
        ws.send(`{"type":${JSON.stringify(type)},"id":"${id}","body":${body}}`);
        if (type === "cancel") return;
        const end = Date.now() + 10_000;
        while (!frames.some((f) => f.id === id && (f.type === "done" || f.type === "error"))) {
          if (Date.now() > end) throw new Error(`no end for ${id}`);
          await new Promise((r) => setTimeout(r, 2));
        }
        for (const f of frames.filter((f) => f.id === id && f.type === "error")) {
          const status = (f.error as { type: string }).type;
          expect(["server_error", "model_error"]).not.toContain(status);
        }
      }),
      { numRuns: 150 },
    );
    expect(ws.readyState).toBe(WebSocket.OPEN);
    ws.close();
  });

  it("the server serves a normal request afterwards", async () => {
    const res = await fetch(`${server.url}/v1/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ model: "stories260K", prompt: "Once upon a time", max_tokens: 8, temperature: 0 }) });
    expect(res.status).toBe(200);
    expect((await res.json()).choices[0].text).toContain("there was");
  });
});
