import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import Fastify, { LogController, type FastifyInstance, type FastifyReply, type FastifyRequest } from "fastify";
import { ApiError, toApiError } from "../errors.js";
import type { ModelRegistry } from "../models/registry.js";
import { prepareChat, prepareCompletion, type Prepare, type PreparedGeneration } from "../service/prepare.js";
import { registerModelRoutes } from "./model-routes.js";
import { ChunkStreamSink, JsonSink, SseTransport } from "./encoders.js";
import websocket from "@fastify/websocket";
import cors from "@fastify/cors";
import { AccessControl, areaOf } from "./access.js";
import { DEFAULT_SOCKET_LIMITS, SocketSession, type SocketLimits } from "../ws/socket-session.js";
import { noteOutcome, RequestTelemetry, type RequestOutcome, type Telemetry } from "../telemetry/request-telemetry.js";

export interface AppOptions {
  registry: ModelRegistry;
  maxBodyBytes: number;
  requestTimeoutSeconds: number;
  logLevel: string;
  /** When false the server answers 503 everywhere that needs a model (shutting down). */
  isAccepting?: () => boolean;
  /** Largest WebSocket frame; a bigger one closes the connection with 1009. */
  maxFrameBytes?: number;
  socketLimits?: Partial<SocketLimits>;
  telemetry: Telemetry;
  access: AccessControl;
  /** Allowed browser origins; empty: CORS off. */
  corsOrigins?: string[];
  /** Unread bytes a stream's client may leave before its generation is cancelled. */
  maxStreamBufferBytes?: number;
  /** Seconds a client has to send its whole request (slowloris); 408 after. */
  readTimeoutSeconds?: number;
}

declare module "fastify" {
  interface FastifyRequest {
    /** Index of the API key the request authenticated with, when keys are required. */
    apiKey: number | undefined;
  }
}

function sendError(reply: FastifyReply, err: ApiError): FastifyReply {
  if (err.retryAfter !== undefined) reply.header("retry-after", String(err.retryAfter));
  if (err.headers) reply.headers(err.headers);
  return reply.code(err.status).type("application/json").send(err.toEnvelope());
}

/** Maps fastify's own errors (bad JSON, body too large, bad content type) to the taxonomy. */
function fromFastifyError(err: { statusCode?: number; code?: string; message: string }): ApiError {
  if (err.code === "FST_ERR_CTP_BODY_TOO_LARGE" || err.statusCode === 413) {
    return new ApiError("payload_too_large", "The request body is too large.", { code: "body_too_large" });
  }
  if (err.code === "FST_ERR_CTP_INVALID_MEDIA_TYPE" || err.statusCode === 415) {
    return new ApiError("unsupported_media_type", "The request body must be application/json.", { code: "unsupported_media_type" });
  }
  if (err.statusCode !== undefined && err.statusCode >= 400 && err.statusCode < 500) {
    const msg = err.code === "FST_ERR_CTP_EMPTY_JSON_BODY" ? "The request body is empty; expected a JSON object." : `The request body is not valid JSON: ${err.message}`;
    return new ApiError("invalid_request", msg, { code: "invalid_json" });
  }
  return toApiError(err);
}

