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
  return { ok: false, status: 0, errorType: undefined, ttft: 0, itl: [], latency: 0, promptTokens: 0, outputTokens: 0, usageReported: false, text: "" };
}

export async function streamRequest(spec: RequestSpec): Promise<RequestRecord> {
  const url = `${spec.baseUrl.replace(/\/$/, "")}/v1/${spec.endpoint === "chat" ? "chat/completions" : "completions"}`;
  const body = { ...spec.body, stream: true, stream_options: { include_usage: true } };
  const rec = emptyRecord();
  const t0 = performance.now();
  let last = 0;
  let chunks = 0;
  try {
    const res = await fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json", ...spec.headers },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(spec.timeoutMs ?? 600_000),
    });
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
