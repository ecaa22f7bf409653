/**
 * Anthropic's Messages API (`POST /v1/messages`), as the Anthropic SDKs and Claude Code
 * speak it: system, content blocks (text, tool_use, tool_result, thinking), tools and
 * tool_choice, stop sequences; answered as a Message or as its event stream; errors in
 * Anthropic's envelope with Anthropic's statuses. The generation is a chat, prepared as
 * every chat API's is.
 */
import { randomBytes } from "node:crypto";
import { z } from "zod";
import type { TemplateMessage, TemplateToolCall } from "../engine/chat-template.js";
import { ApiError, invalidRequest, type ErrorKind } from "../errors.js";
import type { ChoiceResult, GenerationEvents, GenerationPlan, GenerationResult, PreparedPrompt, PromptModel, StartInfo, ToolCallDelta, Usage } from "../service/generation.js";
import { prepareChat } from "./chat-prompt.js";
import { LIMITS, parseBody, refuseMediaParts } from "./openai-common.js";
import type { StreamTransport } from "./openai-output.js";
import { functionTool, type ToolChoice } from "./openai-tools.js";
import { outputGrammar } from "./structured-output.js";

const nullish = <T extends z.ZodType>(t: T) => t.nullable().optional();
const cacheControl = nullish(z.strictObject({ type: z.literal("ephemeral"), ttl: nullish(z.string()) }));

const textBlock = z.strictObject({ type: z.literal("text"), text: z.string(), cache_control: cacheControl, citations: nullish(z.array(z.unknown())) });
const toolUseBlock = z.strictObject({ type: z.literal("tool_use"), id: z.string().min(1).max(256), name: z.string().min(1).max(256), input: z.record(z.string(), z.unknown()), cache_control: cacheControl });
const toolResultBlock = z.strictObject({
  type: z.literal("tool_result"),
  tool_use_id: z.string().min(1).max(256),
  content: nullish(z.union([z.string(), z.array(textBlock)])),
  is_error: nullish(z.boolean()),
  cache_control: cacheControl,
});
const thinkingBlock = z.strictObject({ type: z.literal("thinking"), thinking: z.string(), signature: nullish(z.string()) });
const block = z.discriminatedUnion("type", [textBlock, toolUseBlock, toolResultBlock, thinkingBlock]);

const MEDIA_BLOCKS: Record<string, string> = { image: "image input", document: "document input", redacted_thinking: "redacted thinking", search_result: "search results", container_upload: "container uploads" };

export const messagesRequestSchema = z.strictObject({
  model: z.string().min(1),
  max_tokens: z.number().int().min(1),
  messages: z
    .array(z.strictObject({ role: z.enum(["user", "assistant"]), content: z.union([z.string(), z.array(block).min(1)]) }))
    .min(1)
    .max(LIMITS.maxMessages),
  system: nullish(z.union([z.string(), z.array(textBlock)])),
  tools: nullish(
    z
      .array(
        z.strictObject({
          type: nullish(z.literal("custom")),
          name: z.string().regex(/^[a-zA-Z0-9_-]{1,128}$/),
          description: nullish(z.string().max(64 * 1024)),
          input_schema: z.record(z.string(), z.unknown()),
          cache_control: cacheControl,
        }),
      )
      .max(LIMITS.maxTools),
  ),
  tool_choice: nullish(
    z.discriminatedUnion("type", [
      z.strictObject({ type: z.literal("auto"), disable_parallel_tool_use: nullish(z.boolean()) }),
      z.strictObject({ type: z.literal("any"), disable_parallel_tool_use: nullish(z.boolean()) }),
      z.strictObject({ type: z.literal("tool"), name: z.string(), disable_parallel_tool_use: nullish(z.boolean()) }),
      z.strictObject({ type: z.literal("none") }),
    ]),
  ),
  stop_sequences: nullish(z.array(z.string().min(1).max(LIMITS.maxStopLength)).max(LIMITS.maxStopEntries)),
  temperature: nullish(z.number().min(0).max(1)),
  top_p: nullish(z.number().min(0).max(1)),
  top_k: nullish(z.number().int().min(0)),
  metadata: nullish(z.strictObject({ user_id: nullish(z.string().max(256)) })),
  stream: nullish(z.boolean()),
  thinking: nullish(z.discriminatedUnion("type", [z.strictObject({ type: z.literal("enabled"), budget_tokens: z.number().int().min(0) }), z.strictObject({ type: z.literal("disabled") })])),
  service_tier: nullish(z.enum(["auto", "standard_only"])),
  /** Structured output: the reply is JSON matching `format.schema`. `effort` is accepted and has no lever here. */
  output_config: nullish(
    z.strictObject({
      effort: nullish(z.enum(["low", "medium", "high", "xhigh", "max"])),
      format: nullish(z.strictObject({ type: z.literal("json_schema"), schema: z.record(z.string(), z.unknown()) })),
    }),
  ),
});