export function buildApp(opts: AppOptions): FastifyInstance {
  const { registry } = opts;
  const app = Fastify({
    bodyLimit: opts.maxBodyBytes,
    // JSON lines for machines; readable lines when a person watches a terminal.
    logger:
      opts.logLevel === "silent"
        ? false
        : process.stdout.isTTY
          ? { level: opts.logLevel, transport: { target: "pino-pretty", options: { translateTime: "SYS:HH:MM:ss.l", ignore: "pid,hostname" } } }
          : { level: opts.logLevel },
    // One line per finished generation (RequestTelemetry), not fastify's two per request.
    logController: new LogController({ disableRequestLogging: true }),
    // Ids are our own, so no client can forge another request's log lines.
    genReqId: () => randomBytes(8).toString("hex"),
    // close() ends keep-alive connections too, instead of waiting out clients' idle timers.
    forceCloseConnections: true,
    // Slow headers: Node's own request timeout (408). Slow bodies: the onRequest timer
    // below. Either way a slowloris client never holds a slot: slots are taken only after
    // the body is parsed.
    requestTimeout: (opts.readTimeoutSeconds ?? 30) * 1000,
    // Node checks its timeout on an interval (30 s by default): check often enough for it to bite.
    http: { connectionsCheckingInterval: Math.min(1000, (opts.readTimeoutSeconds ?? 30) * 250) },
    onProtoPoisoning: "error",
    onConstructorPoisoning: "error",
  });

  app.setErrorHandler((err, request, reply) => {
    const apiErr = err instanceof ApiError ? err : fromFastifyError(err as { statusCode?: number; code?: string; message: string });
    if (apiErr.kind === "internal") request.log.error({ err }, "internal error");
    return sendError(reply, apiErr);
  });
  const access = opts.access;
  app.decorateRequest("apiKey", undefined);
  if (opts.corsOrigins && opts.corsOrigins.length > 0) {
    void app.register(cors, {
      origin: opts.corsOrigins.includes("*") ? "*" : opts.corsOrigins,
      methods: ["GET", "POST", "OPTIONS"],
      allowedHeaders: ["authorization", "x-api-key", "content-type", "x-priority", "x-request-timeout", "traceparent"],
      exposedHeaders: ["x-trace-id", "retry-after", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"],
      maxAge: 600,
    });
  }
  // Node's requestTimeout stops at the headers; a body dripped byte by byte (slowloris)
  // is cut here: 408 and the socket closed, at the read timeout.
  const readTimeoutMs = (opts.readTimeoutSeconds ?? 30) * 1000;
  app.addHook("onRequest", (request, _reply, done) => {
    const raw = request.raw;
    if (raw.method === "GET" || raw.method === "HEAD" || raw.complete) return done();
    const timer = setTimeout(() => {
      if (raw.complete || raw.socket.destroyed) return;
      const err = new ApiError("request_timeout", `The request body was not received within ${readTimeoutMs / 1000} s.`, { code: "read_timeout" });
      const body = JSON.stringify(err.toEnvelope());
      raw.socket.end(`HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
      raw.socket.destroySoon();
    }, readTimeoutMs);
    timer.unref();
    raw.once("end", () => clearTimeout(timer));
    raw.once("close", () => clearTimeout(timer));
    done();
  });

  // Every route is protected when keys are configured, but for the public areas; the
  // WebSocket may instead authenticate with its first frame.
  app.addHook("onRequest", async (request) => {
    if (request.method === "OPTIONS") return;
    const path = request.url.split("?")[0]!;
    if (areaOf(path) === "admin") return access.authorizeAdmin(AccessControl.presented(request.headers), request.socket.remoteAddress);
    if (!access.enabled) return;
    if (access.isPublic(path)) return;
    const token = AccessControl.presented(request.headers);
    if (path === "/v1/ws" && token === undefined) return;
    try {
      request.apiKey = access.authenticate(token);
    } catch (err) {
      // A refused WebSocket upgrade: answer and drop the socket, which the HTTP server
      // no longer tracks (it would otherwise outlive close()).
      if (request.headers.upgrade !== undefined) {
        const e = err as ApiError;
        request.raw.socket.end(`HTTP/1.1 ${e.status} Unauthorized\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n${JSON.stringify(e.toEnvelope())}`);
        request.raw.socket.destroySoon();
      }
      throw err;
    }
  });

  app.setNotFoundHandler((request, reply) =>
    sendError(reply, new ApiError("not_found", `Unknown route: ${request.method} ${request.url.split("?")[0]}`, { code: "unknown_route" })),
  );

  // The chat page: three static files, read once, no build step.
  const webRoot = new URL("../../web/", import.meta.url);
  const page = (file: string, type: string) => {
    const body = readFileSync(new URL(file, webRoot));
    return async (_req: FastifyRequest, reply: FastifyReply) => reply.type(type).header("cache-control", "no-cache").send(body);
  };
  app.get("/", page("index.html", "text/html; charset=utf-8"));
  app.get("/chat.js", page("chat.js", "text/javascript; charset=utf-8"));
  app.get("/chat.css", page("chat.css", "text/css; charset=utf-8"));

  app.get("/metrics", async (_req, reply) => {
    if (!opts.telemetry.metrics.enabled) throw new ApiError("not_found", "Metrics are off (--metrics off).", { code: "metrics_off" });
    const metrics = opts.telemetry.metrics.registry;
    return reply.type(metrics.contentType).send(await metrics.metrics());
  });

  registerModelRoutes(app, registry, () => opts.isAccepting?.() ?? true);

  /** Runs one generation and answers it as JSON or SSE; reports it once, however it ends. */
  async function serve(request: FastifyRequest, reply: FastifyReply, prepare: Prepare) {
    const endpoint = prepare === prepareChat ? "chat" : "completions";
    const telemetry = new RequestTelemetry(opts.telemetry, { id: request.id, endpoint, transport: "http", route: `POST ${request.url.split("?")[0]}`, headers: request.headers });
    if (telemetry.traceId) reply.header("x-trace-id", telemetry.traceId);
    const outcome: RequestOutcome = { status: 200 };
    let lease: ReturnType<AccessControl["admit"]> | undefined;
    let prepared: PreparedGeneration | undefined;
    try {
      if (opts.isAccepting && !opts.isAccepting()) {
        throw new ApiError("unavailable", "The server is shutting down.", { retryAfter: 5, code: "shutting_down" });
      }
      lease = access.admit(request.apiKey);
      reply.headers(lease.headers);
      const abort = new AbortController();
      // 'close' before the response finished means the client went away.
      reply.raw.on("close", () => {
        if (!reply.raw.writableFinished) abort.abort();
      });
      prepared = await prepare(
        registry,
        request.body,
        { headers: request.headers, signal: abort.signal, defaultTimeoutSeconds: opts.requestTimeoutSeconds },
        opts.telemetry,
      );
      telemetry.prepare(prepared);
      const { entry, meta, stream, includeUsage, echo, gen } = prepared;
      if (stream) {
        const transport = new SseTransport(
          reply.raw,
          () => {
            // Hijacked replies skip fastify's header handling: carry its headers by hand.
            for (const [k, v] of Object.entries(reply.getHeaders())) if (v !== undefined) reply.raw.setHeader(k, v as string);
            reply.hijack();
          },
          opts.maxStreamBufferBytes,
          () => abort.abort(),
        );
        const sink = new ChunkStreamSink(meta, transport, includeUsage, echo);
        noteOutcome(outcome, await entry.scheduler.submit(gen, sink));
        if (transport.earlyError) throw transport.earlyError;
        return reply;
      }
      const sink = new JsonSink(meta, echo);
      noteOutcome(outcome, await entry.scheduler.submit(gen, sink));
      const result = sink.result!;
      if ("error" in result) throw result.error;
      return reply.send(result.body);
    } catch (err) {
      const apiErr = toApiError(err);
      outcome.status = apiErr.status;
      outcome.error = apiErr;
      throw apiErr;
    } finally {
      prepared?.lease.release();
      lease?.release(outcome.usage ? outcome.usage.promptTokens + outcome.usage.completionTokens : 0);
      telemetry.finish(outcome);
    }
  }

  const socketLimits = { ...DEFAULT_SOCKET_LIMITS, ...opts.socketLimits };
  void app.register(websocket, { options: { maxPayload: opts.maxFrameBytes ?? opts.maxBodyBytes } });
  void app.register(async (instance) => {
    instance.get("/v1/ws", { websocket: true }, (socket, request) => {
      new SocketSession(socket, registry, {
        access,
        apiKey: request.apiKey,
        telemetry: opts.telemetry,
        limits: socketLimits,
        requestTimeoutSeconds: opts.requestTimeoutSeconds,
        isAccepting: () => opts.isAccepting?.() ?? true,
        headers: request.headers,
      });
    });
  });

  app.post("/v1/chat/completions", (request, reply) => serve(request, reply, prepareChat));
  app.post("/v1/completions", (request, reply) => serve(request, reply, prepareCompletion));

  return app;
}
