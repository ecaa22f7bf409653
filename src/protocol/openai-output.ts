/**
 * The OpenAI answers of one generation, chat or text completion: a JSON body collected
 * whole, or a stream of chunk objects handed to a transport (SSE events, WebSocket
 * frames). The per-token path concatenates a precomputed prefix and suffix around the
 * JSON-escaped text: no object is built or serialised per token.
 */
import type { ApiError } from "../errors.js";
import type { GenerationEvents, GenerationPlan, GenerationResult, StartInfo, Usage } from "../service/generation.js";

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

export function completionBody(shape: AnswerShape, start: StartInfo, text: string, result: GenerationResult) {
  const base = { id: shape.id, created: start.created, model: start.model };
  if (shape.kind === "chat") {
    return {
      ...base,
      object: "chat.completion",
      choices: [{ index: 0, message: { role: "assistant", content: text, refusal: null }, logprobs: null, finish_reason: result.finishReason }],
      usage: usageJson(result.usage),
    };
  }
  return {
    ...base,
    object: "text_completion",
    choices: [{ index: 0, text, logprobs: null, finish_reason: result.finishReason }],
    usage: usageJson(result.usage),
  };
}

/** Collects the whole text, answered as one JSON body. */
export class JsonAnswer implements GenerationEvents {
  private text = "";
  private start: StartInfo | undefined;
  private result: GenerationResult | undefined;

  constructor(private readonly shape: AnswerShape) {}

  onStart(info: StartInfo): void {
    this.start = info;
    this.text = this.shape.echo();
  }

  onText(text: string): void {
    this.text += text;
  }

  onDone(result: GenerationResult): void {
    this.result = result;
  }

  onError(): void {}

  /** Headers the answer carries (x-ratelimit-*). */
  get headers(): Record<string, string> {
    return this.start?.headers ?? {};
  }

  body(): unknown {
    return completionBody(this.shape, this.start!, this.text, this.result!);
  }
}

/** Builds the JSON text of each stream chunk; the same bytes whatever carries them. */
export class ChunkEncoder {
  private readonly head: string;
  private readonly deltaOpen: string;
  private readonly deltaClose: string;

  constructor(private readonly kind: OutputKind, id: string, start: StartInfo) {
    const object = kind === "chat" ? "chat.completion.chunk" : "text_completion";
    this.head = `{"id":${JSON.stringify(id)},"object":"${object}","created":${start.created},"model":${JSON.stringify(start.model)},"choices":`;
    if (kind === "chat") {
      this.deltaOpen = `${this.head}[{"index":0,"delta":{"content":`;
      this.deltaClose = `},"logprobs":null,"finish_reason":null}]}`;
    } else {
      this.deltaOpen = `${this.head}[{"index":0,"text":`;
      this.deltaClose = `,"logprobs":null,"finish_reason":null}]}`;
    }
  }

  /** The chat stream's first chunk, carrying the role; none for text completions. */
  role(): string | undefined {
    if (this.kind !== "chat") return undefined;
    return `${this.head}[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}`;
  }

  delta(text: string): string {
    return this.deltaOpen + JSON.stringify(text) + this.deltaClose;
  }

  final(result: GenerationResult): string {
    return this.kind === "chat"
      ? `${this.head}[{"index":0,"delta":{},"logprobs":null,"finish_reason":"${result.finishReason}"}]}`
      : `${this.head}[{"index":0,"text":"","logprobs":null,"finish_reason":"${result.finishReason}"}]}`;
  }

  usage(result: GenerationResult): string {
    return `${this.head}[],"usage":${JSON.stringify(usageJson(result.usage))}}`;
  }
}

/** A parsed OpenAI request: run by the service, answered as JSON or as a stream. */
export interface OpenAIPlan extends GenerationPlan {
  readonly id: string;
  jsonAnswer(): JsonAnswer;
  streamAnswer(transport: StreamTransport): GenerationEvents;
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

/** A generation streamed as OpenAI chunks: the role, the deltas, the final chunk, the usage, [DONE]. */
export class ChunkStream implements GenerationEvents {
  private encoder: ChunkEncoder | undefined;

  constructor(
    private readonly shape: AnswerShape,
    private readonly transport: StreamTransport,
    private readonly includeUsage: boolean,
  ) {}

  onStart(info: StartInfo): void {
    const encoder = (this.encoder = new ChunkEncoder(this.shape.kind, this.shape.id, info));
    this.transport.open(info.headers);
    const role = encoder.role();
    if (role !== undefined) this.transport.send(role);
    const echo = this.shape.echo();
    if (echo !== "") this.transport.send(encoder.delta(echo));
  }

  onText(text: string): void {
    this.transport.send(this.encoder!.delta(text));
  }

  onDone(result: GenerationResult): void {
    this.transport.send(this.encoder!.final(result));
    if (this.includeUsage) this.transport.send(this.encoder!.usage(result));
    this.transport.close("[DONE]");
  }

  onError(error: ApiError): void {
    // OpenAI's SDKs raise an error event mid-stream as an APIError; the stream ends without [DONE].
    this.transport.fail(error, { json: JSON.stringify(error.toEnvelope()) });
  }
}
