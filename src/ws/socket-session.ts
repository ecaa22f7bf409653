/**
 * One WebSocket connection of `GET /v1/ws`: many generations in flight, interleaved,
 * each streamed as the same chunk objects the SSE stream carries.
 *
 *   client → {"type":"auth","token":"…"}                       (first, when keys are required and the upgrade had none)
 *   client → {"type":"chat.completions.create"|"completions.create","id":"…","body":{…},"timeout"?:s,"priority"?:p}
 *   client → {"type":"cancel","id":"…"}
 *   server → {"type":"chunk","id":"…","chunk":{…}} … {"type":"done","id":"…"}
 *   server → {"type":"error","id":"…"|null,"error":{message,type,param,code}}
 *
 * Every frame is checked (size by the socket, then JSON depth, then its shape) before
 * any of its fields is used, and every handler is contained: whatever a client sends
 * ends as an error frame or a close for that connection only.
 */
import { randomBytes } from "node:crypto";
import type { WebSocket } from "ws";
import type { KeyRing, Principal } from "../access/keys.js";
import { ApiError, toApiError } from "../errors.js";
import type { Headers } from "../observers.js";
import { jsonDepthExceeds } from "../protocol/json-limits.js";
import { parseChat } from "../protocol/openai-chat.js";
import { parseCompletion } from "../protocol/openai-completions.js";
import type { OpenAIPlan, StreamTransport } from "../protocol/openai-output.js";
import type { GenerationService } from "../service/generation-service.js";

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
  /** Seconds a connection that must authenticate has to send its auth frame. */
  authTimeoutSeconds: number;
}

export const DEFAULT_SOCKET_LIMITS: SocketLimits = {
  maxInFlight: 64,
  framesPerSecond: 50,
  frameBurst: 100,
  maxBufferedBytes: 4 * 1024 * 1024,
  pingIntervalSeconds: 20,
  authTimeoutSeconds: 10,
};

/** Close codes (RFC 6455): 1008 policy violation, 1009 message too big (sent by ws itself). */
export const CLOSE_POLICY = 1008;

/** Frames nest a body a few levels deep; far deeper than any request needs is refused unread. */
const MAX_FRAME_DEPTH = 64;

const REQUEST_TYPES = {
  "chat.completions.create": { endpoint: "chat", parse: parseChat },
  "completions.create": { endpoint: "completions", parse: parseCompletion },
} as const;
type RequestType = keyof typeof REQUEST_TYPES;

interface InFlight {
  abort: AbortController;
}

function frameError(message: string, param: string | null = null, code = "invalid_frame"): ApiError {
  return new ApiError("invalid_request", message, { param, code });
}

/** A frame's scalar field, or an error naming it. */
function optionalNumber(frame: Record<string, unknown>, field: string): number | undefined {
  const v = frame[field];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) throw frameError(`Invalid '${field}': expected a positive number of seconds.`, field);
  return v;
}

