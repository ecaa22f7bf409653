/**
 * One WebSocket connection of `GET /v1/ws`: many generations in flight, interleaved,
 * each streamed as the same chunk objects the SSE stream carries.
 *
 *   client → {"type":"chat.completions.create"|"completions.create","id":"…","body":{…},"timeout"?:s,"priority"?:p}
 *   client → {"type":"cancel","id":"…"}
 *   server → {"type":"chunk","id":"…","chunk":{…}} … {"type":"done","id":"…"}
 *   server → {"type":"error","id":"…"|null,"error":{message,type,param,code}}
 */
import type { WebSocket } from "ws";
import { ApiError, toApiError } from "../errors.js";
import type { ChunkTransport } from "../http/encoders.js";
import { ChunkStreamSink } from "../http/encoders.js";
import { noteOutcome, RequestTelemetry, type RequestOutcome, type Telemetry } from "../telemetry/request-telemetry.js";
import { AccessControl } from "../http/access.js";
import { randomBytes } from "node:crypto";
import type { ModelRegistry } from "../models/registry.js";
import { prepareChat, prepareCompletion, type PreparedGeneration } from "../service/prepare.js";

export interface SocketLimits {
  /** Generations one connection may have in flight. */
  maxInFlight: number;
  /** Frames a client may send per second (sustained), and in a burst. */
  framesPerSecond: number;
  frameBurst: number;
  /** Bytes queued for a slow reader beyond which its generations are cancelled. */
  maxBufferedBytes: number;
  /** Seconds between pings; a connection that missed one pong is dropped. */
  pingIntervalSeconds: number;
}

export const DEFAULT_SOCKET_LIMITS: SocketLimits = {
  maxInFlight: 64,
  framesPerSecond: 50,
  frameBurst: 100,
  maxBufferedBytes: 4 * 1024 * 1024,
  pingIntervalSeconds: 20,
};

/** Close codes (RFC 6455): 1008 policy violation, 1009 message too big (sent by ws itself). */
export const CLOSE_POLICY = 1008;

interface InFlight {
  abort: AbortController;
  /** Set when the server ended it (slow reader), so the error frame says why. */
  reason: ApiError | undefined;
}

export class SocketSession {
  private readonly inFlight = new Map<string, InFlight>();
  private tokens: number;
  private lastRefill = performance.now();
  private alive = true;
  /** The key this connection authenticated with (header or first frame). */
  private apiKey: number | undefined;
  private authenticated: boolean;
  private readonly pinger: NodeJS.Timeout;

  constructor(
    private readonly socket: WebSocket,
    private readonly registry: ModelRegistry,
    private readonly opts: { access: AccessControl; apiKey: number | undefined; telemetry: Telemetry; limits: SocketLimits; requestTimeoutSeconds: number; isAccepting: () => boolean; headers: Record<string, string | string[] | undefined> },
  ) {
    this.tokens = opts.limits.frameBurst;
    this.apiKey = opts.apiKey;
    this.authenticated = !opts.access.enabled || opts.apiKey !== undefined;
    socket.on("message", (data, isBinary) => this.onMessage(data as Buffer, isBinary));
    socket.on("close", () => this.onClose());
    socket.on("error", () => this.onClose());
    socket.on("pong", () => (this.alive = true));
    this.pinger = setInterval(() => {
      if (!this.alive) {
        socket.terminate();
        return;
      }
      this.alive = false;
      socket.ping();
    }, opts.limits.pingIntervalSeconds * 1000);
    this.pinger.unref();
  }

  get generations(): number {
    return this.inFlight.size;
  }

  private send(frame: string): void {
    if (this.socket.readyState === this.socket.OPEN) this.socket.send(frame);
  }

  private sendError(id: string | null, error: ApiError): void {
    this.send(JSON.stringify({ type: "error", id, error: error.toEnvelope().error }));
  }

  /** A token bucket: a flood of frames closes the connection. */
  private admitFrame(): boolean {
    const now = performance.now();
    this.tokens = Math.min(this.opts.limits.frameBurst, this.tokens + ((now - this.lastRefill) / 1000) * this.opts.limits.framesPerSecond);
    this.lastRefill = now;
    if (this.tokens < 1) return false;
    this.tokens--;
    return true;
  }

