/**
 * Anthropic's Messages shapes as JSON Schemas, written from @anthropic-ai/sdk's types
 * (resources/messages/messages.d.ts): the Message, and each stream event. Anthropic
 * publishes no OpenAPI file; these are strict (no unknown fields) so drift shows.
 */
import { Ajv2020, type ValidateFunction } from "ajv/dist/2020.js";

const int = { type: "integer", minimum: 0 };
const nullableInt = { type: ["integer", "null"], minimum: 0 };
const usage = {
  type: "object",
  required: ["input_tokens", "output_tokens"],
  properties: { input_tokens: int, output_tokens: int, cache_creation_input_tokens: nullableInt, cache_read_input_tokens: nullableInt, service_tier: { type: ["string", "null"] } },
  additionalProperties: false,
};
const blocks = {
  text: { type: "object", required: ["type", "text"], properties: { type: { const: "text" }, text: { type: "string" }, citations: { type: ["array", "null"] } }, additionalProperties: false },
  thinking: { type: "object", required: ["type", "thinking", "signature"], properties: { type: { const: "thinking" }, thinking: { type: "string" }, signature: { type: "string" } }, additionalProperties: false },
  tool_use: {
    type: "object",
    required: ["type", "id", "name", "input"],
    properties: { type: { const: "tool_use" }, id: { type: "string", pattern: "^toolu_" }, name: { type: "string", minLength: 1 }, input: { type: "object" } },
    additionalProperties: false,
  },
};
const block = { oneOf: Object.values(blocks) };
const stopReason = { enum: ["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal"] };
const message = (final: boolean) => ({
  type: "object",
  required: ["id", "type", "role", "content", "model", "stop_reason", "stop_sequence", "usage"],
  properties: {
    id: { type: "string", pattern: "^msg_" },
    type: { const: "message" },
    role: { const: "assistant" },
    content: { type: "array", items: block },
    model: { type: "string" },
    stop_reason: final ? stopReason : { anyOf: [stopReason, { type: "null" }] },
    stop_sequence: { type: ["string", "null"] },
    stop_details: { type: ["object", "null"] },
    container: { type: ["object", "null"] },
    usage,
  },
  additionalProperties: false,
});
const event = (type: string, properties: Record<string, unknown> = {}) => ({
  type: "object",
  required: ["type", ...Object.keys(properties)],
  properties: { type: { const: type }, ...properties },
  additionalProperties: false,
});
const SCHEMAS: Record<string, object> = {
  Message: message(true),
  message_start: event("message_start", { message: message(false) }),
  ping: event("ping"),
  content_block_start: event("content_block_start", { index: int, content_block: block }),
  content_block_delta: event("content_block_delta", {
    index: int,
    delta: {
      oneOf: [
        event("text_delta", { text: { type: "string" } }),
        event("input_json_delta", { partial_json: { type: "string" } }),
        event("thinking_delta", { thinking: { type: "string" } }),
        event("signature_delta", { signature: { type: "string" } }),
      ],
    },
  }),
  content_block_stop: event("content_block_stop", { index: int }),
  message_delta: event("message_delta", {
    delta: { type: "object", required: ["stop_reason", "stop_sequence"], properties: { stop_reason: stopReason, stop_sequence: { type: ["string", "null"] } }, additionalProperties: false },
    usage,
  }),
  message_stop: event("message_stop"),
  error: event("error", { error: { type: "object", required: ["type", "message"], properties: { type: { type: "string" }, message: { type: "string" } }, additionalProperties: false } }),
};

const ajv = new Ajv2020({ strict: false, allErrors: true });
const compiled = new Map<string, ValidateFunction>();

/** Throws unless `value` is the named shape: "Message", or an event's type. */
export function assertAnthropic(name: string, value: unknown): void {
  let v = compiled.get(name);
  if (!v) {
    const schema = SCHEMAS[name];
    if (!schema) throw new Error(`no Anthropic schema for ${name}`);
    compiled.set(name, (v = ajv.compile(schema)));
  }
  if (!v(value)) throw new Error(`not an Anthropic ${name}: ${JSON.stringify(v.errors?.slice(0, 5))}\n${JSON.stringify(value).slice(0, 500)}`);
}

/** An event from a stream: checked against its own type's schema. */
export function assertAnthropicEvent(e: { type: string }): void {
  assertAnthropic(e.type, e);
}

/** The events of an SSE body, each `event:` name checked against its data's type. */
export function parseAnthropicSse(text: string): Array<{ type: string } & Record<string, unknown>> {
  return text
    .split("\n\n")
    .filter((chunk) => chunk.trim() !== "")
    .map((chunk) => {
      const name = /^event: (.+)$/m.exec(chunk)?.[1];
      const data = JSON.parse(/^data: (.*)$/m.exec(chunk)![1]!) as { type: string } & Record<string, unknown>;
      if (name !== data.type) throw new Error(`event ${name} carries data of type ${data.type}`);
      return data;
    });
}
