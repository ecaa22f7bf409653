/**
 * OpenAI's Responses API (`POST /v1/responses`): input items (messages, function calls
 * and their outputs), instructions, function tools, text formats, previous_response_id;
 * answered as one Response object or as its typed event stream with sequence numbers.
 * The generation itself is a chat, prepared as every chat API's is (chat-prompt.ts).
 */
import { randomBytes } from "node:crypto";
import { z } from "zod";
import type { TemplateMessage, TemplateToolCall } from "../engine/chat-template.js";
import { ApiError, invalidRequest } from "../errors.js";
import type { ChoiceResult, GenerationEvents, GenerationPlan, GenerationResult, PreparedPrompt, PromptModel, StartInfo, TokenLogprob, ToolCallDelta, Usage } from "../service/generation.js";
import type { StoredResponse } from "../service/response-store.js";
import { prepareChat } from "./chat-prompt.js";
import { LIMITS, parseBody, refuseMediaParts, samplingFields } from "./openai-common.js";
import type { StreamTransport } from "./openai-output.js";
import { functionTool, type ToolChoice } from "./openai-tools.js";
import { outputGrammar } from "./structured-output.js";

const nullish = <T extends z.ZodType>(t: T) => t.nullable().optional();
const rid = (prefix: string) => `${prefix}_${randomBytes(16).toString("hex")}`;

const inputText = z.strictObject({ type: z.literal("input_text"), text: z.string() });
const outputText = z.strictObject({ type: z.literal("output_text"), text: z.string(), annotations: nullish(z.array(z.unknown())), logprobs: nullish(z.array(z.unknown())) });
const MEDIA: Record<string, string> = { input_image: "image input", input_file: "file input", input_audio: "audio input" };

const messageItem = z.strictObject({
  type: z.literal("message").optional(),
  id: nullish(z.string()),
  status: nullish(z.string()),
  role: z.enum(["user", "assistant", "system", "developer"]),
  content: z.union([z.string(), z.array(z.union([inputText, outputText])).max(LIMITS.maxMessages)]),
});
const functionCallItem = z.strictObject({
  type: z.literal("function_call"),
  id: nullish(z.string()),
  call_id: z.string().min(1).max(256),
  name: z.string().min(1).max(256),
  arguments: z.string().max(1 << 20),
  status: nullish(z.string()),
});
const functionCallOutputItem = z.strictObject({
  type: z.literal("function_call_output"),
  id: nullish(z.string()),
  call_id: z.string().min(1).max(256),
  output: z.union([z.string(), z.array(inputText)]),
  status: nullish(z.string()),
});
const reasoningItem = z.strictObject({
  type: z.literal("reasoning"),
  id: nullish(z.string()),
  summary: z.array(z.strictObject({ type: z.literal("summary_text"), text: z.string() })),
  content: nullish(z.array(z.strictObject({ type: z.literal("reasoning_text"), text: z.string() }))),
  encrypted_content: nullish(z.string()),
  status: nullish(z.string()),
});
const inputItem = z.union([messageItem, functionCallItem, functionCallOutputItem, reasoningItem]);

/** Responses' function tools are flat: {type, name, description, parameters, strict}. */
const responsesTool = z.strictObject({
  type: z.literal("function"),
  name: z.string().regex(/^[a-zA-Z0-9_.\-:]{1,128}$/),
  description: nullish(z.string().max(64 * 1024)),
  parameters: nullish(z.record(z.string(), z.unknown())),
  strict: nullish(z.boolean()),
});

const format = z.discriminatedUnion("type", [
  z.strictObject({ type: z.literal("text") }),
  z.strictObject({ type: z.literal("json_object") }),
  z.strictObject({ type: z.literal("json_schema"), name: z.string().max(256), schema: z.record(z.string(), z.unknown()), description: nullish(z.string()), strict: nullish(z.boolean()) }),
]);

