/** OpenAI Chat Completions: the request schema, how it becomes a generation, and its answers. */
import { randomBytes } from "node:crypto";
import { z } from "zod";
import type { ChatMessage } from "../engine/types.js";
import { PromptRenderError } from "../engine/types.js";
import { ApiError } from "../errors.js";
import type { GenerationPlan, PreparedPrompt, PromptModel } from "../service/generation.js";
import { refuseSurelyTooLong, resolveMaxTokens, samplingParams } from "../service/sampling.js";
import { LIMITS, parseBody, samplingFields, stopList } from "./openai-common.js";
import { ChunkStream, JsonAnswer, type AnswerShape, type StreamTransport } from "./openai-output.js";

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

/** A validated chat request: what the service runs, and the answers it is given back as. */
export class ChatPlan implements GenerationPlan, AnswerShape {
  readonly kind = "chat" as const;
  readonly id = `chatcmpl-${randomBytes(12).toString("hex")}`;

  constructor(readonly body: ChatRequest) {}

  get model(): string {
    return this.body.model;
  }

  get user(): string | undefined {
    return this.body.user ?? undefined;
  }

  get stream(): boolean {
    return this.body.stream === true;
  }

  echo(): string {
    return "";
  }

  prepare(model: PromptModel): PreparedPrompt {
    const body = this.body;
    const messages = toChatMessages(body);
    let chars = 0;
    for (const m of messages) chars += m.content.length;
    refuseSurelyTooLong(chars, model, "messages");
    let rendered;
    try {
      rendered = model.renderChat(messages);
    } catch (err) {
      if (err instanceof PromptRenderError) throw new ApiError("invalid_request", err.message, { param: "messages", code: "invalid_messages" });
      throw err;
    }
    const maxParam = body.max_completion_tokens != null ? "max_completion_tokens" : "max_tokens";
    // The newer `max_completion_tokens` wins over `max_tokens`.
    const requested = body.max_completion_tokens ?? body.max_tokens ?? undefined;
    return {
      promptTokens: rendered.tokens,
      maxTokens: resolveMaxTokens(rendered.tokens.length, requested, model.sampling.max_tokens, model.ctxSize, { prompt: "messages", maxTokens: maxParam }),
      stop: [...stopList(body.stop), ...rendered.stopStrings],
      sampling: samplingParams(body, model),
    };
  }

  jsonAnswer(): JsonAnswer {
    return new JsonAnswer(this);
  }

  streamAnswer(transport: StreamTransport): ChunkStream {
    return new ChunkStream(this, transport, this.body.stream_options?.include_usage === true);
  }
}

export function parseChat(raw: unknown): ChatPlan {
  return new ChatPlan(parseBody(chatRequestSchema, raw));
}
