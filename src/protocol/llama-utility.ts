/**
 * llama-server's and vLLM's utility routes, which let users see what a model receives:
 * POST /apply-template (messages in, prompt out), /tokenize and /detokenize. Both
 * servers' field names are accepted and both are answered.
 */
import { z } from "zod";
import { invalidRequest } from "../errors.js";
import { LIMITS, parseBody } from "./openai-common.js";
import { chatRequestSchema, toTemplateMessages } from "./openai-chat.js";
import { refuseOtherTools, toolsField } from "./openai-tools.js";

const nullish = <T extends z.ZodType>(t: T) => t.nullable().optional();

export const applyTemplateSchema = z.strictObject({
  model: nullish(z.string().min(1)),
  messages: chatRequestSchema.shape.messages,
  tools: toolsField,
  chat_template_kwargs: nullish(z.record(z.string().max(128), z.unknown())),
});

export const tokenizeSchema = z.strictObject({
  model: nullish(z.string().min(1)),
  /** llama-server's field… */
  content: nullish(z.string()),
  /** …and vLLM's. */
  prompt: nullish(z.string()),
  /** vLLM: a chat, rendered with the template first. */
  messages: nullish(chatRequestSchema.shape.messages),
  add_special: nullish(z.boolean()),
  add_special_tokens: nullish(z.boolean()),
  with_pieces: nullish(z.boolean()),
  add_generation_prompt: nullish(z.boolean()),
});

export const detokenizeSchema = z.strictObject({
  model: nullish(z.string().min(1)),
  tokens: z.array(z.number().int().min(0)).max(1 << 20),
});

export function parseApplyTemplate(raw: unknown) {
  refuseOtherTools((raw as { tools?: unknown })?.tools, "tools");
  const body = parseBody(applyTemplateSchema, raw);
  const tools = body.tools?.map((t) => ({ type: "function" as const, function: { ...t.function, description: t.function.description ?? undefined, strict: t.function.strict ?? undefined } }));
  return { model: body.model ?? undefined, input: { messages: toTemplateMessages(body), tools, kwargs: body.chat_template_kwargs ?? undefined } };
}

export function parseTokenize(raw: unknown) {
  const body = parseBody(tokenizeSchema, raw);
  const sources = [body.content != null, body.prompt != null, body.messages != null].filter(Boolean).length;
  if (sources !== 1) throw invalidRequest("Send exactly one of 'content', 'prompt' or 'messages'.", "content", "invalid_value");
  if (body.content != null && body.content.length > LIMITS.maxStopLength * 8192) throw invalidRequest("'content' is too long.", "content", "invalid_value");
  return {
    model: body.model ?? undefined,
    text: body.content ?? body.prompt ?? undefined,
    messages: body.messages ? toTemplateMessages({ messages: body.messages }) : undefined,
    // llama-server adds BOS unless told not to; so does vLLM (add_special_tokens).
    addSpecial: body.add_special ?? body.add_special_tokens ?? true,
    withPieces: body.with_pieces === true,
  };
}

export function parseDetokenize(raw: unknown) {
  const body = parseBody(detokenizeSchema, raw);
  return { model: body.model ?? undefined, tokens: body.tokens };
}
