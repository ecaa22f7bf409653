/**
 * The OpenAI answers of one generation, chat or text completion: a JSON body collected
 * whole, or a stream of chunk objects handed to a transport (SSE events, WebSocket
 * frames). Choices, tool calls, reasoning and log probabilities in OpenAI's shapes. The
 * per-token path of a plain stream concatenates a precomputed prefix and suffix around
 * the JSON-escaped text: no object is built or serialised per token.
 */
import type { ApiError } from "../errors.js";
import type { ChoiceResult, GenerationEvents, GenerationPlan, GenerationResult, StartInfo, TokenLogprob, ToolCallDelta, Usage } from "../service/generation.js";

export type OutputKind = "chat" | "text";

export function usageJson(u: Usage) {
  return {
    prompt_tokens: u.promptTokens,
    completion_tokens: u.completionTokens,
    total_tokens: u.promptTokens + u.completionTokens,
    prompt_tokens_details: { cached_tokens: u.cachedTokens },
  };
}

/** The id, object names and echo of one answer: what both encodings share. */
export interface AnswerShape {
  kind: OutputKind;
  id: string;
  /** Text sent before the generated text (completions' `echo`); read when the answer starts. */
  echo(): string;
}

/** A parsed OpenAI request: run by the service, answered as JSON or as a stream. */
export interface OpenAIPlan extends GenerationPlan {
  readonly id: string;
  jsonAnswer(): JsonAnswer;
  streamAnswer(transport: StreamTransport): GenerationEvents;
}

/** Chat logprobs: one entry per token (OpenAI's ChatCompletionTokenLogprob). */
function chatLogprob(e: TokenLogprob) {
  return { token: e.token, logprob: e.logprob, bytes: e.bytes, top_logprobs: e.top.map((t) => ({ token: t.token, logprob: t.logprob, bytes: t.bytes })) };
}

/** Completions logprobs (the legacy shape): parallel lists, offsets into the choice's text. */
class TextLogprobs {
  readonly tokens: string[] = [];
  readonly token_logprobs: Array<number | null> = [];
  readonly top_logprobs: Array<Record<string, number> | null> = [];
  readonly text_offset: number[] = [];

  add(entries: ReadonlyArray<TokenLogprob | null>, offset: number): number {
    for (const e of entries) {
      this.text_offset.push(offset);
      if (e === null) {
        this.tokens.push("");
        this.token_logprobs.push(null);
        this.top_logprobs.push(null);
        continue;
      }
      this.tokens.push(e.token);
      this.token_logprobs.push(e.logprob);
      const top: Record<string, number> = {};
      for (const t of e.top) top[t.token] = t.logprob;
      this.top_logprobs.push(top);
      offset += e.token.length;
    }
    return offset;
  }

  json() {
    return { tokens: this.tokens, token_logprobs: this.token_logprobs, top_logprobs: this.top_logprobs, text_offset: this.text_offset };
  }
}

/** What one choice collected, for the JSON body. */
class ChoiceState {
  text = "";
  reasoning = "";
  readonly calls: Array<{ id: string; type: "function"; function: { name: string; arguments: string } }> = [];
  readonly chatLogprobs: TokenLogprob[] = [];
  readonly textLogprobs = new TextLogprobs();
  finish: ChoiceResult["finishReason"] = "stop";
}

/** Collects the whole answer, sent as one JSON body. */
export class JsonAnswer implements GenerationEvents {
  private start: StartInfo | undefined;
  private readonly choices: ChoiceState[] = [];
  private usage: Usage | undefined;
  private promptLogprobs: Array<TokenLogprob | null> | undefined;

  constructor(
    private readonly shape: AnswerShape,
    private readonly logprobs: boolean,
  ) {}

  private choice(i: number): ChoiceState {
    let c = this.choices[i];
    if (!c) {
      c = this.choices[i] = new ChoiceState();
      c.text = this.shape.echo();
      if (this.logprobs && this.promptLogprobs) c.textLogprobs.add(this.promptLogprobs, 0);
    }
    return c;
  }

  onStart(info: StartInfo): void {
    this.start = info;
  }

  onPromptLogprobs(entries: Array<TokenLogprob | null>): void {
    this.promptLogprobs = entries;
  }

  onText(text: string, i: number, logprobs?: TokenLogprob[]): void {
    const c = this.choice(i);
    if (logprobs && this.logprobs) {
      if (this.shape.kind === "chat") c.chatLogprobs.push(...logprobs);
      else c.textLogprobs.add(logprobs, c.text.length);
    }
    c.text += text;
  }