export const responsesRequestSchema = z.strictObject({
  model: z.string().min(1),
  input: z.union([z.string(), z.array(inputItem).max(LIMITS.maxMessages)]),
  instructions: nullish(z.string()),
  tools: nullish(z.array(responsesTool).max(LIMITS.maxTools)),
  tool_choice: nullish(z.union([z.enum(["none", "auto", "required"]), z.strictObject({ type: z.literal("function"), name: z.string() })])),
  parallel_tool_calls: nullish(z.boolean()),
  text: nullish(z.strictObject({ format: nullish(format), verbosity: nullish(z.literal("medium", { message: "only 'medium' is served here" })) })),
  max_output_tokens: nullish(z.number().int().min(1)),
  temperature: samplingFields.temperature,
  top_p: samplingFields.top_p,
  top_logprobs: nullish(z.number().int().min(0).max(20)),
  metadata: nullish(z.record(z.string().max(64), z.string().max(512))),
  user: samplingFields.user,
  safety_identifier: nullish(z.string().max(256)),
  prompt_cache_key: nullish(z.string().max(256)),
  stream: nullish(z.boolean()),
  stream_options: nullish(z.strictObject({ include_obfuscation: nullish(z.boolean()) })),
  store: nullish(z.boolean()),
  previous_response_id: nullish(z.string().max(256)),
  reasoning: nullish(z.strictObject({ effort: nullish(z.enum(["minimal", "low", "medium", "high"])), summary: nullish(z.enum(["auto", "concise", "detailed"])) })),
  truncation: nullish(z.literal("disabled", { message: "only 'disabled' is supported: a prompt too long for the context is refused" })),
  service_tier: nullish(z.enum(["auto", "default"])),
  include: nullish(z.array(z.enum(["message.output_text.logprobs", "reasoning.encrypted_content"])).max(8)),
  // llama-server's and vLLM's extensions work here too.
  seed: samplingFields.seed,
  top_k: samplingFields.top_k,
  min_p: samplingFields.min_p,
  repetition_penalty: samplingFields.repetition_penalty,
  stop: samplingFields.stop,
});

export type ResponsesRequest = z.infer<typeof responsesRequestSchema>;

function partsText(content: string | ReadonlyArray<{ text: string }>): string {
  return typeof content === "string" ? content : content.map((p) => p.text).join("");
}

/** Input items as template messages: calls join the assistant turn before them, outputs are tool results. */
export function itemsToMessages(items: ResponsesRequest["input"]): TemplateMessage[] {
  if (typeof items === "string") return [{ role: "user", content: items }];
  const out: TemplateMessage[] = [];
  let reasoning: string | undefined;
  items.forEach((item, i) => {
    if (item.type === "reasoning") {
      reasoning = [...item.summary.map((s) => s.text), ...(item.content ?? []).map((c) => c.text)].join("\n");
      return;
    }
    if (item.type === "function_call") {
      let args: unknown;
      try {
        args = JSON.parse(item.arguments);
      } catch {
        throw invalidRequest(`Invalid value for 'input[${i}].arguments': not valid JSON.`, `input[${i}].arguments`, "invalid_value");
      }
      const call: TemplateToolCall = { id: item.call_id, type: "function", function: { name: item.name, arguments: args } };
      const last = out.at(-1);
      if (last?.role === "assistant" && last.tool_calls) last.tool_calls.push(call);
      else out.push({ role: "assistant", content: "", tool_calls: [call], ...(reasoning ? { reasoning_content: reasoning } : {}) });
      reasoning = undefined;
      return;
    }
    if (item.type === "function_call_output") {
      out.push({ role: "tool", tool_call_id: item.call_id, content: partsText(item.output) });
      return;
    }
    const role = item.role === "developer" ? "system" : item.role;
    out.push({ role, content: partsText(item.content), ...(role === "assistant" && reasoning ? { reasoning_content: reasoning } : {}) });
    if (role === "assistant") reasoning = undefined;
  });
  return out;
}

function refuseMedia(raw: unknown): void {
  refuseMediaParts((raw as { input?: unknown })?.input, MEDIA, (i, j) => `input[${i}].content[${j}]`);
}

type OutputItem =
  | { type: "message"; id: string; status: string; role: "assistant"; content: Array<{ type: "output_text"; text: string; annotations: unknown[]; logprobs: unknown[] }> }
  | { type: "function_call"; id: string; call_id: string; name: string; arguments: string; status: string }
  | { type: "reasoning"; id: string; summary: unknown[]; content: Array<{ type: "reasoning_text"; text: string }>; status?: string };

function responseLogprob(e: TokenLogprob) {
  return { token: e.token, logprob: e.logprob, bytes: e.bytes, top_logprobs: e.top.map((t) => ({ token: t.token, logprob: t.logprob, bytes: t.bytes })) };
}

/**
 * A validated Responses request, with the conversation it continues: what the service
 * runs, and the answers it is given back as (a Response object, or its events).
 */
export class ResponsesPlan implements GenerationPlan {
  readonly id = rid("resp");
  readonly createdAt = Math.floor(Date.now() / 1000);
  /** The conversation this request adds to (previous_response_id), then its own input. */
  readonly conversation: TemplateMessage[];