export type MessagesRequest = z.infer<typeof messagesRequestSchema>;

/** Anthropic's error types and the statuses it answers them with (529 for overload). */
const ANTHROPIC_ERRORS: Record<ErrorKind, { status: number; type: string }> = {
  invalid_request: { status: 400, type: "invalid_request_error" },
  not_found: { status: 404, type: "not_found_error" },
  payload_too_large: { status: 413, type: "request_too_large" },
  request_timeout: { status: 408, type: "invalid_request_error" },
  unsupported_media_type: { status: 415, type: "invalid_request_error" },
  conflict: { status: 409, type: "invalid_request_error" },
  unauthorized: { status: 401, type: "authentication_error" },
  forbidden: { status: 403, type: "permission_error" },
  rate_limited: { status: 429, type: "rate_limit_error" },
  overloaded: { status: 529, type: "overloaded_error" },
  unavailable: { status: 529, type: "overloaded_error" },
  timeout: { status: 504, type: "timeout_error" },
  cancelled: { status: 499, type: "api_error" },
  model_error: { status: 500, type: "api_error" },
  internal: { status: 500, type: "api_error" },
};

export function anthropicError(e: ApiError): { status: number; body: { type: "error"; error: { type: string; message: string } } } {
  const m = ANTHROPIC_ERRORS[e.kind];
  return { status: m.status, body: { type: "error", error: { type: m.type, message: e.message } } };
}

const blocksText = (c: string | ReadonlyArray<{ text: string }> | null | undefined) => (c == null ? "" : typeof c === "string" ? c : c.map((b) => b.text).join(""));

/** Messages as templates take them: tool results become tool messages, tool_use blocks calls. */
export function toMessages(body: Pick<MessagesRequest, "system" | "messages">): TemplateMessage[] {
  const out: TemplateMessage[] = [];
  if (body.system) out.push({ role: "system", content: blocksText(body.system) });
  for (const m of body.messages) {
    if (typeof m.content === "string") {
      out.push({ role: m.role, content: m.content });
      continue;
    }
    if (m.role === "user") {
      // Tool results answer the calls of the turn before: they come first.
      for (const b of m.content) if (b.type === "tool_result") out.push({ role: "tool", tool_call_id: b.tool_use_id, content: `${b.is_error ? "Error: " : ""}${blocksText(b.content)}` });
      const text = m.content.filter((b) => b.type === "text").map((b) => (b as { text: string }).text).join("");
      if (text !== "" || !m.content.some((b) => b.type === "tool_result")) out.push({ role: "user", content: text });
      continue;
    }
    const calls: TemplateToolCall[] = m.content.filter((b) => b.type === "tool_use").map((b) => {
      const u = b as z.infer<typeof toolUseBlock>;
      return { id: u.id, type: "function", function: { name: u.name, arguments: u.input } };
    });
    const thinking = m.content.filter((b) => b.type === "thinking").map((b) => (b as { thinking: string }).thinking).join("");
    out.push({
      role: "assistant",
      content: m.content.filter((b) => b.type === "text").map((b) => (b as { text: string }).text).join(""),
      ...(calls.length > 0 ? { tool_calls: calls } : {}),
      ...(thinking !== "" ? { reasoning_content: thinking } : {}),
    });
  }
  return out;
}

function refuseMedia(raw: unknown): void {
  refuseMediaParts((raw as { messages?: unknown })?.messages, MEDIA_BLOCKS, (i, j) => `messages.${i}.content.${j}`, "blocks");
}