  onReasoning(text: string, i: number): void {
    this.choice(i).reasoning += text;
  }

  onToolCall(d: ToolCallDelta, i: number): void {
    const c = this.choice(i);
    if (d.id !== undefined) c.calls[d.index] = { id: d.id, type: "function", function: { name: d.name ?? "", arguments: "" } };
    c.calls[d.index]!.function.arguments += d.arguments;
  }

  onChoiceDone(r: ChoiceResult): void {
    this.choice(r.index).finish = r.finishReason;
  }

  onDone(result: GenerationResult): void {
    this.usage = result.usage;
    for (const c of result.choices) this.choice(c.index);
  }

  onError(): void {}

  /** Headers the answer carries (x-ratelimit-*). */
  get headers(): Record<string, string> {
    return this.start?.headers ?? {};
  }

  body(): unknown {
    const start = this.start!;
    const base = { id: this.shape.id, created: start.created, model: start.model, system_fingerprint: start.fingerprint };
    if (this.shape.kind === "chat") {
      return {
        ...base,
        object: "chat.completion",
        choices: this.choices.map((c, index) => ({
          index,
          message: {
            role: "assistant",
            // OpenAI's content is null when the answer is only tool calls.
            content: c.calls.length > 0 && c.text === "" ? null : c.text,
            refusal: null,
            ...(c.reasoning !== "" ? { reasoning_content: c.reasoning } : {}),
            ...(c.calls.length > 0 ? { tool_calls: c.calls } : {}),
          },
          logprobs: this.logprobs ? { content: c.chatLogprobs.map(chatLogprob), refusal: null } : null,
          finish_reason: c.finish,
        })),
        usage: usageJson(this.usage!),
      };
    }
    return {
      ...base,
      object: "text_completion",
      choices: this.choices.map((c, index) => ({ index, text: c.text, logprobs: this.logprobs ? c.textLogprobs.json() : null, finish_reason: c.finish })),
      usage: usageJson(this.usage!),
    };
  }
}

/** Builds the JSON text of each stream chunk; the same bytes whatever carries them. */
export class ChunkEncoder {
  private readonly head: string;
  /** Per choice: the precomputed text around a plain content delta. */
  private readonly open: string[] = [];
  private readonly close: string;
  private readonly tail: string;

  constructor(
    private readonly kind: OutputKind,
    id: string,
    start: StartInfo,
    includeUsage: boolean,
  ) {
    const object = kind === "chat" ? "chat.completion.chunk" : "text_completion";
    this.head = `{"id":${JSON.stringify(id)},"object":"${object}","created":${start.created},"model":${JSON.stringify(start.model)},"system_fingerprint":${JSON.stringify(start.fingerprint)},"choices":`;
    // With include_usage every chat chunk but the last carries "usage": null (as OpenAI's do;
    // its legacy completions chunks have no such field).
    this.tail = includeUsage && kind === "chat" ? `,"usage":null}` : "}";
    for (let i = 0; i < start.choices; i++) {
      this.open.push(kind === "chat" ? `${this.head}[{"index":${i},"delta":{"content":` : `${this.head}[{"index":${i},"text":`);
    }
    this.close = kind === "chat" ? `},"logprobs":null,"finish_reason":null}]${this.tail}` : `,"logprobs":null,"finish_reason":null}]${this.tail}`;
  }

  private chunk(choice: object): string {
    return `${this.head}[${JSON.stringify(choice)}]${this.tail}`;
  }

  /** The chat stream's first chunk of a choice, carrying the role; none for text completions. */
  role(i: number): string | undefined {
    if (this.kind !== "chat") return undefined;
    return this.chunk({ index: i, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null });
  }

  delta(text: string, i: number): string {
    return this.open[i] + JSON.stringify(text) + this.close;
  }

  /** A delta with its tokens' log probabilities (chat: entries; completions: the legacy lists). */
  deltaWithLogprobs(text: string, i: number, logprobs: readonly TokenLogprob[] | ReadonlyArray<TokenLogprob | null>, offset: number): string {
    if (this.kind === "chat") {
      const entries = (logprobs as TokenLogprob[]).map(chatLogprob);
      return this.chunk({ index: i, delta: { content: text }, logprobs: { content: entries, refusal: null }, finish_reason: null });
    }
    const lp = new TextLogprobs();
    lp.add(logprobs, offset);
    return this.chunk({ index: i, text, logprobs: lp.json(), finish_reason: null });
  }

