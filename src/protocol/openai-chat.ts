/**
 * OpenAI Chat Completions: the request schema (what agents, SDKs and frontends send,
 * with vLLM's and llama-server's extensions), how it becomes a generation for the model
 * that serves it, and its answers.
 */
import { randomBytes } from "node:crypto";
import { z } from "zod";
import type { TemplateMessage, TemplateToolCall } from "../engine/chat-template.js";
import { invalidRequest } from "../errors.js";
import type { GenerationPlan, PreparedPrompt, PromptModel } from "../service/generation.js";
import { prepareChat } from "./chat-prompt.js";
import { LIMITS, parseBody, refuseMediaParts, samplingFields, stopList } from "./openai-common.js";
import { ChunkStream, JsonAnswer, type AnswerShape, type StreamTransport } from "./openai-output.js";
import { outputGrammar, structuredOutputFields } from "./structured-output.js";
import { refuseOtherTools, toolChoiceField, toolsField } from "./openai-tools.js";

const nullish = <T extends z.ZodType>(t: T) => t.nullable().optional();

/** Content parts other than text, named when refused (until a model that reads them is served). */
const MEDIA_PARTS: Record<string, string> = {
  image_url: "image input",
  input_image: "image input",
  input_audio: "audio input",
  file: "file input",
  video_url: "video input",
};

const textPart = z.strictObject({ type: z.literal("text"), text: z.string() });
const part = z.custom<z.infer<typeof textPart>>((v) => textPart.safeParse(v).success, "expected a text part {type: \"text\", text}");
const content = z.union([z.string(), z.array(part).min(1)]);

const toolCall = z.strictObject({
  id: z.string().min(1).max(256),
  type: z.literal("function"),
  function: z.strictObject({ name: z.string().min(1).max(256), arguments: z.string().max(1 << 20) }),
});

const message = z.discriminatedUnion("role", [
  z.strictObject({ role: z.literal("system"), content, name: nullish(z.string().max(256)) }),
  z.strictObject({ role: z.literal("developer"), content, name: nullish(z.string().max(256)) }),
  z.strictObject({ role: z.literal("user"), content, name: nullish(z.string().max(256)) }),
  z.strictObject({
    role: z.literal("assistant"),
    content: nullish(content),
    name: nullish(z.string().max(256)),
    refusal: nullish(z.string()),
    tool_calls: nullish(z.array(toolCall).max(LIMITS.maxTools)),
    // What reasoning models thought (llama-server's and vLLM's field): passed to the template.
    reasoning_content: nullish(z.string()),
  }),
  z.strictObject({ role: z.literal("tool"), content, tool_call_id: z.string().min(1).max(256) }),
]);

export const chatRequestSchema = z.strictObject({
  ...samplingFields,
  ...structuredOutputFields,
  messages: z.array(message).min(1, "must contain at least one message").max(LIMITS.maxMessages),
  max_tokens: nullish(z.number().int().min(1)),
  max_completion_tokens: nullish(z.number().int().min(1)),
  tools: toolsField,
  tool_choice: toolChoiceField,
  parallel_tool_calls: nullish(z.boolean()),
  logprobs: nullish(z.boolean()),
  top_logprobs: nullish(z.number().int().min(0).max(20)),
  // Accepted at the values that mean what this server does; nothing is stored.
  store: nullish(z.boolean()),
  metadata: nullish(z.record(z.string().max(64), z.string().max(512))),
  modalities: nullish(z.array(z.literal("text", { message: "only text output is supported" })).max(1)),
  service_tier: nullish(z.enum(["auto", "default"], { message: "only 'auto' and 'default' are served here" })),
  stream_options: nullish(z.strictObject({ include_usage: nullish(z.boolean()), include_obfuscation: nullish(z.boolean()) })),
  reasoning_effort: nullish(z.enum(["minimal", "low", "medium", "high"])),
  chat_template_kwargs: nullish(z.record(z.string().max(128), z.unknown())),
});

export type ChatRequest = z.infer<typeof chatRequestSchema>;

function text(c: string | ReadonlyArray<{ text: string }> | null | undefined): string {
  if (c === null || c === undefined) return "";
  return typeof c === "string" ? c : c.map((p) => p.text).join("");
}

/** Messages as templates take them: developer is system, tool calls' arguments are objects. */
export function toTemplateMessages(req: Pick<ChatRequest, "messages">): TemplateMessage[] {
  return req.messages.map((m, i) => {
    if (m.role === "tool") return { role: "tool", content: text(m.content), tool_call_id: m.tool_call_id };
    const out: TemplateMessage = { role: m.role === "developer" ? "system" : m.role, content: text(m.content) };
    if (m.name) out.name = m.name;
    if (m.role === "assistant") {
      if (m.reasoning_content) out.reasoning_content = m.reasoning_content;
      if (m.tool_calls?.length) {
        out.tool_calls = m.tool_calls.map((c, j): TemplateToolCall => {
          let args: unknown;
          try {
            args = JSON.parse(c.function.arguments);
          } catch {
            throw invalidRequest(`Invalid value for 'messages[${i}].tool_calls[${j}].function.arguments': not valid JSON.`, `messages[${i}].tool_calls[${j}].function.arguments`, "invalid_value");
          }
          return { id: c.id, type: "function", function: { name: c.function.name, arguments: args } };
        });
      }
    }
    return out;
  });
}

function refuseMedia(raw: unknown): void {
  refuseMediaParts((raw as { messages?: unknown })?.messages, MEDIA_PARTS, (i, j) => `messages[${i}].content[${j}]`);
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
    const kwargs: Record<string, unknown> = { ...body.chat_template_kwargs };
    if (body.reasoning_effort) kwargs.reasoning_effort ??= body.reasoning_effort;
    return prepareChat(model, {
      messages: toTemplateMessages(body),
      tools: body.tools,
      toolChoice: body.tool_choice,
      parallelToolCalls: body.parallel_tool_calls ?? true,
      grammar: outputGrammar(body),
      sampling: body,
      // The newer `max_completion_tokens` wins over `max_tokens`.
      maxTokens: { value: body.max_completion_tokens ?? body.max_tokens ?? undefined, param: body.max_completion_tokens != null ? "max_completion_tokens" : "max_tokens" },
      stop: stopList(body.stop),
      kwargs,
      logprobs: body.logprobs ? (body.top_logprobs ?? 0) : undefined,
      choices: body.n ?? 1,
      minTokens: body.min_tokens ?? undefined,
      stopTokenIds: body.stop_token_ids ? new Set(body.stop_token_ids) : undefined,
      includeStopString: body.include_stop_str_in_output ?? undefined,
      params: { messages: "messages", tools: "tools", toolChoice: "tool_choice" },
    });
  }

  jsonAnswer(): JsonAnswer {
    return new JsonAnswer(this, this.body.logprobs === true);
  }

  streamAnswer(transport: StreamTransport): ChunkStream {
    return new ChunkStream(this, transport, this.body.stream_options?.include_usage === true, this.body.logprobs === true);
  }
}

export function parseChat(raw: unknown): ChatPlan {
  refuseMedia(raw);
  refuseOtherTools((raw as { tools?: unknown })?.tools, "tools");
  const body = parseBody(chatRequestSchema, raw);
  if (body.top_logprobs != null && body.top_logprobs > 0 && body.logprobs !== true) {
    throw invalidRequest("'top_logprobs' needs 'logprobs': true.", "top_logprobs", "invalid_value");
  }
  return new ChatPlan(body);
}