  constructor(
    readonly body: ResponsesRequest,
    previous: StoredResponse | undefined,
  ) {
    this.conversation = [...(previous?.conversation ?? []), ...itemsToMessages(body.input)];
  }

  get model(): string {
    return this.body.model;
  }

  get user(): string | undefined {
    return this.body.user ?? this.body.safety_identifier ?? undefined;
  }

  get stream(): boolean {
    return this.body.stream === true;
  }

  get store(): boolean {
    return this.body.store ?? true;
  }

  /** Instructions are this request's own: they are not carried over from a previous response. */
  messages(): TemplateMessage[] {
    const b = this.body;
    return b.instructions ? [{ role: "system", content: b.instructions }, ...this.conversation] : this.conversation;
  }

  get logprobs(): number | undefined {
    const b = this.body;
    return b.top_logprobs != null || b.include?.includes("message.output_text.logprobs") ? (b.top_logprobs ?? 0) : undefined;
  }

  prepare(model: PromptModel): PreparedPrompt {
    const b = this.body;
    const f = b.text?.format;
    const toolChoice: ToolChoice | undefined =
      b.tool_choice == null ? undefined : typeof b.tool_choice === "string" ? b.tool_choice : { type: "function", function: { name: b.tool_choice.name } };
    const kwargs: Record<string, unknown> = {};
    if (b.reasoning?.effort) kwargs.reasoning_effort = b.reasoning.effort;
    return prepareChat(model, {
      messages: this.messages(),
      tools: b.tools?.map((t) => functionTool.parse({ type: "function", function: { name: t.name, description: t.description ?? undefined, parameters: t.parameters ?? undefined, strict: t.strict ?? undefined } })),
      toolChoice,
      parallelToolCalls: b.parallel_tool_calls ?? true,
      grammar: outputGrammar({ response_format: f?.type === "json_schema" ? { type: "json_schema", json_schema: { schema: f.schema } } : f }),
      sampling: b,
      maxTokens: { value: b.max_output_tokens ?? undefined, param: "max_output_tokens" },
      stop: b.stop == null ? [] : typeof b.stop === "string" ? [b.stop] : b.stop,
      kwargs,
      logprobs: this.logprobs,
      params: { messages: "input", tools: "tools", toolChoice: "tool_choice" },
    });
  }

  /** The Response object around its output items, as every form of the answer shows it. */
  response(status: string, model: string, output: OutputItem[], usage: Usage | undefined, extra: { incomplete?: string; error?: ApiError } = {}) {
    const b = this.body;
    return {
      id: this.id,
      object: "response",
      created_at: this.createdAt,
      status,
      error: extra.error ? { code: extra.error.code ?? extra.error.type, message: extra.error.message } : null,
      incomplete_details: extra.incomplete ? { reason: extra.incomplete } : null,
      instructions: b.instructions ?? null,
      max_output_tokens: b.max_output_tokens ?? null,
      model,
      output,
      parallel_tool_calls: b.parallel_tool_calls ?? true,
      previous_response_id: b.previous_response_id ?? null,
      reasoning: { effort: b.reasoning?.effort ?? null, summary: b.reasoning?.summary ?? null },
      store: this.store,
      temperature: b.temperature ?? 1,
      text: { format: b.text?.format ?? { type: "text" } },
      tool_choice: b.tool_choice ?? "auto",
      tools: (b.tools ?? []).map((t) => ({ type: "function", name: t.name, description: t.description ?? null, parameters: t.parameters ?? null, strict: t.strict ?? true })),
      top_p: b.top_p ?? 1,
      truncation: "disabled",
      // Omitted, not null, until there is usage: the contract's ResponseUsage is not nullable.
      ...(usage
        ? { usage: {
            input_tokens: usage.promptTokens,
            input_tokens_details: { cached_tokens: usage.cachedTokens, cache_write_tokens: 0 },
            output_tokens: usage.completionTokens,
            output_tokens_details: { reasoning_tokens: 0 },
            total_tokens: usage.promptTokens + usage.completionTokens,
          } }
        : {}),
      ...(b.user ? { user: b.user } : {}),
      metadata: b.metadata ?? {},
    };
  }
}

export function parseResponses(raw: unknown, previous: (id: string) => StoredResponse | undefined): ResponsesPlan {
  refuseMedia(raw);
  const body = parseBody(responsesRequestSchema, raw);
  let prev: StoredResponse | undefined;
  if (body.previous_response_id) {
    prev = previous(body.previous_response_id);
    if (!prev) throw new ApiError("not_found", `Response with id '${body.previous_response_id}' not found.`, { param: "previous_response_id", code: "response_not_found" });
  }
  return new ResponsesPlan(body, prev);
}

