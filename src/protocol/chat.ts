import { z } from "zod";
import type { ChatMessage } from "../engine/llama-engine.js";
import { LIMITS, samplingFields } from "./common.js";

const textPart = z.strictObject({ type: z.literal("text"), text: z.string() });
const content = z.union([z.string(), z.array(textPart).min(1)]);

const message = z.discriminatedUnion("role", [
  z.strictObject({ role: z.literal("system"), content, name: z.string().optional() }),
  z.strictObject({ role: z.literal("developer"), content, name: z.string().optional() }),
  z.strictObject({ role: z.literal("user"), content, name: z.string().optional() }),
  z.strictObject({
    role: z.literal("assistant"),
    content,
    name: z.string().optional(),
    refusal: z.null().optional(),
  }),
]);

export const chatRequestSchema = z.strictObject({
  ...samplingFields,
  messages: z.array(message).min(1, "must contain at least one message").max(LIMITS.maxMessages),
  max_completion_tokens: samplingFields.max_tokens,
  logprobs: z.literal(false).nullable().optional(),
  // `store` and `metadata` are accepted because they never change the output; nothing is stored.
  store: z.literal(false).nullable().optional(),
});

export type ChatRequest = z.infer<typeof chatRequestSchema>;

export function toChatMessages(req: ChatRequest): ChatMessage[] {
  return req.messages.map((m) => ({
    // The developer role is the newer name for system.
    role: m.role === "developer" ? "system" : m.role,
    content: typeof m.content === "string" ? m.content : m.content.map((p) => p.text).join(""),
  }));
}

/** The newer `max_completion_tokens` wins over `max_tokens`. */
export function requestedMaxTokens(req: ChatRequest): number | undefined {
  return req.max_completion_tokens ?? req.max_tokens ?? undefined;
}