export function toolChoiceOf(c: MessagesRequest["tool_choice"]): { choice: ToolChoice | undefined; parallel: boolean } {
  if (!c) return { choice: undefined, parallel: true };
  const parallel = c.type === "none" ? true : c.disable_parallel_tool_use !== true;
  if (c.type === "auto") return { choice: "auto", parallel };
  if (c.type === "any") return { choice: "required", parallel };
  if (c.type === "none") return { choice: "none", parallel };
  return { choice: { type: "function", function: { name: c.name } }, parallel };
}

export class MessagesPlan implements GenerationPlan {
  readonly id = `msg_${randomBytes(16).toString("hex")}`;

  constructor(readonly body: MessagesRequest) {}

  get model(): string {
    return this.body.model;
  }

  get user(): string | undefined {
    return this.body.metadata?.user_id ?? undefined;
  }

  get stream(): boolean {
    return this.body.stream === true;
  }

  prepare(model: PromptModel): PreparedPrompt {
    const b = this.body;
    const { choice, parallel } = toolChoiceOf(b.tool_choice);
    const kwargs: Record<string, unknown> = {};
    if (b.thinking) kwargs.enable_thinking = b.thinking.type === "enabled";
    return prepareChat(model, {
      messages: toMessages(b),
      tools: b.tools?.map((t) => functionTool.parse({ type: "function", function: { name: t.name, description: t.description ?? undefined, parameters: t.input_schema } })),
      toolChoice: choice,
      parallelToolCalls: parallel,
      grammar: b.output_config?.format ? outputGrammar({ response_format: { type: "json_schema", json_schema: { schema: b.output_config.format.schema } } }) : undefined,
      sampling: { temperature: b.temperature, top_p: b.top_p, top_k: b.top_k },
      maxTokens: { value: b.max_tokens, param: "max_tokens" },
      stop: b.stop_sequences ?? [],
      kwargs,
      params: { messages: "messages", tools: "tools", toolChoice: "tool_choice" },
    });
  }
}

export function parseMessages(raw: unknown): MessagesPlan {
  refuseMedia(raw);
  return new MessagesPlan(parseBody(messagesRequestSchema, raw));
}

type Block = { type: "text"; text: string } | { type: "thinking"; thinking: string; signature: string } | { type: "tool_use"; id: string; name: string; input: unknown; json: string };

const STOP_REASONS = { stop: "end_turn", length: "max_tokens", tool_calls: "tool_use" } as const;

/** The Message as it forms, block by block; the stream reports each change as Anthropic's events. */
class MessageBuilder implements GenerationEvents {
  readonly blocks: Block[] = [];
  private open: number | undefined;
  private readonly toolBlocks = new Map<number, number>();
  private start: StartInfo | undefined;
  usage: Usage | undefined;
  result: ChoiceResult | undefined;

  constructor(
    readonly plan: MessagesPlan,
    private readonly emit: ((type: string, data: Record<string, unknown>) => void) | undefined,
  ) {}

  get headers(): Record<string, string> {
    return this.start?.headers ?? {};
  }

  get model(): string {
    return this.start?.model ?? this.plan.model;
  }

  protected event(type: string, data: Record<string, unknown>): void {
    this.emit?.(type, { type, ...data });
  }

  onStart(info: StartInfo): void {
    this.start = info;
    this.event("message_start", {
      message: { id: this.plan.id, type: "message", role: "assistant", content: [], model: info.model, stop_reason: null, stop_sequence: null, stop_details: null, container: null, usage: { input_tokens: info.promptTokens, output_tokens: 0, cache_creation_input_tokens: 0, cache_read_input_tokens: 0 } },
    });
    this.event("ping", {});
  }

  private close(): void {
    if (this.open === undefined) return;
    this.event("content_block_stop", { index: this.open });
    this.open = undefined;
  }

  private begin(b: Block): number {
    this.close();
    const index = this.blocks.push(b) - 1;
    const shown = b.type === "tool_use" ? { type: "tool_use", id: b.id, name: b.name, input: {} } : b.type === "thinking" ? { type: "thinking", thinking: "", signature: "" } : { type: "text", text: "" };
    this.event("content_block_start", { index, content_block: shown });
    this.open = index;
    return index;
  }

