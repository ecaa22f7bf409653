/**
 * The wire encodings of one generation: OpenAI chat and text completions, as a JSON
 * body or as a stream of chunk objects carried by a transport (SSE today, WebSocket
 * frames too). The per-token path concatenates a precomputed prefix and suffix around
 * the JSON-escaped text: no object is built or serialised per token.
 */
import type { ServerResponse } from "node:http";
import { ApiError } from "../errors.js";
import type { GenerationResult, GenerationSink, Usage } from "../scheduler/types.js";
import type { ResponseMeta } from "../service/prepare.js";

export function usageJson(u: Usage) {
  return {
    prompt_tokens: u.promptTokens,
    completion_tokens: u.completionTokens,
    total_tokens: u.promptTokens + u.completionTokens,
    prompt_tokens_details: { cached_tokens: u.cachedTokens },
  };
}

export function completionBody(meta: ResponseMeta, text: string, result: GenerationResult) {
  const base = { id: meta.id, created: meta.created, model: meta.model };
  if (meta.endpoint === "chat") {
    return {
      ...base,
      object: "chat.completion",
      choices: [
        { index: 0, message: { role: "assistant", content: text, refusal: null }, logprobs: null, finish_reason: result.finishReason },
      ],
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
export class JsonSink implements GenerationSink {
  private text: string;
  result: { body: unknown } | { error: ApiError } | undefined;

  constructor(private readonly meta: ResponseMeta, prefix = "") {
    this.text = prefix;
  }

  onStart(): void {}

  onText(text: string): void {
    this.text += text;
  }

  onDone(result: GenerationResult): void {
    this.result = { body: completionBody(this.meta, this.text, result) };
  }

  onError(error: ApiError): void {
    this.result = { error };
  }
}

/** Builds the JSON text of each stream chunk; the same bytes whatever carries them. */
export class ChunkEncoder {
  private readonly head: string;
  private readonly deltaOpen: string;
  private readonly deltaClose: string;

  constructor(private readonly meta: ResponseMeta) {
    const object = meta.endpoint === "chat" ? "chat.completion.chunk" : "text_completion";
    this.head = `{"id":${JSON.stringify(meta.id)},"object":"${object}","created":${meta.created},"model":${JSON.stringify(meta.model)},"choices":`;
    if (meta.endpoint === "chat") {
      this.deltaOpen = `${this.head}[{"index":0,"delta":{"content":`;
      this.deltaClose = `},"logprobs":null,"finish_reason":null}]}`;
    } else {
      this.deltaOpen = `${this.head}[{"index":0,"text":`;
      this.deltaClose = `,"logprobs":null,"finish_reason":null}]}`;
    }
  }

  /** The chat stream's first chunk, carrying the role; none for text completions. */
  role(): string | undefined {
    if (this.meta.endpoint !== "chat") return undefined;
    return `${this.head}[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}`;
  }

  delta(text: string): string {
    return this.deltaOpen + JSON.stringify(text) + this.deltaClose;
  }

  final(result: GenerationResult): string {
    return this.meta.endpoint === "chat"
      ? `${this.head}[{"index":0,"delta":{},"logprobs":null,"finish_reason":"${result.finishReason}"}]}`
      : `${this.head}[{"index":0,"text":"","logprobs":null,"finish_reason":"${result.finishReason}"}]}`;
  }

  usage(result: GenerationResult): string {
    return `${this.head}[],"usage":${JSON.stringify(usageJson(result.usage))}}`;
  }
}

/** Carries chunk JSON texts to a client. */
export interface ChunkTransport {
  /** The request got a slot: the first moment anything may be sent. */
  open(): void;
  chunk(json: string): void;
  /** The stream ended normally. */
  close(): void;
  /** The stream failed; `started` tells whether anything was sent before. */
  fail(error: ApiError, started: boolean): void;
}

/** A generation streamed as chunks: the role, the deltas, the final chunk, the usage. */
export class ChunkStreamSink implements GenerationSink {
  private readonly encoder: ChunkEncoder;
  private started = false;

  constructor(
    meta: ResponseMeta,
    private readonly transport: ChunkTransport,
    private readonly includeUsage: boolean,
    private readonly echo = "",
  ) {
    this.encoder = new ChunkEncoder(meta);
  }

  onStart(): void {
    this.started = true;
    this.transport.open();
    const role = this.encoder.role();
    if (role !== undefined) this.transport.chunk(role);
    if (this.echo !== "") this.transport.chunk(this.encoder.delta(this.echo));
  }

  onText(text: string): void {
    this.transport.chunk(this.encoder.delta(text));
  }

  onDone(result: GenerationResult): void {
    this.transport.chunk(this.encoder.final(result));
    if (this.includeUsage) this.transport.chunk(this.encoder.usage(result));
    this.transport.close();
  }

  onError(error: ApiError): void {
    this.transport.fail(error, this.started);
  }
}

/**
 * Server-Sent Events. Headers go out only when the request gets a slot, so an error
 * while it queues (timeout, overload) can still be an HTTP status: the route reads
 * `earlyError` and answers it.
 */
export class SseTransport implements ChunkTransport {
  earlyError: ApiError | undefined;
  private slow: ApiError | undefined;

  /**
   * `onSlowReader` is called once the client has left more than `maxBufferedBytes`
   * unread: its generation is cancelled rather than buffered without bound.
   */
  constructor(
    private readonly res: ServerResponse,
    private readonly beforeOpen: () => void,
    private readonly maxBufferedBytes = 4 * 1024 * 1024,
    private readonly onSlowReader: () => void = () => {},
  ) {}

  open(): void {
    this.beforeOpen();
    this.res.writeHead(200, {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
      connection: "keep-alive",
      "x-accel-buffering": "no",
    });
  }

  chunk(json: string): void {
    if (this.res.writableLength > this.maxBufferedBytes) {
      if (this.slow === undefined) {
        this.slow = new ApiError("cancelled", `The client is reading too slowly (over ${this.maxBufferedBytes} bytes unread): the generation was cancelled.`, { code: "slow_consumer" });
        this.onSlowReader();
      }
      return;
    }
    this.res.write(`data: ${json}\n\n`);
  }

  close(): void {
    this.res.end("data: [DONE]\n\n");
  }

  fail(error: ApiError, started: boolean): void {
    if (!started) {
      this.earlyError = error;
      return;
    }
    // Mid-stream the status is already 200: the error travels as an event (the OpenAI
    // SDKs raise it as an APIError), and the stream ends without [DONE].
    if (!this.res.destroyed) this.res.end(`data: ${JSON.stringify((this.slow ?? error).toEnvelope())}\n\n`);
  }
}