export class SocketSession {
  private readonly inFlight = new Map<string, InFlight>();
  private tokens: number;
  private lastRefill = performance.now();
  private alive = true;
  private principal: Principal | undefined;
  private authenticated: boolean;
  private readonly pinger: NodeJS.Timeout;
  private authTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly socket: WebSocket,
    private readonly opts: { generation: GenerationService; keys: KeyRing; principal: Principal | undefined; limits: SocketLimits; headers: Headers },
  ) {
    this.tokens = opts.limits.frameBurst;
    this.principal = opts.principal;
    this.authenticated = !opts.keys.enabled || opts.principal !== undefined;
    socket.on("message", (data, isBinary) => {
      try {
        this.onMessage(data as Buffer, isBinary);
      } catch (err) {
        // Nothing a client sends may escape: the worst a frame gets is an error frame.
        this.sendError(null, toApiError(err));
      }
    });
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
    if (!this.authenticated) {
      // A connection that never authenticates must not live on the server's pings.
      this.authTimer = setTimeout(() => {
        this.sendError(null, new ApiError("unauthorized", `Authenticate within ${opts.limits.authTimeoutSeconds} s of connecting.`, { code: "auth_timeout" }));
        socket.close(CLOSE_POLICY, "authentication timeout");
      }, opts.limits.authTimeoutSeconds * 1000);
      this.authTimer.unref();
    }
  }

  get generations(): number {
    return this.inFlight.size;
  }

  private send(frame: string): void {
    if (this.socket.readyState === this.socket.OPEN) this.socket.send(frame);
  }

  private sendError(id: string | null, error: ApiError): void {
    // retry_after: what an HTTP answer carries in its Retry-After header.
    this.send(JSON.stringify({ type: "error", id, error: error.toEnvelope().error, ...(error.retryAfter !== undefined ? { retry_after: error.retryAfter } : {}) }));
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
    if (isBinary) return this.sendError(null, frameError("Binary frames are not supported: send JSON text frames."));
    const text = data.toString("utf8");
    if (jsonDepthExceeds(text, MAX_FRAME_DEPTH)) return this.sendError(null, frameError(`The frame nests deeper than ${MAX_FRAME_DEPTH} levels.`));
    let msg: unknown;
    try {
      msg = JSON.parse(text);
    } catch {
      return this.sendError(null, frameError("The frame is not valid JSON."));
    }
    if (msg === null || typeof msg !== "object" || Array.isArray(msg)) return this.sendError(null, frameError("A frame must be a JSON object with a type."));
    const frame = msg as Record<string, unknown>;
    const id = typeof frame.id === "string" && frame.id.length > 0 && frame.id.length <= 256 ? frame.id : null;
    const type = typeof frame.type === "string" && frame.type.length <= 64 ? frame.type : undefined;
    if (!this.authenticated) return this.authenticate(type, frame.token);
    if (type === "auth") return;
    if (type === "cancel") {
      // A generation that already finished is not an error: the race is normal.
      if (id !== null) this.inFlight.get(id)?.abort.abort();
      return;
    }
    if (type === undefined || !Object.hasOwn(REQUEST_TYPES, type)) {
      const shown = type === undefined ? (typeof frame.type === "string" ? "a string over 64 characters" : `a value of type ${Array.isArray(frame.type) ? "array" : frame.type === null ? "null" : typeof frame.type}`) : JSON.stringify(type);
      return this.sendError(id, frameError(`Unknown frame type ${shown}: expected ${Object.keys(REQUEST_TYPES).join(", ")}, cancel or auth.`, "type"));
    }
    if (id === null) return this.sendError(null, frameError("A request frame needs an id: a non-empty string of at most 256 characters.", "id"));
    if (this.inFlight.has(id)) return this.sendError(id, frameError(`The id "${id}" is already in flight on this connection.`, "id", "duplicate_id"));
    if (this.inFlight.size >= this.opts.limits.maxInFlight) {
      return this.sendError(id, new ApiError("overloaded", `At most ${this.opts.limits.maxInFlight} generations may be in flight on one connection.`, { code: "too_many_in_flight", retryAfter: 1 }));
    }
    let headers: Headers;
    try {
      headers = this.frameHeaders(frame);
    } catch (err) {
      return this.sendError(id, toApiError(err));
    }
    void this.generate(id, type as RequestType, frame.body, headers);
  }

  /** The frame's own timeout and priority take the place of the HTTP headers. */
  private frameHeaders(frame: Record<string, unknown>): Headers {
    const headers: Headers = { ...this.opts.headers };
    const timeout = optionalNumber(frame, "timeout");
    if (timeout !== undefined) headers["x-request-timeout"] = String(timeout);
    if (frame.priority !== undefined && frame.priority !== null) {
      if (typeof frame.priority !== "string" || frame.priority.length > 16) throw frameError("Invalid 'priority': expected high, normal or low.", "priority");
      headers["x-priority"] = frame.priority;
    }
    return headers;
  }

  private authenticate(type: string | undefined, token: unknown): void {
    // Without a key on the upgrade, the first frame must carry one: {"type":"auth","token":"…"}.
    try {
      if (type !== "auth") throw new ApiError("unauthorized", 'Authenticate first: send {"type":"auth","token":"<key>"} or connect with an Authorization header.', { code: "missing_api_key" });
      this.principal = this.opts.keys.authenticate(typeof token === "string" ? token : undefined);
      this.authenticated = true;
      clearTimeout(this.authTimer);
    } catch (err) {
      this.sendError(null, toApiError(err));
      this.socket.close(CLOSE_POLICY, "authentication required");
    }
  }

  private async generate(id: string, type: RequestType, body: unknown, headers: Headers): Promise<void> {
    const entry: InFlight = { abort: new AbortController() };
    this.inFlight.set(id, entry);
    try {
      const { endpoint, parse } = REQUEST_TYPES[type];
      const run = this.opts.generation.open({ id: randomBytes(8).toString("hex"), endpoint, transport: "ws", headers, principal: this.principal, signal: entry.abort.signal });
      const outcome = await run.generate(
        // Frames always stream: the body's own `stream` does not change the framing.
        () => parse(body !== null && typeof body === "object" && !Array.isArray(body) ? { ...body, stream: true } : body) as OpenAIPlan,
        (plan) => {
          run.responseId = plan.id;
          return plan.streamAnswer(this.transport(id, entry));
        },
      );
      if (outcome.error && !outcome.started) this.sendError(id, outcome.error);
    } catch (err) {
      this.sendError(id, toApiError(err));
    } finally {
      this.inFlight.delete(id);
    }
  }

  private transport(id: string, entry: InFlight): StreamTransport {
    const open = `{"type":"chunk","id":${JSON.stringify(id)},"chunk":`;
    const limit = this.opts.limits.maxBufferedBytes;
    return {
      open: () => {},
      send: (json) => {
        // A reader that does not keep up must not grow our memory or hold its slot.
        if (this.socket.bufferedAmount > limit) {
          if (!entry.abort.signal.aborted) {
            entry.abort.abort(new ApiError("cancelled", `The connection is reading too slowly (over ${limit} bytes buffered): the generation was cancelled.`, { code: "slow_consumer" }));
          }
          return;
        }
        this.send(open + json + "}");
      },
      close: () => this.send(`{"type":"done","id":${JSON.stringify(id)}}`),
      fail: (error) => this.sendError(id, error),
    };
  }

  /** A closed or broken connection cancels everything it had in flight. */
  private onClose(): void {
    clearInterval(this.pinger);
    clearTimeout(this.authTimer);
    for (const g of this.inFlight.values()) g.abort.abort();
  }
}