  reasoning(text: string, i: number): string {
    return this.chunk({ index: i, delta: { reasoning_content: text }, logprobs: null, finish_reason: null });
  }

  toolCall(d: ToolCallDelta, i: number): string {
    const call = d.id !== undefined ? { index: d.index, id: d.id, type: "function", function: { name: d.name, arguments: d.arguments } } : { index: d.index, function: { arguments: d.arguments } };
    return this.chunk({ index: i, delta: { tool_calls: [call] }, logprobs: null, finish_reason: null });
  }

  final(r: ChoiceResult): string {
    return this.kind === "chat"
      ? this.chunk({ index: r.index, delta: {}, logprobs: null, finish_reason: r.finishReason })
      : this.chunk({ index: r.index, text: "", logprobs: null, finish_reason: r.finishReason });
  }

  usage(result: GenerationResult): string {
    return `${this.head}[],"usage":${JSON.stringify(usageJson(result.usage))}}`;
  }
}

/** Carries an answer's stream to a client: SSE events, WebSocket frames. */
export interface StreamTransport {
  /** The request got a slot: the first moment anything may be sent; `headers` go with the answer. */
  open(headers: Record<string, string>): void;
  /** One event's JSON text; `event` names it for protocols whose events are typed (SSE `event:`). */
  send(json: string, event?: string): void;
  /** The stream ended normally; `done` is the protocol's closing sentinel, if it has one. */
  close(done?: string): void;
  /**
   * The stream failed after it opened: the error goes in it, and it ends. `encoded` is
   * the error as this protocol's stream carries it, for transports that carry the
   * protocol's events as they are (SSE); others frame the error their own way.
   */
  fail(error: ApiError, encoded: { json: string; event?: string }): void;
}

/** A generation streamed as OpenAI chunks: each choice's role, deltas and final chunk, the usage, [DONE]. */
export class ChunkStream implements GenerationEvents {
  private encoder: ChunkEncoder | undefined;
  /** Characters sent per choice (completions' text_offset). */
  private offsets: number[] = [];
  private promptLogprobs: Array<TokenLogprob | null> | undefined;

  constructor(
    private readonly shape: AnswerShape,
    private readonly transport: StreamTransport,
    private readonly includeUsage: boolean,
    private readonly logprobs = false,
  ) {}

  onStart(info: StartInfo): void {
    const encoder = (this.encoder = new ChunkEncoder(this.shape.kind, this.shape.id, info, this.includeUsage));
    this.transport.open(info.headers);
    this.offsets = new Array<number>(info.choices).fill(0);
    const echo = this.shape.echo();
    for (let i = 0; i < info.choices; i++) {
      const role = encoder.role(i);
      if (role !== undefined) this.transport.send(role);
      if (echo !== "") {
        this.transport.send(this.logprobs && this.promptLogprobs ? encoder.deltaWithLogprobs(echo, i, this.promptLogprobs, 0) : encoder.delta(echo, i));
        this.offsets[i] = echo.length;
      }
    }
  }

  onPromptLogprobs(entries: Array<TokenLogprob | null>): void {
    this.promptLogprobs = entries;
  }

  onText(text: string, i: number, logprobs?: TokenLogprob[]): void {
    if (logprobs && this.logprobs) this.transport.send(this.encoder!.deltaWithLogprobs(text, i, logprobs, this.offsets[i]!));
    else this.transport.send(this.encoder!.delta(text, i));
    this.offsets[i]! += text.length;
  }

  onReasoning(text: string, i: number): void {
    this.transport.send(this.encoder!.reasoning(text, i));
  }

  onToolCall(d: ToolCallDelta, i: number): void {
    this.transport.send(this.encoder!.toolCall(d, i));
  }

  onChoiceDone(r: ChoiceResult): void {
    this.transport.send(this.encoder!.final(r));
  }

  onDone(result: GenerationResult): void {
    if (this.includeUsage) this.transport.send(this.encoder!.usage(result));
    this.transport.close("[DONE]");
  }

  onError(error: ApiError): void {
    // OpenAI's SDKs raise an error event mid-stream as an APIError; the stream ends without [DONE].
    this.transport.fail(error, { json: JSON.stringify(error.toEnvelope()) });
  }
}
