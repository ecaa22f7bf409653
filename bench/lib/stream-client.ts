/**
 * One streamed request against any OpenAI-compatible server, timed the way vLLM's
 * `bench serve` times it: TTFT at the first content chunk, every gap between content
 * chunks as an ITL sample, latency at the end of the stream.
 */
import { createParser } from "eventsource-parser";

export interface RequestRecord {
  ok: boolean;
  status: number;
  /** Error class for failed requests: http_429, http_503, timeout, network, stream_error… */
  errorType: string | undefined;
  /** Seconds from send to the first content chunk. */
  ttft: number;
  /** Seconds between consecutive content chunks. */
  itl: number[];
  /** Seconds from send to the end of the stream. */
  latency: number;
  promptTokens: number;
  outputTokens: number;
  /** True when the token counts came from the server's usage chunk. */
  usageReported: boolean;
  text: string;
  /** Sent again: a kept-alive connection it went out on was closed under it before any answer (send). */
  resent: boolean;
}

export interface RequestSpec {
  baseUrl: string;
  endpoint: "chat" | "completions";
  body: Record<string, unknown>;
  headers?: Record<string, string>;
  timeoutMs?: number;
}

/** Splits an SSE byte stream into events whatever the network chunking; exported for tests. */
export function sseEvents(onData: (data: string) => void) {
  const parser = createParser({ onEvent: (e) => onData(e.data) });
  return (chunk: string) => parser.feed(chunk);
}

/** A record of a request not (yet) answered. */
export function emptyRecord(): RequestRecord {
  return { ok: false, status: 0, errorType: undefined, ttft: 0, itl: [], latency: 0, promptTokens: 0, outputTokens: 0, usageReported: false, text: "", resent: false };
}

/** How undici says a connection was closed or reset under a request before any answer came. */
const CLOSED_UNDER_REQUEST = new Set(["UND_ERR_SOCKET", "UND_ERR_CLOSED", "ECONNRESET", "EPIPE"]);

/** Sends after the first when a connection was closed under the request: as many as openai-node's default retries. */
const MAX_RESENDS = 2;

/**
 * Sends the request, and again (at most MAX_RESENDS times) while the connection it went out
 * on is closed before any answer comes. A server may close a kept-alive connection just as
 * the client reuses it (llama-server does at c≥8: "other side closed" within ~5 ms of
 * sending, about one request in 45), and the resend may pick another such connection from
 * the pool; the official SDKs retry connection errors, so counting them as failures would
 * charge the server for a client-pool race. Any other error, and an error after the answer
 * began, is the request's failure. The request's times still run from the first send.
 */
async function send(url: string, init: RequestInit, rec: RequestRecord): Promise<Response> {
  for (let resends = 0; ; resends++) {
    try {
      return await fetch(url, init);
    } catch (err) {
      const code = (err as { cause?: { code?: string } }).cause?.code;
      if (resends === MAX_RESENDS || code === undefined || !CLOSED_UNDER_REQUEST.has(code)) throw err;
      rec.resent = true;
    }
  }
}

export async function streamRequest(spec: RequestSpec): Promise<RequestRecord> {
  const url = `${spec.baseUrl.replace(/\/$/, "")}/v1/${spec.endpoint === "chat" ? "chat/completions" : "completions"}`;
  const body = { ...spec.body, stream: true, stream_options: { include_usage: true } };
  const rec = emptyRecord();
  const t0 = performance.now();
  let last = 0;
  let chunks = 0;
  try {
    const res = await send(
      url,
      {
        method: "POST",
        headers: { "content-type": "application/json", ...spec.headers },
        body: JSON.stringify(body),
        signal: AbortSignal.timeout(spec.timeoutMs ?? 600_000),
      },
      rec,
    );
    rec.status = res.status;
    if (!res.ok || res.body === null) {
      rec.errorType = `http_${res.status}`;
      await res.text().catch(() => "");
      rec.latency = (performance.now() - t0) / 1000;
      return rec;
    }
    let streamError: string | undefined;
    const feed = sseEvents((data) => {
      if (data === "[DONE]") return;
      const now = performance.now();
      const msg = JSON.parse(data);
      if (msg.error) {
        streamError = msg.error.type ?? "stream_error";
        return;
      }
      if (msg.usage) {
        rec.promptTokens = msg.usage.prompt_tokens ?? 0;
        rec.outputTokens = msg.usage.completion_tokens ?? 0;
        rec.usageReported = true;
      }
      const choice = msg.choices?.[0];
      const piece: string | undefined = choice?.delta?.content ?? choice?.text;
      if (piece) {
        if (chunks === 0) rec.ttft = (now - t0) / 1000;
        else rec.itl.push((now - last) / 1000);
        last = now;
        chunks++;
        rec.text += piece;
      }
    });
    const decoder = new TextDecoder();
    for await (const part of res.body) feed(decoder.decode(part as Uint8Array, { stream: true }));
    rec.latency = (performance.now() - t0) / 1000;
    if (!rec.usageReported) rec.outputTokens = chunks;
    if (streamError) rec.errorType = streamError;
    else rec.ok = true;
  } catch (err) {
    rec.latency = (performance.now() - t0) / 1000;
    rec.errorType = (err as Error).name === "TimeoutError" ? "timeout" : "network";
  }
  return rec;
}