  onReasoning(text: string): void {
    let i = this.open;
    if (i === undefined || this.blocks[i]!.type !== "thinking") i = this.begin({ type: "thinking", thinking: "", signature: "" });
    (this.blocks[i] as { thinking: string }).thinking += text;
    this.event("content_block_delta", { index: i, delta: { type: "thinking_delta", thinking: text } });
  }

  onText(text: string): void {
    if (text === "") return;
    let i = this.open;
    if (i === undefined || this.blocks[i]!.type !== "text") i = this.begin({ type: "text", text: "" });
    (this.blocks[i] as { text: string }).text += text;
    this.event("content_block_delta", { index: i, delta: { type: "text_delta", text } });
  }

  onToolCall(d: ToolCallDelta): void {
    if (d.id !== undefined) {
      const id = `toolu_${d.id.replace(/^call_/, "")}`;
      this.toolBlocks.set(d.index, this.begin({ type: "tool_use", id, name: d.name ?? "", input: {}, json: "" }));
    }
    const i = this.toolBlocks.get(d.index)!;
    if (d.arguments === "") return;
    (this.blocks[i] as { json: string }).json += d.arguments;
    this.event("content_block_delta", { index: i, delta: { type: "input_json_delta", partial_json: d.arguments } });
  }

  onChoiceDone(r: ChoiceResult): void {
    this.result = r;
  }

  /** The stop sequence, when one of the request's own ended the message. */
  private stopSequence(): string | null {
    const s = this.result?.stopString;
    return s !== undefined && (this.plan.body.stop_sequences ?? []).includes(s) ? s : null;
  }

  private stopReason(): string {
    return this.stopSequence() !== null ? "stop_sequence" : STOP_REASONS[this.result?.finishReason ?? "stop"];
  }

  onDone(result: GenerationResult): void {
    this.usage = result.usage;
    this.close();
    // The final usage, as Anthropic's message_delta carries it: cache reads are known only now.
    this.event("message_delta", { delta: { stop_reason: this.stopReason(), stop_sequence: this.stopSequence() }, usage: this.anthropicUsage() });
    this.event("message_stop", {});
  }

  onError(_error: ApiError): void {}

  private anthropicUsage() {
    const u = this.usage!;
    return { input_tokens: u.promptTokens - u.cachedTokens, output_tokens: u.completionTokens, cache_read_input_tokens: u.cachedTokens, cache_creation_input_tokens: 0 };
  }

  message() {
    return {
      id: this.plan.id,
      type: "message",
      role: "assistant",
      model: this.model,
      content: this.blocks.map((b) => {
        if (b.type !== "tool_use") return b;
        let input: unknown = {};
        try {
          input = JSON.parse(b.json);
        } catch {
          /* a call cut short by max_tokens: its input is what could be read */
        }
        return { type: "tool_use", id: b.id, name: b.name, input };
      }),
      stop_reason: this.stopReason(),
      stop_sequence: this.stopSequence(),
      stop_details: null,
      container: null,
      usage: this.anthropicUsage(),
    };
  }
}

export class MessagesJson extends MessageBuilder {
  constructor(plan: MessagesPlan) {
    super(plan, undefined);
  }
}

/** The message as Anthropic's event stream: `event:` and `data:`; an error as an `error` event. */
export class MessagesStream extends MessageBuilder {
  constructor(plan: MessagesPlan, private readonly transport: StreamTransport) {
    super(plan, (type, data) => transport.send(JSON.stringify(data), type));
  }

  override onStart(info: StartInfo): void {
    this.transport.open(info.headers);
    super.onStart(info);
  }

  override onDone(result: GenerationResult): void {
    super.onDone(result);
    this.transport.close();
  }

  override onError(error: ApiError): void {
    this.transport.fail(error, { json: JSON.stringify(anthropicError(error).body), event: "error" });
  }
}

/** POST /v1/messages/count_tokens: a Messages request without max_tokens, counted as the model reads it. */
export function parseCountTokens(raw: unknown) {
  refuseMedia(raw);
  const body = parseBody(messagesRequestSchema.partial({ max_tokens: true }), raw);
  return {
    model: body.model,
    messages: toMessages(body),
    tools: body.tools?.map((t) => ({ type: "function" as const, function: { name: t.name, description: t.description ?? undefined, parameters: t.input_schema } })),
  };
}