/**
 * The answer as it forms: output items in order (reasoning, a message, function calls),
 * every change reported to `emit` as Responses' typed events. The JSON answer ignores
 * the events; the stream sends them.
 */
class ResponseBuilder implements GenerationEvents {
  readonly output: OutputItem[] = [];
  private message: { index: number; item: Extract<OutputItem, { type: "message" }>; logprobs: unknown[] } | undefined;
  private reasoningItem: { index: number; item: Extract<OutputItem, { type: "reasoning" }> } | undefined;
  private readonly calls = new Map<number, { index: number; item: Extract<OutputItem, { type: "function_call" }> }>();
  private start: StartInfo | undefined;
  usage: Usage | undefined;
  finish: ChoiceResult["finishReason"] = "stop";
  protected seq = 0;

  constructor(
    readonly plan: ResponsesPlan,
    private readonly emit: ((type: string, fields: Record<string, unknown>) => void) | undefined,
  ) {}

  get model(): string {
    return this.start?.model ?? this.plan.model;
  }

  get headers(): Record<string, string> {
    return this.start?.headers ?? {};
  }

  protected event(type: string, fields: Record<string, unknown>): void {
    this.emit?.(type, { type, sequence_number: this.seq++, ...fields });
  }

  onStart(info: StartInfo): void {
    this.start = info;
    const r = this.plan.response("in_progress", info.model, [], undefined);
    this.event("response.created", { response: r });
    this.event("response.in_progress", { response: r });
  }

  private closeReasoning(): void {
    const r = this.reasoningItem;
    if (!r) return;
    this.reasoningItem = undefined;
    r.item.status = "completed";
    const text = r.item.content[0]!.text;
    this.event("response.reasoning_text.done", { item_id: r.item.id, output_index: r.index, content_index: 0, text });
    this.event("response.output_item.done", { output_index: r.index, item: r.item });
  }

  onReasoning(text: string): void {
    if (!this.reasoningItem) {
      const item: Extract<OutputItem, { type: "reasoning" }> = { type: "reasoning", id: rid("rs"), summary: [], content: [{ type: "reasoning_text", text: "" }], status: "in_progress" };
      this.reasoningItem = { index: this.output.push(item) - 1, item };
      this.event("response.output_item.added", { output_index: this.reasoningItem.index, item: { ...item, content: [] } });
    }
    const r = this.reasoningItem;
    r.item.content[0]!.text += text;
    this.event("response.reasoning_text.delta", { item_id: r.item.id, output_index: r.index, content_index: 0, delta: text });
  }

  private ensureMessage() {
    if (this.message) return this.message;
    this.closeReasoning();
    const item: Extract<OutputItem, { type: "message" }> = { type: "message", id: rid("msg"), status: "in_progress", role: "assistant", content: [] };
    const index = this.output.push(item) - 1;
    this.event("response.output_item.added", { output_index: index, item: { ...item, content: [] } });
    item.content.push({ type: "output_text", text: "", annotations: [], logprobs: [] });
    this.event("response.content_part.added", { item_id: item.id, output_index: index, content_index: 0, part: { type: "output_text", text: "", annotations: [], logprobs: [] } });
    return (this.message = { index, item, logprobs: [] });
  }

  onText(text: string, _choice: number, logprobs?: TokenLogprob[]): void {
    if (text === "" && !logprobs) return;
    const m = this.ensureMessage();
    m.item.content[0]!.text += text;
    const lp = logprobs && this.plan.logprobs !== undefined ? logprobs.map(responseLogprob) : [];
    if (lp.length > 0) m.item.content[0]!.logprobs.push(...lp);
    this.event("response.output_text.delta", { item_id: m.item.id, output_index: m.index, content_index: 0, delta: text, logprobs: lp });
  }

  onToolCall(d: ToolCallDelta): void {
    if (d.id !== undefined) {
      this.closeReasoning();
      this.closeMessage();
      const item: Extract<OutputItem, { type: "function_call" }> = { type: "function_call", id: rid("fc"), call_id: d.id, name: d.name ?? "", arguments: "", status: "in_progress" };
      const index = this.output.push(item) - 1;
      this.calls.set(d.index, { index, item });
      this.event("response.output_item.added", { output_index: index, item: { ...item } });
    }
    const c = this.calls.get(d.index)!;
    if (d.arguments === "") return;
    c.item.arguments += d.arguments;
    this.event("response.function_call_arguments.delta", { item_id: c.item.id, output_index: c.index, delta: d.arguments });
  }

