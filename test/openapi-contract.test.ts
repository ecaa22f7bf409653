import { describe, expect, it } from "vitest";
import { schemaValidator } from "./helpers/openapi.js";

// The validator itself must reject what is wrong, or every schema check passes vacuously.
describe("the OpenAPI validator", () => {
  const chunk = {
    id: "x",
    object: "chat.completion.chunk",
    created: 1,
    model: "m",
    choices: [{ index: 0, delta: { content: "a" }, logprobs: null, finish_reason: null }],
  };
  it("accepts a valid chunk, including a null finish_reason", () => {
    expect(schemaValidator("CreateChatCompletionStreamResponse")(chunk)).toBe(true);
  });
  it("rejects a bad finish_reason and a wrong object type", () => {
    const v = schemaValidator("CreateChatCompletionStreamResponse");
    expect(v({ ...chunk, choices: [{ ...chunk.choices[0], finish_reason: "done" }] })).toBe(false);
    expect(v({ ...chunk, object: "chat.completion" })).toBe(false);
  });
  it("rejects an error envelope without a message", () => {
    expect(schemaValidator("ErrorResponse")({ error: { message: "m", type: "t", param: null, code: null } })).toBe(true);
    expect(schemaValidator("ErrorResponse")({ error: { type: "t", param: null, code: null } })).toBe(false);
  });
});
