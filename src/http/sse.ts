/**
 * Server-Sent Events: an answer's stream over HTTP. Headers go out only when the
 * request gets a slot, so an error while it waits (timeout, overload) is still an HTTP
 * status. A client that stops reading is cut off: past a bound of unread bytes its
 * generation is cancelled (with slow_consumer) rather than buffered without end.
 */
import type { FastifyReply } from "fastify";
import { ApiError } from "../errors.js";
import type { StreamTransport } from "../protocol/openai-output.js";

export class SseTransport implements StreamTransport {
  private opened = false;
  private slow: ApiError | undefined;

  /** `onSlowReader` gets the error to end the generation with (it aborts the request). */
  constructor(
    private readonly reply: FastifyReply,
    private readonly maxBufferedBytes: number,
    private readonly onSlowReader: (error: ApiError) => void,
  ) {}

  /** Whether the stream started: after that, errors travel inside it. */
  get started(): boolean {
    return this.opened;
  }

  open(headers: Record<string, string>): void {
    const reply = this.reply;
    // A hijacked reply skips fastify's header handling: carry its headers by hand.
    for (const [k, v] of Object.entries(reply.getHeaders())) if (v !== undefined) reply.raw.setHeader(k, v as string);
    reply.hijack();
    reply.raw.writeHead(200, {
      ...headers,
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
      connection: "keep-alive",
      "x-accel-buffering": "no",
    });
    this.opened = true;
  }

  send(json: string, event?: string): void {
    const res = this.reply.raw;
    if (res.writableLength > this.maxBufferedBytes) {
      if (this.slow === undefined) {
        this.slow = new ApiError("cancelled", `The client is reading too slowly (over ${this.maxBufferedBytes} bytes unread): the generation was cancelled.`, { code: "slow_consumer" });
        this.onSlowReader(this.slow);
      }
      return;
    }
    res.write(event === undefined ? `data: ${json}\n\n` : `event: ${event}\ndata: ${json}\n\n`);
  }

  close(done?: string): void {
    this.reply.raw.end(done === undefined ? undefined : `data: ${done}\n\n`);
  }

  fail(_error: ApiError, encoded: { json: string; event?: string }): void {
    const res = this.reply.raw;
    if (res.destroyed) return;
    res.end(encoded.event === undefined ? `data: ${encoded.json}\n\n` : `event: ${encoded.event}\ndata: ${encoded.json}\n\n`);
  }
}