  private onMessage(data: Buffer, isBinary: boolean): void {
    if (!this.admitFrame()) {
      this.socket.close(CLOSE_POLICY, "too many frames");
      return;
    }
    if (isBinary) {
      this.sendError(null, new ApiError("invalid_request", "Binary frames are not supported: send JSON text frames.", { code: "invalid_frame" }));
      return;
    }
    let msg: unknown;
    try {
      msg = JSON.parse(data.toString("utf8"));
    } catch {
      this.sendError(null, new ApiError("invalid_request", "The frame is not valid JSON.", { code: "invalid_frame" }));
      return;
    }
    if (msg === null || typeof msg !== "object" || Array.isArray(msg)) {
      this.sendError(null, new ApiError("invalid_request", "A frame must be a JSON object with a type.", { code: "invalid_frame" }));
      return;
    }
    const frame = msg as { type?: unknown; id?: unknown; body?: unknown; timeout?: unknown; priority?: unknown; token?: unknown };
    const id = typeof frame.id === "string" && frame.id.length > 0 && frame.id.length <= 256 ? frame.id : null;
    if (!this.authenticated) {
      // Without a key on the upgrade, the first frame must carry one: {"type":"auth","token":"…"}.
      try {
        if (frame.type !== "auth") throw new ApiError("unauthorized", "Authenticate first: send {\"type\":\"auth\",\"token\":\"<key>\"} or connect with an Authorization header.", { code: "missing_api_key" });
        this.apiKey = this.opts.access.authenticate(typeof frame.token === "string" ? frame.token : undefined);
        this.authenticated = true;
      } catch (err) {
        this.sendError(null, toApiError(err));
        this.socket.close(CLOSE_POLICY, "authentication required");
      }
      return;
    }
    if (frame.type === "auth") return;
    if (frame.type === "cancel") {
      // A generation that already finished is not an error: the race is normal.
      if (id !== null) this.inFlight.get(id)?.abort.abort();
      return;
    }
    if (frame.type !== "chat.completions.create" && frame.type !== "completions.create") {
      this.sendError(id, new ApiError("invalid_request", `Unknown frame type ${JSON.stringify(frame.type)}: expected chat.completions.create, completions.create or cancel.`, { param: "type", code: "invalid_frame" }));
      return;
    }
    if (id === null) {
      this.sendError(null, new ApiError("invalid_request", "A request frame needs an id: a non-empty string of at most 256 characters.", { param: "id", code: "invalid_frame" }));
      return;
    }
    if (this.inFlight.has(id)) {
      this.sendError(id, new ApiError("invalid_request", `The id "${id}" is already in flight on this connection.`, { param: "id", code: "duplicate_id" }));
      return;
    }
    if (this.inFlight.size >= this.opts.limits.maxInFlight) {
      this.sendError(id, new ApiError("overloaded", `At most ${this.opts.limits.maxInFlight} generations may be in flight on one connection.`, { code: "too_many_in_flight", retryAfter: 1 }));
      return;
    }
    void this.generate(id, frame.type, frame);
  }

  private async generate(id: string, type: "chat.completions.create" | "completions.create", frame: { body?: unknown; timeout?: unknown; priority?: unknown }): Promise<void> {
    const entry: InFlight = { abort: new AbortController(), reason: undefined };
    this.inFlight.set(id, entry);
    const telemetry = new RequestTelemetry(this.opts.telemetry, {
      id: randomBytes(8).toString("hex"),
      endpoint: type === "chat.completions.create" ? "chat" : "completions",
      transport: "ws",
      route: `WS ${type}`,
      headers: this.opts.headers,
    });
    const outcome: RequestOutcome = { status: 200 };
    let lease: ReturnType<AccessControl["admit"]> | undefined;
    let p: PreparedGeneration | undefined;
    try {
      if (!this.opts.isAccepting()) throw new ApiError("unavailable", "The server is shutting down.", { retryAfter: 5, code: "shutting_down" });
      lease = this.opts.access.admit(this.apiKey);
      // The frame's own timeout and priority take the place of the HTTP headers.
      const headers: Record<string, string | string[] | undefined> = { ...this.opts.headers };
      if (frame.timeout !== undefined) headers["x-request-timeout"] = String(frame.timeout);
      if (frame.priority !== undefined) headers["x-priority"] = String(frame.priority);
      const body = frame.body !== null && typeof frame.body === "object" ? { ...(frame.body as object), stream: true } : frame.body;
      const prepare = type === "chat.completions.create" ? prepareChat : prepareCompletion;
      p = await prepare(this.registry, body, { headers, signal: entry.abort.signal, defaultTimeoutSeconds: this.opts.requestTimeoutSeconds }, this.opts.telemetry);
      telemetry.prepare(p);
      noteOutcome(outcome, await p.entry.scheduler.submit(p.gen, new ChunkStreamSink(p.meta, this.transport(id, entry), p.includeUsage, p.echo)));
      if (outcome.error) outcome.status = outcome.error.status;
    } catch (err) {
      const apiErr = toApiError(err);
      outcome.status = apiErr.status;
      outcome.error = apiErr;
      this.sendError(id, apiErr);
    } finally {
      this.inFlight.delete(id);
      p?.lease.release();
      lease?.release(outcome.usage ? outcome.usage.promptTokens + outcome.usage.completionTokens : 0);
      telemetry.finish(outcome);
    }
  }

  private transport(id: string, entry: InFlight): ChunkTransport {
    const open = `{"type":"chunk","id":${JSON.stringify(id)},"chunk":`;
    const limit = this.opts.limits.maxBufferedBytes;
    return {
      open: () => {},
      chunk: (json) => {
        // A reader that does not keep up must not grow our memory or hold its slot.
        if (this.socket.bufferedAmount > limit && entry.reason === undefined) {
          entry.reason = new ApiError("cancelled", `The connection is reading too slowly (over ${limit} bytes buffered): the generation was cancelled.`, { code: "slow_consumer" });
          entry.abort.abort();
          return;
        }
        this.send(open + json + "}");
      },
      close: () => this.send(`{"type":"done","id":${JSON.stringify(id)}}`),
      fail: (error) => this.sendError(id, entry.reason ?? error),
    };
  }

  /** A closed or broken connection cancels everything it had in flight. */
  private onClose(): void {
    clearInterval(this.pinger);
    for (const g of this.inFlight.values()) g.abort.abort();
  }
}