  private closeMessage(status: "completed" | "incomplete" = "completed"): void {
    const m = this.message;
    if (!m || m.item.status !== "in_progress") return;
    m.item.status = status;
    const part = m.item.content[0]!;
    this.event("response.output_text.done", { item_id: m.item.id, output_index: m.index, content_index: 0, text: part.text, logprobs: part.logprobs });
    this.event("response.content_part.done", { item_id: m.item.id, output_index: m.index, content_index: 0, part });
    this.event("response.output_item.done", { output_index: m.index, item: m.item });
  }

  private closeAll(status: "completed" | "incomplete"): void {
    this.closeReasoning();
    this.closeMessage(status);
    for (const c of this.calls.values()) {
      if (c.item.status !== "in_progress") continue;
      c.item.status = "completed";
      this.event("response.function_call_arguments.done", { item_id: c.item.id, output_index: c.index, name: c.item.name, arguments: c.item.arguments });
      this.event("response.output_item.done", { output_index: c.index, item: c.item });
    }
  }

  onChoiceDone(r: ChoiceResult): void {
    this.finish = r.finishReason;
  }

  /** completed, or incomplete when it ran out of max_output_tokens. */
  get status(): "completed" | "incomplete" {
    return this.finish === "length" ? "incomplete" : "completed";
  }

  onDone(result: GenerationResult): void {
    this.usage = result.usage;
    // An answer that is only calls has no message; an empty answer still has one (OpenAI's shape).
    if (this.output.length === 0) this.ensureMessage();
    const status = this.status;
    this.closeAll(status);
    const r = this.final();
    this.event(status === "completed" ? "response.completed" : "response.incomplete", { response: r });
  }

  onError(error: ApiError): void {
    this.closeAll("incomplete");
    const timeout = error.kind === "timeout";
    // A deadline is an incomplete response (OpenAI's reason for a cut answer); anything else failed.
    if (timeout) this.event("response.incomplete", { response: this.plan.response("incomplete", this.model, this.output, this.usage, { incomplete: "max_output_tokens" }) });
    else this.event("response.failed", { response: this.plan.response("failed", this.model, this.output, this.usage, { error }) });
  }

  final() {
    const status = this.status;
    return this.plan.response(status, this.model, this.output, this.usage, status === "incomplete" ? { incomplete: "max_output_tokens" } : {});
  }
}

export class ResponsesJson extends ResponseBuilder {
  constructor(plan: ResponsesPlan) {
    super(plan, undefined);
  }
}

/** The answer as Responses' event stream: `event:` and `data:` per event, no [DONE]. */
export class ResponsesStream extends ResponseBuilder {
  constructor(plan: ResponsesPlan, private readonly transport: StreamTransport) {
    super(plan, (type, fields) => transport.send(JSON.stringify(fields), type));
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
    super.onError(error);
    // A deadline ends the response as incomplete, which is a normal end of its stream.
    if (error.kind === "timeout") return this.transport.close();
    this.transport.fail(error, { json: JSON.stringify({ type: "error", sequence_number: this.seq++, code: error.code ?? error.type, message: error.message, param: error.param }), event: "error" });
  }
}

/** What to keep of a finished response: it, its input, and the conversation through its output. */
export function toStored(plan: ResponsesPlan, builder: ResponseBuilder, owner: number): Omit<StoredResponse, "storedAt" | "bytes"> {
  const response = builder.final() as unknown as Record<string, unknown>;
  const assistant: TemplateMessage = { role: "assistant", content: "" };
  for (const item of builder.output) {
    if (item.type === "message") assistant.content += item.content.map((c) => c.text).join("");
    else if (item.type === "reasoning") assistant.reasoning_content = item.content.map((c) => c.text).join("");
    else {
      let args: unknown = {};
      try {
        args = JSON.parse(item.arguments);
      } catch {
        /* a call cut short: kept with what could be read */
      }
      (assistant.tool_calls ??= []).push({ id: item.call_id, type: "function", function: { name: item.name, arguments: args } });
    }
  }
  const input = plan.body.input;
  return {
    id: plan.id,
    owner,
    response,
    inputItems: typeof input === "string" ? [{ type: "message", role: "user", content: [{ type: "input_text", text: input }] }] : input,
    conversation: [...plan.conversation, assistant],
  };
}

export type { ResponseBuilder };
