/**
 * The wire encodings of one generation: OpenAI chat and text completions, as a JSON
 * body or as Server-Sent Events. The per-token path writes a precomputed prefix and
 * suffix around the JSON-escaped text: no object is built or serialised per token.
 */
import type { ServerResponse } from "node:http";
import type { ApiError } from "../errors.js";
import type { GenerationResult, GenerationSink, Usage } from "../scheduler/types.js";

export type Endpoint = "chat" | "text";

export interface ResponseMeta {
  id: string;
  created: number;
  model: string;
  endpoint: Endpoint;
}

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

function chunkHead(meta: ResponseMeta): string {
  const object = meta.endpoint === "chat" ? "chat.completion.chunk" : "text_completion";
  return `data: {"id":${JSON.stringify(meta.id)},"object":"${object}","created":${meta.created},"model":${JSON.stringify(meta.model)},"choices":`;
}

export interface ErrorReporter {
  /** Sends an error as an HTTP response (nothing was sent yet). */
  (error: ApiError): void;
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

/**
 * Streams chunks as SSE. Headers go out only when the request gets a slot, so an
 * error while queued (timeout, overload) can still be an HTTP status.
 */
export class SseSink implements GenerationSink {
  private readonly head: string;
  private readonly deltaOpen: string;
  private readonly deltaClose: string;
  private started = false;
  /** Set when the request failed before anything was sent: the route answers it as HTTP. */
  earlyError: ApiError | undefined;

  constructor(
    private readonly res: ServerResponse,
    private readonly meta: ResponseMeta,
    private readonly includeUsage: boolean,
    private readonly beforeStart: () => void,
    private readonly echo = "",
  ) {
    this.head = chunkHead(meta);
    if (meta.endpoint === "chat") {
      this.deltaOpen = `${this.head}[{"index":0,"delta":{"content":`;
      this.deltaClose = `},"logprobs":null,"finish_reason":null}]}\n\n`;
    } else {
      this.deltaOpen = `${this.head}[{"index":0,"text":`;
      this.deltaClose = `,"logprobs":null,"finish_reason":null}]}\n\n`;
    }
  }

  onStart(): void {
    this.beforeStart();
    this.started = true;
    this.res.writeHead(200, {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
      connection: "keep-alive",
      "x-accel-buffering": "no",
    });
    if (this.meta.endpoint === "chat") {
      this.res.write(`${this.head}[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n`);
    } else if (this.echo !== "") {
      this.onText(this.echo);
    }
  }

  onText(text: string): void {
    this.res.write(this.deltaOpen + JSON.stringify(text) + this.deltaClose);
  }

  onDone(result: GenerationResult): void {
    const final =
      this.meta.endpoint === "chat"
        ? `[{"index":0,"delta":{},"logprobs":null,"finish_reason":"${result.finishReason}"}]`
        : `[{"index":0,"text":"","logprobs":null,"finish_reason":"${result.finishReason}"}]`;
    let out = `${this.head}${final}}\n\n`;
    if (this.includeUsage) out += `${this.head}[],"usage":${JSON.stringify(usageJson(result.usage))}}\n\n`;
    this.res.end(`${out}data: [DONE]\n\n`);
  }

  onError(error: ApiError): void {
    if (!this.started) {
      this.earlyError = error;
      return;
    }
    // Mid-stream the status is already 200: the error travels as an event (the OpenAI
    // SDKs raise it as an APIError), and the stream ends without [DONE].
    if (!this.res.destroyed) this.res.end(`data: ${JSON.stringify(error.toEnvelope())}\n\n`);
  }
}
